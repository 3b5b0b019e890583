"""Vision Mamba backbone: ARM and Vim block styles, 1/2/4 scan directions, named presets."""

from mambaxray_ctl.backbone.checkpoints import (
    CheckpointError,
    ConvertedCheckpoint,
    LoadReport,
    convert_state_dict,
    detect_format,
    init_backbone_from,
    load_backbone,
    load_backbone_weights,
    read_state_dict,
    save_backbone,
    state_dict_sha256,
)
from mambaxray_ctl.backbone.config import VisionMambaConfig
from mambaxray_ctl.backbone.presets import create_backbone, get_preset_config, list_presets
from mambaxray_ctl.backbone.vision_mamba import VisionMamba

__all__ = ["VisionMamba", "VisionMambaConfig", "create_backbone", "get_preset_config", "list_presets"]
__all__ += [
    "CheckpointError",
    "ConvertedCheckpoint",
    "LoadReport",
    "convert_state_dict",
    "detect_format",
    "init_backbone_from",
    "load_backbone",
    "load_backbone_weights",
    "read_state_dict",
    "save_backbone",
    "state_dict_sha256",
]
