"""Fused C++ selective scan for CPU tensors, with a hand-written backward.

The extension (``csrc/selective_scan_cpu.cpp``) is compiled on first use with
``torch.utils.cpp_extension.load`` and cached in torch's extension folder (``TORCH_EXTENSIONS_DIR``).
It targets the vector ISA that torch detected (``torch.backends.cpu.get_cpu_capability()``: AVX-512,
AVX2, else 128-bit vectors); the ISA is part of the extension name, so machines that share a cache
never load a build they cannot run. It also holds the causal depthwise convolution + SiLU that feeds
the scan (:func:`causal_conv1d_silu_cpu`).
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

from mambaxray_ctl.ops.reference import compute_dtype, reversed_scan, selective_scan_reference

_SOURCE = Path(__file__).parent / "csrc" / "selective_scan_cpu.cpp"
# -fno-trapping-math lets gcc turn the selects of the vector math into blends; it changes no result, only
# floating-point trap flags. -ffp-contract=fast fuses a * b + c into one FMA instruction.
_CFLAGS = ["-O3", "-fopenmp", "-fno-trapping-math", "-ffp-contract=fast"]
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


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


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
    """The op's tensor arguments in the compute dtype; the (B, D, L) and (B, N, L) ones keep their strides
    (the op reads them in place), the parameters A, D and delta_bias are made contiguous."""
    dtype = compute_dtype(u.dtype)
    return [
        _cast(u, dtype),
        _cast(delta, dtype),
        _prepare(A, dtype),
        _cast(B, dtype),
        _cast(C, dtype),
        _prepare(D, dtype),
        _cast(z, dtype),
        _prepare(delta_bias, dtype),
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
        dout, dlast = _cast(dout, dtype), _prepare(dlast, dtype)
        grads = torch.ops.mambaxray_ctl.selective_scan_bwd(
            *_kernel_args(*inputs), ctx.delta_softplus, dout, dlast, ctx.reverse
        )
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


class _CausalConv1dSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor | None, reverse: bool) -> Tensor:
        args = _conv_args(x, weight, bias)
        ctx.save_for_backward(x, weight, bias)
        ctx.reverse = reverse
        return torch.ops.mambaxray_ctl.causal_conv1d_silu_fwd(*args, reverse).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias = ctx.saved_tensors
        args = _conv_args(x, weight, bias)
        dx, dweight, dbias = torch.ops.mambaxray_ctl.causal_conv1d_silu_bwd(
            *args, dout.to(args[0].dtype), ctx.reverse
        )
        needs = ctx.needs_input_grad
        return (
            _cast_grad(dx, x, needs[0]),
            _cast_grad(dweight.view(weight.shape), weight, needs[1]),
            _cast_grad(dbias, bias, needs[2]),
            None,
        )


def _conv_args(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """x (any strides) in the compute dtype, the (C, 1, K) weight as a contiguous (C, K) one, the bias."""
    dtype = compute_dtype(x.dtype)
    return x.to(dtype), _prepare(weight.flatten(1), dtype), _prepare(bias, dtype)


def causal_conv1d_silu_cpu(x: Tensor, weight: Tensor, bias: Tensor | None, reverse: bool = False) -> Tensor:
    """``silu(causal_depthwise_conv1d(x, weight, bias, reverse))`` in one pass of the fused extension
    (sums and SiLU in float32 for lower-precision ``x``, output in ``x``'s dtype); the backward pass
    recomputes the convolution. Needs :func:`cpu_fused_available`."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _CausalConv1dSiLU.apply(x, weight, bias, reverse)
    return torch.ops.mambaxray_ctl.causal_conv1d_silu_fwd(*_conv_args(x, weight, bias), reverse).to(x.dtype)
