"""Golden activations: the backbone against a plain transcription of the official forward pass.

What the package computes is compared, in float64, with an independent transcription (below, in this
file) of the official code's order of operations (docs/METHOD.md#backbone):

- the ARM "v3" mixer of the official `arm/Finetuning/mamba_simple.py` (row forward, row backward on
  the flipped sequence, and the two column-order scans with the middle class token taken out and put
  back), the Vim "v2" mixer of hustvl Vim's vendored `mamba_ssm/modules/mamba_simple.py` (forward +
  flipped, divided by 2) and the single causal scan of stage 1 (`pretrain/models_pretrain.py`,
  mamba-ssm's `mamba_inner_fn`);
- per direction, the slow path of mamba-ssm's inner function: ``in_proj`` -> (x, z) in this order,
  depthwise causal conv + SiLU, ``x_proj`` -> (dt, B, C) in this order, ``dt_proj`` (its bias added
  inside the scan, softplus), ``A = -exp(A_log)``, a plain per-time-step selective scan with the
  ``D`` skip, gated by ``silu(z)``; then ``out_proj``;
- the ARM block of `arm/Finetuning/models_mamba.py` (LayerNorm + mixer, LayerNorm + SwiGLU, two
  residuals) and the Vim block of hustvl Vim's `vim/models_mamba.py` (add -> RMSNorm -> mixer, the
  residual stream carried separately), and both whole backbones (patch embedding, middle class token,
  position embedding, blocks, final norm).

The transcription reads the weights by the official key names from the package module's
``state_dict()``: the package uses the official names unchanged (its checkpoint converters
``convert_mambaxray_vl``/``convert_vim`` only strip a prefix or drop the classifier head), so no
renaming is needed. Every parameter is re-drawn from a seeded generator, so nothing sits at a trivial
initialisation (``A_log``, ``D``, dt bias, conv, norms, ...). The sensitivity tests show that the
comparison catches the bugs it is meant to catch: a transcription with B and C (or x and z, or two
directions' parameters) swapped does NOT match the package.

Precision notes (official semantics, mirrored here): the official mixer keeps ``A``, ``D`` and the dt
bias in float32 (``A_log.float()``, ``D.float()``, ``dt_proj.bias.float()``), so a float64 run inherits
their float32 rounding; the transcription makes the same casts. RMSNorm (Vim) normalises in float32 in
both the official kernel and the package, so Vim blocks are compared at float32 precision.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambaxray_ctl.backbone import VisionMamba, VisionMambaConfig
from mambaxray_ctl.backbone.blocks import ARMBlock, VimBlock
from mambaxray_ctl.backbone.layers import RMSNorm
from mambaxray_ctl.backbone.mixer import MambaMixer
from mambaxray_ctl.ops import cpu_fused_available

GRID = (4, 4)  # 16 patches; with the middle class token L = 17, the class token at index 8
BATCH = 2
EPS = 1e-5
EXACT = {"atol": 1e-10, "rtol": 1e-10}
# RMSNorm normalises in float32 (official kernel and package alike): Vim blocks match to float32 rounding.
FLOAT32_NORM = {"atol": 2e-6, "rtol": 2e-6}
# A deliberately wrong transcription must differ from the package by at least this much (max abs).
CLEARLY_DIFFERENT = 1e-3

SUFFIXES = {1: ("",), 2: ("", "_b"), 4: ("", "_b", "_c", "_c_b")}
IMPLS = [
    "reference",
    pytest.param(
        "cpu_fused",
        marks=pytest.mark.skipif(not cpu_fused_available(), reason="the fused CPU kernel cannot be built"),
    ),
]


# --------------------------------------------------------------------------------------------------
# Modules under test: tiny, float64, every parameter re-drawn from a seeded generator.
# --------------------------------------------------------------------------------------------------


def make_config(style: str, directions: int, *, class_token: bool = True, impl: str = "reference"):
    """Tiny config: 32 px / 8 px patches (4x4 grid), width 16, d_state 4, d_conv 4, dt_rank 3.

    ARM uses the official expand 1, Vim expand 2. dt_rank 3 != d_state 4, so every split is distinct.
    """
    return VisionMambaConfig(
        img_size=32,
        patch_size=8,
        embed_dim=16,
        depth=2,
        d_state=4,
        d_conv=4,
        expand=1 if style == "arm" else 2,
        dt_rank=3,
        block_style=style,
        scan_directions=directions,
        class_token=class_token,
        drop_path_rate=0.0,
        ssm_impl=impl,
    )


_A_LOG = re.compile(r"A(_c)?(_b)?_log")
_D_SKIP = re.compile(r"D(_c)?(_b)?")


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw every parameter (float64, rounded to float32 values) with a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    for module_name, sub in module.named_modules():
        for name, p in sub.named_parameters(recurse=False):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if _A_LOG.fullmatch(name):
                value = 0.5 * noise  # A = -exp(A_log) around -1: the state remembers a few steps
            elif _D_SKIP.fullmatch(name):
                value = noise
            elif module_name.rsplit(".", 1)[-1].startswith("dt_proj") and name == "bias":
                value = -2.5 + 0.5 * noise  # softplus(dt) around 0.1
            elif isinstance(sub, nn.LayerNorm | RMSNorm) and name == "weight":
                value = 1.0 + 0.3 * noise
            elif name == "bias":
                value = 0.2 * noise
            elif name in ("cls_token", "pos_embed"):
                value = 0.5 * noise
            else:  # linear / conv weights: unit-variance outputs
                value = noise / math.sqrt(p[0].numel())
            p.copy_(value.float().double())
    return module.double().eval()


def random_tokens(length: int, width: int = 16, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, length, width, generator=g, dtype=torch.float64)


def sub_state_dict(state_dict: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------------------
# The transcription of the official forward (slow path), with optional deliberate mistakes.
# --------------------------------------------------------------------------------------------------


def naive_selective_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor, delta_bias: Tensor
) -> Tensor:
    """One time step after the other: ``u, delta, z (b, d, l)``, ``A (d, n)``, ``B, C (b, n, l)``.

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t;  y_t = <C_t, h_t> + D u_t;  out_t = y_t * silu(z_t),
    with dt_t = softplus(delta_t + delta_bias) (mamba-ssm's ``delta_softplus=True``).
    """
    batch, dim, length = u.shape
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        dt = F.softplus(delta[:, :, t] + delta_bias)  # (b, d)
        h = torch.exp(dt[..., None] * A) * h + dt[..., None] * B[:, None, :, t] * u[:, :, t, None]
        y = (h * C[:, None, :, t]).sum(-1) + D * u[:, :, t]
        ys.append(y * F.silu(z[:, :, t]))
    return torch.stack(ys, dim=-1)


def official_inner(xz: Tensor, sd: dict[str, Tensor], s: str, dt_rank: int, d_state: int, bug: str) -> Tensor:
    """mamba-ssm's inner function without out_proj on ``xz`` (b, 2·d_inner, l), parameters of suffix ``s``."""
    length = xz.shape[-1]
    x, z = xz.chunk(2, dim=1)
    if bug == "swap_xz":
        x, z = z, x
    weight = sd[f"conv1d{s}.weight"]
    x = F.conv1d(x, weight, sd[f"conv1d{s}.bias"], padding=weight.shape[-1] - 1, groups=x.shape[1])
    x = F.silu(x[..., :length])
    batch, d_inner, _ = x.shape
    x_dbl = F.linear(x.transpose(1, 2).reshape(batch * length, d_inner), sd[f"x_proj{s}.weight"])  # (b l) r
    delta = sd[f"dt_proj{s}.weight"] @ x_dbl[:, :dt_rank].t()  # d (b l)
    delta = delta.reshape(d_inner, batch, length).permute(1, 0, 2)
    B = x_dbl[:, dt_rank : dt_rank + d_state]
    C = x_dbl[:, -d_state:]
    if bug == "swap_bc":
        B, C = C, B
    B = B.reshape(batch, length, d_state).transpose(1, 2)
    C = C.reshape(batch, length, d_state).transpose(1, 2)
    A = -torch.exp(sd[f"A{s}_log"].float())  # the official code keeps A, D and the dt bias in float32
    return naive_selective_scan(
        x, delta, A.double(), B, C, sd[f"D{s}"].float().double(), z, sd[f"dt_proj{s}.bias"].float().double()
    )


def to_column_order(seq: Tensor, has_cls: bool) -> Tensor:
    """The official v3 reordering of (b, d, l): take the class token out of index l // 2, read the square
    patch grid column by column (reshape, swap the two grid axes, flatten) and put the token back at l // 2.
    The same operation maps the column-order output back (a transpose of a square grid is its own inverse)."""
    batch, dim, length = seq.shape
    pos = length // 2
    if has_cls:
        cls = seq[:, :, pos : pos + 1]
        seq = torch.cat([seq[:, :, :pos], seq[:, :, pos + 1 :]], dim=-1)
    side = math.isqrt(length)
    seq = seq.reshape(batch, dim, side, side).permute(0, 1, 3, 2).reshape(batch, dim, -1)
    if has_cls:
        seq = torch.cat([seq[:, :, :pos], cls, seq[:, :, pos:]], dim=-1)
    return seq


def official_mixer(
    hidden: Tensor, sd: dict[str, Tensor], directions: int, *, has_cls: bool = True, bug: str = "none"
) -> Tensor:
    """The official mixer forward on ``hidden`` (b, l, d): 1 direction (stage 1, ``mamba_inner_fn``),
    2 (Vim v2: forward + flipped, divided by 2) or 4 (ARM v3: rows and columns, divided by 4)."""
    batch, length, width = hidden.shape
    dt_rank = sd["dt_proj.weight"].shape[1]
    d_state = sd["A_log"].shape[1]
    # in_proj as the official code: weight @ hidden^T, "d (b l) -> b d l".
    xz = sd["in_proj.weight"] @ hidden.reshape(batch * length, width).t()
    xz = xz.reshape(-1, batch, length).permute(1, 0, 2)
    b_suffix, c_suffix = ("_c", "_b") if bug == "swap_direction_params" else ("_b", "_c")

    def inner(seq: Tensor, s: str) -> Tensor:
        return official_inner(seq, sd, s, dt_rank, d_state, bug)

    out = inner(xz, "")
    if directions >= 2:
        out = out + inner(xz.flip(-1), b_suffix).flip(-1)
    if directions == 4:
        reorder = bug != "columns_in_row_order"
        xc = to_column_order(xz, has_cls) if reorder else xz
        out_c = inner(xc, c_suffix) + inner(xc.flip(-1), "_c_b").flip(-1)
        out = out + (to_column_order(out_c, has_cls) if reorder else out_c)
    if directions > 1:
        out = out / directions
    return F.linear(out.transpose(1, 2), sd["out_proj.weight"])


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS) * weight + bias


