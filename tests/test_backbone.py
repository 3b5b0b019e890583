"""Vision Mamba backbone: shapes, official key names and sizes, scan bookkeeping, positions, numerics."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mambaxray_ctl.backbone import (
    VisionMamba,
    VisionMambaConfig,
    create_backbone,
    get_preset_config,
    list_presets,
)
from mambaxray_ctl.backbone import mixer as mixer_module
from mambaxray_ctl.backbone.layers import DropPath, PatchEmbed, resample_pos_embed, sincos_2d_pos_embed
from mambaxray_ctl.backbone.mixer import MambaMixer, column_major, column_major_index
from mambaxray_ctl.ops import cpu_fused_available, selective_scan

REF = {"ssm_impl": "reference"}


def _tiny(name: str = "test_arm_tiny", **overrides) -> VisionMamba:
    torch.manual_seed(0)
    return create_backbone(name, **REF, **overrides)


def _meta(name: str) -> VisionMamba:
    with torch.device("meta"):
        return create_backbone(name)


# --- sizes and key names of the official variants (docs/METHOD.md#official-checkpoint-formats) ---

# Hand-computed from the official shapes. ARM-Large, per layer: in_proj 2048·1024 = 2,097,152;
# 4 × (conv 1024·4+1024 + x_proj 96·1024 + dt_proj 1024·64+1024 + A 1024·16 + D 1024) = 4 × 187,392;
# out_proj 1,048,576; mlp 2 × (2730·1024+2730) + 1024·2730+1024 = 8,393,044; norms 4,096
# -> 12,292,436 × 24 = 295,018,464; + patch_embed 787,456 + cls 1,024 + pos 197·1024 + norm_f 2,048.
# ARM-Base, per layer: 1,179,648 + 4 × 115,968 + 589,824 + 4,723,456 + 3,072 = 6,959,872 (× 12);
# + 590,592 + 768 + 151,296 + 1,536.
# Vim (d_inner = 2D, 2 directions, RMSNorm weight only, no head) tiny/small/base per layer:
# 282,048 / 1,043,328 / 4,003,584 (× 24); + patch_embed + cls + pos 197·D + norm_f D.
# Stage-1 encoders: one direction, no cls, sin-cos pos_embed is a buffer (not a parameter):
# ARM-Large 11,730,260 × 24 + 787,456 + 2,048; ARM-Base 6,611,968 × 12 + 590,592 + 1,536.
EXPECTED_PARAMS = {
    "arm_large_pz16": 296_010_720,
    "arm_base_pz16": 84_262_656,
    "arm_large_pz16_pretrain": 282_315_744,
    "arm_base_pz16_pretrain": 79_935_744,
    "vim_tiny_patch16": 6_955_008,
    "vim_small_patch16": 25_411_584,
    "vim_base_patch16": 96_829_440,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_preset_parameter_count(name: str) -> None:
    model = _meta(name)
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS[name]


def test_every_non_test_preset_has_a_count() -> None:
    official = {n for n in list_presets() if not n.startswith(("test_", "demo_"))}
    assert official == set(EXPECTED_PARAMS)


def _official_mixer_keys(prefix: str, d: int, d_inner: int, rank: int, suffixes: list[str]) -> dict:
    keys = {f"{prefix}in_proj.weight": (2 * d_inner, d), f"{prefix}out_proj.weight": (d, d_inner)}
    for s in suffixes:
        keys |= {
            f"{prefix}conv1d{s}.weight": (d_inner, 1, 4),
            f"{prefix}conv1d{s}.bias": (d_inner,),
            f"{prefix}x_proj{s}.weight": (rank + 32, d_inner),
            f"{prefix}dt_proj{s}.weight": (d_inner, rank),
            f"{prefix}dt_proj{s}.bias": (d_inner,),
            f"{prefix}A{s}_log": (d_inner, 16),
            f"{prefix}D{s}": (d_inner,),
        }
    return keys


def _shapes(model: VisionMamba) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_arm_large_state_dict_matches_official_keys() -> None:
    d, hidden = 1024, 2730
    expected = {
        "patch_embed.proj.weight": (d, 3, 16, 16),
        "patch_embed.proj.bias": (d,),
        "cls_token": (1, 1, d),
        "pos_embed": (1, 197, d),
        "norm_f.weight": (d,),
        "norm_f.bias": (d,),
    }
    for i in range(24):
        p = f"layers.{i}."
        expected |= _official_mixer_keys(p + "mixer.", d, d, 64, ["", "_b", "_c", "_c_b"])
        expected |= {
            p + "mlp.w1.weight": (hidden, d),
            p + "mlp.w1.bias": (hidden,),
            p + "mlp.w2.weight": (hidden, d),
            p + "mlp.w2.bias": (hidden,),
            p + "mlp.w3.weight": (d, hidden),
            p + "mlp.w3.bias": (d,),
            p + "norm1.weight": (d,),
            p + "norm1.bias": (d,),
            p + "norm2.weight": (d,),
            p + "norm2.bias": (d,),
        }
    assert _shapes(_meta("arm_large_pz16")) == expected


def test_vim_tiny_state_dict_matches_official_keys_without_head() -> None:
    d = 192
    expected = {
        "patch_embed.proj.weight": (d, 3, 16, 16),
        "patch_embed.proj.bias": (d,),
        "cls_token": (1, 1, d),
        "pos_embed": (1, 197, d),
        "norm_f.weight": (d,),
    }
    for i in range(24):
        expected |= _official_mixer_keys(f"layers.{i}.mixer.", d, 2 * d, 12, ["", "_b"])
        expected[f"layers.{i}.norm.weight"] = (d,)
    assert _shapes(_meta("vim_tiny_patch16")) == expected


def test_stage1_encoder_keys_match_pretrain_checkpoint() -> None:
    shapes = _shapes(_meta("arm_large_pz16_pretrain"))
    assert shapes["pos_embed"] == (1, 144, 1024)
    assert "cls_token" not in shapes
    assert not any("_b" in k or "_c" in k for k in shapes)
    assert shapes["layers.23.mixer.x_proj.weight"] == (96, 1024)


# --- forward shapes ---


@pytest.mark.parametrize("style", ["arm", "vim"])
@pytest.mark.parametrize("directions", [1, 2, 4])
@pytest.mark.parametrize("class_token", [True, False])
def test_forward_shapes(style: str, directions: int, class_token: bool) -> None:
    model = _tiny(f"test_{style}_tiny", scan_directions=directions, class_token=class_token).eval()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 16 + class_token, 32)
    assert torch.isfinite(out).all()


def test_non_square_grid_forward() -> None:
    model = _tiny(img_size=(48, 80)).eval()
    assert model.grid_size == (3, 5) and model.cls_index == 7
    assert model(torch.randn(1, 3, 48, 80)).shape == (1, 16, 32)


def test_stage1_style_custom_token_order_without_grid() -> None:
    model = _tiny("test_arm_tiny_pretrain").eval()
    tokens = model.embed(torch.randn(2, 3, 96, 96))
    assert tokens.shape == (2, 36, 32)
    order = torch.randperm(36)[:32]  # any order and length: a single causal scan needs no grid
    out, feats = model.forward_tokens(tokens[:, order], return_layers=[0, 1, 2, 3])
    assert out.shape == (2, 32, 32) and [f.shape for f in feats] == [(2, 32, 32)] * 4


@pytest.mark.parametrize("style", ["arm", "vim"])
def test_return_layers(style: str) -> None:
    model = _tiny(f"test_{style}_tiny").eval()
    tokens = model.embed(torch.randn(2, 3, 64, 64))
    out, feats = model.forward_tokens(tokens, model.grid_size, return_layers=[-1, 0])
    assert len(feats) == 2
    assert torch.equal(model.norm_f(feats[0]), out)
    assert torch.equal(out, model.forward_tokens(tokens, model.grid_size)[0])
    with pytest.raises(ValueError, match="out of range"):
        model.forward_tokens(tokens, model.grid_size, return_layers=[2])


# --- scan-direction bookkeeping ---


def _transform(x: torch.Tensor, column: bool, reverse: bool, order: torch.Tensor) -> torch.Tensor:
    if column:
        x = x[:, order]
    return x.flip(1) if reverse else x


def _untransform(y: torch.Tensor, column: bool, reverse: bool, order: torch.Tensor) -> torch.Tensor:
    if reverse:
        y = y.flip(1)
    return y[:, order.argsort()] if column else y


@pytest.mark.parametrize(
    ("directions", "active", "column", "reverse", "divide_out"),
    [
        (4, "", False, False, True),
        (4, "_b", False, True, True),
        (4, "_c", True, False, True),
        (4, "_c_b", True, True, True),
        (2, "", False, False, True),
        (2, "_b", False, True, True),
        (2, "_b", False, True, False),
    ],
)
def test_single_active_direction_equals_unidirectional_mixer(
    directions: int, active: str, column: bool, reverse: bool, divide_out: bool
) -> None:
    """Only direction ``active`` carries the 1-direction mixer's params; the others are zeroed so they
    output exactly 0 (zero conv -> u = 0, B = C = 0). Then, up to the direction's token reordering and
    the /n compensated in out_proj (powers of two: exact), both mixers agree bit for bit."""
    torch.manual_seed(0)
    base = get_preset_config("test_arm_tiny", **REF, scan_directions=1)
    multi = MambaMixer(
        VisionMambaConfig.from_dict(
            base.to_dict() | {"scan_directions": directions, "divide_out": divide_out}
        )
    )
    single = MambaMixer(base)
    suffixes = ["", "_b", "_c", "_c_b"][:directions]
    with torch.no_grad():
        for p in single.parameters():  # make D, A_log and biases non-trivial too
            p.add_(0.1 * torch.randn_like(p))
        multi.in_proj.weight.copy_(single.in_proj.weight)
        multi.out_proj.weight.copy_(single.out_proj.weight * (directions if divide_out else 1))
        for s in suffixes:
            for name in ("conv1d", "x_proj", "dt_proj"):
                for key, value in getattr(single, name).state_dict().items():
                    target = getattr(getattr(multi, name + s), key)
                    target.copy_(value if s == active else torch.zeros_like(value))
            getattr(multi, f"A{s}_log").copy_(single.A_log)
            getattr(multi, f"D{s}").copy_(single.D if s == active else torch.zeros_like(single.D))

    grid, cls_index = (4, 4), 8
    x = torch.randn(2, 17, 32)
    order = column_major_index(grid, cls_index)
    expected = _untransform(single(_transform(x, column, reverse, order)), column, reverse, order)
    assert torch.equal(multi(x, grid, cls_index), expected)


def test_column_major_index_literal() -> None:
    # grid 2x3, tokens [p0 p1 p2 CLS p3 p4 p5]: column-major patches p0 p3 p1 | p4 p2 p5, cls kept at 3.
    assert column_major_index((2, 3), 3).tolist() == [0, 4, 1, 3, 5, 2, 6]
    assert column_major_index((2, 3)).tolist() == [0, 3, 1, 4, 2, 5]


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (5, 2), (1, 7)])
@pytest.mark.parametrize("with_cls", [True, False])
def test_column_order_round_trips(grid: tuple[int, int], with_cls: bool) -> None:
    n = grid[0] * grid[1]
    cls_index = n // 2 if with_cls else None
    order = column_major_index(grid, cls_index)
    x = torch.randn(2, 8, n + with_cls)
    assert sorted(order.tolist()) == list(range(n + with_cls))
    assert torch.equal(x[..., order][..., order.argsort()], x)
    # The mixer's permutation (slices and a transpose) is exactly that gather, and its inverse.
    assert torch.equal(column_major(x, grid, cls_index), x[..., order])
    assert torch.equal(column_major(x[..., order], grid, cls_index, inverse=True), x)
    if with_cls:
        assert order[cls_index] == cls_index
    patches = torch.arange(n).view(grid)
    no_cls = [i for i in order.tolist() if i != cls_index]
    as_patches = [i - (cls_index is not None and i > cls_index) for i in no_cls]
    assert as_patches == patches.t().reshape(-1).tolist()


def test_column_scan_needs_a_matching_grid() -> None:
    mixer = MambaMixer(get_preset_config("test_arm_tiny", **REF))
    x = torch.randn(1, 17, 32)
    with pytest.raises(ValueError, match="grid_size"):
        mixer(x)
    with pytest.raises(ValueError, match="does not match grid"):
        mixer(x, (4, 4), None)


# --- positions and patch embedding ---


def test_resample_pos_embed_keeps_class_token() -> None:
    pos = torch.randn(1, 17, 8)
    out = resample_pos_embed(pos, (4, 4), (6, 3), has_class_token=True)
    assert out.shape == (1, 19, 8)
    assert torch.equal(out[:, 9], pos[:, 8])
    assert torch.allclose(resample_pos_embed(pos, (4, 4), (4, 4), has_class_token=True), pos)


def test_resample_pos_embed_inserts_zero_class_token() -> None:
    """Stage 1 -> 2 hand-over: 12x12 sin-cos table -> 14x14 plus a zero entry at index 98."""
    table = sincos_2d_pos_embed(16, (12, 12))[None]
    out = resample_pos_embed(table, (12, 12), (14, 14), has_class_token=False, add_class_token=True)
    assert out.shape == (1, 197, 16)
    assert torch.equal(out[:, 98], torch.zeros(1, 16))
    with pytest.raises(ValueError, match="does not fit"):
        resample_pos_embed(table, (12, 12), (14, 14), has_class_token=True)


def test_sincos_table_layout() -> None:
    table = sincos_2d_pos_embed(8, (2, 3)).view(2, 3, 8)
    # first half encodes the column, second half the row: [sin(c), sin(c/100), cos(c), cos(c/100), ... row]
    assert torch.allclose(
        table[1, 2, :4], torch.tensor([math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)])
    )
    assert torch.allclose(
        table[1, 2, 4:], torch.tensor([math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)])
    )


def test_sincos_pos_embed_is_a_saved_frozen_buffer() -> None:
    model = _tiny(pos_embed="sincos")
    assert "pos_embed" in model.state_dict()
    assert "pos_embed" not in dict(model.named_parameters())
    assert torch.equal(model.pos_embed[0, model.cls_index], torch.zeros(32))


@pytest.mark.parametrize("pos_embed", ["learned", "sincos"])
def test_dynamic_img_size_resamples_positions(pos_embed: str) -> None:
    model = _tiny(dynamic_img_size=True, pos_embed=pos_embed).eval()
    images = torch.randn(2, 3, 96, 48)  # grid (6, 3) -> 18 patches + cls at 9
    tokens = model.embed(images)
    assert tokens.shape == (2, 19, 32)
    cls_pos = tokens[:, 9] - model.cls_token[:, 0]
    assert torch.allclose(cls_pos, model.pos_embed[:, model.cls_index].expand(2, -1), atol=1e-6)
    assert model(images).shape == (2, 19, 32)


def test_wrong_input_size_is_a_clear_error() -> None:
    model = _tiny()
    with pytest.raises(ValueError, match="dynamic_img_size"):
        model(torch.randn(1, 3, 96, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="not divisible"):
        PatchEmbed(64, 16, 3, 8, strict_img_size=False)(torch.randn(1, 3, 70, 64))


# --- training behaviour ---


def test_drop_path_identity_in_eval_and_active_in_train() -> None:
    drop = DropPath(0.5)
    x = torch.randn(64, 3, 4)
    assert drop.eval()(x) is x
    y = drop.train()(x)
    kept = (y != 0).flatten(1).all(1)
    assert 0 < kept.sum() < 64
    assert torch.allclose(y[kept], 2 * x[kept])
    model = _tiny("test_arm_tiny", depth=4, drop_path_rate=0.5).eval()
    images = torch.randn(2, 3, 64, 64)
    assert torch.equal(model(images), model(images))


def test_drop_path_rates_follow_arm() -> None:
    rates = get_preset_config("arm_large_pz16").drop_path_rates()
    assert (
        rates[:2] == [0.0, 0.0]
        and rates[2] == pytest.approx(0.1 / 23)
        and rates[23] == pytest.approx(0.1 * 22 / 23)
    )
    model = _meta("arm_large_pz16")
    assert [layer.drop_path.drop_prob for layer in model.layers] == rates


@pytest.mark.parametrize("name", ["test_arm_tiny", "test_vim_tiny"])
def test_bf16_autocast_forward_backward_is_finite(name: str) -> None:
    model = _tiny(name).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 64, 64))
        loss = out.float().pow(2).mean()
    loss.backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["test_arm_tiny", "test_vim_tiny"])
def test_gradient_reaches_every_parameter(name: str) -> None:
    model = _tiny(name)
    out = model(torch.randn(2, 3, 64, 64))
    (out * torch.randn_like(out)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("name", ["test_arm_tiny", "test_vim_tiny"])
def test_grad_checkpointing_matches(name: str) -> None:
    model = _tiny(name, drop_path_rate=0.0)
    images = torch.randn(2, 3, 64, 64)
    model(images).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(images).sum().backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(grads, model.parameters(), strict=True))


def test_deterministic_for_a_seed() -> None:
    a, b = _tiny(), _tiny()
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    images = torch.randn(1, 3, 64, 64)
    assert torch.equal(a.eval()(images), b.eval()(images))


def test_mixer_init() -> None:
    model = _tiny()
    mixer = model.layers[0].mixer
    dt = F.softplus(mixer.dt_proj_c.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    assert mixer.dt_proj.weight.abs().max() <= 2**-0.5
    assert torch.allclose(mixer.A_c_b_log, torch.log(torch.arange(1.0, 9.0)).expand(32, 8))
    assert torch.equal(mixer.D_b, torch.ones(32)) and mixer.A_log.dtype == torch.float32
    assert torch.equal(model.layers[1].norm2.bias, torch.zeros(32))


@pytest.mark.parametrize("pos_embed", ["learned", "sincos"])
def test_meta_build_then_init_weights_is_complete(pos_embed: str) -> None:
    with torch.device("meta"):
        model = create_backbone("test_arm_tiny", **REF, pos_embed=pos_embed)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    reference = _tiny(pos_embed=pos_embed)
    state, expected = model.state_dict(), reference.state_dict()
    assert all(torch.isfinite(value).all() for value in state.values())
    fixed = [k for k in state if k.split(".")[-1].startswith(("A", "D"))]  # A*_log, D*
    fixed += ["pos_embed"] if pos_embed == "sincos" else []
    assert len(fixed) == 16 + (pos_embed == "sincos")
    assert all(torch.equal(state[k], expected[k]) for k in fixed)
    assert model.no_weight_decay() == reference.no_weight_decay()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 17, 32)


def test_no_weight_decay_names() -> None:
    names = _tiny("test_arm_tiny", depth=1).no_weight_decay()
    expected = {"pos_embed", "cls_token"}
    for s in ["", "_b", "_c", "_c_b"]:
        expected |= {f"layers.0.mixer.A{s}_log", f"layers.0.mixer.D{s}"}
    assert names == expected
    assert "pos_embed" not in _tiny(pos_embed="sincos").no_weight_decay()


# --- config and presets ---


def test_config_json_round_trip_and_derived_sizes() -> None:
    config = get_preset_config("arm_large_pz16", img_size=(224, 192))
    again = VisionMambaConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert config.dt_rank == "auto" and config.resolved_dt_rank == 64
    assert config.resolved_mlp_hidden_dim == 2730
    assert get_preset_config("arm_base_pz16").resolved_mlp_hidden_dim == 2048
    assert get_preset_config("vim_base_patch16").resolved_mlp_hidden_dim is None
    assert (config.grid_size, config.num_tokens, config.cls_index) == ((14, 12), 169, 84)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"block_style": "vmamba"}, "block_style"),
        ({"scan_directions": 3}, "scan_directions"),
        ({"img_size": 100}, "divisible"),
        ({"embed_dim": 0}, "embed_dim"),
        ({"dt_rank": "big"}, "dt_rank"),
        ({"pos_embed": "rope"}, "pos_embed"),
        ({"drop_path_rate": 1.0}, "drop_path_rate"),
        ({"divide_out": False}, "divide_out"),
        ({"ssm_impl": "triton"}, "ssm_impl"),
        ({"block_style": "vim", "mlp_hidden_dim": 64}, "no MLP"),
        ({"embed_dim": 30, "pos_embed": "sincos"}, "divisible by 4"),
        ({"depht": 3}, "unknown VisionMambaConfig field"),
    ],
)
def test_config_validation(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_preset_config("test_arm_tiny", **overrides)


def test_unknown_preset_lists_known_ones() -> None:
    with pytest.raises(ValueError, match=r"arm_large_pz16.*vim_tiny_patch16"):
        create_backbone("arm_gigantic")
    assert "test_arm_tiny" in list_presets("test_")


def test_create_backbone_from_config_with_overrides() -> None:
    model = create_backbone(get_preset_config("test_vim_tiny"), depth=1, **REF)
    assert len(model.layers) == 1 and model.config.block_style == "vim"
    with pytest.raises(TypeError):
        create_backbone(42)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_causal_depthwise_conv1d_equals_torch_conv(reverse: bool, with_bias: bool) -> None:
    """The shift-add conv equals nn.Conv1d's depthwise causal conv (on the flipped sequence if reverse)."""
    from mambaxray_ctl.backbone.mixer import causal_depthwise_conv1d

    torch.manual_seed(0)
    x = torch.randn(2, 6, 11, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 1, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True) if with_bias else None
    got = causal_depthwise_conv1d(x, weight, bias, reverse)
    seq = x.flip(-1) if reverse else x
    want = torch.nn.functional.conv1d(seq, weight, bias, padding=3, groups=6)[..., :11]
    want = want.flip(-1) if reverse else want
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    leaves = [t for t in (x, weight, bias) if t is not None]
    grads = torch.autograd.grad(got.square().sum(), leaves)
    want_grads = torch.autograd.grad(want.square().sum(), leaves)
    for grad, want_grad in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(grad, want_grad, rtol=0, atol=1e-10)


