"""Symmetric InfoNCE (CLIP) loss with negatives gathered across ranks, open_clip style."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def distributed_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(features: Tensor) -> Tensor:
    """All ranks' ``features`` concatenated along dim 0; only the local slice keeps its gradient.

    Every rank must pass the same shape (use ``drop_last`` for training). Identity without DDP.
    """
    rank, world = distributed_world()
    if world == 1:
        return features
    chunks = [torch.empty_like(features) for _ in range(world)]
    dist.all_gather(chunks, features.detach().contiguous())
    chunks[rank] = features
    return torch.cat(chunks)


def clip_loss(image: Tensor, text: Tensor, logit_scale: Tensor | float, gather: bool = True) -> Tensor:
    """Mean of the image→text and text→image cross-entropies over the (gathered) batch.

    Features are L2-normalised here. With ``gather`` every rank computes the loss of the GLOBAL
    batch (so the value equals the single-process loss on the concatenated batch) and holds the
    exact gradient of that loss with respect to its own features.
    """
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    if gather:
        image, text = gather_with_grad(image), gather_with_grad(text)
    logits = logit_scale * image @ text.T
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def ddp_gradient_scale(gather: bool) -> int:
    """Factor to multiply a gathered loss by before ``backward`` under DDP.

    DDP averages parameter gradients over ranks, while with ``gather`` each rank's loss already
    covers the global batch and each rank back-propagates only through its own features: the
    per-rank gradients SUM to the global gradient. Scaling by the world size makes DDP's average
    equal the single-process gradient on the concatenated batch.
    """
    return distributed_world()[1] if gather else 1


class LogitScale(nn.Module):
    """Learnable ``log(1/τ)`` (init ``ln(1/0.07)``) clamped to ``[0, max_log_scale]`` when used."""

    def __init__(
        self, temperature: float = 0.07, max_log_scale: float = math.log(100.0), learnable: bool = True
    ):
        super().__init__()
        value = torch.tensor(math.log(1.0 / temperature))
        self.log_scale = nn.Parameter(value, requires_grad=learnable)
        self.max_log_scale = max_log_scale

    def forward(self) -> Tensor:
        return self.log_scale.clamp(0.0, self.max_log_scale).exp()
