"""mamba-ssm's CUDA selective scan behind our signature, imported lazily.

``mamba_ssm`` is never imported at module load: without a CUDA build of its kernels the import raises
(not always an ImportError), and even when it works it takes seconds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

INSTALL_HINT = "pip install 'mambaxray-ctl[cuda]'"
# Input dtypes that mamba-ssm's kernel compiles for (its weights A, D and delta_bias stay float32).
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _import_selective_scan_fn() -> tuple[Callable[..., object] | None, str]:
    """``(selective_scan_fn, "")`` or ``(None, why the import failed)``; tried once per process."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as err:  # ImportError, or e.g. a CUDA/ABI error raised while importing
        return None, f"{type(err).__name__}: {err}"
    return selective_scan_fn, ""


def mamba_ssm_available() -> bool:
    """Whether mamba-ssm's CUDA selective scan imports (the first call imports it)."""
    return torch.cuda.is_available() and _import_selective_scan_fn()[0] is not None


def require_mamba_ssm() -> Callable[..., object]:
    """mamba-ssm's ``selective_scan_fn``; ``ImportError`` with the install command when it is missing."""
    fn, reason = _import_selective_scan_fn()
    if fn is None:
        raise ImportError(
            f"impl='cuda' needs mamba-ssm with its CUDA kernels, which failed to import ({reason}). "
            f"Install it on a CUDA machine with: {INSTALL_HINT}"
        )
    return fn


def selective_scan_cuda(
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
    """Selective scan with mamba-ssm's kernel; casts inputs to the dtypes the kernel requires."""
    fn = require_mamba_ssm()
    if u.dtype not in CUDA_DTYPES:
        raise ValueError(f"impl='cuda' supports {CUDA_DTYPES} inputs, got {u.dtype}; use impl='reference'")
    dtype, f32 = u.dtype, torch.float32
    return fn(
        u,
        delta.to(dtype),
        A.to(f32),
        B.to(dtype),
        C.to(dtype),
        None if D is None else D.to(f32),
        None if z is None else z.to(dtype),
        None if delta_bias is None else delta_bias.to(f32),
        delta_softplus,
        return_last_state,
    )
