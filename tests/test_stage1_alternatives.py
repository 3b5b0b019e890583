"""Stage-1 Table II alternatives on the same backbone: MAE (masking, masked-only loss) and SimCLR
(tensor augmentations, NT-Xent); both lower their loss and export the backbone like ARM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mambaxray_ctl.stages.mae import MAEModule, random_keep
from mambaxray_ctl.stages.optim import decay_groups
from mambaxray_ctl.stages.pretraining import normalize_patches, patchify
from mambaxray_ctl.stages.simclr import SimCLRModule, color_jitter, nt_xent_loss, random_resized_crop
from test_stage1_arm import fit_exports_backbone, loss_drops_on_one_batch

PRETRAIN_TINY = {"preset": "test_arm_tiny_pretrain"}
MAE_TINY = {"backbone": PRETRAIN_TINY, "decoder_dim": 32, "decoder_depth": 2, "decoder_heads": 4}
SIMCLR_TINY = {"backbone": PRETRAIN_TINY, "proj_hidden_dim": 64, "proj_dim": 16}


def tiny_mae(**kwargs: Any) -> MAEModule:
    return MAEModule(**{**MAE_TINY, **kwargs})


def tiny_simclr(**kwargs: Any) -> SimCLRModule:
    return SimCLRModule(**{**SIMCLR_TINY, **kwargs})


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# MAE ----------------------------------------------------------------------------------------------------
def test_random_keep_is_sorted_and_complements_the_mask() -> None:
    keep, masked = random_keep(3, 36, 9, torch.device("cpu"), seeded())
    assert keep.shape == (3, 9) and masked.shape == (3, 36)
    assert torch.equal(keep, keep.sort(dim=1).values) and all(len(set(row.tolist())) == 9 for row in keep)
    assert masked.sum(dim=1).tolist() == [27, 27, 27]
    assert not masked.gather(1, keep).any()
    again, _ = random_keep(3, 36, 9, torch.device("cpu"), seeded())
    assert torch.equal(keep, again) and not torch.equal(keep[0], keep[1])


def test_mae_encodes_only_the_visible_patches() -> None:
    module = tiny_mae()
    lengths: list[int] = []
    module.backbone.layers[0].register_forward_pre_hook(lambda _, args: lengths.append(args[0].shape[1]))
    keep, _ = random_keep(2, 36, module.num_keep, torch.device("cpu"), seeded())
    with torch.no_grad():
        pred = module(torch.randn(2, 3, 96, 96), keep)
    assert module.num_keep == 9 and lengths == [9] and pred.shape == (2, 36, 16 * 16 * 3)


def test_mae_loss_scores_the_hidden_patches_only(monkeypatch: pytest.MonkeyPatch) -> None:
    module = tiny_mae()
    images = torch.randn(2, 3, 96, 96)
    target = normalize_patches(patchify(images, 16))
    _, masked = random_keep(2, 36, module.num_keep, torch.device("cpu"), seeded())
    wrong_where_visible = target + 5.0 * (~masked)[..., None]
    monkeypatch.setattr(module, "forward", lambda images, keep: wrong_where_visible)
    assert module.loss(images, seeded()).item() == 0.0
    monkeypatch.setattr(module, "forward", lambda images, keep: target + 2.0 * masked[..., None])
    assert module.loss(images, seeded()).item() == pytest.approx(4.0)


def test_mae_a_few_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    module = tiny_mae(optimizer={"lr": 2e-3}, export=False)
    loss_drops_on_one_batch(module, lambda images: module.loss(images, seeded()))


def test_mae_exports_the_backbone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    fit_exports_backbone(tiny_mae(optimizer={"lr": 1e-3}), tmp_path)


def test_mae_bad_configs() -> None:
    with pytest.raises(ValueError, match="leaves 0 of 36 patches visible"):
        tiny_mae(mask_ratio=1.0)
    with pytest.raises(ValueError, match="scan_directions=1 and class_token=False"):
        tiny_mae(backbone={"preset": "test_arm_tiny"})


# SimCLR -------------------------------------------------------------------------------------------------
def test_crop_flip_and_jitter() -> None:
    images = torch.randn(4, 3, 32, 32)
    full = random_resized_crop(images, (1.0, 1.0), flip_prob=0.0, ratio=(1.0, 1.0), generator=seeded())
    assert torch.allclose(full, images, atol=1e-5)
    flipped = random_resized_crop(images, (1.0, 1.0), flip_prob=1.0, ratio=(1.0, 1.0), generator=seeded())
    assert torch.allclose(flipped, images.flip(-1), atol=1e-5)
    ramp = torch.linspace(0, 1, 64).expand(2, 3, 64, 64)  # value = column position
    quarter = random_resized_crop(ramp, (0.25, 0.25), ratio=(1.0, 1.0), generator=seeded())
    span = quarter[..., -1] - quarter[..., 0]
    assert torch.allclose(span, torch.full_like(span, 0.5), atol=0.03)  # half the width, zoomed in
    same = color_jitter(images, 0.0, 0.0)
    assert torch.allclose(same, images, atol=1e-6)
    shifted = color_jitter(images, 0.5, 0.0, seeded()) - images  # one shift per image
    assert torch.allclose(shifted, shifted[:, :1, :1, :1].expand_as(shifted), atol=1e-5)


def test_simclr_views_differ_and_keep_the_shape() -> None:
    module = tiny_simclr()
    images = torch.randn(2, 3, 96, 96)
    a, b = module.augment(images, seeded(0)), module.augment(images, seeded(1))
    assert a.shape == images.shape and a.dtype == images.dtype and not torch.allclose(a, b)


def test_nt_xent_matches_a_manual_computation() -> None:
    z1, z2 = torch.randn(3, 8), torch.randn(3, 8)
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    total = 0.0
    for i in range(6):
        positive = (i + 3) % 6
        others = [j for j in range(6) if j != i]
        logits = torch.stack([z[i] @ z[j] / 0.1 for j in others])
        total += -(logits[others.index(positive)] - torch.logsumexp(logits, dim=0))
    assert torch.allclose(nt_xent_loss(z1, z2, 0.1), total / 6, atol=1e-5)
    assert torch.allclose(nt_xent_loss(z1, z2, 0.1, gather=False), total / 6, atol=1e-5)


def test_simclr_weight_decay_groups_on_a_learned_position_backbone() -> None:
    module = tiny_simclr(backbone={"preset": "test_arm_tiny"})  # 4 scans, class token, learned pos_embed
    groups = decay_groups(module.named_parameters(), 0.05, module.no_weight_decay())
    name_of = {id(p): n for n, p in module.named_parameters()}
    plain = {name_of[id(p)] for p in groups[1]["params"]}
    decayed = {name_of[id(p)] for p in groups[0]["params"]}
    assert {"backbone.pos_embed", "backbone.cls_token", "backbone.layers.0.mixer.A_c_b_log"} <= plain
    assert {"backbone.layers.0.mixer.D_b", "projector.0.bias", "backbone.norm_f.weight"} <= plain
    assert {"projector.0.weight", "projector.2.weight", "backbone.layers.0.mixer.x_proj_c.weight"} <= decayed


def test_simclr_a_few_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    # without warm-up the early steps overshoot
    module = tiny_simclr(optimizer={"lr": 1e-3, "warmup_steps": 0.3}, export=False)

    def loss(images: torch.Tensor) -> torch.Tensor:
        return module.loss(images, gather=False, generator=seeded())

    loss_drops_on_one_batch(module, loss, steps=20)


def test_simclr_exports_the_backbone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    fit_exports_backbone(tiny_simclr(optimizer={"lr": 1e-3}), tmp_path)


def test_signatures_are_plain_for_lightning_cli() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(MAEModule, "mae")
    parser.add_class_arguments(SimCLRModule, "simclr")
    cfg = parser.parse_args(["--mae.mask_ratio=0.6", "--simclr.crop_scale=[0.3,0.9]"])
    assert cfg.mae.mask_ratio == 0.6 and tuple(cfg.simclr.crop_scale) == (0.3, 0.9)
    assert cfg.simclr.temperature == 0.1 and cfg.simclr.gather_negatives is True


def test_simclr_bad_configs() -> None:
    with pytest.raises(ValueError, match="temperature must be > 0"):
        tiny_simclr(temperature=0.0)
    with pytest.raises(ValueError, match="crop_scale"):
        tiny_simclr(crop_scale=(0.5, 0.2))
