"""One entry point for the selective scan; picks an implementation for the tensors' device.

``impl``: ``"auto"`` (mamba-ssm's kernel for CUDA tensors when it imports, the fused C++ kernel for
CPU tensors when it builds, else the reference), ``"reference"`` (pure PyTorch, any device),
``"cpu_fused"`` (CPU only) or ``"cuda"`` (CUDA only, needs mamba-ssm). ``"auto"`` on CUDA without a
usable mamba-ssm warns once (global rank 0); select ``"cuda"`` to make that an error instead.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Literal, get_args

import torch
from torch import Tensor

from mambaxray_ctl.distributed import global_rank
from mambaxray_ctl.ops.cpu_fused import cpu_fused_available, selective_scan_cpu_fused
from mambaxray_ctl.ops.cuda import (
    CUDA_DTYPES,
    INSTALL_HINT,
    mamba_ssm_problem,
    require_mamba_ssm,
    selective_scan_cuda,
)
from mambaxray_ctl.ops.reference import reversed_scan, selective_scan_reference

ScanImpl = Literal["auto", "reference", "cpu_fused", "cuda"]
SCAN_IMPLS: tuple[str, ...] = get_args(ScanImpl)
_DEVICE_OF_IMPL = {"cpu_fused": "cpu", "cuda": "cuda"}


@functools.cache
def _warn_reference_on_cuda(problem: str) -> None:
    """Warn, once per process and on global rank 0 only, that ``auto`` runs the reference on CUDA."""
    if global_rank() != 0:
        return
    warnings.warn(
        f"selective scan: impl='auto' runs the pure-PyTorch reference scan on CUDA tensors because "
        f"{problem}. It keeps a (batch, dim, L, d_state) state for the backward pass: many times the "
        "memory and time of mamba-ssm's kernel, more memory than a GPU has at the paper's batch sizes. "
        f"Install the kernel with {INSTALL_HINT}; select ssm_impl 'cuda' (a stage's backbone.ssm_impl) "
        "to make its absence an error.",
        RuntimeWarning,
        stacklevel=4,
    )


def resolve_impl(
    impl: str = "auto", device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> str:
    """The implementation that ``impl`` runs for tensors on ``device`` (of ``dtype``), e.g. for logging.

    Returns ``"reference"`` for ``"cpu_fused"`` when the extension cannot be built (after its warning),
    and for ``"auto"`` on CUDA without a usable mamba-ssm (after a ``RuntimeWarning``, once per process
    on global rank 0). Raises ``ValueError`` for an unknown ``impl`` or one that does not run on
    ``device``, and ``ImportError`` (saying what is missing and how to install it) for ``"cuda"``
    without a usable mamba-ssm.
    """
    if impl not in SCAN_IMPLS:
        raise ValueError(f"unknown selective-scan impl {impl!r}; expected one of {SCAN_IMPLS}")
    device_type = torch.device(device).type
    if impl == "auto":
        if device_type == "cuda" and (dtype is None or dtype in CUDA_DTYPES):
            problem = mamba_ssm_problem()
            if problem is None:
                return "cuda"
            _warn_reference_on_cuda(problem)
        if device_type == "cpu" and cpu_fused_available():
            return "cpu_fused"
        return "reference"
    if impl == "cuda":
        require_mamba_ssm()
    if impl in _DEVICE_OF_IMPL and device_type != _DEVICE_OF_IMPL[impl]:
        raise ValueError(f"impl={impl!r} needs {_DEVICE_OF_IMPL[impl]} tensors, got {device_type} tensors")
    if impl == "cpu_fused" and not cpu_fused_available():
        return "reference"
    return impl


def _expect(name: str, t: Tensor | None, shape: tuple[int, ...], legend: str) -> None:
    if t is not None and tuple(t.shape) != shape:
        raise ValueError(f"selective_scan: {name} must have shape {legend} = {shape}, got {tuple(t.shape)}")


def check_inputs(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
) -> None:
    """Raise ``ValueError`` with the expected shape when the inputs do not fit mamba-ssm's legend."""
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must have shape (batch, dim, L), got {tuple(u.shape)}")
    if A.dim() != 2:
        raise ValueError(f"selective_scan: A must have shape (dim, d_state), got {tuple(A.shape)}")
    batch, dim, length = u.shape
    # d_state from A, unless A's first axis is already wrong (e.g. transposed): then from B.
    d_state = A.shape[1] if A.shape[0] == dim or B.dim() != 3 else B.shape[1]
    _expect("delta", delta, (batch, dim, length), "(batch, dim, L)")
    _expect("A", A, (dim, d_state), "(dim, d_state)")
    _expect("B", B, (batch, d_state, length), "(batch, d_state, L)")
    _expect("C", C, (batch, d_state, length), "(batch, d_state, L)")
    _expect("D", D, (dim,), "(dim,)")
    _expect("z", z, (batch, dim, length), "(batch, dim, L)")
    _expect("delta_bias", delta_bias, (dim,), "(dim,)")
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None]
    if any(t.is_complex() or not t.is_floating_point() for t in tensors):
        raise ValueError("selective_scan: all inputs must be real floating-point tensors")
    devices = sorted({str(t.device) for t in tensors})
    if len(devices) > 1:
        raise ValueError(f"selective_scan: all inputs must be on one device, got {devices}")


def selective_scan(
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
    impl: ScanImpl = "auto",
    reverse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with mamba-ssm's ``selective_scan_fn`` semantics.

    Shapes: ``u, delta, z: (batch, dim, L)``, ``A: (dim, d_state)``, ``B, C: (batch, d_state, L)``,
    ``D, delta_bias: (dim,)``. Returns ``out (batch, dim, L)`` in ``u``'s dtype and, with
    ``return_last_state``, the final state ``(batch, dim, d_state)`` in float32 (float64 for float64 input).
    ``reverse=True`` scans from the last position to the first: the same as flipping ``u, delta, B, C, z``
    along L, scanning and flipping ``out`` back (the fused CPU kernel does it without the copies).
    """
    check_inputs(u, delta, A, B, C, D, z, delta_bias)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    chosen = resolve_impl(impl, u.device, u.dtype)
    with _autocast_off(u.device.type):
        if chosen == "cpu_fused":
            return selective_scan_cpu_fused(*args, reverse=reverse)
        scan = selective_scan_cuda if chosen == "cuda" else selective_scan_reference
        return reversed_scan(scan, *args) if reverse else scan(*args)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager[object]:
    """Autocast disabled on ``device_type``: the scans compute in their own dtypes (under autocast the
    reference's contractions would otherwise run in bfloat16)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
