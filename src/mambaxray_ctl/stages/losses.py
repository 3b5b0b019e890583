"""Symmetric InfoNCE (CLIP) loss with negatives gathered across ranks, open_clip style."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mambaxray_ctl.distributed import distributed_world


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``factor`` in backward."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, features: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return features.view_as(features)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


def gather_with_grad(features: Tensor) -> Tensor:
    """All ranks' ``features`` concatenated along dim 0 for a loss of the GLOBAL batch.

    Every rank computes the same global loss but back-propagates only through its own slice, so the
    per-rank gradients of the features SUM to the global gradient while DDP AVERAGES parameter
    gradients over ranks: the local slice's gradient is multiplied by the world size here, which makes
    DDP's average equal the single-process gradient. Parameters used after the gather on every rank
    (a learnable logit scale) get the full gradient on each rank and are left unscaled.

    Every rank must pass the same shape. Identity without a process group.
    """
    rank, world = distributed_world()
    if world == 1:
        return features
    chunks = [torch.empty_like(features) for _ in range(world)]
    dist.all_gather(chunks, features.detach().contiguous())
    chunks[rank] = _ScaleGradient.apply(features, float(world))
    return torch.cat(chunks)


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE (CLIP): the mean of the image→text and text→image cross-entropies.

    Features are L2-normalised here. With ``gather`` the negatives come from every rank: each rank
    computes the loss of the GLOBAL batch (its value equals the single-process loss on the
    concatenated batch) and, after DDP's gradient average, every parameter has the single-process
    gradient (:func:`gather_with_grad` applies the scaling; callers do nothing more). Without it each
    rank's batch holds its own negatives.
    """

    def __init__(self, gather: bool = True) -> None:
        super().__init__()
        self.gather = gather

    def forward(
        self, image: Tensor, text: Tensor, logit_scale: Tensor | float, gather: bool | None = None
    ) -> Tensor:
        """``gather`` replaces the module's setting for one call (validation keeps negatives per rank)."""
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        if self.gather if gather is None else gather:
            image, text = gather_with_grad(image), gather_with_grad(text)
        logits = logit_scale * image @ text.T
        targets = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


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
