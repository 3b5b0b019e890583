"""Named backbone presets and the ``create_backbone`` factory."""

from __future__ import annotations

from typing import Any

from mambaxray_ctl.backbone.config import VisionMambaConfig
from mambaxray_ctl.backbone.vision_mamba import VisionMamba

_ARM = {"block_style": "arm", "scan_directions": 4, "expand": 1, "patch_size": 16, "img_size": 224}
# Stage-1 (ARM pretraining) encoder: 192 px, one causal scan, no class token, fixed sin-cos positions.
_ARM_PRETRAIN = {
    **_ARM,
    "img_size": 192,
    "scan_directions": 1,
    "class_token": False,
    "pos_embed": "sincos",
    "drop_path_rate": 0.0,
}
_VIM = {"block_style": "vim", "scan_directions": 2, "expand": 2, "patch_size": 16, "img_size": 224}
_TEST = {"img_size": 64, "patch_size": 16, "d_state": 8}

_PRESETS: dict[str, dict[str, Any]] = {
    # ARM ("MambaMLP") backbones of MambaXray-VL/CTL stages 2-3 (v3: four scan directions).
    "arm_base_pz16": {**_ARM, "embed_dim": 768, "depth": 12},
    "arm_large_pz16": {**_ARM, "embed_dim": 1024, "depth": 24},
    # Their stage-1 pretraining encoders.
    "arm_base_pz16_pretrain": {**_ARM_PRETRAIN, "embed_dim": 768, "depth": 12},
    "arm_large_pz16_pretrain": {**_ARM_PRETRAIN, "embed_dim": 1024, "depth": 24},
    # hustvl Vim (v2: two scan directions, RMSNorm, no MLP, middle class token, divide by 2).
    "vim_tiny_patch16": {**_VIM, "embed_dim": 192, "depth": 24},
    "vim_small_patch16": {**_VIM, "embed_dim": 384, "depth": 24},
    "vim_base_patch16": {**_VIM, "embed_dim": 768, "depth": 24},
    # Small CPU backbones of the demo (`make demo`) at 96 px (6x6 patches), and their stage-1 encoders.
    "demo_arm": {**_ARM, "img_size": 96, "embed_dim": 96, "depth": 4, "d_state": 16, "drop_path_rate": 0.0},
    "demo_arm_pretrain": {**_ARM_PRETRAIN, "img_size": 96, "embed_dim": 96, "depth": 4, "d_state": 16},
    # Tiny variants for fast tests (4x4 patch grid; the pretrain one has a 6x6 grid = 3x3 clusters of 2x2).
    "test_arm_tiny": {**_ARM, **_TEST, "embed_dim": 32, "depth": 2},
    "test_arm_tiny_pretrain": {**_ARM_PRETRAIN, **_TEST, "img_size": 96, "embed_dim": 32, "depth": 4},
    "test_vim_tiny": {**_VIM, **_TEST, "embed_dim": 32, "depth": 2},
}


def list_presets(prefix: str = "") -> list[str]:
    """Sorted preset names starting with ``prefix`` (e.g. ``"test_"``)."""
    return sorted(name for name in _PRESETS if name.startswith(prefix))


def get_preset_config(name: str, **overrides: Any) -> VisionMambaConfig:
    """The config of preset ``name`` with ``overrides`` applied (validated)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown backbone preset {name!r}; known presets: {', '.join(list_presets())}")
    return VisionMambaConfig.from_dict({**_PRESETS[name], **overrides})


def create_backbone(name_or_config: str | VisionMambaConfig, **overrides: Any) -> VisionMamba:
    """Build a :class:`VisionMamba` from a preset name or a config, with field ``overrides``."""
    if isinstance(name_or_config, VisionMambaConfig):
        config = VisionMambaConfig.from_dict({**name_or_config.to_dict(), **overrides})
    elif isinstance(name_or_config, str):
        config = get_preset_config(name_or_config, **overrides)
    else:
        raise TypeError(f"expected a preset name or a VisionMambaConfig, got {type(name_or_config).__name__}")
    return VisionMamba(config)
