"""Torch datasets: multi-view studies (stages 2–3) and single images (stage 1), with their collates.

A sample whose image fails to decode at load time is handled by the ``on_invalid`` policy:
``error`` raises :class:`~mambaxray_ctl.data.annotations.DataValidationError` naming the split, id
and file; ``skip`` turns it into ``{"failed": Problem}``, which the collate moves into
``batch["failed"]`` for the DataModule to count and report (so a batch may be smaller than asked).
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


def _load_failure(split: str, sid: str, exc: ImageDecodeError, policy: OnInvalid) -> dict[str, Problem]:
    problem = Problem(split, sid, "undecodable_image", exc.reason, exc.path)
    if policy == "error":
        hint = "on_invalid='error'; use on_invalid='skip' to skip such samples"
        raise DataValidationError(f"{problem} ({hint})") from exc
    return {"failed": problem}


class StudyDataset(Dataset):
    """Item: ``{"id", "images": (V, 3, H, W), "report", "raw_report", "labels"?: (K,)}``."""

    def __init__(
        self,
        studies: Sequence[Study],
        locate: Callable[[str], Path],
        transform: Transform,
        on_invalid: OnInvalid = "error",
    ) -> None:
        self.studies = list(studies)
        self.locate = locate
        self.transform = transform
        self.on_invalid = on_invalid

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, index: int) -> dict[str, Any]:
        study = self.studies[index]
        try:
            images = torch.stack([self.transform(load_image(self.locate(p))) for p in study.image_paths])
        except ImageDecodeError as exc:
            return _load_failure(study.split, study.id, exc, self.on_invalid)
        sample: dict[str, Any] = {
            "id": study.id,
            "images": images,
            "report": study.report,
            "raw_report": study.raw_report,
        }
        if study.labels is not None:
            sample["labels"] = torch.tensor(study.labels, dtype=torch.float32)
        return sample


class ImageDataset(Dataset):
    """Stage-1 items, one image each: ``{"id", "image": (3, H, W)}`` from ``(split, id, path)`` triples."""

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

    def __getitem__(self, index: int) -> dict[str, Any]:
        split, sid, path = self.items[index]
        try:
            image = self.transform(load_image(path))
        except ImageDecodeError as exc:
            return _load_failure(split, sid, exc, self.on_invalid)
        return {"id": sid, "image": image}


def _split_failed(samples: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Problem]]:
    return [s for s in samples if "failed" not in s], [s["failed"] for s in samples if "failed" in s]


def collate_studies(samples: Sequence[dict[str, Any]], image_size: int) -> dict[str, Any]:
    """Pad views to the largest study of the batch.

    Returns ``{"ids", "images": (B, V, 3, H, W), "view_mask": (B, V) bool, "reports", "raw_reports",
    "labels"?: (B, K), "failed"?: [Problem]}``; padded views are zeros with ``view_mask`` False.
    """
    ok, failed = _split_failed(samples)
    views = max((len(s["images"]) for s in ok), default=0)
    images = torch.zeros(len(ok), views, 3, image_size, image_size)
    view_mask = torch.zeros(len(ok), views, dtype=torch.bool)
    for i, sample in enumerate(ok):
        images[i, : len(sample["images"])] = sample["images"]
        view_mask[i, : len(sample["images"])] = True
    batch: dict[str, Any] = {
        "ids": [s["id"] for s in ok],
        "images": images,
        "view_mask": view_mask,
        "reports": [s["report"] for s in ok],
        "raw_reports": [s["raw_report"] for s in ok],
    }
    if ok and "labels" in ok[0]:
        batch["labels"] = torch.stack([s["labels"] for s in ok])
    if failed:
        batch["failed"] = failed
    return batch


def collate_images(samples: Sequence[dict[str, Any]], image_size: int) -> dict[str, Any]:
    """``{"ids", "images": (B, 3, H, W), "failed"?: [Problem]}``."""
    ok, failed = _split_failed(samples)
    images = torch.stack([s["image"] for s in ok]) if ok else torch.zeros(0, 3, image_size, image_size)
    batch: dict[str, Any] = {"ids": [s["id"] for s in ok], "images": images}
    if failed:
        batch["failed"] = failed
    return batch
