"""Torch datasets: multi-view studies (stages 2–3) and single images (stage 1), with their collates.

A sample whose image fails to decode at load time is handled by the ``on_invalid`` policy:
``error`` raises :class:`~mambaxray_ctl.data.annotations.DataValidationError` naming the split, id
and file; ``skip`` replaces it by the next sample that decodes and records the failure, which the
collate moves into ``batch["failed"]`` for the DataModule to count and report. Batches keep their
size on every rank, as DDP's gathered features need.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mambaxray_ctl.data.annotations import DataValidationError, OnInvalid, Problem, Study
from mambaxray_ctl.data.images import ImageDecodeError, load_image

Transform = Callable[[Tensor], Tensor]


MAX_REPLACEMENT_TRIES = 16


class _ReplacingDataset(Dataset):
    """Base of the datasets: an item whose image fails to decode is replaced by the next one that
    decodes (at most :data:`MAX_REPLACEMENT_TRIES` tried), carrying its failure in ``"failed"``, so that
    every rank's batch keeps its size (gathered contrastive negatives need equal shapes on all ranks).
    Only the failure of the requested item is recorded: a failing candidate is recorded when it is
    itself requested. With ``on_invalid="error"`` it raises :class:`DataValidationError` naming the
    split, id and file."""

    on_invalid: OnInvalid

    def _load(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def _describe(self, index: int) -> tuple[str, str]:
        """``(split, id)`` of an item."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return self._load(index)
        except ImageDecodeError as exc:
            split, sid = self._describe(index)
            problem = Problem(split, sid, "undecodable_image", exc.reason, exc.path)
            if self.on_invalid == "error":
                hint = "on_invalid='error'; use on_invalid='skip' to skip such samples"
                raise DataValidationError(f"{problem} ({hint})") from exc
        tries = min(len(self) - 1, MAX_REPLACEMENT_TRIES)
        for offset in range(1, tries + 1):
            try:
                return {**self._load((index + offset) % len(self)), "failed": problem}
            except ImageDecodeError:
                continue
        raise DataValidationError(
            f"{problem}; and none of the next {tries} samples decodes either (is the image folder right?)"
        )


class StudyDataset(_ReplacingDataset):
    """Item: ``{"id", "images": (V, 3, H, W), "report", "raw_report", "labels"?: (K,), "failed"?}``.

    ``keep_in_memory``: keep each study's transformed images after their first load and serve them
    from memory afterwards (only for a deterministic ``transform``; each worker process keeps its own).
    """

    def __init__(
        self,
        studies: Sequence[Study],
        locate: Callable[[str], Path],
        transform: Transform,
        on_invalid: OnInvalid = "error",
        keep_in_memory: bool = False,
    ) -> None:
        self.studies = list(studies)
        self.locate = locate
        self.transform = transform
        self.on_invalid = on_invalid
        self.memory: dict[int, Tensor] | None = {} if keep_in_memory else None

    def __len__(self) -> int:
        return len(self.studies)

    def _describe(self, index: int) -> tuple[str, str]:
        return self.studies[index].split, self.studies[index].id

    def _load(self, index: int) -> dict[str, Any]:
        study = self.studies[index]
        images = None if self.memory is None else self.memory.get(index)
        if images is None:
            images = torch.stack([self.transform(load_image(self.locate(p))) for p in study.image_paths])
            if self.memory is not None:
                self.memory[index] = images
        sample: dict[str, Any] = {
            "id": study.id,
            "images": images,
            "report": study.report,
            "raw_report": study.raw_report,
        }
        if study.labels is not None:
            sample["labels"] = torch.tensor(study.labels, dtype=torch.float32)
        return sample


class ImageDataset(_ReplacingDataset):
    """Stage-1 items, one image each: ``{"id", "image": (3, H, W), "failed"?}`` from ``(split, id, path)``
    triples."""

    def __init__(
        self,
        items: Sequence[tuple[str, str, Path]],
        transform: Transform,
        on_invalid: OnInvalid = "error",
    ) -> None:
        self.items = list(items)
        self.transform = transform
        self.on_invalid = on_invalid

    def __len__(self) -> int:
        return len(self.items)

    def _describe(self, index: int) -> tuple[str, str]:
        return self.items[index][0], self.items[index][1]

    def _load(self, index: int) -> dict[str, Any]:
        _, sid, path = self.items[index]
        return {"id": sid, "image": self.transform(load_image(path))}


def _failures(samples: Sequence[dict[str, Any]]) -> list[Problem]:
    return [sample["failed"] for sample in samples if "failed" in sample]


def collate_studies(samples: Sequence[dict[str, Any]], image_size: int) -> dict[str, Any]:
    """Pad views to the largest study of the batch.

    Returns ``{"ids", "images": (B, V, 3, H, W), "view_mask": (B, V) bool, "reports", "raw_reports",
    "labels"?: (B, K), "failed"?: [Problem]}``; padded views are zeros with ``view_mask`` False.
    """
    failed = _failures(samples)
    views = max((len(s["images"]) for s in samples), default=0)
    images = torch.zeros(len(samples), views, 3, image_size, image_size)
    view_mask = torch.zeros(len(samples), views, dtype=torch.bool)
    for i, sample in enumerate(samples):
        images[i, : len(sample["images"])] = sample["images"]
        view_mask[i, : len(sample["images"])] = True
    batch: dict[str, Any] = {
        "ids": [s["id"] for s in samples],
        "images": images,
        "view_mask": view_mask,
        "reports": [s["report"] for s in samples],
        "raw_reports": [s["raw_report"] for s in samples],
    }
    if samples and "labels" in samples[0]:
        batch["labels"] = torch.stack([s["labels"] for s in samples])
    if failed:
        batch["failed"] = failed
    return batch


def collate_images(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``{"ids", "images": (B, 3, H, W), "failed"?: [Problem]}``."""
    failed = _failures(samples)
    images = torch.stack([s["image"] for s in samples])
    batch: dict[str, Any] = {"ids": [s["id"] for s in samples], "images": images}
    if failed:
        batch["failed"] = failed
    return batch
