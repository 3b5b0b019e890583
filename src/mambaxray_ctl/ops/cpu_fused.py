"""Fused C++ selective scan for CPU tensors, with a hand-written backward.

The extension (``csrc/selective_scan_cpu.cpp``) is compiled on first use with
``torch.utils.cpp_extension.load`` and cached in torch's extension folder (``TORCH_EXTENSIONS_DIR``).
It targets the vector ISA that torch detected (``torch.backends.cpu.get_cpu_capability()``); the ISA is
part of the extension name, so machines that share a cache never load a build they cannot run.
If it cannot be built, :func:`selective_scan_cpu_fused` warns once with the reason and runs the
reference instead.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from mambaxray_ctl.ops.reference import compute_dtype, flip_time, reversed_scan, selective_scan_reference

_SOURCE = Path(__file__).parent / "csrc" / "selective_scan_cpu.cpp"
# -fno-trapping-math lets gcc if-convert the clamps and selects of the vectorised math (without it
# only AVX-512 masking vectorises those loops); it changes no result, only floating-point trap flags.
_CFLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"]
_ISA_FLAGS = {
    "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
    "AVX2": ["-mavx2", "-mfma"],
}


def _load_extension() -> None:
    """Compile (or reuse the cached build of) the extension; it registers ``torch.ops.mambaxray_ctl``."""
    from torch.utils.cpp_extension import load

    isa = torch.backends.cpu.get_cpu_capability()
    load(
        name=f"mambaxray_ctl_selective_scan_cpu_{isa.lower()}",
        sources=[str(_SOURCE)],
        extra_cflags=_CFLAGS + _ISA_FLAGS.get(isa, []),
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )


def _summarise(err: Exception) -> str:
    """One line of a (possibly very long) build log: the first compiler ``error:`` line, else the first."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [""]
    line = next((line for line in lines if "error:" in line.lower()), lines[0])
    return f"{type(err).__name__}: {line[:300]}"


@functools.cache
def _build_error() -> str | None:
    """Build once per process; ``None`` on success, else the reason (warned about once)."""
    try:
        _load_extension()
    except Exception as err:  # no compiler, missing headers, build or load error
        reason = _summarise(err)
        warnings.warn(
            f"mambaxray_ctl: the fused CPU selective scan could not be built ({reason}); "
            "falling back to the slower pure-PyTorch reference.",
            RuntimeWarning,
            stacklevel=3,
        )
        return reason
    return None


def cpu_fused_available() -> bool:
    """Whether the fused CPU kernel is usable (builds it on the first call)."""
    return _build_error() is None


def _prepare(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype).contiguous()


def _kernel_args(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
) -> list[Tensor | None]:
    """The op's tensor arguments in the compute dtype; B and C keep their strides (the op re-lays them)."""
    dtype = compute_dtype(u.dtype)
    return [
        *(_prepare(t, dtype) for t in (u, delta, A)),
        B.to(dtype),
        C.to(dtype),
        *(_prepare(t, dtype) for t in (D, z, delta_bias)),
    ]


def _cast_grad(grad: Tensor, like: Tensor | None, needed: bool) -> Tensor | None:
    return grad.to(like.dtype) if needed and like is not None else None


def _fused_forward(
    tensors: tuple[Tensor | None, ...], delta_softplus: bool, reverse: bool
) -> tuple[Tensor, Tensor]:
    """The forward op on ``(u, delta, A, B, C, D, z, delta_bias)``: ``out`` in ``u``'s dtype, last state."""
    out, last_state = torch.ops.mambaxray_ctl.selective_scan_fwd(
        *_kernel_args(*tensors), delta_softplus, reverse
    )
    return out.to(tensors[0].dtype), last_state


class _SelectiveScanCPU(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor | None,
        z: Tensor | None,
        delta_bias: Tensor | None,
        delta_softplus: bool,
        return_last_state: bool,
        reverse: bool,
    ) -> Tensor | tuple[Tensor, Tensor]:
        out, last_state = _fused_forward((u, delta, A, B, C, D, z, delta_bias), delta_softplus, reverse)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.delta_softplus = delta_softplus
        ctx.reverse = reverse
        return (out, last_state) if return_last_state else out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: Tensor, dlast: Tensor | None = None) -> tuple[Tensor | None, ...]:
        inputs = ctx.saved_tensors
        dtype = compute_dtype(inputs[0].dtype)
        args = _kernel_args(*inputs)
        if ctx.reverse:  # the backward op has no reverse flag: run it on the time-flipped problem
            args = flip_time(args)
            dout = dout.flip(-1)
        grads = torch.ops.mambaxray_ctl.selective_scan_bwd(
            *args, ctx.delta_softplus, _prepare(dout, dtype), _prepare(dlast, dtype)
        )
        if ctx.reverse:
            grads = flip_time(grads)
        needs = ctx.needs_input_grad
        return (
            *(_cast_grad(g, t, n) for g, t, n in zip(grads, inputs, needs, strict=False)),
            None,
            None,
            None,
        )


def selective_scan_cpu_fused(
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
    reverse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan on CPU tensors with the fused kernel (reference fallback if it cannot be built).

    ``reverse``: scan from the last position to the first (as flipping the inputs along L, scanning and
    flipping ``out`` back, without the copies).
    """
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    if not cpu_fused_available():
        if reverse:
            return reversed_scan(selective_scan_reference, *tensors, delta_softplus, return_last_state)
        return selective_scan_reference(*tensors, delta_softplus, return_last_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _SelectiveScanCPU.apply(*tensors, delta_softplus, return_last_state, reverse)
    # No gradient needed (e.g. inference mode): call the op directly, without the autograd node and
    # the tensors it would save for the backward pass.
    out, last_state = _fused_forward(tensors, delta_softplus, reverse)
    return (out, last_state) if return_last_state else out
