"""TensorBoard extras: parameter counts, sample reports with their images and heat maps at each
validation, stage-1 reconstructions, embedding projector with image thumbnails.

Everything here writes from rank 0 only and does nothing without a TensorBoard logger; the model is
run on rank 0 alone only outside FSDP and DeepSpeed (whose forward needs every rank)."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.seed import isolate_rng

from mambaxray_ctl.callbacks.embeddings import collect_embeddings
from mambaxray_ctl.callbacks.images import gray, overlay, thumbnails, tile, unnormalize
from mambaxray_ctl.data.cleaning import sentence_spans
from mambaxray_ctl.data.datasets import ImageDataset, StudyDataset
from mambaxray_ctl.data.images import Normalize
from mambaxray_ctl.metrics.report import sentence_bleu4
from mambaxray_ctl.stages.attribution import sentence_heat_maps

log = logging.getLogger(__name__)


def _tensorboard(trainer: Trainer) -> Any | None:
    """The SummaryWriter of the trainer's TensorBoard logger, if any."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def _sharded(trainer: Trainer) -> bool:
    """FSDP and DeepSpeed: rank 0 does not hold the whole model, and its forward needs every rank."""
    return isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy))


def _normalize(trainer: Trainer) -> Normalize | None:
    """The DataModule's input normalisation (:class:`Normalize`), to show its images; None without one."""
    normalize = getattr(trainer.datamodule, "normalize", None)
    return normalize if isinstance(normalize, Normalize) else None


def _choose(population: list[Any], count: int, seed: int) -> list[Any]:
    """``count`` items drawn with ``seed`` from ``population`` (all when fewer), in their sorted order."""
    return sorted(random.Random(seed).sample(sorted(population), min(count, len(population))))


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


def _cell(text: str) -> str:
    """``text`` as a markdown table cell (its ``|`` escaped)."""
    return text.replace("|", "\\|")


def markdown_samples(rows: list[tuple[str, str, str]]) -> str:
    """A markdown table: id | generated | reference | BLEU-4 (per sample)."""
    lines = ["| id | generated | reference | BLEU-4 |", "|---|---|---|---|"]
    for study, generated, reference in rows:
        cells = [_cell(text) for text in (study, generated, reference)]
        lines.append(f"| {' | '.join(cells)} | {sentence_bleu4(generated, reference):.3f} |")
    return "\n".join(lines)


