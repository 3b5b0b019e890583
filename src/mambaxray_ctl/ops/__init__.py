"""Selective-scan operators: a pure-PyTorch reference and fast paths behind one dispatcher; the fused CPU
causal convolution + SiLU that feeds the scan."""

from mambaxray_ctl.ops.cpu_fused import causal_conv1d_silu_cpu, cpu_fused_available, selective_scan_cpu_fused
from mambaxray_ctl.ops.cuda import mamba_ssm_available
from mambaxray_ctl.ops.reference import selective_scan_reference
from mambaxray_ctl.ops.selective_scan import SCAN_IMPLS, ScanImpl, resolve_impl, selective_scan

__all__ = [
    "SCAN_IMPLS",
    "ScanImpl",
    "causal_conv1d_silu_cpu",
    "cpu_fused_available",
    "mamba_ssm_available",
    "resolve_impl",
    "selective_scan",
    "selective_scan_cpu_fused",
    "selective_scan_reference",
]
