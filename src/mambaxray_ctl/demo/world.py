"""The synthetic chest X-ray world: studies whose findings are visible in two radiograph-like views and
determine a radiology-style report, written to disk in R2Gen format.

``mambaxray-ctl make-demo-data --out data/demo --n 2400 --seed 0`` writes
``<out>/images/<id>/0.png`` (frontal, PA), ``<out>/images/<id>/1.png`` (lateral) and
``<out>/annotation.json`` (R2Gen format, 70/10/20 train/val/test, a ``labels`` list per study and
the top-level ``label_names``). Everything is a function of ``(seed, study index)``: the same seed
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
from mambaxray_ctl.demo.render import render_frontal, render_lateral, sample_patient

log = logging.getLogger(__name__)

SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
WORLD_VERSION = 2  # written to annotation.json; bumped whenever a seed renders different studies


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


def make_study(seed: int, index: int, n: int, out: Path, size: int) -> dict[str, Any]:
    """Render and write one study; returns its annotation entry."""
    findings, report = sample_study(seed, index)
    rng = np.random.default_rng([seed, index, 1])
    patient = sample_patient(rng, findings)
    sid = study_id(index)
    folder = out / "images" / sid
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(render_frontal(findings, patient, size, rng)).save(folder / "0.png", compress_level=1)
    Image.fromarray(render_lateral(findings, patient, size, rng)).save(folder / "1.png", compress_level=1)
    return {
        "id": sid,
        "report": report,
        "image_path": [f"{sid}/0.png", f"{sid}/1.png"],
        "split": split_of(index, n),
        "labels": findings.labels(),
    }


def _make_study_star(args: tuple[int, int, int, Path, int]) -> dict[str, Any]:
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
        entries = [make_study(*job) for job in jobs]
    else:
        with get_context("spawn").Pool(workers) as pool:
            entries = pool.map(_make_study_star, jobs, chunksize=max(1, n // (workers * 8)))
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
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(annotation, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


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


def run(args: argparse.Namespace) -> int:
    if args.n < 10 or args.size < 32 or args.workers < 0:
        print(
            "mambaxray-ctl make-demo-data: error: need --n >= 10, --size >= 32, --workers >= 0",
            file=sys.stderr,
        )
        return 1
    start = time.perf_counter()
    try:
        path = generate_world(args.out, n=args.n, seed=args.seed, size=args.size, workers=args.workers)
    except OSError as exc:
        print(f"mambaxray-ctl make-demo-data: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path} in {time.perf_counter() - start:.1f}s: {describe_world(path)}")
    return 0
