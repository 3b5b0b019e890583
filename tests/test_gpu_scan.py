"""mamba-ssm's CUDA selective scan (``impl="cuda"``) against the float64 reference, on a GPU.

Run by ``pytest -m gpu tests/test_gpu_scan.py``; skipped without a CUDA device (conftest) and without a
usable mamba-ssm (the skip reason says what is missing). The inputs have the layouts ``MambaMixer``
passes, not fresh contiguous tensors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mambaxray_ctl.backbone import get_preset_config
from mambaxray_ctl.backbone.mixer import MambaMixer, _linear_channel_major
from mambaxray_ctl.ops import selective_scan
from mambaxray_ctl.ops.cuda import mamba_ssm_problem

PROBLEM = mamba_ssm_problem()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(PROBLEM is not None, reason=f"mamba-ssm's CUDA scan is not usable: {PROBLEM}"),
]

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
# (rtol, atol as a fraction of the reference tensor's largest magnitude).
# float32: only float32 rounding (fast-math exp included) separates the kernel from the float64
# reference, about 1e-6 relative per element; 1e-4 leaves room for sums over L and the batch.
# bfloat16: the kernel computes in float32 but rounds each bf16 output (out, du, ddelta, dB, dC, dz) to
# 8 significant bits (2^-9 relative), and dz also uses the pre-gating output it saved in bf16: two such
# roundings are 0.4 %, so 2e-2 is a 5x margin that still catches a wrong layout or direction (errors of O(1)).
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])


def assert_close(got: Tensor, want: Tensor, dtype: torch.dtype, what: str) -> None:
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(
        got.double(),
        want.double(),
        rtol=rtol,
        atol=atol * want.abs().max().item(),
        msg=lambda m: f"{what}: {m}",
    )


def mixer_layout_inputs(
    batch: int, d_inner: int, length: int, d_state: int, dtype: torch.dtype
) -> dict[str, Tensor]:
    """Scan inputs laid out as ``MambaMixer._scan`` passes them, each able to take a gradient.

    ``u`` and ``z`` are the halves of a channel-major ``xz`` (B, 2·d_inner, L) from ``_linear_channel_major``
    (views, not contiguous); ``delta`` is channel-major (B, d_inner, L); ``B`` and ``C`` are transposed
    slices of x_proj's (B, L, dt_rank + 2·d_state) output (last stride != 1); ``A = -(1..d_state)``, ``D``
    and ``delta_bias`` (softplus^-1 of dt in [1e-3, 0.1]) are float32, as in the mixer.
    """
    g = torch.Generator().manual_seed(0)
    d_model, dt_rank = d_inner, math.ceil(d_inner / 16)

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return (scale * torch.randn(*shape, generator=g)).cuda()

    hidden = randn(batch, length, d_model)
    xz = _linear_channel_major(hidden, randn(2 * d_inner, d_model, scale=d_model**-0.5))
    xz = xz.to(dtype).requires_grad_()
    u, z = xz.chunk(2, dim=1)
    x_dbl = F.linear(
        u.detach().float().transpose(1, 2), randn(dt_rank + 2 * d_state, d_inner, scale=d_inner**-0.5)
    )
    x_dbl = x_dbl.to(dtype).requires_grad_()
    dt, b, c = x_dbl.split([dt_rank, d_state, d_state], dim=-1)
    delta = _linear_channel_major(dt.detach().float(), randn(d_inner, dt_rank, scale=dt_rank**-0.5))
    dt_init = torch.exp(torch.rand(d_inner, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    inputs = {
        "u": u,
        "delta": delta.to(dtype).requires_grad_(),
        "A": -torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1).cuda().requires_grad_(),
        "B": b.transpose(1, 2),
        "C": c.transpose(1, 2),
        "D": (1 + 0.1 * randn(d_inner)).requires_grad_(),
        "z": z,
        "delta_bias": (dt_init + torch.log(-torch.expm1(-dt_init))).cuda().requires_grad_(),
    }
    assert not u.is_contiguous() and inputs["B"].stride(-1) != 1 and inputs["C"].stride(-1) != 1
    return inputs


@DTYPES
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("length", [197, 2305], ids=["L197", "L2305"])  # 224 px and 768 px, ARM patch 16
def test_kernel_matches_float64_reference(dtype: torch.dtype, reverse: bool, length: int) -> None:
    """Output, last state and the gradient of every input. The loss uses the output only: mamba-ssm's
    backward ignores the gradient of the last state."""
    inputs = mixer_layout_inputs(2, 64, length, 16, dtype)
    out, last = selective_scan(
        **inputs, delta_softplus=True, return_last_state=True, impl="cuda", reverse=reverse
    )
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).cuda().to(dtype)
    grads = torch.autograd.grad((out * dout).sum(), [inputs[k] for k in NAMES])

    ref_inputs = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    ref_out, ref_last = selective_scan(
        **ref_inputs, delta_softplus=True, return_last_state=True, impl="reference", reverse=reverse
    )
    ref_grads = torch.autograd.grad((ref_out * dout.double()).sum(), [ref_inputs[k] for k in NAMES])

    assert out.dtype == dtype and last.dtype == torch.float32
    assert_close(out, ref_out, dtype, "out")
    assert_close(last, ref_last, dtype, "last_state")
    for name, grad, ref_grad in zip(NAMES, grads, ref_grads, strict=True):
        assert grad.dtype == inputs[name].dtype, name
        assert_close(grad, ref_grad, dtype, f"d{name}")


@pytest.mark.parametrize("name", ["test_arm_tiny", "test_vim_tiny"])  # 4 directions (column ones too); 2
@pytest.mark.parametrize("autocast", [False, True], ids=["f32", "bf16-autocast"])
def test_mixer_with_kernel_matches_reference_mixer(name: str, autocast: bool) -> None:
    """A whole MambaMixer (197 tokens: a 14x14 grid and a class token) with ``ssm_impl="cuda"`` against the
    same weights with the reference scan: output, input gradient and every parameter's gradient."""
    torch.manual_seed(0)
    fast = MambaMixer(get_preset_config(name, ssm_impl="cuda")).cuda()
    ref = MambaMixer(get_preset_config(name, ssm_impl="reference")).cuda()
    ref.load_state_dict(fast.state_dict())
    hidden = torch.randn(2, 197, fast.in_proj.in_features, device="cuda")
    weights = torch.randn(2, 197, fast.in_proj.in_features, device="cuda")

    def run(mixer: MambaMixer) -> list[Tensor]:
        x = hidden.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = mixer(x, (14, 14), 98).float()
        return [out, *torch.autograd.grad((out * weights).sum(), [x, *mixer.parameters()])]

    dtype = torch.bfloat16 if autocast else torch.float32
    names = ["out", "d_input", *(f"d{n}" for n, _ in fast.named_parameters())]
    for what, got, want in zip(names, run(fast), run(ref), strict=True):
        assert_close(got, want, dtype, what)
