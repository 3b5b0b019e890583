"""The synthetic chest X-ray world: studies whose findings are visible in two radiograph-like views and
determine a radiology-style report, written to disk in R2Gen format.

``mambaxray-ctl make-demo-data --out data/demo --n 2400 --seed 0`` writes
``<out>/images/<id>/0.png`` (frontal, PA), ``<out>/images/<id>/1.png`` (lateral) and
``<out>/annotation.json`` (R2Gen format, 70/10/20 train/val/test, a ``labels`` list per study and
the top-level ``label_names``) and ``<out>/regions.json`` (where each study's findings are drawn, per
view: :func:`read_regions`). Everything is a function of ``(seed, study index)``: the same seed
gives the same files whatever the number of worker processes.

The parts: :mod:`~mambaxray_ctl.demo.findings` (label set, sampling of findings),
:mod:`~mambaxray_ctl.demo.language` (report text), :mod:`~mambaxray_ctl.demo.render` (the two views)
and :mod:`~mambaxray_ctl.demo.labeller` (report → labels).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mambaxray_ctl.demo.findings import LABEL_NAMES, Findings, sample_findings
from mambaxray_ctl.demo.language import write_report
from mambaxray_ctl.demo.render import Regions, render_frontal, render_lateral, sample_patient

log = logging.getLogger(__name__)

SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
WORLD_VERSION = 2  # written to annotation.json; bumped whenever a seed renders different studies
REGIONS_FILE = "regions.json"
VIEWS = ("frontal", "lateral")  # image 0 and image 1 of every study


def split_of(index: int, n: int) -> str:
    """70/10/20 train/val/test by position (studies are i.i.d., so position is a fair split)."""
    train, val = round(n * SPLIT_FRACTIONS[0]), round(n * (SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]))
    return "train" if index < train else "val" if index < val else "test"


def study_id(index: int) -> str:
    return f"demo_{index:05d}"


def sample_study(seed: int, index: int) -> tuple[Findings, str]:
    """Findings and report of study ``index`` (no pixels): cheap, for label/extractor checks."""
    rng = np.random.default_rng([seed, index, 0])
    findings = sample_findings(rng)
    return findings, write_report(findings, rng)


def render_study(seed: int, index: int, size: int) -> tuple[list[np.ndarray], list[Regions]]:
    """The two views of study ``index`` (uint8 arrays) and where each finding is drawn on each."""
    findings, _ = sample_study(seed, index)
    rng = np.random.default_rng([seed, index, 1])
    patient = sample_patient(rng, findings)
    regions: list[Regions] = [{}, {}]
    frontal = render_frontal(findings, patient, size, rng, regions[0])
    lateral = render_lateral(findings, patient, size, rng, regions[1])
    return [frontal, lateral], regions


def make_study(seed: int, index: int, n: int, out: Path, size: int) -> tuple[dict[str, Any], list[Regions]]:
    """Render and write one study; returns its annotation entry and its regions per view."""
    findings, report = sample_study(seed, index)
    views, regions = render_study(seed, index, size)
    sid = study_id(index)
    folder = out / "images" / sid
    folder.mkdir(parents=True, exist_ok=True)
    for number, view in enumerate(views):
        Image.fromarray(view).save(folder / f"{number}.png", compress_level=1)
    entry = {
        "id": sid,
        "report": report,
        "image_path": [f"{sid}/0.png", f"{sid}/1.png"],
        "split": split_of(index, n),
        "labels": findings.labels(),
    }
    return entry, regions


def _make_study_star(args: tuple[int, int, int, Path, int]) -> tuple[dict[str, Any], list[Regions]]:
    return make_study(*args)


def generate_world(out: str | Path, n: int = 2400, seed: int = 0, size: int = 224, workers: int = 0) -> Path:
    """Write the world to ``out`` and return the annotation path (``workers`` 0 = one per CPU)."""
    if n < 10:
        raise ValueError(f"n must be at least 10 (got {n}) so that every split has studies")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    jobs = [(seed, i, n, out, size) for i in range(n)]
    if workers == 1:
        studies = [make_study(*job) for job in jobs]
    else:
        with get_context("spawn").Pool(workers) as pool:
            studies = pool.map(_make_study_star, jobs, chunksize=max(1, n // (workers * 8)))
    entries = [entry for entry, _ in studies]
    _write_json(out / REGIONS_FILE, _regions_document({entry["id"]: views for entry, views in studies}))
    annotation: dict[str, Any] = {
        "world_version": WORLD_VERSION,
        "label_names": list(LABEL_NAMES),
        "train": [],
        "val": [],
        "test": [],
    }
    for entry in entries:
        annotation[entry["split"]].append(entry)
    path = out / "annotation.json"
    _write_json(path, annotation)
    return path


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def _regions_document(studies: dict[str, list[Regions]]) -> dict[str, Any]:
    return {
        "world_version": WORLD_VERSION,
        "box": "x0, y0, x1, y1: fractions of the image's width and height from its top-left corner",
        "views": list(VIEWS),
        "studies": {
            sid: [{label: [list(box) for box in boxes] for label, boxes in view.items()} for view in views]
            for sid, views in studies.items()
        },
    }


def _checked_regions(args: tuple[int, int, Path]) -> list[Regions]:
    """The regions of study ``index`` after checking that it renders exactly the images in ``folder``."""
    seed, index, folder = args
    stored = [np.asarray(Image.open(folder / f"{number}.png")) for number in range(len(VIEWS))]
    views, regions = render_study(seed, index, stored[0].shape[0])
    for number, (view, image) in enumerate(zip(views, stored, strict=True)):
        if not np.array_equal(view, image):
            raise ValueError(
                f"{folder / f'{number}.png'}: not the image that seed {seed} renders for study {index}; "
                "pass the seed the world was made with, or regenerate the world"
            )
    return regions


def add_regions(world: str | Path, seed: int, workers: int = 0) -> Path:
    """Write ``<world>/regions.json`` for a world written before regions were recorded: each study is
    rendered again from ``(seed, index)`` and must give exactly its stored images (else ValueError
    naming the file). Returns the path."""
    world = Path(world)
    annotation = json.loads((world / "annotation.json").read_text(encoding="utf-8"))
    ids = [entry["id"] for split in ("train", "val", "test") for entry in annotation.get(split, [])]
    jobs = [(seed, int(sid.rpartition("_")[2]), world / "images" / sid) for sid in ids]
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        regions = [_checked_regions(job) for job in jobs]
    else:
        with get_context("spawn").Pool(workers) as pool:
            regions = pool.map(_checked_regions, jobs, chunksize=max(1, len(jobs) // (workers * 8)))
    path = world / REGIONS_FILE
    _write_json(path, _regions_document(dict(zip(ids, regions, strict=True))))
    return path


def read_regions(world: str | Path) -> dict[str, list[Regions]]:
    """Study id -> per view (:data:`VIEWS` order) -> label -> boxes, from ``<world>/regions.json``.

    :raises FileNotFoundError: the world has no regions file (written before regions existed), saying
        how to add one.
    :raises ValueError: the file is not a regions file of this world version.
    """
    path = Path(world) / REGIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: this world was written before its findings' regions were recorded; "
            f"add them with `mambaxray-ctl make-demo-data --out {world} --regions-only --seed SEED` "
            "(the seed the world was made with; its images are checked) or regenerate the world"
        )
    document = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(document, dict) or document.get("world_version") != WORLD_VERSION:
        raise ValueError(f"{path}: not a regions file of world version {WORLD_VERSION}")
    return {
        sid: [{label: [tuple(box) for box in boxes] for label, boxes in view.items()} for view in views]
        for sid, views in document["studies"].items()
    }


def describe_world(annotation: Path) -> str:
    """Split sizes, normal studies and positives per label of a generated world."""
    with open(annotation, encoding="utf-8") as f:
        entries = json.load(f)
    counts = {split: len(entries[split]) for split in ("train", "val", "test")}
    labels = [entry["labels"] for split in counts for entry in entries[split]]
    positives = np.asarray(labels, dtype=np.int64).reshape(-1, len(LABEL_NAMES)).sum(axis=0)
    normal = sum(not any(row) for row in labels)
    lines = [", ".join(f"{k} {v}" for k, v in counts.items())]
    lines.append(f"normal studies: {normal}/{len(labels)}; positives per label:")
    lines += [f"  {name:<36} {int(count)}" for name, count in zip(LABEL_NAMES, positives, strict=True)]
    return "\n".join(lines)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="data/demo", help="output folder (default: data/demo)")
    parser.add_argument("--n", type=int, default=2400, help="number of studies (default: 2400)")
    parser.add_argument("--seed", type=int, default=0, help="world seed (default: 0)")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (default: 224)")
    parser.add_argument("--workers", type=int, default=0, help="processes (default: one per CPU)")
    parser.add_argument(
        "--regions-only",
        action="store_true",
        help=f"only add {REGIONS_FILE} to the world in --out, made with --seed (its images are checked)",
    )


def run(args: argparse.Namespace) -> int:
    if args.n < 10 or args.size < 32 or args.workers < 0:
        print(
            "mambaxray-ctl make-demo-data: error: need --n >= 10, --size >= 32, --workers >= 0",
            file=sys.stderr,
        )
        return 1
    start = time.perf_counter()
    if args.regions_only:
        try:
            path = add_regions(args.out, args.seed, args.workers)
        except (OSError, ValueError, KeyError) as exc:
            print(f"mambaxray-ctl make-demo-data: error: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {path} in {time.perf_counter() - start:.1f}s")
        return 0
    try:
        path = generate_world(args.out, n=args.n, seed=args.seed, size=args.size, workers=args.workers)
    except OSError as exc:
        print(f"mambaxray-ctl make-demo-data: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path} in {time.perf_counter() - start:.1f}s: {describe_world(path)}")
    return 0
