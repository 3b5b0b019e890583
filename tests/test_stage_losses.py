"""Contrastive loss: values, the gathered negatives under 2-process DDP, optimiser helpers."""

from __future__ import annotations

import itertools
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from mambaxray_ctl.stages.losses import ContrastiveLoss, LogitScale, gather_with_grad
from mambaxray_ctl.stages.optim import decay_groups, warmup_cosine


def _manual_clip(image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = scale * image @ text.T
    n = len(image)
    i2t = -torch.stack([logits[i].log_softmax(0)[i] for i in range(n)]).mean()
    t2i = -torch.stack([logits[:, j].log_softmax(0)[j] for j in range(n)]).mean()
    return (i2t + t2i) / 2


def test_contrastive_loss_matches_manual_symmetric_infonce() -> None:
    torch.manual_seed(0)
    image, text = torch.randn(6, 8), torch.randn(6, 8)
    torch.testing.assert_close(ContrastiveLoss()(image, text, 14.3), _manual_clip(image, text, 14.3))


def test_logit_scale_initialised_and_clamped() -> None:
    scale = LogitScale(0.07, math.log(100.0))
    assert scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        scale.log_scale.fill_(10.0)
    assert scale().item() == pytest.approx(100.0, rel=1e-6)


def test_without_process_group_gather_is_identity() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _encoder_and_scale() -> tuple[nn.Linear, LogitScale]:
    torch.manual_seed(0)
    return nn.Linear(8, 5), LogitScale(0.1)  # same weights on both ranks


def _ddp_worker(rank: int, world: int, port: int, queue: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    encoder, scale = _encoder_and_scale()
    inputs, texts = torch.randn(8, 8), torch.randn(8, 5)
    local = slice(rank * 4, rank * 4 + 4)
    loss = ContrastiveLoss(gather=True)(encoder(inputs[local]), texts[local], scale())
    loss.backward()
    grads = [p.grad.clone() for p in [*encoder.parameters(), scale.log_scale]]
    for grad in grads:  # what DDP does: average over ranks
        dist.all_reduce(grad)
        grad /= world
    queue.put((rank, loss.item(), [g.numpy() for g in grads]))
    dist.destroy_process_group()


def test_gathered_loss_and_gradients_on_two_ranks_equal_single_process() -> None:
    """Every parameter, the learnable logit scale included (it sees the whole batch on every rank, so
    its gradient must not be scaled by the world size as the features' is). The loss applies the
    scaling itself: the caller only averages gradients as DDP does."""
    encoder, scale = _encoder_and_scale()
    inputs, texts = torch.randn(8, 8), torch.randn(8, 5)
    single = ContrastiveLoss()(encoder(inputs), texts, scale())
    single.backward()
    expected = [p.grad.clone() for p in [*encoder.parameters(), scale.log_scale]]

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.spawn(_ddp_worker, args=(2, free_port(), queue), nprocs=2, join=True)
    results = [queue.get(timeout=60) for _ in range(2)]
    for _, loss, grads in results:
        assert loss == pytest.approx(single.item(), abs=1e-6)
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(torch.from_numpy(got).reshape(want.shape), want, atol=1e-6, rtol=1e-5)


def test_decay_groups_leave_out_vectors_logs_and_named() -> None:
    model = nn.ModuleDict({"lin": nn.Linear(4, 4), "norm": nn.LayerNorm(4)})
    model.register_parameter("A_log", nn.Parameter(torch.zeros(4, 2)))
    model.register_parameter("pos_embed", nn.Parameter(torch.zeros(1, 3, 4)))
    frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)
    model.register_parameter("frozen", frozen)
    groups = decay_groups(model.named_parameters(), 0.05, no_decay={"pos_embed"})
    decayed = {id(p) for p in groups[0]["params"]}
    assert decayed == {id(model["lin"].weight)}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert id(frozen) not in decayed | {id(p) for p in groups[1]["params"]}


def test_warmup_cosine_shape() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_cosine(optimizer, total_steps=10, warmup_steps=0.2, min_lr_ratio=0.1)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.5) and rates[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(rates[1:]))
    assert rates[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
