"""LightningDataModules for R2Gen-format report data (IU X-ray, CheXpert Plus, MIMIC-CXR).

Batches in ``mode="reports"`` (stages 2–3)::

    {"ids": [str], "images": (B, V, 3, H, W), "view_mask": (B, V) bool, "reports": [cleaned str],
     "raw_reports": [str], "labels": (B, K) float  # only when the annotation has labels}

In ``mode="images"`` (stage 1) every item is one image: ``{"ids": [str], "images": (B, 3, H, W)}``;
the training set holds the images of the train split (plus ``extra_image_dir``; val/test images only
with ``pretrain_on_eval_images=True``), augmented with a random resized crop and a flip; val/test
loaders give their split's images resized, for monitoring.

``batch_size`` is GLOBAL: it is divided by the trainer's world size in :meth:`setup`.
"""

from __future__ import annotations

import logging
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

from lightning.pytorch import Callback, LightningDataModule, Trainer
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mambaxray_ctl.data.annotations import (
    SPLITS,
    DataValidationError,
    ImageCheck,
    OnInvalid,
    Problem,
    Study,
    apply_policy,
    check_images,
    escapes_root,
    find_duplicate_ids,
    label_names_of,
    parse_split,
    read_annotation,
    require_splits,
    write_skipped,
)
from mambaxray_ctl.data.cache import ImageLocator, require_cache
from mambaxray_ctl.data.cleaning import CleaningRule
from mambaxray_ctl.data.datasets import ImageDataset, StudyDataset, collate_images, collate_studies
from mambaxray_ctl.data.images import (
    IMAGE_SUFFIXES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    Normalize,
    RandomResizedCropFlip,
)
from mambaxray_ctl.distributed import all_gather_objects

log = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]
_STAGE_SPLITS: dict[str | None, tuple[str, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    None: SPLITS,
}


def per_device_batch_size(global_size: int, name: str, world: int) -> int:
    """A GLOBAL batch size split over ``world`` ranks; ``ValueError`` naming ``name`` if it does not split."""
    if global_size < 1 or global_size % world:
        raise ValueError(
            f"{name}={global_size} is the GLOBAL batch size and must be a positive multiple of the "
            f"world size {world} (devices x nodes); e.g. {name}={max(1, global_size // world) * world}"
        )
    return global_size // world


def micro_batches(global_size: int, micro: int, world: int) -> int:
    """How many micro-batches of ``micro`` per rank make the GLOBAL batch on ``world`` ranks (the
    gradient accumulation); ``ValueError`` if that is not whole."""
    if micro < 1 or global_size < 1 or global_size % (micro * world):
        raise ValueError(
            f"batch_size={global_size} (GLOBAL) is not a positive multiple of micro_batch_size x world size "
            f"= {micro} x {world}: accumulate_grad_batches = batch_size / (micro_batch_size x world size) "
            "must be whole"
        )
    return global_size // (micro * world)


class ReportDataModule(LightningDataModule):
    """R2Gen-format annotation + image folder → batches of multi-view studies (or single images).

    :param annotation: path of ``annotation.json`` (``{"train": [...], "val": [...], "test": [...]}``).
    :param image_root: folder the ``image_path`` entries are relative to (default: the annotation's folder).
    :param cleaning: report cleaning rule: ``iu_xray``, ``mimic_cxr`` (R2Gen/R2GenGPT) or ``none``.
    :param num_views: if set, every study must have exactly this many images (else a ``view_count`` problem).
    :param image_suffix: replace every image path's extension (e.g. ``.png``, as the official code forces;
        docs/METHOD.md#deviations-in-data-and-backbone).
    :param image_size: side of the square images given to the model (bicubic resize, aspect not kept).
    :param mean: normalisation mean per channel (default ImageNet 0.485, 0.456, 0.406).
    :param std: normalisation std per channel (default ImageNet 0.229, 0.224, 0.225).
    :param batch_size: GLOBAL training batch size, split evenly across ranks.
    :param micro_batch_size: per-device training batch; the GLOBAL ``batch_size`` is then reached by
        gradient accumulation, ``accumulate_grad_batches = batch_size / (micro_batch_size x world size)``,
        set on the trainer at setup (an error says what fits when it is not whole). ``None``: no
        accumulation, each rank takes ``batch_size / world size``.
    :param eval_batch_size: GLOBAL batch size for val/test/predict (default: ``batch_size``).
    :param num_workers: DataLoader worker processes.
    :param pin_memory: pin host memory for faster copies to the GPU.
    :param persistent_workers: keep workers alive between epochs (only with ``num_workers > 0``).
    :param shuffle: shuffle the training split (seeded; the official code never shuffles).
    :param seed: seed of the training-order shuffle.
    :param drop_last: drop the last incomplete training batch.
    :param on_invalid: ``error`` raises on any invalid sample, ``skip`` drops it, counts and lists it.
    :param image_check: at setup, ``exists`` (cheapest), ``header`` (exists + header parses) or
        ``decode`` (full decode: slow on large sets); decode failures at load time follow ``on_invalid``.
    :param skipped_file: where skipped samples are listed (default ``<trainer.log_dir>/skipped.jsonl``).
    :param image_cache: folder built by ``mambaxray-ctl prepare images`` at ``image_size``; read instead
        of ``image_root`` when set (stage-1 crops are then cut from the cached images).
    :param keep_in_memory: ``reports`` mode: keep every study's resized, normalised images in memory
        after their first load, so that later epochs decode no file (memory: studies x views x 3 x
        ``image_size``^2 x 4 bytes, e.g. 0.5 GB for the demo world at 96 px; each worker process keeps
        its own copy, so use it with ``num_workers=0`` or ``persistent_workers``).
    :param mode: ``reports`` (studies with reports) or ``images`` (stage 1, one image per item).
    :param extra_image_dir: stage 1: a folder of extra images (searched recursively) added to training.
    :param pretrain_on_eval_images: stage 1: also train on val and test images (off: that leaks the
        evaluation images into pretraining, as the official code does).
    :param crop_scale_min: stage 1: smallest crop area fraction of the random resized crop.
    :param predict_split: the split served by ``predict_dataloader``.
    """

    dataset_name: ClassVar[str] = "custom"

    def __init__(
        self,
        annotation: str,
        image_root: str | None = None,
        cleaning: CleaningRule = "mimic_cxr",
        num_views: int | None = None,
        image_suffix: str | None = None,
        image_size: int = 224,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        batch_size: int = 8,
        micro_batch_size: int | None = None,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        shuffle: bool = True,
        seed: int = 42,
        drop_last: bool = False,
        on_invalid: OnInvalid = "error",
        image_check: ImageCheck = "header",
        skipped_file: str | None = None,
        image_cache: str | None = None,
        keep_in_memory: bool = False,
        mode: Literal["reports", "images"] = "reports",
        extra_image_dir: str | None = None,
        pretrain_on_eval_images: bool = False,
        crop_scale_min: float = 0.2,
        predict_split: Split = "test",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.annotation_path = Path(annotation)
        self.image_root = Path(image_root) if image_root is not None else self.annotation_path.parent
        self.normalize = Normalize(mean or IMAGENET_MEAN, std or IMAGENET_STD)
        self.label_names: list[str] | None = None
        self.batch_size_per_device: int | None = None
        self.eval_batch_size_per_device: int | None = None
        self.skipped_at_setup: Counter[str] = Counter()  # problem kind -> samples' problems dropped
        self.skipped_at_load: Counter[str] = Counter()  # kind -> distinct samples failed at load, whole run
        self._studies: dict[str, list[Study]] | None = None
        self._datasets: dict[str, Dataset] = {}
        self._epoch_failures: dict[str, list[Problem]] = {}  # phase -> this rank's load-time failures
        self._listed_failures: set[Problem] = set()  # load-time failures already counted and listed
        self._skipped_file: Path | None = None  # resolved in setup, on every rank
        self._skipped_written = False
        self._reporter: _LoadFailureReporter | None = None

    # ------------------------------------------------------------------------------------- setup

    @property
    def num_labels(self) -> int:
        """Number of label columns (0 when the annotation has none)."""
        first = next((s for studies in (self._studies or {}).values() for s in studies), None)
        return len(first.labels) if first is not None and first.labels is not None else 0

    def _world(self) -> tuple[int, int]:
        """(world size, global rank); (1, 0) without a trainer."""
        return (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)

    def _resolve_skipped_path(self) -> Path:
        """``skipped_file``, else ``<trainer.log_dir>/skipped.jsonl``. ``trainer.log_dir`` is a
        broadcast under DDP, so this runs in :meth:`setup` on every rank, never from rank-0-only code."""
        if self.hparams.skipped_file is not None:
            return Path(self.hparams.skipped_file)
        log_dir = self.trainer.log_dir if self.trainer is not None else None
        return Path(log_dir or ".") / "skipped.jsonl"

    def _skipped_path(self) -> Path:
        if self._skipped_file is None:
            raise RuntimeError("call setup() first: it resolves where skipped samples are listed")
        return self._skipped_file

    def _write_skipped(self, problems: list[Problem]) -> None:
        path = self._skipped_path()
        if not self._skipped_written and path.exists():
            path.unlink()  # a fresh list per run
        write_skipped(problems, path)
        self._skipped_written = True

    def _apply_policy(self, items: list[Any], problems: list[Problem], key: Any = None) -> list[Any]:
        """Apply ``on_invalid``; only rank 0 writes the skipped list (every rank drops the same samples)."""
        path = self._skipped_path()
        kwargs = {} if key is None else {"key": key}
        kept = apply_policy(items, problems, self.hparams.on_invalid, self.annotation_path, path, **kwargs)
        self.skipped_at_setup.update(p.kind for p in problems)
        if problems and self._world()[1] == 0:
            self._write_skipped(problems)
        return kept

    def _load_studies(self, data: dict[str, Any]) -> dict[str, list[Study]]:
        hp = self.hparams
        self.label_names = label_names_of(data, self.annotation_path)
        present = [split for split in SPLITS if isinstance(data.get(split), list)]
        entries = [e for split in present for e in data[split] if isinstance(e, dict)]
        lengths = Counter(len(e["labels"]) for e in entries if isinstance(e.get("labels"), list))
        num_labels = len(self.label_names) if self.label_names else None
        if num_labels is None and lengths:
            num_labels = lengths.most_common(1)[0][0]  # entries that differ become bad_labels problems
        studies: list[Study] = []
        problems: list[Problem] = []
        for split in present:
            parsed, found = parse_split(
                data[split],
                split,
                hp.cleaning,
                num_views=hp.num_views,
                image_suffix=hp.image_suffix,
                num_labels=num_labels,
                check_reports=hp.mode == "reports",
            )
            studies += parsed
            problems += found
        problems += find_duplicate_ids(studies)
        files = [(s.split, s.id, rel) for s in studies for rel in s.image_paths if not escapes_root(rel)]
        problems += check_images(files, self._locator(), hp.image_check)
        kept = self._apply_policy(studies, problems)
        by_split = {split: [s for s in kept if s.split == split] for split in present}
        log.info(
            "%s: %s (cleaning=%s, images from %s)",
            self.annotation_path,
            ", ".join(f"{split} {len(v)}" for split, v in by_split.items()),
            hp.cleaning,
            hp.image_cache or self.image_root,
        )
        return by_split

    def _locator(self) -> ImageLocator:
        return ImageLocator(self.image_root, self.hparams.image_cache)

    def _extra_images(self) -> list[tuple[str, str, Path]]:
        root = Path(self.hparams.extra_image_dir)
        if not root.is_dir():
            raise DataValidationError(f"extra_image_dir {root} is not a folder")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        items = [("extra", p.relative_to(root).as_posix(), p) for p in files]
        locate = ImageLocator(root)
        problems = check_images([(s, i, i) for s, i, _ in items], locate, self.hparams.image_check)
        kept = self._apply_policy(items, problems, key=lambda item: (item[0], item[1]))
        log.info("extra_image_dir %s: %d images", root, len(kept))
        return kept

    def _image_items(self, splits: tuple[str, ...]) -> list[tuple[str, str, Path]]:
        """Unique images of the given splits as (split, id, file); the id is the relative path."""
        assert self._studies is not None
        locate = self._locator()
        seen: dict[str, tuple[str, str, Path]] = {}
        for split in splits:
            for study in self._studies.get(split, []):
                for rel in study.image_paths:
                    seen.setdefault(rel, (split, rel, locate(rel)))
        return list(seen.values())

    def _build_datasets(self) -> None:
        hp = self.hparams
        assert self._studies is not None
        locate = self._locator()
        evaluate = EvalTransform(hp.image_size, self.normalize)
        if hp.mode == "reports":
            for split, studies in self._studies.items():
                self._datasets[split] = StudyDataset(
                    studies, locate, evaluate, hp.on_invalid, keep_in_memory=hp.keep_in_memory
                )
            return
        train_splits = SPLITS if hp.pretrain_on_eval_images else ("train",)
        train_items = self._image_items(train_splits)
        if hp.extra_image_dir:
            train_items += self._extra_images()
        augment = RandomResizedCropFlip(hp.image_size, self.normalize, scale=(hp.crop_scale_min, 1.0))
        self._datasets["train"] = ImageDataset(train_items, augment, hp.on_invalid)
        for split in ("val", "test"):
            self._datasets[split] = ImageDataset(self._image_items((split,)), evaluate, hp.on_invalid)
        log.info("stage-1 images: train %d (from %s)", len(train_items), ", ".join(train_splits))

    def _train_batch_per_device(self, world: int) -> int:
        """The per-device training batch; with ``micro_batch_size``, also the trainer's gradient
        accumulation that makes the global ``batch_size``."""
        hp = self.hparams
        if hp.micro_batch_size is None:
            return per_device_batch_size(hp.batch_size, "batch_size", world)
        accumulate = micro_batches(hp.batch_size, hp.micro_batch_size, world)
        trainer = self.trainer
        if trainer is not None:
            if trainer.accumulate_grad_batches not in (1, accumulate):
                raise ValueError(
                    f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} disagrees with "
                    f"data.micro_batch_size={hp.micro_batch_size} (batch_size {hp.batch_size} on {world} "
                    f"rank(s) needs {accumulate}): set one of the two"
                )
            trainer.accumulate_grad_batches = accumulate
        log.info(
            "batch_size %d = %d per device x %d rank(s) x %d accumulated micro-batch(es)",
            hp.batch_size, hp.micro_batch_size, world, accumulate,
        )
        return hp.micro_batch_size

    def setup(self, stage: str | None = None) -> None:
        """Validate and load once (idempotent); check the splits ``stage`` needs; split batch sizes."""
        hp = self.hparams
        self._skipped_file = self._resolve_skipped_path()
        world, _ = self._world()
        self.batch_size_per_device = self._train_batch_per_device(world)
        self.eval_batch_size_per_device = per_device_batch_size(
            hp.eval_batch_size or hp.batch_size, "eval_batch_size", world
        )
        required = (hp.predict_split,) if stage == "predict" else _STAGE_SPLITS[stage]
        if hp.mode == "images" and stage == "fit":
            required = ("train",)
        if self._studies is None:
            if hp.image_cache is not None:
                require_cache(hp.image_cache, hp.image_size)
            data = read_annotation(self.annotation_path)
            require_splits(data, required, self.annotation_path)
            self._studies = self._load_studies(data)
            self._build_datasets()
        else:
            require_splits(self._studies, required, self.annotation_path)
        if self.trainer is not None and self._reporter not in self.trainer.callbacks:
            self._reporter = self._reporter or _LoadFailureReporter(self)
            self.trainer.callbacks.append(self._reporter)

    # -------------------------------------------------------------------------------- dataloaders

    def dataset(self, split: str) -> Dataset:
        """The dataset of a split (after :meth:`setup`)."""
        if split not in self._datasets:
            raise RuntimeError(f"no {split!r} dataset: call setup() first, and check the annotation has it")
        return self._datasets[split]

    def _loader(self, split: str, train: bool) -> DataLoader:
        hp = self.hparams
        batch_size = self.batch_size_per_device if train else self.eval_batch_size_per_device
        if batch_size is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        dataset = self.dataset(split)
        sampler = None
        if train and hp.shuffle:
            # Our own sampler, also on one process: the order is a function of (seed, epoch) (Lightning
            # calls set_epoch), so a run resumed from a checkpoint sees the batches of an uninterrupted one.
            world, rank = self._world()
            sampler = DistributedSampler(
                dataset, num_replicas=world, rank=rank, shuffle=True, seed=hp.seed, drop_last=hp.drop_last
            )
        reports = hp.mode == "reports"
        collate = partial(collate_studies, image_size=hp.image_size) if reports else collate_images
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=hp.num_workers,
            pin_memory=hp.pin_memory,
            persistent_workers=hp.persistent_workers and hp.num_workers > 0,
            collate_fn=collate,
            drop_last=train and hp.drop_last,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.predict_split, train=False)

    # ------------------------------------------------------------------------- load-time failures

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Take the failures of the samples that were replaced out of the batch and keep them for the
        epoch-end report (this rank only: no collective here, mid-epoch)."""
        failed = batch.pop("failed", None) if isinstance(batch, dict) else None
        if failed:
            self._epoch_failures.setdefault(self._phase(), []).extend(failed)
            rank = self._world()[1]
            for problem in failed:
                log.warning("rank %d: skipped at load time (replaced by another sample): %s", rank, problem)
        return batch

    def _phase(self) -> str:
        """The trainer's running stage (``train``, ``validate``, ``sanity_check``, ...), else ``load``."""
        stage = self.trainer.state.stage if self.trainer is not None else None
        return stage.value if stage is not None else "load"

    def report_load_failures(self, phase: str | None = None) -> None:
        """Gather every rank's load-time failures of ``phase`` (default: the current one), log this
        epoch's count, count and list (rank 0) the samples not seen failing before in this run, and
        reset; called on every rank at every epoch end."""
        phase = phase or self._phase()
        local = self._epoch_failures.pop(phase, [])
        failed = list(dict.fromkeys(p for part in all_gather_objects(local) for p in part))
        if not failed:
            return
        new = [problem for problem in failed if problem not in self._listed_failures]
        self._listed_failures.update(new)
        self.skipped_at_load.update(problem.kind for problem in new)
        counts = Counter(problem.kind for problem in failed)
        if self._world()[1] == 0:
            if new:
                self._write_skipped(new)
            epoch = f" epoch {self.trainer.current_epoch}" if self.trainer is not None else ""
            text = ", ".join(f"{kind}={n}" for kind, n in sorted(counts.items()))
            log.warning(
                "%s%s: samples skipped at load time: %s; listed in %s",
                phase,
                epoch,
                text,
                self._skipped_path(),
            )


