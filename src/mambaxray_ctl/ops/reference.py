"""Readable pure-PyTorch selective scan: the specification every fast path is tested against.

Shapes (mamba-ssm's legend): ``u, delta, z: (B, D, L)``, ``A: (D, N)``, ``B, C: (B, N, L)``,
``D, delta_bias: (D,)``. The recurrence per channel ``d`` and state ``n`` is::

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t = <C_t, h_t> + D * u_t,   out_t = y_t * silu(z_t)

The loop iterates over ``unbind``-ed time slices: indexing ``x[:, :, t]`` inside a differentiable
loop makes autograd allocate a full ``(B, D, L, N)`` gradient per step (quadratic memory and time).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The scan runs in at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with autograd; returns ``out (B, D, L)`` and optionally ``last_state (B, D, N)``."""
    out_dtype = u.dtype
    dtype = compute_dtype(u.dtype)
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)

    decay = torch.exp(torch.einsum("bdl,dn->lbdn", delta, A))
    drive = torch.einsum("bdl,bnl,bdl->lbdn", delta, B, u)
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    states = []
    for decay_t, drive_t in zip(decay.unbind(0), drive.unbind(0), strict=True):
        state = decay_t * state + drive_t
        states.append(state)
    y = torch.einsum("lbdn,bnl->bdl", torch.stack(states), C)

    if D is not None:
        y = y + u * D.to(dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(dtype))
    y = y.to(out_dtype)
    return (y, state) if return_last_state else y


# Positions, in the scan's argument order (u, delta, A, B, C, D, z, delta_bias), of the time-axis inputs.
TIME_AXIS_INPUTS = frozenset({0, 1, 3, 4, 6})


def flip_time(tensors: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Flip along L the scan inputs (or their gradients, same order) with a time axis: u, delta, B, C, z."""
    return [t.flip(-1) if i in TIME_AXIS_INPUTS and t is not None else t for i, t in enumerate(tensors)]


def reversed_scan(
    scan: Callable[..., Tensor | tuple[Tensor, Tensor]], *args: Any
) -> Tensor | tuple[Tensor, Tensor]:
    """``scan(*args)`` walking the sequence backwards; ``args`` in the scan's order (u, delta, A, B, C, D, z,
    delta_bias, delta_softplus, return_last_state). Flips the time-axis inputs along L, scans and flips
    ``out`` back (``last_state`` is the state after the first position)."""
    result = scan(*flip_time(args[:8]), *args[8:])
    if isinstance(result, tuple):
        out, last_state = result
        return out.flip(-1), last_state
    return result.flip(-1)
