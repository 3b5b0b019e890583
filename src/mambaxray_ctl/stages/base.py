"""What the three stage modules share: the backbone, the hand-off from the previous stage, the
export at the end of ``fit``, and the optimiser (AdamW + per-step warm-up/cosine).

Subclasses call ``self.save_hyperparameters()`` with these hyper-parameters among their own:
``backbone`` (preset name), ``backbone_overrides`` (config fields), ``init_from`` / ``init_format`` /
``init_prefix`` (hand-off), ``export`` (write ``backbone.safetensors`` into the run directory at the
end of ``fit``; not under ``fast_dev_run``), and ``lr`` / ``weight_decay`` / ``betas`` /
``warmup_steps`` / ``min_lr_ratio``.

Hand-off rule: ``init_from`` is loaded in ``setup("fit")`` only, so it never runs for
``validate/test/predict`` nor when the stage resumes from its own ``--ckpt_path`` (the CLI marks that
with :meth:`skip_init_from`; from Python, pass ``init_from=None`` when resuming).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, ClassVar

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_only
from torch.optim import AdamW

from mambaxray_ctl.backbone import LoadReport, VisionMamba, create_backbone, init_backbone_from, save_backbone
from mambaxray_ctl.backbone.checkpoints import summarize_keys
from mambaxray_ctl.stages.optim import decay_groups, warmup_cosine

log = logging.getLogger(__name__)

EXPORT_NAME = "backbone.safetensors"


class BackboneStage(LightningModule):
    """Base LightningModule of the stages; the backbone lives in ``self.backbone``."""

    stage_name: ClassVar[str] = "stage"

    def __init__(self) -> None:
        super().__init__()
        self.init_report: LoadReport | None = None
        self._skip_init_from = False

    # Backbone ----------------------------------------------------------------------------------------------
    def build_backbone(self, **forced: Any) -> VisionMamba:
        """The ``hparams.backbone`` preset with ``backbone_overrides``, then ``forced``, applied."""
        overrides = {**(self.hparams.backbone_overrides or {}), **forced}
        return create_backbone(self.hparams.backbone, **overrides)

    def skip_init_from(self) -> None:
        """Mark this run as a resume: ``init_from`` is not loaded (the checkpoint has the weights)."""
        self._skip_init_from = True

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.init_from and not self._skip_init_from:
            self.load_init_from(self.hparams.init_from)

    def load_init_from(self, source: str) -> LoadReport:
        """Load the backbone from a previous stage's export, a Lightning ``.ckpt`` or an official file."""
        prefix = self.hparams.init_prefix
        if prefix is None and str(source).endswith(".ckpt"):
            prefix = "backbone."
        report = init_backbone_from(
            self.backbone, source, source_format=self.hparams.init_format, prefix=prefix
        )
        log.info(
            "%s: backbone initialised from %s (%s, %d tensors, sha256 %s)",
            self.stage_name,
            source,
            report.source_format,
            len(report.loaded),
            report.sha256,
        )
        if report.ignored:
            log.debug("ignored non-backbone keys of %s: %s", source, sorted(report.ignored))
            log.info(
                "ignored %d non-backbone key(s): %s", len(report.ignored), summarize_keys(report.ignored)
            )
        self.init_report = report
        return report

    # Export ------------------------------------------------------------------------------------------------
    def export_path(self) -> Path:
        """``backbone.safetensors`` in the run directory (the logger's directory, else the root dir)."""
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / EXPORT_NAME

    def on_fit_end(self) -> None:
        if not self.hparams.export:
            return
        if self.trainer.fast_dev_run:  # no logger there: the export would land in default_root_dir (cwd)
            log.info("%s: fast_dev_run, the backbone is not exported", self.stage_name)
            return
        self._export()

    @rank_zero_only
    def _export(self) -> None:
        metadata = {
            "stage": self.stage_name,
            "global_step": str(self.global_step),
            "epoch": str(self.current_epoch),
            "init_from": str(self.hparams.init_from or ""),
            "init_sha256": self.init_report.sha256 if self.init_report else "",
        }
        path, _ = save_backbone(self.backbone, None, self.export_path(), metadata=metadata)
        log.info("%s: exported the backbone to %s", self.stage_name, path)

    # Resume -----------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the RNG states, so that a resumed run draws the same dropout/augmentation as an
        uninterrupted one (the data order is seeded per epoch by the DataModule's sampler)."""
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if states is None:
            return
        torch.set_rng_state(states["torch"])
        random.setstate(states["python"])
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])

    # Optimiser ---------------------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Full parameter names kept out of weight decay besides 1-D tensors and ``*_log``."""
        return {f"backbone.{name}" for name in self.backbone.no_weight_decay()}

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = decay_groups(self.named_parameters(), hp.weight_decay, self.no_weight_decay())
        optimizer = AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = warmup_cosine(optimizer, total, hp.warmup_steps, hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