class _LoadFailureReporter(Callback):
    """Added to the trainer by :meth:`ReportDataModule.setup`: reports load-time failures per epoch."""

    def __init__(self, datamodule: ReportDataModule) -> None:
        self.datamodule = datamodule

    def _report(self, trainer: Trainer, *_: Any) -> None:
        self.datamodule.report_load_failures(trainer.state.stage.value if trainer.state.stage else None)

    on_train_epoch_end = on_validation_epoch_end = on_test_epoch_end = on_predict_epoch_end = _report


class IUXrayDataModule(ReportDataModule):
    """IU X-ray (R2Gen split 2,069 / 296 / 590): two views per study, IU cleaning rule.

    :param annotation: R2Gen ``annotation.json``.
    :param image_root: folder holding ``<id>/0.png`` and ``<id>/1.png``.
    :param cleaning: report cleaning rule.
    :param num_views: images required per study.
    :param kwargs: any other :class:`ReportDataModule` argument.
    """

    dataset_name = "iu_xray"

    def __init__(
        self,
        annotation: str = "data/iu_xray/annotation.json",
        image_root: str | None = "data/iu_xray/images",
        cleaning: CleaningRule = "iu_xray",
        num_views: int | None = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            annotation=annotation, image_root=image_root, cleaning=cleaning, num_views=num_views, **kwargs
        )


