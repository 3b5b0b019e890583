"""mamba-ssm's CUDA selective scan behind our signature, imported lazily.

``mamba_ssm`` is never imported at module load: without a CUDA build of its kernels the import raises
(not always an ImportError), and even when it works it takes seconds. Usable means that both
``selective_scan_fn`` and mamba-ssm's compiled extension ``selective_scan_cuda`` import: mamba-ssm can be
installed without that extension (``MAMBA_SKIP_CUDA_BUILD``; newer sources build it only with
``MAMBA_KEEP_CUDA_BUILD=TRUE``), and a release that guards its import fails only at the first call.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

import torch
from torch import Tensor

INSTALL_HINT = (
    "`make setup-cuda` (builds mamba-ssm's kernels into the project's venv; needs nvcc and a CUDA build "
    "of torch), or by hand: MAMBA_FORCE_BUILD=TRUE MAMBA_KEEP_CUDA_BUILD=TRUE "
    "pip install --no-build-isolation --no-binary mamba-ssm 'mambaxray-ctl[cuda]'"
)
# Input dtypes that mamba-ssm's kernel compiles for (its weights A, D and delta_bias stay float32).
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EXTENSION = "selective_scan_cuda"


def _installed_version() -> str:
    try:
        return f"mamba-ssm {version('mamba-ssm')}"
    except PackageNotFoundError:
        return "mamba-ssm"


def _describe_import_error(err: Exception) -> str:
    """What is missing or broken, from the error raised while importing mamba-ssm's selective scan."""
    missing = err.name if isinstance(err, ModuleNotFoundError) else None
    if missing == "mamba_ssm":
        return "mamba-ssm is not installed"
    if missing == EXTENSION:
        return (
            f"{_installed_version()} is installed without its compiled CUDA extension {EXTENSION} "
            "(it was built with MAMBA_SKIP_CUDA_BUILD, or by a mamba-ssm that builds the extension "
            "only when asked to with MAMBA_KEEP_CUDA_BUILD=TRUE)"
        )
    return f"{_installed_version()} failed to import ({type(err).__name__}: {err})"


@functools.cache
def _import_selective_scan_fn() -> tuple[Callable[..., object] | None, str]:
    """``(selective_scan_fn, "")`` or ``(None, what is missing)``; tried once per process."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        importlib.import_module(EXTENSION)
    except Exception as err:  # ImportError, or e.g. a CUDA/ABI error raised while importing
        return None, _describe_import_error(err)
    return selective_scan_fn, ""


def mamba_ssm_problem() -> str | None:
    """Why mamba-ssm's CUDA selective scan cannot be used here, or ``None`` when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return _import_selective_scan_fn()[1] or None


def mamba_ssm_available() -> bool:
    """Whether mamba-ssm's CUDA selective scan is usable (the first call imports it)."""
    return mamba_ssm_problem() is None


def require_mamba_ssm() -> Callable[..., object]:
    """mamba-ssm's ``selective_scan_fn``; ``ImportError`` saying what is missing and how to install it."""
    fn, reason = _import_selective_scan_fn()
    if fn is None:
        raise ImportError(
            f"impl='cuda' needs mamba-ssm's CUDA selective scan, but {reason}. Install it with {INSTALL_HINT}"
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
