"""What the stage modules share: the backbone, the hand-off from the previous stage, the export at
the end of training, per-rank randomness, and the optimiser (AdamW + per-step warm-up/cosine).

Subclasses call ``self.save_hyperparameters()`` with these hyper-parameters among their own:
``backbone`` (preset name), ``backbone_overrides`` (config fields), ``ssm_impl`` (the selective-scan
implementation, set to ``cuda`` by the GPU trainer configs; ``None`` keeps the preset's),
``init_from`` / ``init_format`` / ``init_prefix`` (hand-off), ``export`` (write
``backbone.safetensors`` into the run directory at the end of training; not under ``fast_dev_run``),
and ``lr`` / ``weight_decay`` / ``betas`` / ``warmup_steps`` / ``min_lr_ratio``.

Hand-off rule: ``init_from`` is loaded in ``setup("fit")`` only, so it never runs for
``validate/test/predict`` nor when the stage resumes from its own ``--ckpt_path`` (the CLI marks that
with :meth:`skip_init_from`; from Python, pass ``init_from=None`` when resuming).
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from lightning.pytorch import LightningModule
from torch import Tensor
from torch.optim import AdamW

from mambaxray_ctl.backbone import LoadReport, VisionMamba, create_backbone, init_backbone_from, save_backbone
from mambaxray_ctl.backbone.checkpoints import summarize_keys
from mambaxray_ctl.distributed import all_gather_objects
from mambaxray_ctl.ops.cuda import require_mamba_ssm
from mambaxray_ctl.stages.optim import decay_groups, warmup_cosine
from mambaxray_ctl.stages.sharding import float32_state_dict

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
        """The ``hparams.backbone`` preset with ``backbone_overrides``, ``ssm_impl``, ``forced`` applied."""
        overrides = dict(self.hparams.backbone_overrides or {})
        if self.hparams.ssm_impl is not None:
            overrides["ssm_impl"] = self.hparams.ssm_impl
        overrides.update(forced)
        return create_backbone(self.hparams.backbone, **overrides)

    def skip_init_from(self) -> None:
        """Mark this run as a resume: ``init_from`` is not loaded (the checkpoint has the weights)."""
        self._skip_init_from = True

    def setup(self, stage: str) -> None:
        if self.backbone.config.ssm_impl == "cuda":
            require_mamba_ssm()  # fail on every rank before any work, saying how to install it
        if stage == "fit" and self.hparams.init_from and not self._skip_init_from:
            self.load_init_from(self.hparams.init_from)
        self.seed_rank()

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
        """``backbone.safetensors`` in the run directory (the logger's directory, else the root dir).

        ``trainer.log_dir`` is a broadcast under DDP: call this on every rank.
        """
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / EXPORT_NAME

    def on_train_end(self) -> None:
        """Export the backbone in float32 (gathered from FSDP shards or DeepSpeed's master weights) while
        the model is still on the training device (``on_fit_end`` runs after Lightning's teardown has
        moved it to the CPU)."""
        if not self.hparams.export:
            return
        if self.trainer.fast_dev_run:  # no logger there: the export would land in default_root_dir (cwd)
            log.info("%s: fast_dev_run, the backbone is not exported", self.stage_name)
            return
        path = self.export_path()  # on every rank: a collective
        state = float32_state_dict(self, "backbone")  # gathered under FSDP/DeepSpeed: every rank
        if self.trainer.is_global_zero:
            self._export(path, state)

    def _export(self, path: Path, state: dict[str, Tensor]) -> None:
        metadata = {
            "stage": self.stage_name,
            "global_step": str(self.global_step),
            "epoch": str(self.current_epoch),
            "init_from": str(self.hparams.init_from or ""),
            "init_sha256": self.init_report.sha256 if self.init_report else "",
        }
        saved, _ = save_backbone(state, self.backbone.config, path, metadata=metadata)
        log.info("%s: exported the backbone to %s", self.stage_name, saved)

    # Randomness per rank ------------------------------------------------------------------------------------
    def seed_rank(self) -> None:
        """Seed this rank's generators with ``seed + global_rank``, after the model is built.

        LightningCLI seeds every rank alike before the model is built, so that all ranks start from
        the same weights; from here on each rank draws its own masks, drop-path and augmentations.
        """
        base = os.environ.get("PL_GLOBAL_SEED")
        seed = (int(base) if base is not None else torch.initial_seed()) + self.global_rank
        seed %= 2**32
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # seeds CUDA as well

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store every rank's RNG states, so that a resumed run draws the same dropout/augmentation as
        an uninterrupted one on each rank (the data order is seeded per epoch by the DataModule's
        sampler). Called on every rank; the states are gathered into the checkpoint rank 0 writes."""
        states = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state_to_torch(np.random.get_state()),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        checkpoint["rng_states_per_rank"] = all_gather_objects(states)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        per_rank = checkpoint.get("rng_states_per_rank")
        if per_rank is None or self._trainer is None:  # no trainer: weights loaded for inference
            return
        if len(per_rank) != self.trainer.world_size:
            log.warning(
                "%s: the checkpoint holds the RNG states of %d rank(s), this run has %d; "
                "each rank keeps its seed + rank generators",
                self.stage_name,
                len(per_rank),
                self.trainer.world_size,
            )
            return
        states = per_rank[self.global_rank]
        torch.set_rng_state(states["torch"])
        np.random.set_state(_numpy_state_from_torch(states["numpy"]))
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


def _numpy_state_to_torch(state: tuple) -> tuple:
    """NumPy's legacy RNG state with its key array as a tensor (loadable with ``weights_only=True``)."""
    name, keys, position, has_gauss, cached = state
    return name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached


def _numpy_state_from_torch(state: tuple) -> tuple:
    name, keys, position, has_gauss, cached = state
    return name, keys.numpy().astype(np.uint32), position, has_gauss, cached
