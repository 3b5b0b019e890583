"""Optimiser pieces shared by the stages: weight-decay groups and a per-step warm-up + cosine schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def decay_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    no_decay: Iterable[str] = (),
) -> list[dict]:
    """Two AdamW groups: decayed matrices, and undecayed 1-D tensors (norms, biases, ``D``, scales)
    plus the named parameters in ``no_decay`` (``A_log``, position embeddings, class token).

    Frozen parameters are left out. Empty groups are dropped.
    """
    skip = set(no_decay)
    decay, plain = [], []
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        undecayed = param.ndim <= 1 or name in skip or name.endswith("_log")
        (plain if undecayed else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def warmup_cosine(
    optimizer: Optimizer, total_steps: int, warmup_steps: int | float = 0, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warm-up from 0, then a half-cycle cosine down to ``min_lr_ratio`` × the base rate, per step.

    ``warmup_steps`` below 1 is a fraction of ``total_steps``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    warmup = round(warmup_steps * total_steps) if 0 < warmup_steps < 1 else int(warmup_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
