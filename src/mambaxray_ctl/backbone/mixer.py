"""Mamba mixer with 1, 2 (Vim v2) or 4 (ARM v3) scan directions over a patch sequence.

Parameter names follow the official checkpoints: ``in_proj``, ``out_proj`` and, per direction
suffix ``s`` in ``["", "_b", "_c", "_c_b"]``, ``conv1d{s}``, ``x_proj{s}``, ``dt_proj{s}``,
``A{s}_log``, ``D{s}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambaxray_ctl.ops import causal_conv1d_silu_cpu, resolve_impl, selective_scan

if TYPE_CHECKING:
    from mambaxray_ctl.backbone.config import VisionMambaConfig


@dataclass(frozen=True)
class ScanDirection:
    """One scan: parameter-name suffix, column-major order or not, reversed or not."""

    suffix: str
    column: bool
    reverse: bool


SCAN_DIRECTIONS: tuple[ScanDirection, ...] = (
    ScanDirection("", column=False, reverse=False),  # row forward
    ScanDirection("_b", column=False, reverse=True),  # row backward
    ScanDirection("_c", column=True, reverse=False),  # column forward
    ScanDirection("_c_b", column=True, reverse=True),  # column backward
)


def column_major_index(
    grid_size: tuple[int, int], cls_index: int | None = None, device: torch.device | None = None
) -> Tensor:
    """Token indices that reorder a row-major sequence into column-major order.

    ``x[..., index]`` removes the class token (at ``cls_index``, if any), walks the (H, W) patch
    grid column by column and re-inserts the class token at the same index. The inverse
    permutation is ``index.argsort()``.
    """
    rows, cols = grid_size
    order = torch.arange(rows * cols, device=device).view(rows, cols).t().reshape(-1)
    if cls_index is None:
        return order
    if not 0 <= cls_index <= rows * cols:
        raise ValueError(f"cls_index {cls_index} out of range for a {rows}x{cols} grid")
    order = order + (order >= cls_index).long()  # patch number -> token index
    cls = torch.tensor([cls_index], device=device)
    return torch.cat([order[:cls_index], cls, order[cls_index:]])


def column_major(
    x: Tensor, grid_size: tuple[int, int], cls_index: int | None, inverse: bool = False
) -> Tensor:
    """``x[..., column_major_index(grid_size, cls_index)]`` (or, ``inverse``, the permutation back) for a
    (..., L) ``x``, as slices, a transposed copy and concatenations: several times faster on CPU than a
    gather along the last dimension, forward and backward."""
    rows, cols = (grid_size[1], grid_size[0]) if inverse else grid_size
    if cls_index is None:
        return x.unflatten(-1, (rows, cols)).transpose(-1, -2).flatten(-2)
    patches = torch.cat([x[..., :cls_index], x[..., cls_index + 1 :]], dim=-1)
    patches = patches.unflatten(-1, (rows, cols)).transpose(-1, -2).flatten(-2)
    cls = x[..., cls_index : cls_index + 1]
    return torch.cat([patches[..., :cls_index], cls, patches[..., cls_index:]], dim=-1)


def _linear_channel_major(x: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(x, weight).transpose(1, 2)`` for ``x`` (B, L, K), as a contiguous (B, out, L) tensor
    computed as ``weight @ x^T`` (no transposed copy of the result)."""
    if x.shape[0] == 1:
        return torch.mm(weight, x[0].t()).unsqueeze(0)
    return torch.matmul(weight, x.transpose(1, 2)).contiguous()


