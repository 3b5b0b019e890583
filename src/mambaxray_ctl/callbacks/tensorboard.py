"""TensorBoard extras: parameter counts, sample reports at each validation, embedding projector."""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.seed import isolate_rng

from mambaxray_ctl.callbacks.embeddings import collect_embeddings
from mambaxray_ctl.metrics.report import sentence_bleu4

log = logging.getLogger(__name__)


def _tensorboard(trainer: Trainer) -> Any | None:
    """The SummaryWriter of the trainer's TensorBoard logger, if any."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def parameter_counts(module: torch.nn.Module) -> dict[str, int]:
    """Total, trainable and frozen parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"params/total": total, "params/trainable": trainable, "params/frozen": total - trainable}


class ParameterCounts(Callback):
    """Logs total / trainable / frozen parameter counts at the setup of ``fit`` (matters with a frozen
    LLM), before FSDP or DeepSpeed shard the parameters."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        counts = parameter_counts(pl_module)
        rank_zero_info(", ".join(f"{k.split('/')[1]} {v:,}" for k, v in counts.items()) + " parameters")
        for logger in trainer.loggers:
            logger.log_metrics({k: float(v) for k, v in counts.items()}, step=0)


def markdown_samples(rows: list[tuple[str, str, str]]) -> str:
    """A markdown table: id | generated | reference | BLEU-4 (per sample)."""
    lines = ["| id | generated | reference | BLEU-4 |", "|---|---|---|---|"]
    for study, generated, reference in rows:
        cells = [text.replace("|", "\\|") for text in (study, generated, reference)]
        lines.append(f"| {' | '.join(cells)} | {sentence_bleu4(generated, reference):.3f} |")
    return "\n".join(lines)


class SampleReports(Callback):
    """At each validation, a fixed set of ``num_samples`` studies as a markdown table in TensorBoard.

    The studies are drawn once with ``seed`` from the validation ids, so epochs are comparable.
    Needs a module with ``val_metrics["report"]`` (:class:`ReportGenModule`); the corpus is gathered
    on every rank and written from rank 0.
    """

    def __init__(self, num_samples: int = 8, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.chosen: list[str] | None = None

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not hasattr(pl_module, "val_metrics"):
            return
        corpus = pl_module.val_metrics["report"].corpus()  # collective: every rank calls it
        writer = _tensorboard(trainer)
        if not trainer.is_global_zero or writer is None or not corpus:
            return
        by_id = {row[0]: row for row in corpus}
        if self.chosen is None:
            ids = sorted(by_id)
            self.chosen = sorted(random.Random(self.seed).sample(ids, min(self.num_samples, len(ids))))
        rows = [by_id[i] for i in self.chosen if i in by_id]
        writer.add_text("val/samples", markdown_samples(rows), global_step=trainer.global_step)


class EmbeddingProjector(Callback):
    """At the end of training, image and text embeddings of the validation split to TensorBoard's projector.

    Needs a module with ``embed(batch) -> (image, text)`` (stages 2 and 3). Runs on rank 0 only, on the
    training device (``on_train_end``: by ``on_fit_end`` Lightning has moved the model to the CPU).
    Skipped under FSDP and DeepSpeed, whose rank 0 does not hold the whole model (the notebooks embed
    from a checkpoint instead).
    """

    def __init__(self, max_studies: int = 500) -> None:
        self.max_studies = max_studies

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writer = _tensorboard(trainer)
        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
            rank_zero_info("EmbeddingProjector: skipped under a sharded strategy (rank 0 lacks the model)")
            return
        if not trainer.is_global_zero or writer is None or not hasattr(pl_module, "embed"):
            return
        try:
            # isolate_rng: the loader draws a seed, and the checkpoint saved after this keeps training's RNG
            with isolate_rng():
                loader = trainer.datamodule.val_dataloader()
                ids, image, text = collect_embeddings(pl_module, loader, self.max_studies)
        except Exception:  # an optional view: the export and the other ranks must not wait on it
            log.exception("EmbeddingProjector: embedding the validation split failed; no projector data")
            return
        features = torch.from_numpy(np.concatenate([image, text]))
        metadata = [[study, kind] for kind in ("image", "text") for study in ids]
        writer.add_embedding(
            features, metadata=metadata, metadata_header=["id", "modality"], global_step=trainer.global_step
        )
