"""Stage 2: image–report contrastive learning (docs/METHOD.md, Stage 2)."""

from __future__ import annotations

import math
from typing import Any, Literal

from torch import Tensor, nn

from mambaxray_ctl.metrics.retrieval import RetrievalRecall
from mambaxray_ctl.stages.base import BackboneStage
from mambaxray_ctl.stages.losses import ContrastiveLoss, LogitScale
from mambaxray_ctl.text.encoder import TextEncoder


class ContrastiveModule(BackboneStage):
    """Backbone (4 scan directions, 224 px) + text encoder trained with a symmetric InfoNCE loss.

    Image side: views averaged token-wise, tokens mean-pooled, ``vision_proj``. Text side: an HF
    ``AutoModel`` from a local folder or hub name, pooled (``last_nonpad`` as the official code: the
    ``[SEP]`` state of BERT), ``text_proj``. The logit scale is learnable from ``ln(1/0.07)`` and
    clamped to ``ln(100)``. ``gather_negatives`` uses every rank's batch as negatives (the official
    code uses per-GPU negatives only: set it to false to compare; docs/METHOD.md#deviations-in-stage-2).
    Validation: image→text and text→image recall@1/5/10 over the whole validation split.
    """

    stage_name = "stage2-contrastive"

    def __init__(
        self,
        text_encoder: str = "emilyalsentzer/Bio_ClinicalBERT",
        text_pooling: Literal["last_nonpad", "cls", "mean"] = "last_nonpad",
        text_max_length: int = 128,
        projection_dim: int = 2048,
        temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        gather_negatives: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.backbone = self.build_backbone()
        self.text_encoder = TextEncoder(text_encoder, pooling=text_pooling, max_length=text_max_length)
        self.vision_proj = nn.Linear(self.backbone.config.embed_dim, projection_dim)
        self.text_proj = nn.Linear(self.text_encoder.hidden_size, projection_dim)
        self.logit_scale = LogitScale(temperature, math.log(max_logit_scale))
        self.contrastive_loss = ContrastiveLoss(gather=gather_negatives)
        self.val_retrieval = RetrievalRecall()

    def encode_image(self, images: Tensor, view_mask: Tensor | None = None) -> Tensor:
        """Studies (B, V, 3, H, W) → projected image embeddings (B, projection_dim), not normalised."""
        return self.vision_proj(self.encode_studies(images, view_mask).mean(dim=1))

    def encode_text(self, reports: list[str]) -> Tensor:
        """Cleaned reports → projected text embeddings (B, projection_dim), not normalised."""
        return self.text_proj(self.text_encoder(reports))

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        return self.encode_image(batch["images"], batch.get("view_mask")), self.encode_text(batch["reports"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        image, text = self(batch)
        loss = self.contrastive_loss(image, text, self.logit_scale())
        self.log("train/loss", loss, prog_bar=True, batch_size=image.shape[0])
        self.log("train/logit_scale", self.logit_scale().detach(), batch_size=image.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        image, text = self(batch)
        loss = self.contrastive_loss(image, text, self.logit_scale(), gather=False)
        self.log("val/loss", loss, sync_dist=True, batch_size=image.shape[0])
        self.val_retrieval.update(batch["ids"], image, text)

    def on_validation_epoch_end(self) -> None:
        scores = self.val_retrieval.compute()
        self.val_retrieval.reset()
        for name, value in scores.items():
            # the same value on every rank (computed on the gathered split): sync_dist averages equal values
            self.log(f"val/{name}", value, prog_bar=name == "i2t_R@1", sync_dist=True)
        self.log("val/mean_R@1", (scores["i2t_R@1"] + scores["t2i_R@1"]) / 2, sync_dist=True)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"logit_scale.log_scale"}

    def embed(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """L2-normalised (image, text) embeddings of a batch (for the projector and the notebooks)."""
        image, text = self(batch)
        return nn.functional.normalize(image, dim=-1), nn.functional.normalize(text, dim=-1)
