"""Backbone checkpoints: official formats (docs/METHOD.md#official-checkpoint-formats), reading, strict
loading, export, CLI.

The official state dicts are built here from the documented key names and shape formulas, not from
the model, so a naming difference between the backbone and the official checkpoints fails a test.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from mambaxray_ctl.backbone import VisionMamba, create_backbone
from mambaxray_ctl.backbone.checkpoints import (
    CheckpointError,
    convert_state_dict,
    detect_format,
    init_backbone_from,
    load_backbone,
    load_backbone_weights,
    read_state_dict,
    save_backbone,
    state_dict_sha256,
    summarize_keys,
)
from mambaxray_ctl.backbone.convert_command import _infer_preset
from mambaxray_ctl.cli import main

REF = {"ssm_impl": "reference"}
ARM_SMALL = {"embed_dim": 64, "depth": 2, **REF}  # same key structure as ARM-Base/Large, d_state 16
VL_EXTRAS = {  # non-backbone keys of a stage-2/3 checkpoint (docs/METHOD.md#stage-2-to-stage-3)
    "vision_proj.weight": (32, 64),
    "vision_proj.bias": (32,),
    "text_proj.weight": (32, 24),
    "logit_scale": (),
    "text_encoder.embeddings.word_embeddings.weight": (10, 24),
    "text_encoder.encoder.layer.0.output.dense.weight": (24, 24),
    "llama_proj.weight": (48, 64),
    "layer_norm.weight": (48,),
}
DECODER_KEYS = {  # ARM stage-1 decoder side (docs/METHOD.md#stage-1-to-stage-2), shrunk to 16 wide
    "ar_token": (1, 1, 16),
    "dec_pos_embed": (1, 128, 16),
    "enc2dec.weight": (64, 256),
    "enc2dec.bias": (64,),
    "dec_block.0.cross_attn.q.weight": (16, 16),
    "dec_block.3.mlp.fc2.bias": (16,),
    **{f"norm_{k}.{p}": (64,) for k in range(1, 5) for p in ("weight", "bias")},
    "ar_norm.weight": (16,),
    "ar_norm.bias": (16,),
    "ar_pred.weight": (768, 16),
    "ar_pred.bias": (768,),
    "mask": (128, 128),
}


# --- official-format builders (docs/METHOD.md#official-checkpoint-formats) -------------------------------
def _mixer_shapes(i: int, dim: int, d_inner: int, d_state: int, suffixes: tuple[str, ...]) -> dict:
    rank = math.ceil(dim / 16)
    m = f"layers.{i}.mixer."
    shapes = {m + "in_proj.weight": (2 * d_inner, dim), m + "out_proj.weight": (dim, d_inner)}
    for s in suffixes:
        shapes |= {
            f"{m}conv1d{s}.weight": (d_inner, 1, 4),
            f"{m}conv1d{s}.bias": (d_inner,),
            f"{m}x_proj{s}.weight": (rank + 2 * d_state, d_inner),
            f"{m}dt_proj{s}.weight": (d_inner, rank),
            f"{m}dt_proj{s}.bias": (d_inner,),
            f"{m}A{s}_log": (d_inner, d_state),
            f"{m}D{s}": (d_inner,),
        }
    return shapes


def arm_shapes(dim: int, depth: int, grid: int = 14, d_state: int = 16, stage1: bool = False) -> dict:
    """The ``mambaxray-vl`` layout (stages 2-3: 4 directions, cls, norm_f) or the encoder part of the
    ``arm-pretrain`` one (stage 1)."""
    hidden = dim * 4 * 2 // 3
    shapes = {"patch_embed.proj.weight": (dim, 3, 16, 16), "patch_embed.proj.bias": (dim,)}
    shapes["pos_embed"] = (1, grid * grid + (0 if stage1 else 1), dim)
    if not stage1:
        shapes |= {"cls_token": (1, 1, dim), "norm_f.weight": (dim,), "norm_f.bias": (dim,)}
    suffixes = ("",) if stage1 else ("", "_b", "_c", "_c_b")
    for i in range(depth):
        shapes |= _mixer_shapes(i, dim, dim, d_state, suffixes)
        shapes |= {
            f"layers.{i}.mlp.w1.weight": (hidden, dim),
            f"layers.{i}.mlp.w1.bias": (hidden,),
            f"layers.{i}.mlp.w2.weight": (hidden, dim),
            f"layers.{i}.mlp.w2.bias": (hidden,),
            f"layers.{i}.mlp.w3.weight": (dim, hidden),
            f"layers.{i}.mlp.w3.bias": (dim,),
        }
        shapes |= {f"layers.{i}.norm{n}.{p}": (dim,) for n in (1, 2) for p in ("weight", "bias")}
    return shapes


def vim_shapes(dim: int, depth: int, grid: int = 14, d_state: int = 16) -> dict:
    """The ``vim`` layout: d_inner = 2D, 2 directions, RMSNorm weights only, classifier head."""
    shapes = {
        "patch_embed.proj.weight": (dim, 3, 16, 16),
        "patch_embed.proj.bias": (dim,),
        "cls_token": (1, 1, dim),
        "pos_embed": (1, grid * grid + 1, dim),
        "norm_f.weight": (dim,),
        "head.weight": (1000, dim),
        "head.bias": (1000,),
    }
    for i in range(depth):
        shapes |= _mixer_shapes(i, dim, 2 * dim, d_state, ("", "_b"))
        shapes[f"layers.{i}.norm.weight"] = (dim,)
    return shapes


def randomize(shapes: dict, seed: int = 0, prefix: str = "") -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {prefix + k: 0.2 * torch.randn(shape, generator=gen) for k, shape in shapes.items()}


def _forward(model: VisionMamba, seed: int = 1) -> Tensor:
    size = model.config.img_hw
    images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(images)


def _direct(name: str, state_dict: dict[str, Tensor], **overrides) -> VisionMamba:
    """A model with ``state_dict`` loaded by plain ``load_state_dict`` (no converter)."""
    model = create_backbone(name, **overrides)
    model.load_state_dict(state_dict, strict=True)
    return model


# --- MambaXray-VL / CTL stage-2/3 -------------------------------------------------------------------------
def test_mambaxray_vl_converts_and_loads_strictly() -> None:
    backbone = randomize(arm_shapes(64, 2))
    source = {f"visual_encoder.{k}": v for k, v in backbone.items()} | randomize(VL_EXTRAS, seed=1)
    assert detect_format(source) == "mambaxray-vl"

    model = create_backbone("arm_base_pz16", **ARM_SMALL)
    report = init_backbone_from(model, source)

    assert report.source_format == "mambaxray-vl"
    assert sorted(report.ignored) == sorted(VL_EXTRAS)
    assert report.initialised == [] and report.unexpected == []
    assert sorted(report.loaded) == sorted(backbone)
    assert report.sha256 == state_dict_sha256(backbone)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, backbone[name]), name
    torch.testing.assert_close(_forward(model), _forward(_direct("arm_base_pz16", backbone, **ARM_SMALL)))


def test_mambaxray_vl_column_backward_direction_is_used() -> None:
    backbone = randomize(arm_shapes(64, 2))
    source = {f"visual_encoder.{k}": v for k, v in backbone.items()}
    model = create_backbone("arm_base_pz16", **ARM_SMALL)
    init_backbone_from(model, source)
    before = _forward(model)
    source["visual_encoder.layers.1.mixer.A_c_b_log"] = (
        source["visual_encoder.layers.1.mixer.A_c_b_log"] + 1.0
    )
    init_backbone_from(model, source)
    assert not torch.allclose(before, _forward(model))


def test_real_arm_base_shapes_load_strictly() -> None:
    backbone = {k: torch.full(shape, float(i)) for i, (k, shape) in enumerate(arm_shapes(768, 12).items())}
    with torch.device("meta"):  # skip the random init: every tensor is overwritten
        model = create_backbone("arm_base_pz16")
    model.to_empty(device="cpu")
    report = init_backbone_from(model, {f"visual_encoder.{k}": v for k, v in backbone.items()})
    assert len(report.loaded) == len(backbone) == len(model.state_dict())
    assert torch.equal(model.layers[11].mixer.A_c_b_log, backbone["layers.11.mixer.A_c_b_log"])
    assert model.pos_embed.shape == (1, 197, 768)


# --- ARM stage-1 pretraining ------------------------------------------------------------------------------
def _stage1(dim: int = 64, depth: int = 2, grid: int = 12) -> dict[str, Tensor]:
    return randomize(arm_shapes(dim, depth, grid=grid, stage1=True)) | randomize(DECODER_KEYS, seed=2)


def test_arm_pretrain_copies_forward_scan_to_all_directions() -> None:
    source = _stage1()
    assert detect_format(source) == "arm-pretrain"
    model = create_backbone("arm_base_pz16", **ARM_SMALL)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = init_backbone_from(model, source)

    assert sorted(report.ignored) == sorted(DECODER_KEYS)
    assert report.initialised == ["cls_token", "norm_f.weight", "norm_f.bias"]
    assert any("copied" in note for note in report.notes)
    loaded = model.state_dict()
    for name in ("cls_token", "norm_f.weight", "norm_f.bias"):
        assert torch.equal(loaded[name], fresh[name]), name
    for i in range(2):
        m = f"layers.{i}.mixer."
        for s in ("", "_b", "_c", "_c_b"):
            for param in ("conv1d{s}.weight", "conv1d{s}.bias", "x_proj{s}.weight", "dt_proj{s}.weight"):
                assert torch.equal(loaded[m + param.format(s=s)], source[m + param.format(s="")])
            assert torch.equal(loaded[f"{m}dt_proj{s}.bias"], source[f"{m}dt_proj.bias"])
            assert torch.equal(loaded[f"{m}A{s}_log"], source[f"{m}A_log"])
            assert torch.equal(loaded[f"{m}D{s}"], source[f"{m}D"])
        for param in ("in_proj.weight", "out_proj.weight"):
            assert torch.equal(loaded[m + param], source[m + param])
    assert torch.equal(loaded["layers.1.mlp.w3.weight"], source["layers.1.mlp.w3.weight"])
    assert torch.equal(loaded["layers.0.norm2.bias"], source["layers.0.norm2.bias"])


def test_arm_pretrain_pos_embed_resampled_with_zero_class_entry() -> None:
    source = _stage1(depth=1)
    model = create_backbone("arm_base_pz16", **{**ARM_SMALL, "depth": 1})
    report = init_backbone_from(model, source)

    pos = model.pos_embed.detach()
    assert pos.shape == (1, 197, 64)
    assert torch.equal(pos[0, 98], torch.zeros(64))
    grid = source["pos_embed"].reshape(1, 12, 12, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(14, 14), mode="bicubic", align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(1, 196, 64)
    torch.testing.assert_close(torch.cat([pos[:, :98], pos[:, 99:]], dim=1), expected)
    assert any("12x12 -> 14x14" in note and "index 98" in note for note in report.notes)


def test_arm_pretrain_forward_equals_hand_built_state_dict() -> None:
    source = _stage1(depth=1, grid=3)
    config = {**ARM_SMALL, "depth": 1, "img_size": 64}  # 4x4 grid, 17 tokens
    model = create_backbone("arm_base_pz16", **config)
    init_backbone_from(model, source)

    manual = {k: v for k, v in source.items() if k not in DECODER_KEYS}
    m = "layers.0.mixer."
    for s in ("_b", "_c", "_c_b"):
        for name in ("conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias"):
            module, param = name.split(".")
            manual[f"{m}{module}{s}.{param}"] = source[m + name]
        manual[f"{m}A{s}_log"] = source[f"{m}A_log"]
        manual[f"{m}D{s}"] = source[f"{m}D"]
    manual["pos_embed"] = model.pos_embed.detach()  # checked against F.interpolate above
    manual |= {k: model.state_dict()[k] for k in ("cls_token", "norm_f.weight", "norm_f.bias")}
    torch.testing.assert_close(_forward(model), _forward(_direct("arm_base_pz16", manual, **config)))


def test_arm_pretrain_into_a_stage1_encoder_is_identity() -> None:
    source = _stage1(dim=32, depth=4, grid=6)
    backbone = {k: v for k, v in source.items() if k not in DECODER_KEYS}
    model = create_backbone("test_arm_tiny_pretrain", d_state=16)
    report = init_backbone_from(model, source)
    assert report.initialised == ["norm_f.weight", "norm_f.bias"]
    for name, tensor in backbone.items():
        assert torch.equal(model.state_dict()[name], tensor), name


# --- hustvl Vim -------------------------------------------------------------------------------------------
VIM_SMALL = {"embed_dim": 32, "depth": 2, "img_size": 64, **REF}


def test_vim_drops_head_and_loads_strictly(tmp_path) -> None:
    weights = randomize(vim_shapes(32, 2, grid=4))
    ema = randomize(vim_shapes(32, 2, grid=4), seed=5)
    torch.save(
        {"model": weights, "model_ema": ema, "epoch": 3, "args": argparse.Namespace(lr=1e-3)},
        tmp_path / "v.pth",
    )
    source = read_state_dict(tmp_path / "v.pth", key="model_ema")
    assert detect_format(source) == "vim"

    model = create_backbone("vim_tiny_patch16", **VIM_SMALL)
    report = init_backbone_from(model, source)
    assert sorted(report.ignored) == ["head.bias", "head.weight"]
    backbone = {k: v for k, v in ema.items() if not k.startswith("head.")}
    torch.testing.assert_close(_forward(model), _forward(_direct("vim_tiny_patch16", backbone, **VIM_SMALL)))

    source["layers.0.mixer.x_proj_b.weight"] = source["layers.0.mixer.x_proj_b.weight"] * 2
    before = _forward(model)
    init_backbone_from(model, source)
    assert not torch.allclose(before, _forward(model))


def test_vim_weights_do_not_fit_the_arm_backbone() -> None:
    model = create_backbone("arm_base_pz16", embed_dim=32, depth=2, img_size=64)
    with pytest.raises(CheckpointError, match=r"missing backbone key\(s\): .*mixer\.conv1d_c\.weight"):
        init_backbone_from(model, randomize(vim_shapes(32, 2, grid=4)))


# --- strict loading errors and reports --------------------------------------------------------------------
def _vl_source() -> dict[str, Tensor]:
    return {f"visual_encoder.{k}": v for k, v in randomize(arm_shapes(64, 2, grid=4)).items()}


def _small_arm() -> VisionMamba:
    return create_backbone("arm_base_pz16", **ARM_SMALL, img_size=64)


def test_missing_key_is_named() -> None:
    source = _vl_source()
    del source["visual_encoder.layers.1.mixer.D_c_b"]
    with pytest.raises(CheckpointError, match=r"missing backbone key\(s\): layers\.1\.mixer\.D_c_b$"):
        init_backbone_from(_small_arm(), source)


def test_shape_mismatch_names_key_and_both_shapes() -> None:
    source = _vl_source()
    source["visual_encoder.layers.0.mixer.x_proj_b.weight"] = torch.zeros(90, 64)
    with pytest.raises(
        CheckpointError,
        match=r"layers\.0\.mixer\.x_proj_b\.weight: checkpoint \(90, 64\), backbone \(36, 64\)",
    ):
        init_backbone_from(_small_arm(), source)


def test_unexpected_key_is_an_error_when_strict_and_reported_otherwise() -> None:
    source = _vl_source() | {"visual_encoder.extra.scale": torch.ones(3)}
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\) not in the backbone: extra\.scale"):
        init_backbone_from(_small_arm(), source)
    report = init_backbone_from(_small_arm(), source, strict=False)
    assert report.unexpected == ["extra.scale"]
    assert "extra.scale" not in report.loaded


def test_load_backbone_weights_reports_and_hashes_loaded_tensors() -> None:
    model = _small_arm()
    state_dict = {k: v + 1 for k, v in model.state_dict().items()}
    report = load_backbone_weights(model, state_dict, ignored=["head.weight"], initialised=["cls_token"])
    assert report.ignored == ["head.weight"] and report.initialised == ["cls_token"]
    assert "cls_token" not in report.loaded and len(report.loaded) == len(state_dict) - 1
    assert report.sha256 == state_dict_sha256(state_dict, report.loaded)
    assert len(report.sha256) == 16
    assert report.sha256 != state_dict_sha256(state_dict)


def test_given_format_must_agree_with_the_keys() -> None:
    with pytest.raises(CheckpointError, match="looks like 'mambaxray-vl', not 'vim'"):
        convert_state_dict(_vl_source(), _small_arm(), "vim")


def test_lightning_checkpoint_with_prefix(tmp_path) -> None:
    backbone = randomize(arm_shapes(64, 2, grid=4))
    state_dict = {f"backbone.{k}": v for k, v in backbone.items()} | {"head.proj.weight": torch.ones(2, 2)}
    torch.save({"state_dict": state_dict, "epoch": 1, "hyper_parameters": {"lr": 0.1}}, tmp_path / "s.ckpt")
    model = _small_arm()
    report = init_backbone_from(model, tmp_path / "s.ckpt", prefix="backbone.")
    assert report.source_format == "backbone" and report.ignored == ["head.proj.weight"]
    assert torch.equal(model.norm_f.bias, backbone["norm_f.bias"])
    with pytest.raises(CheckpointError, match=r"s\.ckpt: no key starts with 'encoder\.'"):
        init_backbone_from(model, tmp_path / "s.ckpt", prefix="encoder.")


def test_detect_format_rejects_unknown_keys() -> None:
    with pytest.raises(CheckpointError, match="cannot tell the checkpoint format"):
        detect_format({"encoder.weight": torch.ones(1)})


def test_summarize_keys() -> None:
    keys = ["text_encoder.a", "text_encoder.b", "logit_scale", "vision_proj.weight"]
    assert summarize_keys(keys) == "text_encoder.* (2), logit_scale, vision_proj.weight"
    assert summarize_keys([]) == "none"


# --- reading files ----------------------------------------------------------------------------------------
class Payload:
    """Stands for an arbitrary pickled object in a checkpoint."""


def test_read_uses_weights_only(tmp_path, monkeypatch) -> None:
    torch.save({"model": {"a": torch.ones(1)}}, tmp_path / "c.pth")
    calls = []
    original = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    read_state_dict(tmp_path / "c.pth")
    assert calls == [{"map_location": "cpu", "weights_only": True}]


def test_custom_pickled_object_is_refused(tmp_path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": {"a": torch.ones(1)}, "extra": Payload()}, path)
    with pytest.raises(
        CheckpointError, match=r"refusing to load .*evil\.pth with weights_only=True: .*Payload"
    ):
        read_state_dict(path)


def test_official_wrappers_and_module_prefix(tmp_path) -> None:
    from lightning.fabric.utilities.data import AttributeDict

    sd = {"module.layers.0.mixer.D": torch.ones(2)}
    torch.save(
        {"model": sd, "optimizer": {}, "epoch": 1, "args": argparse.Namespace(a=1)}, tmp_path / "a.pth"
    )
    torch.save({"model": sd, "config": AttributeDict(lr=1e-4), "step": 5}, tmp_path / "b.pth")
    torch.save(sd, tmp_path / "flat.pt")
    save_file({"layers.0.mixer.D": torch.ones(2)}, str(tmp_path / "s.safetensors"))
    for name in ("a.pth", "b.pth", "flat.pt", "s.safetensors"):
        assert list(read_state_dict(tmp_path / name)) == ["layers.0.mixer.D"], name


@pytest.mark.parametrize(
    ("content", "key", "message"),
    [
        (None, None, "checkpoint file not found: .*nope.pth"),
        (b"hello", None, "cannot read checkpoint .*bad.pth"),
        ([torch.ones(1)], None, "bad.pth holds a list, not a state dict"),
        ({"model": {"a": torch.ones(1)}}, "model_ema", r"bad.pth: no state dict under 'model_ema'"),
        ({"model": {"a": 1}}, None, r"bad.pth: entry 'model' is not a state dict"),
    ],
)
def test_unreadable_files_are_named(tmp_path, content, key, message) -> None:
    path = tmp_path / ("nope.pth" if content is None else "bad.pth")
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=message):
        read_state_dict(path, key=key)


# --- export -----------------------------------------------------------------------------------------------
def test_save_and_load_backbone_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_backbone("test_arm_tiny", **REF)
    weights, sidecar = save_backbone(
        model, None, tmp_path / "out" / "backbone.safetensors", metadata={"stage": "2"}
    )
    assert sidecar == tmp_path / "out" / "backbone.json"
    side = json.loads(sidecar.read_text())
    assert side["config"] == model.config.to_dict() and side["stage"] == "2"
    with safe_open(str(weights), framework="pt") as f:
        assert json.loads(f.metadata()["config"]) == model.config.to_dict()

    loaded = load_backbone(weights)
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    torch.testing.assert_close(_forward(loaded), _forward(model))


def test_save_state_dict_needs_a_fitting_config(tmp_path) -> None:
    model = create_backbone("test_vim_tiny")
    state_dict = model.state_dict()
    save_backbone(state_dict, model.config, tmp_path / "v.safetensors")
    assert torch.equal(load_backbone(tmp_path / "v.safetensors").norm_f.weight, model.norm_f.weight)
    del state_dict["norm_f.weight"]
    with pytest.raises(CheckpointError, match=r"missing backbone key.*norm_f\.weight"):
        save_backbone(state_dict, model.config, tmp_path / "w.safetensors")


def test_load_backbone_falls_back_to_sidecar_and_checks_hash(tmp_path) -> None:
    model = create_backbone("test_arm_tiny")
    weights, sidecar = save_backbone(model, None, tmp_path / "b.safetensors")
    with safe_open(str(weights), framework="pt") as f:
        header = f.metadata()
    tampered = {k: v.clone() for k, v in model.state_dict().items()}
    tampered["norm_f.bias"] += 1
    save_file(tampered, str(weights), metadata=header)
    with pytest.raises(CheckpointError, match=r"tensor hash .* differs from the recorded"):
        load_backbone(weights)

    save_file(model.state_dict(), str(weights))  # no metadata: the config comes from the sidecar
    assert load_backbone(weights).config == model.config
    sidecar.unlink()
    with pytest.raises(
        CheckpointError, match=r"b\.safetensors: no backbone config in its metadata and no sidecar b\.json"
    ):
        load_backbone(weights)


# --- preset inference and the CLI -------------------------------------------------------------------------
def _meta_tensors(shapes: dict, prefix: str = "") -> dict[str, Tensor]:
    return {prefix + k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


def test_infer_preset_from_official_shapes() -> None:
    assert (
        _infer_preset(_meta_tensors(arm_shapes(1024, 24), "visual_encoder."), "mambaxray-vl")
        == "arm_large_pz16"
    )
    assert (
        _infer_preset(_meta_tensors(arm_shapes(768, 12, grid=12, stage1=True)), "arm-pretrain")
        == "arm_base_pz16"
    )
    assert _infer_preset(_meta_tensors(vim_shapes(384, 24)), "vim") == "vim_small_patch16"
    with pytest.raises(CheckpointError, match="embed_dim 64 and depth 2; pass --preset"):
        _infer_preset(_meta_tensors(arm_shapes(64, 2)), "backbone")


def test_cli_converts_a_stage2_checkpoint(tmp_path, capsys) -> None:
    backbone = randomize(arm_shapes(32, 2, grid=4, d_state=8))
    source = {f"visual_encoder.{k}": v for k, v in backbone.items()} | randomize(VL_EXTRAS, seed=1)
    torch.save({"model": source, "config": {"lr": 1e-4}, "epoch": 4, "step": 50}, tmp_path / "clip.pth")
    dst = tmp_path / "backbone.safetensors"

    code = main(["convert-checkpoint", str(tmp_path / "clip.pth"), str(dst), "--preset", "test_arm_tiny"])
    out = capsys.readouterr().out
    assert code == 0
    assert "source format : mambaxray-vl" in out
    assert f"loaded        : {len(backbone)} tensors, sha256 {state_dict_sha256(backbone)}" in out
    assert "dropped       : 8 key(s): vision_proj.* (2)" in out
    assert str(dst) in out and str(tmp_path / "backbone.json") in out
    loaded = load_backbone(dst)
    for name, tensor in backbone.items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_cli_converts_stage1_and_vim_ema(tmp_path, capsys) -> None:
    stage1 = randomize(arm_shapes(32, 2, grid=3, d_state=8, stage1=True)) | randomize(DECODER_KEYS, seed=3)
    torch.save(
        {"model": stage1, "epoch": 100, "args": argparse.Namespace(input_size=192)}, tmp_path / "s1.pth"
    )
    code = main(
        [
            "convert-checkpoint",
            str(tmp_path / "s1.pth"),
            str(tmp_path / "a.safetensors"),
            "--preset",
            "test_arm_tiny",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "initialised   : cls_token, norm_f.weight, norm_f.bias (fresh init, not loaded)" in out
    assert "3x3 -> 4x4" in out and "index 8" in out
    assert load_backbone(tmp_path / "a.safetensors").pos_embed.shape == (1, 17, 32)

    vim = randomize(vim_shapes(32, 2, grid=4, d_state=8))
    torch.save({"model": {}, "model_ema": vim}, tmp_path / "vim.pth")
    args = [
        "convert-checkpoint",
        str(tmp_path / "vim.pth"),
        str(tmp_path / "v.safetensors"),
        "--preset",
        "test_vim_tiny",
    ]
    assert main([*args, "--ema", "--img-size", "96"]) == 0
    loaded = load_backbone(tmp_path / "v.safetensors")
    assert loaded.pos_embed.shape == (1, 37, 32)
    assert torch.equal(loaded.layers[1].mixer.A_b_log, vim["layers.1.mixer.A_b_log"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.pth", "out.safetensors"], "checkpoint file not found: missing.pth"),
        (["clip.pth", "out.safetensors", "--from", "vim"], "looks like 'mambaxray-vl', not 'vim'"),
        (["clip.pth", "out.safetensors", "--preset", "test_vim_tiny"], "missing backbone key"),
        (["clip.pth", "out.safetensors", "--preset", "test_arm_tiny", "--img-size", "70"], "not divisible"),
        (["odd.pth", "out.safetensors"], "cannot infer the preset of an 'arm' backbone with embed_dim 48"),
        (["clip.pth", "out.pth", "--preset", "test_arm_tiny"], "DST must end in .safetensors"),
    ],
)
def test_cli_user_errors_exit_1_with_one_line(tmp_path, monkeypatch, capsys, args, message) -> None:
    monkeypatch.chdir(tmp_path)
    source = {f"visual_encoder.{k}": v for k, v in randomize(arm_shapes(32, 2, grid=4, d_state=8)).items()}
    torch.save({"model": source}, tmp_path / "clip.pth")
    torch.save({"model": randomize(arm_shapes(48, 2, grid=4))}, tmp_path / "odd.pth")
    assert main(["convert-checkpoint", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mambaxray-ctl convert-checkpoint: error: ") and err.count("\n") == 1
    assert message in err
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_shape_mismatch_names_the_key(tmp_path, capsys) -> None:
    source = {f"visual_encoder.{k}": v for k, v in randomize(arm_shapes(32, 2, grid=4, d_state=8)).items()}
    source["visual_encoder.layers.1.mlp.w3.weight"] = torch.zeros(32, 20)
    torch.save({"model": source}, tmp_path / "clip.pth")
    code = main(
        [
            "convert-checkpoint",
            str(tmp_path / "clip.pth"),
            str(tmp_path / "o.safetensors"),
            "--preset",
            "test_arm_tiny",
        ]
    )
    assert code == 1
    assert (
        "shape mismatch for layers.1.mlp.w3.weight: checkpoint (32, 20), backbone (32, 85)"
        in capsys.readouterr().err
    )
