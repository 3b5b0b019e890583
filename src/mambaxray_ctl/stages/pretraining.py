"""What the stage-1 objectives (ARM, MAE, SimCLR) share: their default backbone and optimiser,
the checks on the backbone and the images, and the pixel-patch helpers of the reconstruction losses."""

from __future__ import annotations

from torch import Tensor

from mambaxray_ctl.backbone import VisionMambaConfig
from mambaxray_ctl.backbone.layers import to_2tuple
from mambaxray_ctl.stages.specs import BackboneSpec, OptimizerSpec

PRETRAIN_BACKBONE = BackboneSpec(preset="arm_large_pz16_pretrain")
# The official ARM pretraining recipe: AdamW (0.9, 0.95), weight decay 0.05, 5 % warm-up, cosine to 0;
# lr = 1.5e-4 x global batch / 256 (the value here is that rate at a global batch of 256).
PRETRAIN_OPTIMIZER = OptimizerSpec(
    lr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95), warmup_steps=0.05, min_lr_ratio=0.0
)


def require_sequence_backbone(config: VisionMambaConfig, stage: str) -> None:
    """Objectives that reorder or drop tokens need one causal scan and no class token (``*_pretrain``)."""
    if config.scan_directions != 1 or config.class_token:
        raise ValueError(
            f"{stage} needs a backbone with scan_directions=1 and class_token=False (a *_pretrain preset), "
            f"got scan_directions={config.scan_directions}, class_token={config.class_token}"
        )


def check_image_size(images: Tensor, config: VisionMambaConfig, stage: str) -> None:
    """The token order and the decoder's positions are built for ``config.img_size`` only."""
    if tuple(images.shape[-2:]) != config.img_hw:
        raise ValueError(
            f"{stage} takes {config.img_hw[0]}x{config.img_hw[1]} images (the backbone's img_size), "
            f"got {tuple(images.shape[-2:])}: set the data's image_size to match"
        )


def patchify(images: Tensor, patch_size: int | tuple[int, int]) -> Tensor:
    """Images (B, C, H, W) → patches (B, N, ph·pw·C), row-major, each flattened as (row, column, channel)."""
    ph, pw = to_2tuple(patch_size)
    batch, chans, height, width = images.shape
    if height % ph or width % pw:
        raise ValueError(f"image size ({height}, {width}) is not divisible by patch size ({ph}, {pw})")
    x = images.reshape(batch, chans, height // ph, ph, width // pw, pw)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // ph) * (width // pw), ph * pw * chans)


def unpatchify(patches: Tensor, patch_size: int | tuple[int, int], grid_size: tuple[int, int]) -> Tensor:
    """Inverse of :func:`patchify`: patches (B, N, ph·pw·C) on a (rows, cols) grid → images (B, C, H, W)."""
    ph, pw = to_2tuple(patch_size)
    rows, cols = grid_size
    batch, num, dim = patches.shape
    if num != rows * cols or dim % (ph * pw):
        raise ValueError(f"patches {tuple(patches.shape)} do not fit a {grid_size} grid of {ph}x{pw} patches")
    x = patches.reshape(batch, rows, cols, ph, pw, dim // (ph * pw))
    return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, -1, rows * ph, cols * pw)


def normalize_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Each patch minus its mean, over ``sqrt(var + eps)`` (unbiased variance, as ARM and MAE)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def denormalize_patches(patches: Tensor, reference: Tensor, eps: float = 1e-6) -> Tensor:
    """Inverse of :func:`normalize_patches` with the statistics of ``reference`` (the raw target
    patches): a norm-pix prediction back in pixel space, for viewing (as MAE's visualisation demo)."""
    mean = reference.mean(dim=-1, keepdim=True)
    var = reference.var(dim=-1, keepdim=True)
    return patches * (var + eps).sqrt() + mean