def causal_depthwise_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, reverse: bool = False) -> Tensor:
    """``conv1d(x, weight, bias, padding=K - 1, groups=channels)[..., :L]`` as K shifted multiply-adds.

    ``x``: (B, C, L), ``weight``: (C, 1, K). Same sums in the same order as the convolution, several
    times faster on CPU than the depthwise convolution kernel for Mamba's K = 4. ``reverse=True`` is the
    convolution of the time-flipped ``x``, flipped back (causal in the backward direction): it reads
    ``x[l + K - 1 - k]`` where the forward one reads ``x[l - K + 1 + k]``. The sums run in the promoted
    dtype (float32 for bfloat16 ``x`` and float32 weights, as in causal-conv1d's kernel); the output has
    ``x``'s dtype, so that under autocast the scan gets bfloat16 activations, not float32 ones.
    """
    length, width = x.shape[-1], weight.shape[-1]
    padded = F.pad(x, (0, width - 1) if reverse else (width - 1, 0))
    w = weight[:, 0, :, None]  # (C, K, 1)

    def tap(k: int) -> Tensor:
        start = width - 1 - k if reverse else k
        return padded[..., start : start + length]

    out = tap(0) * w[:, 0] if bias is None else torch.addcmul(bias[:, None], tap(0), w[:, 0])
    for k in range(1, width):
        out.addcmul_(tap(k), w[:, k])  # in place: addcmul's backward needs no output
    return out.to(x.dtype)


