"""Stage 1 (ARM): cluster order, patches, block-causal mask, official shapes, causality, norm-pix targets,
default feature layers, weight-decay groups, a short optimisation, the export of a fit, bad configs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor
from torch.utils.data import DataLoader

from mambaxray_ctl.backbone import load_backbone
from mambaxray_ctl.data import ReportDataModule
from mambaxray_ctl.stages.arm import ARMModule, default_feature_layers
from mambaxray_ctl.stages.arm_decoder import block_causal_mask, cluster_order
from mambaxray_ctl.stages.base import BackboneStage
from mambaxray_ctl.stages.optim import decay_groups
from mambaxray_ctl.stages.pretraining import patchify, unpatchify
from test_data_helpers import make_dataset

# 96 px, patch 16 -> 6x6 patch grid -> 3x3 clusters of 2x2 patches (K = 9, P = 4).
TINY_BACKBONE = {"preset": "test_arm_tiny_pretrain"}
TINY = {"backbone": TINY_BACKBONE, "cluster_size": 2, "decoder_dim": 32, "decoder_heads": 4}
PATCH, GRID, CLUSTER = 16, 6, 2


def tiny_arm(**kwargs: Any) -> ARMModule:
    return ARMModule(**{**TINY, **kwargs})


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    kwargs.setdefault("logger", False)
    return pl.Trainer(
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def loss_drops_on_one_batch(module: BackboneStage, loss: Callable[[Tensor], Tensor], steps: int = 10) -> None:
    """A few AdamW steps (configure_optimizers, through a Trainer) on one fixed batch lower its loss;
    the validation step runs once on it at the end of the epoch."""
    coarse = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    images = torch.nn.functional.interpolate(coarse, size=(96, 96), mode="bilinear")  # smooth, survives crops
    with torch.no_grad():
        before = loss(images).item()
    batch = {"ids": [str(i) for i in range(len(images))], "images": images}
    trainer = quiet_trainer(max_steps=steps)
    trainer.fit(module, DataLoader([batch] * steps, batch_size=None), DataLoader([batch], batch_size=None))
    assert "val/loss" in trainer.callback_metrics
    with torch.no_grad():
        after = loss(images).item()
    assert after < 0.97 * before, (before, after)


def fit_exports_backbone(module: BackboneStage, tmp_path: Path) -> None:
    """A short real fit (2 steps + validation) writes a loadable export equal to the module's backbone, and
    its Lightning checkpoint restores the module from the saved hyper-parameters."""
    annotation, _ = make_dataset(tmp_path / "data", counts=(4, 2, 2), views=1, size=32)
    data = ReportDataModule(
        annotation=str(annotation),
        image_root=str(annotation.parent / "images"),
        mode="images",
        image_size=96,
        batch_size=2,
    )
    trainer = quiet_trainer(
        max_steps=2, limit_val_batches=1, log_every_n_steps=1, logger=CSVLogger(str(tmp_path / "logs"))
    )
    trainer.fit(module, datamodule=data)
    run_dir = Path(trainer.log_dir)
    assert (run_dir / "backbone.safetensors").is_file() and (run_dir / "backbone.json").is_file()
    exported = load_backbone(run_dir / "backbone.safetensors").state_dict()
    expected = module.backbone.state_dict()
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], v) for k, v in expected.items())
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "val/loss"} <= set(header)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    restored = type(module).load_from_checkpoint(tmp_path / "last.ckpt").state_dict()
    assert all(torch.equal(restored[k], v) for k, v in module.state_dict().items())


def test_cluster_order() -> None:
    assert cluster_order((4, 4), 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert cluster_order((2, 4), 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    with pytest.raises(ValueError, match=r"\(6, 6\) is not divisible into 4x4-patch clusters"):
        cluster_order((6, 6), 4)


def test_patchify_layout_and_round_trip() -> None:
    images = torch.randn(2, 3, 32, 48)
    patches = patchify(images, PATCH)
    assert patches.shape == (2, 6, PATCH * PATCH * 3)
    # Row-major patch 4 is row 1, column 1; each patch is flattened as (row, column, channel).
    assert torch.equal(patches[1, 4], images[1, :, 16:32, 16:32].permute(1, 2, 0).reshape(-1))
    assert torch.equal(unpatchify(patches, PATCH, (2, 3)), images)


def test_block_causal_mask() -> None:
    mask = block_causal_mask(3, 4)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, torch.kron(torch.tril(torch.ones(3, 3)), torch.ones(4, 4)).bool())


def test_official_layout_gives_128_encoder_tokens_and_128_queries() -> None:
    # The official code's 192 px / patch 16 / cluster 4 layout on a tiny stack.
    backbone = {**TINY_BACKBONE, "overrides": {"img_size": 192}}
    module = ARMModule(**{**TINY, "cluster_size": 4, "backbone": backbone})
    lengths: list[int] = []
    module.backbone.layers[0].register_forward_pre_hook(lambda _, args: lengths.append(args[0].shape[1]))
    with torch.no_grad():
        pred = module(torch.randn(1, 3, 192, 192))
    assert lengths == [128] and pred.shape == (1, 128, PATCH * PATCH * 3)
    assert module.decoder.mask.shape == (128, 128) and module.decoder.num_tokens == 128
    assert torch.equal(module.decoder.mask, block_causal_mask(8, 16))
    assert module.decoder.dec_pos_embed.shape == (1, 144, 32)  # as ARM's checkpoints: full grid, row-major


def test_prediction_of_cluster_j_plus_1_sees_only_clusters_up_to_j() -> None:
    torch.manual_seed(0)
    module = tiny_arm().eval()
    images = torch.randn(1, 3, 96, 96)
    side, per_row = CLUSTER * PATCH, GRID // CLUSTER
    num_clusters, cluster_len = per_row**2, CLUSTER**2
    with torch.no_grad():
        base = module(images)
        for c in range(num_clusters):  # perturb the pixels of cluster c (0-based, raster over clusters)
            row, col = divmod(c, per_row)
            changed = images.clone()
            changed[..., row * side : (row + 1) * side, col * side : (col + 1) * side] += 1.0
            diff = (module(changed) - base).abs().view(num_clusters - 1, cluster_len, -1).amax(dim=(1, 2))
            # Query block t predicts cluster t + 1 from clusters 0..t.
            assert torch.all(diff[:c] < 1e-6) and torch.all(diff[c:] > 1e-4), (c, diff)


def test_norm_pix_targets_match_a_manual_computation() -> None:
    images = torch.randn(2, 3, 96, 96)
    # Cluster order by hand: clusters raster over the 3x3 cluster grid, 2x2 patches raster inside.
    order = [
        (cr * CLUSTER + pr) * GRID + cc * CLUSTER + pc
        for cr in range(3)
        for cc in range(3)
        for pr in range(CLUSTER)
        for pc in range(CLUSTER)
    ]
    raw, normed = [], []
    for index in order[CLUSTER**2 :]:  # the first cluster is never a target
        r, c = divmod(index, GRID)
        patch = images[:, :, r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH]
        patch = patch.permute(0, 2, 3, 1).reshape(2, -1)
        mean = patch.mean(dim=1, keepdim=True)
        var = (patch - mean).pow(2).sum(dim=1, keepdim=True) / (patch.shape[1] - 1)
        raw.append(patch)
        normed.append((patch - mean) / torch.sqrt(var + 1e-6))
    assert torch.allclose(tiny_arm().targets(images), torch.stack(normed, dim=1), atol=1e-5)
    assert torch.equal(tiny_arm(norm_pix_loss=False).targets(images), torch.stack(raw, dim=1))


def test_default_feature_layers_match_the_official_code() -> None:
    assert default_feature_layers(24, 4) == [11, 15, 19, 23]  # 1-based {12, 16, 20, 24}
    assert default_feature_layers(12, 4) == [5, 7, 9, 11]  # 1-based {6, 8, 10, 12}
    assert default_feature_layers(4, 4) == [0, 1, 2, 3]
    assert default_feature_layers(6, 1) == [5]
    assert tiny_arm().feature_layers == [0, 1, 2, 3]
    deep = tiny_arm(backbone={**TINY_BACKBONE, "overrides": {"depth": 12, "embed_dim": 16}})
    assert deep.feature_layers == [5, 7, 9, 11] and len(deep.decoder.dec_block) == 4
    assert tiny_arm(feature_layers=[1, -1], decoder_depth=2).feature_layers == [1, 3]


def test_weight_decay_groups() -> None:
    module = tiny_arm()
    groups = decay_groups(module.named_parameters(), 0.05, module.no_weight_decay())
    name_of = {id(p): n for n, p in module.named_parameters()}
    decayed = {name_of[id(p)] for p in groups[0]["params"]}
    plain = {name_of[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert {
        "backbone.layers.0.mixer.A_log",
        "backbone.layers.0.mixer.D",
        "backbone.layers.0.norm1.weight",
        "backbone.layers.0.mlp.w1.bias",
        "backbone.patch_embed.proj.bias",
        "decoder.ar_token",
        "decoder.norm_1.weight",
        "decoder.dec_block.0.norm2_1.weight",
        "decoder.enc2dec.bias",
    } <= plain
    assert {
        "backbone.patch_embed.proj.weight",
        "backbone.layers.0.mixer.in_proj.weight",
        "backbone.layers.0.mixer.x_proj.weight",
        "backbone.layers.0.mlp.w1.weight",
        "decoder.enc2dec.weight",
        "decoder.dec_block.0.attn2.q.weight",
        "decoder.dec_block.0.mlp.fc1.weight",
        "decoder.ar_pred.weight",
    } <= decayed
    assert all(name_of[id(p)].endswith(".weight") and p.ndim >= 2 for p in groups[0]["params"])
    assert "backbone.norm_f.weight" not in decayed | plain  # frozen: it never gets a gradient here
    assert "backbone.pos_embed" in module.state_dict() and "backbone.pos_embed" not in name_of.values()


def test_a_few_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    module = tiny_arm(optimizer={"lr": 2e-3}, export=False)
    loss_drops_on_one_batch(module, module.loss)


def test_fit_exports_the_backbone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    fit_exports_backbone(tiny_arm(optimizer={"lr": 1e-3}), tmp_path)


def test_fast_dev_run_does_not_export(tmp_path: Path) -> None:
    batch = {"ids": ["a", "b"], "images": torch.randn(2, 3, 96, 96)}
    trainer = pl.Trainer(
        accelerator="cpu", fast_dev_run=1, default_root_dir=str(tmp_path), enable_progress_bar=False
    )
    trainer.fit(tiny_arm(), DataLoader([batch], batch_size=None), DataLoader([batch], batch_size=None))
    assert not list(tmp_path.rglob("*.safetensors"))


def test_signatures_parse_as_groups_with_the_stage_defaults() -> None:
    """The shared settings are typed groups the CLI fills field by field; stage 1 keeps its own
    optimiser defaults for the fields not given, and the hand-off group comes from the base class."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(ARMModule, "model")
    cfg = parser.parse_args(["--model.feature_layers=[5,7,9,11]", "--model.optimizer.betas=[0.9,0.99]"])
    assert cfg.model.feature_layers == [5, 7, 9, 11] and tuple(cfg.model.optimizer.betas) == (0.9, 0.99)
    assert cfg.model.backbone.preset == "arm_large_pz16_pretrain" and cfg.model.cluster_size == 4
    assert cfg.model.optimizer.lr == 1.5e-4 and cfg.model.optimizer.warmup_steps == 0.05
    assert cfg.model.handoff.source is None and cfg.model.export is True


