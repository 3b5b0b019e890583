"""Stage-1 ablation (Table II): MAE-style masked-patch reconstruction on the same Mamba encoder."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mambaxray_ctl.backbone import VisionMamba
from mambaxray_ctl.backbone.layers import sincos_2d_pos_embed
from mambaxray_ctl.stages.base import BackboneStage
from mambaxray_ctl.stages.pretraining import (
    PRETRAIN_BACKBONE,
    PRETRAIN_OPTIMIZER,
    check_image_size,
    denormalize_patches,
    normalize_patches,
    patchify,
    require_sequence_backbone,
    unpatchify,
)
from mambaxray_ctl.stages.specs import BackboneSpec, OptimizerSpec


def random_keep(
    batch: int,
    num_patches: int,
    num_keep: int,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Per sample, ``num_keep`` visible patch indices in raster order (B, num_keep), and the mask
    (B, num_patches), True at the masked (hidden) patches."""
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    keep = noise.argsort(dim=1)[:, :num_keep].sort(dim=1).values
    masked = torch.ones(batch, num_patches, dtype=torch.bool, device=device).scatter(1, keep, False)
    return keep, masked


class MAEDecoder(nn.Module):
    """Encoded visible tokens + a learned ``mask_token`` elsewhere, plus fixed sin-cos positions →
    pre-LN transformer blocks → per-patch pixels (B, N, ``out_dim``) for every patch."""

    def __init__(
        self,
        *,
        embed_dim: int,
        grid_size: tuple[int, int],
        out_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_2d_pos_embed(dim, grid_size)[None], persistent=False)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim,
                num_heads,
                dim_feedforward=int(dim * mlp_ratio),
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, out_dim)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, visible: Tensor, keep: Tensor) -> Tensor:
        """``visible`` (B, V, D) encoded tokens at patch indices ``keep`` (B, V) → (B, N, out_dim)."""
        x = self.embed(visible)
        batch, dim = x.shape[0], x.shape[-1]
        full = self.mask_token.to(x.dtype).expand(batch, self.pos_embed.shape[1], dim)
        x = full.scatter(1, keep[..., None].expand(-1, -1, dim), x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))


class MAEModule(BackboneStage):
    """Masked autoencoding: hide ``mask_ratio`` of the patches at random, run the Mamba encoder on the
    visible ones (raster order, with their position embeddings), reconstruct every patch with a small
    transformer decoder (:class:`MAEDecoder`), and score the hidden patches only (norm-pix MSE with
    ``norm_pix_loss``). Training masks come from the global RNG (seed it with ``seed_everything``);
    validation masks are seeded by the batch index, so ``val/loss`` is comparable across epochs.

    Optimisation as :class:`~mambaxray_ctl.stages.arm.ARMModule` (``optimizer.lr`` is absolute).
    """

    stage_name = "stage1-mae"

    def __init__(
        self,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 4,
        decoder_heads: int = 8,
        decoder_mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        backbone: BackboneSpec = PRETRAIN_BACKBONE,
        optimizer: OptimizerSpec = PRETRAIN_OPTIMIZER,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone=backbone, optimizer=optimizer, **kwargs)
        self.backbone: VisionMamba = self.build_backbone()
        config = self.backbone.config
        require_sequence_backbone(config, self.stage_name)
        self.num_keep = int(config.num_patches * (1 - mask_ratio))
        if not 0 < self.num_keep < config.num_patches:
            raise ValueError(
                f"mask_ratio={mask_ratio} leaves {self.num_keep} of {config.num_patches} patches visible; "
                "at least one must be visible and one hidden"
            )
        ph, pw = config.patch_hw
        self.decoder = MAEDecoder(
            embed_dim=config.embed_dim,
            grid_size=config.grid_size,
            out_dim=ph * pw * config.in_chans,
            dim=decoder_dim,
            depth=decoder_depth,
            num_heads=decoder_heads,
            mlp_ratio=decoder_mlp_ratio,
        )

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"decoder.mask_token"}

    def forward(self, images: Tensor, keep: Tensor) -> Tensor:
        """Images (B, C, H, W), visible patch indices ``keep`` (B, V) → predictions (B, N, patch_dim)."""
        check_image_size(images, self.backbone.config, self.stage_name)
        tokens = self.backbone.embed(images)
        visible = tokens.gather(1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
        encoded, _ = self.backbone.forward_tokens(visible)
        return self.decoder(encoded, keep)

    def loss(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Mean over the hidden patches of the per-patch MSE, with a fresh random mask."""
        keep, masked = random_keep(
            images.shape[0], self.backbone.config.num_patches, self.num_keep, images.device, generator
        )
        target = patchify(images, self.backbone.config.patch_hw)
        if self.hparams.norm_pix_loss:
            target = normalize_patches(target)
        per_patch = (self(images, keep) - target).pow(2).mean(dim=-1)
        return per_patch[masked].mean()

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> dict[str, Tensor]:
        """For viewing (:class:`~mambaxray_ctl.callbacks.Reconstructions`), with a mask from the global RNG:
        ``{"masked": the visible patches (hidden ones 0), "reconstruction": the predicted hidden patches
        with the visible ones pasted back (as MAE's visualisation), "target": images}``, each
        (B, C, H, W) in the input's space; with ``norm_pix_loss`` each predicted patch gets its
        target patch's mean and std back."""
        config = self.backbone.config
        keep, masked = random_keep(images.shape[0], config.num_patches, self.num_keep, images.device)
        patches = patchify(images, config.patch_hw)
        predicted = self(images, keep).to(patches.dtype)
        if self.hparams.norm_pix_loss:
            predicted = denormalize_patches(predicted, patches)
        hidden = masked[..., None]
        panels = {
            "masked": patches.masked_fill(hidden, 0.0),
            "reconstruction": torch.where(hidden, predicted, patches),
        }
        layout = {name: unpatchify(p, config.patch_hw, config.grid_size) for name, p in panels.items()}
        return {**layout, "target": images}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.loss(batch["images"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["images"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images = batch["images"]
        generator = torch.Generator(device=images.device).manual_seed(batch_idx)
        loss = self.loss(images, generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(images))