def rms_norm(x: Tensor, weight: Tensor) -> Tensor:
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + EPS) * weight


def official_arm_block(
    x: Tensor, sd: dict[str, Tensor], *, has_cls: bool = True, bug: str = "none"
) -> Tensor:
    """ARM Block: x + mixer(norm1(x)), then + w3(silu(w1 h) * w2 h) of norm2 (drop path off)."""
    mixer = sub_state_dict(sd, "mixer.")
    x = x + official_mixer(
        layer_norm(x, sd["norm1.weight"], sd["norm1.bias"]), mixer, 4, has_cls=has_cls, bug=bug
    )
    h = layer_norm(x, sd["norm2.weight"], sd["norm2.bias"])
    x1 = F.linear(h, sd["mlp.w1.weight"], sd["mlp.w1.bias"])
    x2 = F.linear(h, sd["mlp.w2.weight"], sd["mlp.w2.bias"])
    gated = F.silu(x1) * x2
    return x + F.linear(gated, sd["mlp.w3.weight"], sd["mlp.w3.bias"])


def official_vim_block(
    hidden: Tensor, residual: Tensor | None, sd: dict[str, Tensor], bug: str = "none"
) -> tuple[Tensor, Tensor]:
    """Vim Block: residual = hidden (first block) or residual + hidden; hidden = mixer(RMSNorm(residual))."""
    residual = hidden if residual is None else residual + hidden
    hidden = official_mixer(rms_norm(residual, sd["norm.weight"]), sub_state_dict(sd, "mixer."), 2, bug=bug)
    return hidden, residual


