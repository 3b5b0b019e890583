"""One entry point for the selective scan; picks an implementation for the tensors' device.

``impl``: ``"auto"`` (mamba-ssm's kernel for CUDA tensors when it imports, the fused C++ kernel for
CPU tensors when it builds, else the reference), ``"reference"`` (pure PyTorch, any device),
``"cpu_fused"`` (CPU only) or ``"cuda"`` (CUDA only, needs mamba-ssm).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from mambaxray_ctl.ops.cpu_fused import cpu_fused_available, selective_scan_cpu_fused
from mambaxray_ctl.ops.cuda import CUDA_DTYPES, mamba_ssm_available, require_mamba_ssm, selective_scan_cuda
from mambaxray_ctl.ops.reference import reversed_scan, selective_scan_reference

ScanImpl = Literal["auto", "reference", "cpu_fused", "cuda"]
SCAN_IMPLS: tuple[str, ...] = get_args(ScanImpl)
_DEVICE_OF_IMPL = {"cpu_fused": "cpu", "cuda": "cuda"}


def resolve_impl(
    impl: str = "auto", device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> str:
    """The implementation that ``impl`` runs for tensors on ``device`` (of ``dtype``), e.g. for logging.

    Returns ``"reference"`` for ``"cpu_fused"`` when the extension cannot be built (after its warning).
    Raises ``ValueError`` for an unknown ``impl`` or one that does not run on ``device``, and
    ``ImportError`` (with the install command) for ``"cuda"`` without mamba-ssm.
    """
    if impl not in SCAN_IMPLS:
        raise ValueError(f"unknown selective-scan impl {impl!r}; expected one of {SCAN_IMPLS}")
    device_type = torch.device(device).type
    if impl == "auto":
        if device_type == "cuda" and (dtype is None or dtype in CUDA_DTYPES) and mamba_ssm_available():
            return "cuda"
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
    if chosen == "cpu_fused":
        return selective_scan_cpu_fused(*args, reverse=reverse)
    scan = selective_scan_cuda if chosen == "cuda" else selective_scan_reference
    return reversed_scan(scan, *args) if reverse else scan(*args)