def test_bad_configs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"6x6 patch grid, which does not split into two or more 4x4"):
        tiny_arm(cluster_size=4)
    with pytest.raises(ValueError, match="does not split into two or more 6x6"):
        tiny_arm(cluster_size=6)  # a single cluster: nothing to predict
    with pytest.raises(ValueError, match=r"decoder_depth=3 must equal len\(feature_layers\)=4"):
        tiny_arm(feature_layers=[0, 1, 2, 3], decoder_depth=3)
    with pytest.raises(ValueError, match="must include the last layer"):
        tiny_arm(feature_layers=[0, 1, 2], decoder_depth=3)
    with pytest.raises(ValueError, match="out of range"):
        tiny_arm(feature_layers=[0, 1, 2, 4])
    with pytest.raises(ValueError, match="cannot pick 5 feature layers from 4"):
        tiny_arm(decoder_depth=5)
    with pytest.raises(ValueError, match="scan_directions=1 and class_token=False"):
        tiny_arm(backbone={"preset": "test_arm_tiny"})
    with pytest.raises(ValueError, match="not divisible by 3 heads"):
        tiny_arm(decoder_heads=3)
    with pytest.raises(ValueError, match="takes 96x96 images"):
        dynamic = {**TINY_BACKBONE, "overrides": {"dynamic_img_size": True}}
        tiny_arm(backbone=dynamic)(torch.randn(1, 3, 64, 64))