def official_backbone(images: Tensor, sd: dict[str, Tensor], style: str, depth: int) -> Tensor:
    """Patch embedding (row-major), class token inserted at M // 2, + pos_embed, the blocks, norm_f; all
    tokens are returned (the ARM backbone of the official stages 2-3 does so; for Vim the package also
    returns every token, where hustvl Vim keeps only the class token for its head)."""
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=8)
    x = x.flatten(2).transpose(1, 2)
    position = x.shape[1] // 2
    cls = sd["cls_token"].expand(x.shape[0], -1, -1)
    x = torch.cat([x[:, :position], cls, x[:, position:]], dim=1) + sd["pos_embed"]
    if style == "arm":
        for i in range(depth):
            x = official_arm_block(x, sub_state_dict(sd, f"layers.{i}."))
        return layer_norm(x, sd["norm_f.weight"], sd["norm_f.bias"])
    hidden, residual = x, None
    for i in range(depth):
        hidden, residual = official_vim_block(hidden, residual, sub_state_dict(sd, f"layers.{i}."))
    return rms_norm(residual + hidden, sd["norm_f.weight"])


# --------------------------------------------------------------------------------------------------
# Golden tests
# --------------------------------------------------------------------------------------------------


def _mixer_case(style: str, directions: int, class_token: bool, impl: str = "reference"):
    config = make_config(style, directions, class_token=class_token, impl=impl)
    mixer = randomize_(MambaMixer(config))
    length = GRID[0] * GRID[1] + int(class_token)
    x = random_tokens(length)
    with torch.no_grad():
        got = mixer(x, GRID, length // 2 if class_token else None)
    return mixer, x, got


MIXER_CASES = [
    pytest.param("arm", 4, True, id="arm-v3-cls"),
    pytest.param("arm", 4, False, id="arm-v3-no-cls"),
    pytest.param("vim", 2, True, id="vim-v2"),
    pytest.param("arm", 1, False, id="stage1-forward-only"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("style", "directions", "class_token"), MIXER_CASES)
def test_mixer_matches_official_transcription(
    style: str, directions: int, class_token: bool, impl: str
) -> None:
    """The mixer equals the official forward (docs/METHOD.md#backbone, scan directions) in float64:
    ARM v3 of `arm/Finetuning/mamba_simple.py` with the middle class token (and, this package's
    generalisation, without one: the official v3 path always has it), Vim v2 of hustvl Vim's
    `mamba_ssm/modules/mamba_simple.py`, and stage 1's single scan."""
    mixer, x, got = _mixer_case(style, directions, class_token, impl)
    with torch.no_grad():
        want = official_mixer(x, mixer.state_dict(), directions, has_cls=class_token)
    assert got.dtype == torch.float64 and got.shape == x.shape
    assert want.abs().max() > 0.1  # a non-trivial activation
    torch.testing.assert_close(got, want, **EXACT)


def test_every_direction_contributes() -> None:
    """Each of the four ARM directions matters: changing one direction's ``D`` changes the package's output,
    which still equals the transcription (no direction's parameters are ignored or shared)."""
    mixer, x, got = _mixer_case("arm", 4, True)
    for s in SUFFIXES[4]:
        changed = randomize_(MambaMixer(make_config("arm", 4)))
        changed.load_state_dict(mixer.state_dict())
        with torch.no_grad():
            getattr(changed, f"D{s}").add_(1.0)
            out = changed(x, GRID, x.shape[1] // 2)
            want = official_mixer(x, changed.state_dict(), 4)
        assert (out - got).abs().max() > CLEARLY_DIFFERENT, f"direction {s!r} has no effect"
        torch.testing.assert_close(out, want, **EXACT)


@pytest.mark.parametrize(
    ("style", "bug"),
    [
        ("arm", "swap_bc"),
        ("arm", "swap_xz"),
        ("arm", "swap_direction_params"),
        ("arm", "columns_in_row_order"),
        ("vim", "swap_bc"),
        ("vim", "swap_xz"),
    ],
)
def test_a_wrong_transcription_is_caught(style: str, bug: str) -> None:
    """Sensitivity: the same transcription with B and C swapped in the x_proj split, x and z swapped in the
    in_proj chunk, the _b and _c parameters swapped, or the column scans left in row order does NOT match
    the package, so the golden tests above would catch such a bug in the package."""
    directions = 4 if style == "arm" else 2
    mixer, x, got = _mixer_case(style, directions, True)
    with torch.no_grad():
        right = official_mixer(x, mixer.state_dict(), directions)
        wrong = official_mixer(x, mixer.state_dict(), directions, bug=bug)
    torch.testing.assert_close(got, right, **EXACT)
    assert (wrong - got).abs().max() > CLEARLY_DIFFERENT


@pytest.mark.parametrize("bug", ["none", "swap_bc", "swap_xz"])
def test_arm_block_matches_official_transcription(bug: str) -> None:
    """ARM block (docs/METHOD.md#backbone, block styles; `arm/Finetuning/models_mamba.py`): LayerNorm +
    v3 mixer and LayerNorm + SwiGLU (w1 gated by SiLU, times w2, then w3), two residuals, drop path 0;
    float64 to 1e-10. With a swapped split in the transcription the block no longer matches."""
    block = randomize_(ARMBlock(make_config("arm", 4)))
    x = random_tokens(GRID[0] * GRID[1] + 1)
    with torch.no_grad():
        got = block(x, GRID, GRID[0] * GRID[1] // 2)
        want = official_arm_block(x, block.state_dict(), bug=bug)
    if bug == "none":
        torch.testing.assert_close(got, want, **EXACT)
    else:
        assert (want - got).abs().max() > CLEARLY_DIFFERENT


@pytest.mark.parametrize("first", [True, False], ids=["first-block", "later-block"])
def test_vim_block_matches_official_transcription(first: bool) -> None:
    """Vim block (docs/METHOD.md#backbone, block styles; hustvl Vim's `vim/models_mamba.py`): the
    residual stream is ``hidden`` for the first block, ``residual + hidden`` after; the mixer sees
    RMSNorm(residual). The residual is exact; the mixer output to float32 rounding (RMSNorm normalises
    in float32, as the official fused kernel does)."""
    block = randomize_(VimBlock(make_config("vim", 2)))
    length = GRID[0] * GRID[1] + 1
    hidden = random_tokens(length, seed=1)
    residual = None if first else random_tokens(length, seed=2)
    with torch.no_grad():
        got_hidden, got_residual = block(hidden, residual, GRID, length // 2)
        want_hidden, want_residual = official_vim_block(hidden, residual, block.state_dict())
        wrong_hidden, _ = official_vim_block(hidden, residual, block.state_dict(), bug="swap_bc")
    torch.testing.assert_close(got_residual, want_residual, **EXACT)
    torch.testing.assert_close(got_hidden, want_hidden, **FLOAT32_NORM)
    assert (wrong_hidden - got_hidden).abs().max() > CLEARLY_DIFFERENT


@pytest.mark.parametrize("style", ["arm", "vim"])
def test_backbone_matches_official_transcription(style: str) -> None:
    """Whole tiny backbone (2 blocks) from images to the tokens after norm_f (docs/METHOD.md#backbone,
    tokens and positions): patch embedding, class token at index num_patches // 2, position embedding,
    blocks, final norm. ARM to 1e-10; Vim to float32 rounding (its RMSNorms)."""
    config = make_config(style, 4 if style == "arm" else 2)
    model = randomize_(VisionMamba(config))
    g = torch.Generator().manual_seed(3)
    images = torch.randn(BATCH, 3, 32, 32, generator=g, dtype=torch.float64)
    with torch.no_grad():
        got = model(images)
        want = official_backbone(images, model.state_dict(), style, config.depth)
    assert got.shape == (BATCH, GRID[0] * GRID[1] + 1, 16)
    torch.testing.assert_close(got, want, **(EXACT if style == "arm" else FLOAT32_NORM))