def test_causal_depthwise_conv1d_keeps_the_input_dtype() -> None:
    """bfloat16 activations with float32 weights (autocast) give a bfloat16 output: the float32 sums
    rounded once."""
    from mambaxray_ctl.backbone.mixer import causal_depthwise_conv1d

    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 6, 11).bfloat16(), torch.randn(6, 1, 4), torch.randn(6)
    got = causal_depthwise_conv1d(x, weight, bias)
    assert got.dtype == torch.bfloat16
    want = F.conv1d(x.float(), weight, bias, padding=3, groups=6)[..., :11]
    torch.testing.assert_close(got, want.bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("length", [1, 3, 37], ids=["L1", "L3", "L37"])
def test_fused_conv_silu_equals_the_conv_and_silu(reverse: bool, with_bias: bool, length: int) -> None:
    """The fused CPU causal conv + SiLU: values and gradients of F.silu(causal_depthwise_conv1d(...)), on
    a strided x (the x half of xz, as in the mixer), float64 and float32."""
    from mambaxray_ctl.backbone.mixer import causal_depthwise_conv1d
    from mambaxray_ctl.ops import causal_conv1d_silu_cpu, cpu_fused_available

    if not cpu_fused_available():
        pytest.skip("the fused CPU extension cannot be built here")
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        g = torch.Generator().manual_seed(length)
        xz = torch.randn(3, 2 * 19, length, generator=g, dtype=dtype).requires_grad_()
        weight = torch.randn(19, 1, 4, generator=g, dtype=dtype).requires_grad_()
        bias = torch.randn(19, generator=g, dtype=dtype).requires_grad_() if with_bias else None
        dout = torch.randn(3, 19, length, generator=g, dtype=dtype)
        x = xz.chunk(2, dim=1)[0]
        got = causal_conv1d_silu_cpu(x, weight, bias, reverse)
        want = F.silu(causal_depthwise_conv1d(x, weight, bias, reverse))
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        leaves = [t for t in (xz, weight, bias) if t is not None]
        grads = torch.autograd.grad(got, leaves, dout)
        for grad, want_grad in zip(grads, torch.autograd.grad(want, leaves, dout), strict=True):
            torch.testing.assert_close(grad, want_grad, rtol=tol, atol=tol)
        with torch.no_grad():
            torch.testing.assert_close(causal_conv1d_silu_cpu(x, weight, bias, reverse), got, rtol=0, atol=0)
    low = causal_conv1d_silu_cpu(x.detach().bfloat16(), weight.detach(), None, reverse)
    assert low.dtype == torch.bfloat16


SCAN_ARGS = ("u", "delta", "A", "B", "C")


@pytest.mark.parametrize(("name", "impl"), [("test_arm_tiny", "reference"), ("test_vim_tiny", "cpu_fused")])
def test_bf16_autocast_scan_runs_in_bf16_and_matches_float32(
    name: str, impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under bf16 autocast, u, delta, B, C and z reach the scan in bfloat16 (A, D and delta_bias stay
    float32, as mamba-ssm expects), and forward and backward match a float32 run."""
    if impl == "cpu_fused" and not cpu_fused_available():
        pytest.skip("the fused CPU extension cannot be built here")
    seen: list[dict[str, torch.dtype]] = []

    def spy(*args: torch.Tensor, **kwargs) -> torch.Tensor:
        tensors = dict(zip(SCAN_ARGS, args, strict=True)) | {k: kwargs[k] for k in ("D", "z", "delta_bias")}
        seen.append({k: t.dtype for k, t in tensors.items()})
        return selective_scan(*args, **kwargs)

    monkeypatch.setattr(mixer_module, "selective_scan", spy)
    torch.manual_seed(0)
    model = create_backbone(name, ssm_impl=impl, drop_path_rate=0.0)
    images = torch.randn(2, 3, 64, 64)
    out = model(images)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), list(model.parameters()))
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16 = model(images)
    grads_bf16 = torch.autograd.grad((out_bf16.float() * weights).sum(), list(model.parameters()))

    low, f32 = torch.bfloat16, torch.float32
    expected = {"u": low, "delta": low, "B": low, "C": low, "z": low, "A": f32, "D": f32, "delta_bias": f32}
    assert len(seen) == model.config.depth * model.config.scan_directions
    assert all(call == expected for call in seen)
    # bf16 keeps 8 significant bits (relative rounding 2^-9); the output, a few roundings deep, measured
    # 0.3 % of its largest value. Gradients sum bf16 products over positions with cancellation: x_proj's
    # measured up to 5 % relative (L2) error, so 10 % flags a float32 scan or a broken chain, not noise.
    torch.testing.assert_close(out_bf16.float(), out, rtol=0, atol=1e-2 * out.abs().max().item())
    for (param_name, _), grad, grad_bf16 in zip(model.named_parameters(), grads, grads_bf16, strict=True):
        assert grad_bf16.dtype == f32
        assert (grad_bf16 - grad).norm() <= 0.1 * grad.norm(), param_name
