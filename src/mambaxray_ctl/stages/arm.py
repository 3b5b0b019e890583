"""Stage 1: ARM autoregressive pretraining — predict the next cluster of patches
(docs/METHOD.md, Stage 1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mambaxray_ctl.backbone import VisionMamba
from mambaxray_ctl.stages.arm_decoder import ARMDecoder, cluster_order
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


def default_feature_layers(depth: int, num_levels: int) -> list[int]:
    """``num_levels`` 0-based layers ending at the last one, ``max(1, depth // (2·(num_levels − 1)))``
    apart: the official code's (1-based) {12, 16, 20, 24} of 24 layers and {6, 8, 10, 12} of 12
    (docs/METHOD.md#stage-1-arm-pretraining)."""
    if not 1 <= num_levels <= depth:
        raise ValueError(f"cannot pick {num_levels} feature layers from {depth} layers; set feature_layers")
    step = max(1, depth // (2 * (num_levels - 1))) if num_levels > 1 else 0
    return [depth - 1 - step * (num_levels - 1 - k) for k in range(num_levels)]


def resolve_feature_layers(layers: Sequence[int] | None, depth: int, num_levels: int) -> list[int]:
    """``layers`` (0-based, negatives allowed) as non-negative indices, checked; the default if ``None``."""
    if layers is None:
        return default_feature_layers(depth, num_levels)
    if len(layers) != num_levels:
        raise ValueError(
            f"decoder_depth={num_levels} must equal len(feature_layers)={len(layers)}: "
            "decoder block k reads feature level k"
        )
    if any(not -depth <= i < depth for i in layers):
        raise ValueError(f"feature_layers {list(layers)} out of range for a backbone of depth {depth}")
    resolved = [i % depth for i in layers]
    if max(resolved) != depth - 1:
        raise ValueError(
            f"feature_layers {list(layers)} must include the last layer ({depth - 1}); "
            "layers after the deepest feature layer would be untrained (use a smaller depth instead)"
        )
    return resolved


class ARMModule(BackboneStage):
    """ARM pretraining: the causal Mamba encoder reads clusters ``1..K−1`` of patches, the
    cross-attention decoder (:class:`ARMDecoder`) predicts the pixels of clusters ``2..K``.

    A cluster is ``cluster_size × cluster_size`` patches (official code: 4 → 3×3 clusters of a 12×12 grid
    at 192 px); the encoder gets the embedded tokens reordered into cluster order, last cluster
    dropped. The outputs of ``feature_layers`` (0-based; default: the official code's evenly spaced layers
    of the second half, ending at the last) feed the ``decoder_depth`` decoder blocks, one level
    each. Loss: MSE against the target patches, each normalised by its mean and
    ``sqrt(var + 1e-6)`` with ``norm_pix_loss``.

    ``optimizer.lr`` is the absolute learning rate. The official code sets
    ``lr = blr · global_batch / 256`` with ``blr = 1.5e-4``: the default is that rate at a global batch
    of 256 (the official script's batch of 12 gives 7.03e-6). Its other settings: AdamW betas
    (0.9, 0.95), weight decay 0.05, 5 % linear warm-up then cosine to 0 per step, gradient clipping at
    3.0 and bf16 autocast (set ``gradient_clip_val`` and ``precision`` on the Trainer); see
    docs/METHOD.md#stage-1-arm-pretraining. Unlike the official code, norms, ``A_log``, ``D`` and
    ``ar_token`` get no weight decay (biases and positions get none in both;
    docs/METHOD.md#deviations-in-stage-1).

    The backbone's ``norm_f`` is frozen (the decoder reads un-normed layer outputs, so it never gets a
    gradient); it is exported at its initial value, as ARM's checkpoints carry no ``norm_f``.
    """

    stage_name = "stage1-arm"

    def __init__(
        self,
        cluster_size: int = 4,
        feature_layers: list[int] | None = None,
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
        rows, cols = config.grid_size
        self.cluster_len = cluster_size * cluster_size
        if cluster_size < 1 or rows % cluster_size or cols % cluster_size or rows * cols <= self.cluster_len:
            raise ValueError(
                f"img_size {config.img_hw} with patch_size {config.patch_hw} gives a {rows}x{cols} "
                f"patch grid, which does not split into two or more {cluster_size}x{cluster_size}-patch "
                "clusters: img_size must be a multiple of patch_size x cluster_size and hold two clusters"
            )
        self.feature_layers = resolve_feature_layers(feature_layers, config.depth, decoder_depth)
        self.backbone.norm_f.requires_grad_(False)
        ph, pw = config.patch_hw
        self.decoder = ARMDecoder(
            embed_dim=config.embed_dim,
            grid_size=config.grid_size,
            cluster_size=cluster_size,
            out_dim=ph * pw * config.in_chans,
            num_levels=decoder_depth,
            dim=decoder_dim,
            num_heads=decoder_heads,
            mlp_ratio=decoder_mlp_ratio,
        )
        self.register_buffer("order", cluster_order(config.grid_size, cluster_size), persistent=False)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"decoder.ar_token"}

    def forward(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) → predictions (B, (K−1)·P, patch_dim) of clusters ``2..K`` (cluster order)."""
        check_image_size(images, self.backbone.config, self.stage_name)
        tokens = self.backbone.embed(images)[:, self.order]
        _, features = self.backbone.forward_tokens(
            tokens[:, : -self.cluster_len], return_layers=self.feature_layers
        )
        return self.decoder(features)

    def targets(self, images: Tensor) -> Tensor:
        """The patches of clusters ``2..K`` (B, (K−1)·P, patch_dim), normalised with ``norm_pix_loss``."""
        patches = patchify(images, self.backbone.config.patch_hw)[:, self.decoder.target_index]
        return normalize_patches(patches) if self.hparams.norm_pix_loss else patches

    def loss(self, images: Tensor) -> Tensor:
        return F.mse_loss(self(images), self.targets(images))

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> dict[str, Tensor]:
        """For viewing (:class:`~mambaxray_ctl.callbacks.Reconstructions`): ``{"prediction": ...,
        "target": images}``, both (B, C, H, W) in the input's space. The predicted patches of clusters
        ``2..K`` are put back at their places in the image; cluster 1 (never predicted) is 0. With
        ``norm_pix_loss`` each predicted patch gets its target patch's mean and std back."""
        config = self.backbone.config
        patches = patchify(images, config.patch_hw)
        index = self.decoder.target_index
        predicted = self(images).to(patches.dtype)
        if self.hparams.norm_pix_loss:
            predicted = denormalize_patches(predicted, patches[:, index])
        full = torch.zeros_like(patches)
        full[:, index] = predicted
        return {"prediction": unpatchify(full, config.patch_hw, config.grid_size), "target": images}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.loss(batch["images"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["images"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = self.loss(batch["images"])
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["images"]))
