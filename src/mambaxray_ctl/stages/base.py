"""What the stage modules share: the backbone, the hand-off from the previous stage, the export at
the end of training, per-rank randomness, and the optimiser.

:class:`BackboneStage` declares and reads the shared settings (:mod:`mambaxray_ctl.stages.specs`):
``backbone`` (:class:`BackboneSpec`), ``handoff`` (:class:`HandOff`), ``optimizer``
(:class:`OptimizerSpec`) and ``export`` (write ``backbone.safetensors`` into the run directory at the
end of training, and stage 3's ``model.safetensors`` with its card; not under ``fast_dev_run``). Every
checkpoint and export records the package version and git commit (:mod:`mambaxray_ctl.provenance`).
A stage declares its own settings and passes the rest on with ``**kwargs``; one whose defaults differ
(stage 1's backbone and optimiser) declares those too.

Hand-off rule: ``handoff.source`` is loaded in ``setup("fit")`` only, so it never runs for
``validate/test/predict`` nor when the stage resumes from its own ``--ckpt_path`` (the CLI marks that
with :meth:`skip_handoff`; from Python, pass no hand-off when resuming).
"""

from __future__ import annotations

import inspect
import logging
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from mambaxray_ctl.backbone import LoadReport, VisionMamba, init_backbone_from, save_backbone
from mambaxray_ctl.backbone.checkpoints import summarize_keys
from mambaxray_ctl.distributed import all_gather_objects
from mambaxray_ctl.ops.cuda import require_mamba_ssm
from mambaxray_ctl.provenance import provenance
from mambaxray_ctl.stages.sharding import float32_state_dict, submodule_entries
from mambaxray_ctl.stages.specs import BackboneSpec, HandOff, OptimizerSpec, Spec, as_spec, plain

log = logging.getLogger(__name__)

EXPORT_NAME = "backbone.safetensors"