class MambaMixer(nn.Module):
    """Selective-state-space mixer; ``(B, L, D) -> (B, L, D)``.

    Per direction: depthwise causal conv + SiLU, ``x_proj`` -> (dt, B, C), ``dt_proj`` (its bias
    goes into the scan as ``delta_bias`` with softplus), selective scan with ``D`` skip, gated by
    ``silu(z)``. Backward directions act as if ``xz`` were flipped and the output flipped back (the conv
    and the scan walk the sequence backwards instead of copying it); column
    directions reorder ``xz`` to column-major order and map the output back. The directions are
    summed, averaged (always with 4, with 2 when ``divide_out``) and projected by ``out_proj``.
    """

    def __init__(self, config: VisionMambaConfig) -> None:
        super().__init__()
        self.d_inner = config.d_inner
        self.d_state = config.d_state
        self.dt_rank = config.resolved_dt_rank
        self.directions = SCAN_DIRECTIONS[: config.scan_directions]
        self.divide_out = config.divide_out or config.scan_directions == 4
        self.ssm_impl = config.ssm_impl
        self.dt_init_range = (config.dt_min, config.dt_max, config.dt_init_floor)

        self.in_proj = nn.Linear(config.embed_dim, 2 * self.d_inner, bias=False)
        for direction in self.directions:
            s = direction.suffix
            conv = nn.Conv1d(
                self.d_inner,
                self.d_inner,
                kernel_size=config.d_conv,
                groups=self.d_inner,
                padding=config.d_conv - 1,
            )
            setattr(self, f"conv1d{s}", conv)
            setattr(self, f"x_proj{s}", nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False))
            setattr(self, f"dt_proj{s}", nn.Linear(self.dt_rank, self.d_inner))
            a_log = nn.Parameter(torch.empty(self.d_inner, self.d_state, dtype=torch.float32))
            d_skip = nn.Parameter(torch.empty(self.d_inner, dtype=torch.float32))
            a_log._no_weight_decay = d_skip._no_weight_decay = True
            self.register_parameter(f"A{s}_log", a_log)
            self.register_parameter(f"D{s}", d_skip)
        self.out_proj = nn.Linear(self.d_inner, config.embed_dim, bias=False)
        self.reset_ssm_parameters()

    @property
    def no_weight_decay_names(self) -> list[str]:
        """Names of the ``A*_log`` and ``D*`` parameters (Mamba excludes them from weight decay)."""
        return [name for d in self.directions for name in (f"A{d.suffix}_log", f"D{d.suffix}")]

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba's init of every direction: ``dt_proj`` weight uniform ±dt_rank^-0.5, bias =
        softplus^-1(dt) with dt log-uniform in [dt_min, dt_max] floored at dt_init_floor;
        ``A_log = log(1..N)`` per channel; ``D = 1``."""
        dt_min, dt_max, dt_floor = self.dt_init_range
        for direction in self.directions:
            s = direction.suffix
            dt_proj: nn.Linear = getattr(self, f"dt_proj{s}")
            bound = self.dt_rank**-0.5
            nn.init.uniform_(dt_proj.weight, -bound, bound)
            log_dt = torch.rand_like(dt_proj.bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
            dt = log_dt.exp().clamp(min=dt_floor)
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            a_log: Tensor = getattr(self, f"A{s}_log")
            a_log.copy_(torch.arange(1, self.d_state + 1, dtype=a_log.dtype, device=a_log.device).log())
            getattr(self, f"D{s}").fill_(1.0)

    def forward(
        self, hidden_states: Tensor, grid_size: tuple[int, int] | None = None, cls_index: int | None = None
    ) -> Tensor:
        """Mix ``hidden_states`` (B, L, D) laid out row-major over ``grid_size`` (needed by column scans)
        with the class token, if any, at ``cls_index``."""
        # (B, 2·d_inner, L) computed directly in channel-major layout (as mamba-ssm does), so that the
        # x and z halves are contiguous (for batch 1) and need no transposed copy before the scan.
        xz = _linear_channel_major(hidden_states, self.in_proj.weight)
        if any(direction.column for direction in self.directions):
            self._check_grid(hidden_states.shape[1], grid_size, cls_index)

        # Backward directions run on the unflipped sequence: the conv and the scan walk it backwards. The
        # column directions share one reordered xz, and their summed output is mapped back once.
        outputs = {False: None, True: None}  # column or not -> summed output in that order
        xz_column = None
        for direction in self.directions:
            if direction.column and xz_column is None:
                xz_column = column_major(xz, grid_size, cls_index)
            y = self._scan(xz_column if direction.column else xz, direction.suffix, direction.reverse)
            summed = outputs[direction.column]
            outputs[direction.column] = y if summed is None else summed + y
        out = outputs[False]
        if outputs[True] is not None:
            out = out + column_major(outputs[True], grid_size, cls_index, inverse=True)
        if self.divide_out and len(self.directions) > 1:
            out = out / len(self.directions)
        return self.out_proj(out.transpose(1, 2))

    @staticmethod
    def _check_grid(length: int, grid_size: tuple[int, int] | None, cls_index: int | None) -> None:
        if grid_size is None:
            raise ValueError("column scan directions need the patch grid_size of the sequence")
        expected = grid_size[0] * grid_size[1] + int(cls_index is not None)
        if length != expected:
            raise ValueError(
                f"sequence length {length} does not match grid {tuple(grid_size)} "
                f"{'with' if cls_index is not None else 'without'} a class token (expected {expected})"
            )

    def _scan(self, xz: Tensor, suffix: str, reverse: bool = False) -> Tensor:
        """One direction on an already reordered ``xz`` (B, 2·d_inner, L) -> (B, d_inner, L); ``reverse``
        gives the same result as flipping ``xz`` along L, scanning forwards and flipping the output back."""
        conv: nn.Conv1d = getattr(self, f"conv1d{suffix}")
        x_proj: nn.Linear = getattr(self, f"x_proj{suffix}")
        dt_proj: nn.Linear = getattr(self, f"dt_proj{suffix}")
        a_log: Tensor = getattr(self, f"A{suffix}_log")
        d_skip: Tensor = getattr(self, f"D{suffix}")

        x, z = xz.chunk(2, dim=1)
        if resolve_impl(self.ssm_impl, x.device) == "cpu_fused":
            x = causal_conv1d_silu_cpu(x, conv.weight, conv.bias, reverse)
        else:
            x = F.silu(causal_depthwise_conv1d(x, conv.weight, conv.bias, reverse))
        dt, b, c = x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # (B, d_inner, L) directly; the dt_proj bias is applied inside the scan.
        dt = _linear_channel_major(dt, dt_proj.weight)
        return selective_scan(
            x,
            dt,
            -torch.exp(a_log.float()),
            b.transpose(1, 2),
            c.transpose(1, 2),
            D=d_skip.float(),
            z=z,
            delta_bias=dt_proj.bias.float(),
            delta_softplus=True,
            impl=self.ssm_impl,
            reverse=reverse,
        )