class SampleReports(Callback):
    """At each validation, a fixed set of ``num_samples`` studies as a markdown table in TensorBoard,
    and the X-rays of the first ``image_samples`` of them (in id order).

    The studies are drawn once with ``seed`` from the validation ids, so epochs are comparable.
    Needs a module with ``val_metrics["report"]`` (:class:`ReportGenModule`); the corpus is gathered
    on every rank and written from rank 0.

    Images, from rank 0 only, with a DataModule that normalises (its ``normalize``):
    ``val/images/<id>``, the study's views side by side, each ``thumbnail_size`` px square and
    un-normalised with the DataModule's mean and std; with ``heat_maps``, ``val/heat_maps/<id>/<k>``,
    the heat map of sentence ``k`` of the generated report over each view, one colour scale for its
    views (:func:`~mambaxray_ctl.stages.attribution.sentence_heat_maps`), the sentences listed in the
    text ``val/heat_map_sentences``. Heat maps are skipped under FSDP and DeepSpeed (rank 0 lacks the
    model). A failure is logged and the run goes on.

    Memory: a study's heat maps take one LM forward and backward pass with one row per sentence, on top
    of what training holds (README.md, "TensorBoard"), so only its first ``heat_map_sentences``
    sentences get one: the maps of the report cut after sentence ``heat_map_sentences``, which are
    those of the whole report (the LM is causal and the cut falls between tokens). The CUDA cache is
    emptied after the heat maps; out of memory, heat maps are turned off for the rest of the run, with a
    warning, and the images go on.
    """

    def __init__(
        self,
        num_samples: int = 8,
        seed: int = 0,
        image_samples: int = 4,
        thumbnail_size: int = 128,
        heat_maps: bool = True,
        heat_map_sentences: int = 4,
    ) -> None:
        if image_samples < 0 or thumbnail_size < 1 or heat_map_sentences < 1:
            raise ValueError(
                "need image_samples >= 0, thumbnail_size >= 1 and heat_map_sentences >= 1, got "
                f"{image_samples}, {thumbnail_size}, {heat_map_sentences}"
            )
        self.num_samples = num_samples
        self.seed = seed
        self.image_samples = image_samples
        self.thumbnail_size = thumbnail_size
        self.heat_maps = heat_maps
        self.heat_map_sentences = heat_map_sentences
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
            self.chosen = _choose(list(by_id), self.num_samples, self.seed)
        rows = [by_id[i] for i in self.chosen if i in by_id]
        writer.add_text("val/samples", markdown_samples(rows), global_step=trainer.global_step)
        normalize = _normalize(trainer)
        if self.image_samples and normalize is not None:
            heat_maps = self.heat_maps  # turned off by an out-of-memory error in _log_images
            try:
                self._log_images(trainer, pl_module, writer, normalize, rows[: self.image_samples])
            except Exception:  # an optional view: the other ranks must not wait on it
                log.exception("SampleReports: drawing the sample studies' images failed; none this time")
            if heat_maps and pl_module.device.type == "cuda":
                torch.cuda.empty_cache()  # the heat maps' LM pass: give its blocks back before training

    def _log_images(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        writer: Any,
        normalize: Normalize,
        rows: list[tuple[str, str, str]],
    ) -> None:
        dataset = trainer.datamodule.dataset("val")
        if not isinstance(dataset, StudyDataset):
            return
        index = {study.id: i for i, study in enumerate(dataset.studies)}
        heat_maps = self.heat_maps and hasattr(pl_module, "llm") and not _sharded(trainer)
        step = trainer.global_step
        sentences: list[tuple[str, int, str]] = []
        for study, generated, _ in rows:
            item = dataset[index[study]]
            if item["id"] != study:  # undecodable here, replaced by another study (on_invalid=skip)
                continue
            views = thumbnails(item["images"], normalize, self.thumbnail_size)
            writer.add_image(f"val/images/{study}", tile([views]), global_step=step)
            if not heat_maps:
                continue
            valid = torch.ones(len(views), dtype=torch.bool)
            try:
                found_maps = sentence_heat_maps(pl_module, item["images"], valid, self._cut(generated))
            except torch.OutOfMemoryError:
                self.heat_maps = heat_maps = False
                log.warning(
                    "SampleReports: out of memory drawing the heat maps of study %s (an LM row per sentence, "
                    "up to heat_map_sentences=%d); heat maps are off for the rest of this run",
                    study,
                    self.heat_map_sentences,
                )
                continue
            for k, found in enumerate(found_maps, 1):
                scale = float(found.maps.max())
                pairs = zip(views, found.maps, strict=True)
                picture = np.concatenate([overlay(gray(v), m.numpy(), vmax=scale) for v, m in pairs], axis=1)
                writer.add_image(f"val/heat_maps/{study}/{k}", picture, global_step=step, dataformats="HWC")
                sentences.append((study, k, found.sentence))
        if sentences:
            lines = ["| id | # | sentence |", "|---|---|---|"]
            lines += [f"| {_cell(study)} | {k} | {_cell(sentence)} |" for study, k, sentence in sentences]
            writer.add_text("val/heat_map_sentences", "\n".join(lines), global_step=step)

    def _cut(self, report: str) -> str:
        """``report`` up to the end of its ``heat_map_sentences``-th sentence (all of it when shorter)."""
        spans = sentence_spans(report)
        return (
            report[: spans[self.heat_map_sentences - 1][1]]
            if len(spans) > self.heat_map_sentences
            else report
        )