class BackboneStage(LightningModule):
    """Base LightningModule of the stages; the backbone lives in ``self.backbone``."""

    stage_name: ClassVar[str] = "stage"

    def __init__(
        self,
        backbone: BackboneSpec = BackboneSpec(),
        handoff: HandOff = HandOff(),
        optimizer: OptimizerSpec = OptimizerSpec(),
        export: bool = True,
    ) -> None:
        """
        Args:
            backbone: which backbone to build.
            handoff: where its first weights come from (``fit`` only).
            optimizer: AdamW and its warm-up/cosine schedule.
            export: write ``backbone.safetensors`` into the run directory at the end of training.
        """
        super().__init__()
        self.save_hyperparameters()  # the subclass's arguments too
        self.backbone_spec = self.resolve_spec("backbone", BackboneSpec, backbone)
        self.handoff = self.resolve_spec("handoff", HandOff, handoff)
        self.optimizer_spec = self.resolve_spec("optimizer", OptimizerSpec, optimizer)
        self.export_backbone = export
        self.init_report: LoadReport | None = None
        self._skip_handoff = False

    def resolve_spec(self, name: str, cls: type[Spec], value: Spec | Mapping[str, Any]) -> Spec:
        """Argument ``name`` as a ``cls`` spec (a partial dict completes the stage's declared default),
        stored complete, as a plain dict, in the hyper-parameters (``hparams.yaml``, checkpoints)."""
        spec = as_spec(cls, value, self.declared_default(name))
        self.save_hyperparameters({**self.hparams, name: plain(spec)})
        return spec

    @classmethod
    def declared_default(cls, name: str) -> Any:
        """The default of argument ``name`` in the most derived ``__init__`` that declares it (stage 1
        declares its own backbone and optimiser): what a partial dict of fields completes."""
        for klass in cls.__mro__:
            parameter = inspect.signature(klass.__init__).parameters.get(name)
            if parameter is not None:
                return parameter.default
        raise KeyError(name)

    # Backbone ----------------------------------------------------------------------------------------------
    def build_backbone(self, **forced: Any) -> VisionMamba:
        """The configured backbone with ``forced`` config fields applied."""
        return self.backbone_spec.build(**forced)

    def encode_studies(self, images: Tensor, view_mask: Tensor | None = None) -> Tensor:
        """Multi-view studies (B, V, 3, H, W) → backbone tokens (B, L, D), averaged token by token over
        each study's valid views."""
        batch, views = images.shape[:2]
        tokens = self.backbone(images.flatten(0, 1)).unflatten(0, (batch, views))
        if view_mask is None:
            return tokens.mean(dim=1)
        weights = view_mask.to(tokens.dtype)[:, :, None, None]
        return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

    def skip_handoff(self) -> None:
        """Mark this run as a resume: ``handoff.source`` is not loaded (the checkpoint has the weights)."""
        self._skip_handoff = True

    def setup(self, stage: str) -> None:
        if self.backbone.config.ssm_impl == "cuda":
            require_mamba_ssm()  # fail on every rank before any work, saying how to install it
        if stage == "fit" and self.handoff.source and not self._skip_handoff:
            self.load_handoff(self.handoff.source)
        self.seed_rank()
        provenance()  # found once per process, here: the commit of the code that runs, not at save time

    def load_handoff(self, source: str) -> LoadReport:
        """Load the backbone from a previous stage's export, a Lightning ``.ckpt`` or an official file."""
        prefix = self.handoff.prefix
        if prefix is None and str(source).endswith(".ckpt"):
            prefix = "backbone."
        report = init_backbone_from(self.backbone, source, source_format=self.handoff.format, prefix=prefix)
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
        if not self.export_backbone:
            return
        if self.trainer.fast_dev_run:  # no logger there: the export would land in default_root_dir (cwd)
            log.info("%s: fast_dev_run, the backbone is not exported", self.stage_name)
            return
        path = self.export_path()  # on every rank: a collective
        state = self.export_state()  # gathered under FSDP/DeepSpeed: every rank
        if self.trainer.is_global_zero:  # after every collective: a failed write leaves no rank waiting
            self._export(path, submodule_entries(state, "backbone"))
            self.export_more(path.parent, state)

    def export_state(self) -> dict[str, Tensor]:
        """The float32 state every export is cut from, full names, gathered once
        (:func:`~mambaxray_ctl.stages.sharding.float32_state_dict`: call on every rank): the backbone's;
        stage 3 takes all it checkpoints."""
        return float32_state_dict(self, prefix="backbone.")

    def export_more(self, run_dir: Path, state: dict[str, Tensor]) -> None:
        """A stage's further exports into ``run_dir``, from :meth:`export_state`'s ``state``, after the
        backbone's and under its rules; rank 0 only. Stage 3 writes its model export."""

    def export_metadata(self) -> dict[str, str]:
        """What every export's metadata records (strings): stage, step, epoch, hand-off source and its
        sha256, package version and git commit."""
        return {
            "stage": self.stage_name,
            "global_step": str(self.global_step),
            "epoch": str(self.current_epoch),
            "init_from": str(self.handoff.source or ""),  # the export format's key (hand-off source)
            "init_sha256": self.init_report.sha256 if self.init_report else "",
            **provenance(),  # package version and git commit
        }

    def _export(self, path: Path, state: dict[str, Tensor]) -> None:
        saved, _ = save_backbone(state, self.backbone.config, path, metadata=self.export_metadata())
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
        sampler). Called on every rank; the states are gathered into the checkpoint rank 0 writes.
        Also records the package version and git commit (:func:`~mambaxray_ctl.provenance.provenance`)."""
        states = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state_to_torch(np.random.get_state()),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        checkpoint["rng_states_per_rank"] = all_gather_objects(states)
        checkpoint["provenance"] = provenance()

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
        return self.optimizer_spec.configure(
            self.named_parameters(), self.no_weight_decay(), int(self.trainer.estimated_stepping_batches)
        )


def _numpy_state_to_torch(state: tuple) -> tuple:
    """NumPy's legacy RNG state with its key array as a tensor (loadable with ``weights_only=True``)."""
    name, keys, position, has_gauss, cached = state
    return name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached


def _numpy_state_from_torch(state: tuple) -> tuple:
    name, keys, position, has_gauss, cached = state
    return name, keys.numpy().astype(np.uint32), position, has_gauss, cached
