"""Builders of tiny image files and R2Gen datasets shared by the data tests (no tests here)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")


def write_png(path: Path, size: int = 32, mode: str = "L", seed: int = 0) -> Path:
    """A random PNG in mode L (8-bit), I;16 (16-bit), RGB or RGBA."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (size, size), dtype=np.uint16))
    else:
        channels = {"L": (), "RGB": (3,), "RGBA": (4,)}[mode]
        image = Image.fromarray(rng.integers(0, 256, (size, size, *channels), dtype=np.uint8), mode=mode)
    image.save(path)
    return path


def write_truncated_png(path: Path) -> Path:
    """A PNG whose header is intact but whose pixel data is cut: passes the header check, fails decoding."""
    write_png(path, size=64, seed=1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_corrupt_png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a PNG file at all" * 4)
    return path


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
    bits_stored: int = 12,
) -> Path:
    """A minimal uncompressed 16-bit grayscale DICOM file written with pydicom."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_annotation(root: Path, data: dict[str, Any]) -> Path:
    path = root / "annotation.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def make_dataset(
    root: Path,
    counts: Sequence[int] = (4, 2, 2),
    views: int | Sequence[int] = 2,
    labels: int = 0,
    size: int = 32,
) -> tuple[Path, dict[str, Any]]:
    """Write ``root/images/<id>/<view>.png`` and ``root/annotation.json``; returns (annotation path, data).

    ``views`` may be a sequence: study i of a split gets ``views[i % len(views)]`` images.
    """
    data: dict[str, Any] = {}
    for split, n in zip(SPLITS, counts, strict=True):
        data[split] = []
        for i in range(n):
            sid = f"{split}_{i}"
            nv = views if isinstance(views, int) else views[i % len(views)]
            paths = [f"{sid}/{v}.png" for v in range(nv)]
            for v, rel in enumerate(paths):
                write_png(root / "images" / rel, size=size, seed=SPLITS.index(split) * 10_000 + i * 10 + v)
            entry: dict[str, Any] = {
                "id": sid,
                "report": f"Study {i} of {split}. No acute disease.",
                "image_path": paths,
            }
            if labels:
                entry["labels"] = [float((i + k) % 2) for k in range(labels)]
            data[split].append(entry)
    return write_annotation(root, data), data