class Reconstructions(Callback):
    """At every ``every_n_epochs``-th validation, a stage-1 module's reconstructions of ``num_images``
    validation images beside their targets, as one picture ``val/reconstructions``: a row per image,
    a column per panel of the module's ``reconstruct(images)``, the target last (ARM: the prediction of
    clusters ``2..K``, cluster 1 left at the normalisation mean, then the target; MAE: masked input,
    reconstruction, target), un-normalised with the DataModule's mean and std, at the model's image size.

    The images are drawn once with ``seed`` from the validation split, so epochs are comparable; the
    module's random draws (MAE's mask) come from the global RNG seeded with ``seed``, inside
    ``isolate_rng`` (training's RNG is left as it was). Rank 0 only, with a TensorBoard logger;
    skipped under FSDP and DeepSpeed; a failure is logged and the run goes on.
    """

    def __init__(self, num_images: int = 4, every_n_epochs: int = 1, seed: int = 0) -> None:
        if num_images < 1 or every_n_epochs < 1:
            raise ValueError(
                f"num_images and every_n_epochs must be >= 1, got {num_images}, {every_n_epochs}"
            )
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.seed = seed
        self.chosen: list[int] | None = None

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        due = (trainer.current_epoch + 1) % self.every_n_epochs == 0
        if trainer.sanity_checking or not due or not trainer.is_global_zero or _sharded(trainer):
            return
        writer, normalize = _tensorboard(trainer), _normalize(trainer)
        if writer is None or normalize is None or not hasattr(pl_module, "reconstruct"):
            return
        try:
            dataset = trainer.datamodule.dataset("val")
            if not isinstance(dataset, ImageDataset):
                return
            if self.chosen is None:
                self.chosen = _choose(list(range(len(dataset))), self.num_images, self.seed)
            images = torch.stack([dataset[i]["image"] for i in self.chosen]).to(pl_module.device)
            with isolate_rng():
                torch.manual_seed(self.seed)
                panels = pl_module.reconstruct(images)
            pictures = [unnormalize(panel, normalize) for panel in panels.values()]
            grid = tile([list(row) for row in zip(*pictures, strict=True)])
            writer.add_image("val/reconstructions", grid, global_step=trainer.global_step)
        except Exception:  # an optional view: the other ranks must not wait on it
            log.exception("Reconstructions: drawing the stage-1 reconstructions failed; none this time")


class EmbeddingProjector(Callback):
    """At the end of training, image and text embeddings of the validation split to TensorBoard's projector.

    Needs a module with ``embed(batch) -> (image, text)`` (stages 2 and 3). Runs on rank 0 only, on the
    training device (``on_train_end``: by ``on_fit_end`` Lightning has moved the model to the CPU).
    Skipped under FSDP and DeepSpeed, whose rank 0 does not hold the whole model (the notebooks embed
    from a checkpoint instead). Each point shows its study's first view, ``thumbnail_size`` px square
    (the projector's sprite; ``None``: no images), on its image and on its text point.
    """

    def __init__(self, max_studies: int = 500, thumbnail_size: int | None = 32) -> None:
        self.max_studies = max_studies
        self.thumbnail_size = thumbnail_size

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writer = _tensorboard(trainer)
        if _sharded(trainer):
            rank_zero_info("EmbeddingProjector: skipped under a sharded strategy (rank 0 lacks the model)")
            return
        if not trainer.is_global_zero or writer is None or not hasattr(pl_module, "embed"):
            return
        normalize = _normalize(trainer) if self.thumbnail_size else None
        firsts: dict[str, torch.Tensor] = {}

        def keep_first_views(loader: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
            for batch in loader:
                if normalize is not None and self.thumbnail_size and len(firsts) < self.max_studies:
                    pictures = thumbnails(batch["images"][:, 0], normalize, self.thumbnail_size)
                    firsts.update(zip(map(str, batch["ids"]), pictures, strict=True))
                yield batch

        try:
            # isolate_rng: the loader draws a seed, and the checkpoint saved after this keeps training's RNG
            with isolate_rng():
                loader = keep_first_views(trainer.datamodule.val_dataloader())
                ids, image, text = collect_embeddings(pl_module, loader, self.max_studies)
            features = torch.from_numpy(np.concatenate([image, text]))
            metadata = [[study, kind] for kind in ("image", "text") for study in ids]
            # each study's first view on its image and its text point; none unless every study has one
            pictured = bool(firsts) and all(study in firsts for study in ids)
            label_img = torch.stack([firsts[i] for i in ids] * 2) if pictured else None
            writer.add_embedding(
                features,
                metadata=metadata,
                label_img=label_img,
                metadata_header=["id", "modality"],
                global_step=trainer.global_step,
            )
        except Exception:  # an optional view: the export and the other ranks must not wait on it
            log.exception("EmbeddingProjector: writing the validation split's embeddings failed; none")