class CheXpertPlusDataModule(ReportDataModule):
    """CheXpert Plus (CXPMRG-Bench ``annotation.json`` or one built by ``prepare chexpert-plus``):
    the views listed in ``image_path`` (1 or more), MIMIC cleaning rule.

    :param annotation: R2Gen-format annotation.
    :param image_root: folder the image paths are relative to (the PNG release).
    :param cleaning: report cleaning rule.
    :param kwargs: any other :class:`ReportDataModule` argument.
    """

    dataset_name = "chexpert_plus"

    def __init__(
        self,
        annotation: str = "data/chexpert_plus/annotation.json",
        image_root: str | None = "data/chexpert_plus/PNG",
        cleaning: CleaningRule = "mimic_cxr",
        **kwargs: Any,
    ) -> None:
        super().__init__(annotation=annotation, image_root=image_root, cleaning=cleaning, **kwargs)


class MIMICCXRDataModule(ReportDataModule):
    """MIMIC-CXR in R2Gen format (views from ``image_path``), MIMIC cleaning rule.

    :param annotation: R2Gen-format annotation.
    :param image_root: folder the image paths are relative to.
    :param cleaning: report cleaning rule.
    :param kwargs: any other :class:`ReportDataModule` argument.
    """

    dataset_name = "mimic_cxr"

    def __init__(
        self,
        annotation: str = "data/mimic_cxr/annotation.json",
        image_root: str | None = "data/mimic_cxr/images",
        cleaning: CleaningRule = "mimic_cxr",
        **kwargs: Any,
    ) -> None:
        super().__init__(annotation=annotation, image_root=image_root, cleaning=cleaning, **kwargs)
