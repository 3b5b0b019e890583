"""Stage-1 ablation (Table II): SimCLR contrastive pretraining of the same backbone.

The two views are made on the (normalised) batch tensor inside the module, on its device: random
resized crop (+ horizontal flip) as one ``grid_sample``, brightness/contrast jitter, Gaussian noise.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambaxray_ctl.backbone import VisionMamba
from mambaxray_ctl.stages.base import BackboneStage
from mambaxray_ctl.stages.losses import gather_with_grad
from mambaxray_ctl.stages.pretraining import PRETRAIN_BACKBONE, PRETRAIN_OPTIMIZER
from mambaxray_ctl.stages.specs import BackboneSpec, OptimizerSpec


def _uniform(n: int, low: float, high: float, like: Tensor, generator: torch.Generator | None) -> Tensor:
    return low + (high - low) * torch.rand(n, device=like.device, generator=generator)


def random_resized_crop(
    images: Tensor,
    scale: tuple[float, float],
    flip_prob: float = 0.0,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per image, a crop of area fraction in ``scale`` and aspect ratio (w/h) log-uniform in ``ratio``,
    mirrored with probability ``flip_prob``, resampled bilinearly to the input size."""
    batch = images.shape[0]
    area = _uniform(batch, *scale, images, generator)
    aspect = _uniform(batch, math.log(ratio[0]), math.log(ratio[1]), images, generator).exp()
    crop_w = (area * aspect).sqrt().clamp(max=1.0)  # fractions of the width / height
    crop_h = (area / aspect).sqrt().clamp(max=1.0)
    center_x = (1 - crop_w) * (2 * torch.rand(batch, device=images.device, generator=generator) - 1)
    center_y = (1 - crop_h) * (2 * torch.rand(batch, device=images.device, generator=generator) - 1)
    flip = torch.rand(batch, device=images.device, generator=generator) < flip_prob
    theta = torch.zeros(batch, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = torch.where(flip, -crop_w, crop_w)
    theta[:, 0, 2] = center_x
    theta[:, 1, 1] = crop_h
    theta[:, 1, 2] = center_y
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def color_jitter(
    images: Tensor, brightness: float, contrast: float, generator: torch.Generator | None = None
) -> Tensor:
    """Normalised images: scale each image about its mean by U(1 ± contrast), shift it by U(± brightness)."""
    batch = images.shape[0]
    factor = _uniform(batch, 1 - contrast, 1 + contrast, images, generator).view(-1, 1, 1, 1)
    shift = _uniform(batch, -brightness, brightness, images, generator).view(-1, 1, 1, 1)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (images - mean) * factor + mean + shift


def gaussian_noise(images: Tensor, std: float, generator: torch.Generator | None = None) -> Tensor:
    noise = torch.randn(images.shape, device=images.device, dtype=images.dtype, generator=generator)
    return images + std * noise


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float, gather: bool = True) -> Tensor:
    """SimCLR's NT-Xent: each of the 2N views has its other view as positive and the other 2N − 2 as
    negatives; mean cross-entropy over all 2N samples of the (gathered) batch.

    As :class:`~mambaxray_ctl.stages.losses.ContrastiveLoss`: with ``gather`` each rank computes the loss of
    the global batch, and DDP's averaged gradient equals the single-process one.
    """
    z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    if gather:
        z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
    n = z1.shape[0]
    z = torch.cat([z1, z2])
    logits = (z @ z.T / temperature).float()
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    index = torch.arange(n, device=z.device)
    return F.cross_entropy(logits, torch.cat([index + n, index]))


class SimCLRModule(BackboneStage):
    """SimCLR: two random views per image → backbone → mean of the tokens → 2-layer MLP projector →
    NT-Xent at ``temperature``; negatives gathered across ranks with ``gather_negatives`` (DDP's
    gradient average then equals the single-process gradient).

    Any backbone preset works (the whole image goes through ``forward``); the default is the ARM
    pretraining encoder, for a like-for-like Table II comparison. ``val/loss`` uses views seeded by
    the batch index and each rank's own batch as negatives. ``optimizer.lr`` is absolute, as in ARMModule.
    """

    stage_name = "stage1-simclr"

    def __init__(
        self,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 128,
        temperature: float = 0.1,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        flip_prob: float = 0.5,
        brightness: float = 0.4,
        contrast: float = 0.4,
        noise_std: float = 0.05,
        gather_negatives: bool = True,
        backbone: BackboneSpec = PRETRAIN_BACKBONE,
        optimizer: OptimizerSpec = PRETRAIN_OPTIMIZER,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone=backbone, optimizer=optimizer, **kwargs)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
        self.backbone: VisionMamba = self.build_backbone()
        self.projector = nn.Sequential(
            nn.Linear(self.backbone.config.embed_dim, proj_hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(proj_hidden_dim, proj_dim),
        )

    def forward(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) → projections (B, proj_dim) of the mean backbone token."""
        return self.projector(self.backbone(images).mean(dim=1))

    def augment(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One random view of every image."""
        hp = self.hparams
        views = random_resized_crop(images, tuple(hp.crop_scale), hp.flip_prob, generator=generator)
        views = color_jitter(views, hp.brightness, hp.contrast, generator)
        return gaussian_noise(views, hp.noise_std, generator)

    def loss(self, images: Tensor, gather: bool, generator: torch.Generator | None = None) -> Tensor:
        views = torch.cat([self.augment(images, generator), self.augment(images, generator)])
        z1, z2 = self(views).chunk(2)
        return nt_xent_loss(z1, z2, self.hparams.temperature, gather)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        gather = self.hparams.gather_negatives
        loss = self.loss(batch["images"], gather)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["images"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images = batch["images"]
        generator = torch.Generator(device=images.device).manual_seed(batch_idx)
        loss = self.loss(images, gather=False, generator=generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(images))
