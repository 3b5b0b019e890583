"""``mambaxray-ctl prepare``: build a CheXpert Plus annotation, or resize images once into a cache.

* ``prepare chexpert-plus --csv df_chexpert_plus_240401.csv --out OUT.json [--images ROOT]``:
  our own R2Gen-format annotation from the official CSV (the paper's split, the CXPMRG-Bench file, is
  the default and is used as is; this one is an option). One study per image folder
  (``train/patient42142/study5``), report = the chosen section (rows without it are dropped and
  counted), frontal views first, a seeded 7:1:2 train/val/test split at PATIENT level.
* ``prepare images --root ROOT --size 224 --out CACHE``: every image under ROOT (or listed in
  ``--annotation``) decoded, resized and written as PNG into CACHE, in parallel processes with a
  progress bar; files already cached are skipped (resumable); unreadable files are listed in
  ``CACHE/unreadable.jsonl`` and do not stop the run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Iterable
from multiprocessing import get_context
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from mambaxray_ctl.data.annotations import SPLITS, DataValidationError, escapes_root, read_annotation
from mambaxray_ctl.data.cache import (
    UNREADABLE_NAME,
    cached_path,
    normalise_relpath,
    read_manifest,
    write_manifest,
)
from mambaxray_ctl.data.images import IMAGE_SUFFIXES, ImageDecodeError, load_image, resize, save_image

SECTIONS = {
    "findings": ("section_findings",),
    "impression": ("section_impression",),
    "both": ("section_findings", "section_impression"),
}
IMAGE_FORMATS = ("png", "jpg", "dicom")
REQUIRED_COLUMNS = ("path_to_image", "path_to_dcm", "frontal_lateral", "deid_patient_id")
SPLIT_RATIOS = (0.7, 0.1, 0.2)


class UserError(Exception):
    """Bad input from the user: reported as one line, exit status 1."""


# --------------------------------------------------------------------------------------- CheXpert Plus


def _text(value: str | None) -> str:
    text = (value or "").strip()
    return "" if text.lower() in {"nan", "none", "null"} else text


def _image_path(row: dict[str, str], image_format: str) -> str:
    if image_format == "dicom":
        return row["path_to_dcm"]
    path = row["path_to_image"]
    return str(PurePosixPath(path).with_suffix(".png")) if image_format == "png" else path


def split_patients(patients: Iterable[str], seed: int) -> dict[str, str]:
    """Patient → split, a seeded shuffle cut 7:1:2 (every patient in exactly one split)."""
    order = sorted(set(patients))
    random.Random(seed).shuffle(order)
    n_train = round(len(order) * SPLIT_RATIOS[0])
    n_val = round(len(order) * (SPLIT_RATIOS[0] + SPLIT_RATIOS[1])) - n_train
    return {
        p: "train" if i < n_train else "val" if i < n_train + n_val else "test" for i, p in enumerate(order)
    }


def build_chexpert_plus(
    csv_path: str | Path,
    section: str = "findings",
    image_format: str = "png",
    images_root: str | Path | None = None,
    seed: int = 0,
) -> tuple[dict[str, list[dict[str, Any]]], Counter[str], list[dict[str, Any]]]:
    """Build the annotation from the official CSV.

    :returns: (annotation, counts, dropped rows as ``{"line", "path", "reason"}``).
    :raises UserError: missing file or columns.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"CSV not found: {csv_path}")
    columns = SECTIONS[section]
    counts: Counter[str] = Counter()
    dropped: list[dict[str, Any]] = []
    studies: dict[str, dict[str, Any]] = {}
    csv.field_size_limit(sys.maxsize)
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in (*REQUIRED_COLUMNS, *columns) if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(
                f"{csv_path}: missing column(s) {', '.join(missing)} (header: {reader.fieldnames})"
            )
        for row in reader:
            counts["rows"] += 1
            line = reader.line_num
            path = _image_path(row, image_format)
            report = " ".join(t for t in (_text(row[c]) for c in columns) if t)
            if not report:
                dropped.append({"line": line, "path": path, "reason": f"no {section} section"})
                counts[f"rows without {section}"] += 1
                continue
            if images_root is not None and not (Path(images_root) / path).is_file():
                dropped.append({"line": line, "path": path, "reason": "image file not found"})
                counts["rows with a missing image"] += 1
                continue
            key = str(PurePosixPath(row["path_to_image"]).parent)
            study = studies.setdefault(
                key,
                {
                    "patient": _text(row["deid_patient_id"]) or PurePosixPath(key).parent.name,
                    "report": report,
                    "views": [],
                },
            )
            if study["report"] != report:
                counts["rows whose report differs from their study's first row (first kept)"] += 1
            frontal = _text(row["frontal_lateral"]).lower() == "frontal"
            study["views"].append((not frontal, path))
    patient_split = split_patients((s["patient"] for s in studies.values()), seed)
    annotation: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    for key, study in sorted(studies.items()):
        split = patient_split[study["patient"]]
        annotation[split].append(
            {
                "id": key.replace("/", "_"),
                "report": study["report"],
                "image_path": [path for _, path in sorted(study["views"])],
                "split": split,
                "patient_id": study["patient"],
            }
        )
    return annotation, counts, dropped


def _run_chexpert_plus(args: argparse.Namespace) -> int:
    annotation, counts, dropped = build_chexpert_plus(
        args.csv, section=args.section, image_format=args.format, images_root=args.images, seed=args.seed
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(annotation, indent=1) + "\n", encoding="utf-8")
    for name, value in counts.items():
        print(f"{name}: {value}")
    for split in SPLITS:
        entries = annotation[split]
        patients = len({e["patient_id"] for e in entries})
        images = sum(len(e["image_path"]) for e in entries)
        print(f"{split}: {len(entries)} studies, {images} images, {patients} patients")
    if dropped:
        dropped_path = out.with_name(out.stem + "_dropped.jsonl")
        with open(dropped_path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(d) + "\n" for d in dropped)
        print(f"{len(dropped)} dropped rows listed in {dropped_path}")
    print(f"wrote {out}")
    return 0


# ------------------------------------------------------------------------------------------ image cache


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def cache_one(job: tuple[str, str, str, int]) -> tuple[str, str | None]:
    """Decode, resize and write one image; returns (relative path, error or None). Never raises."""
    root, rel, cache_dir, size = job
    target = cached_path(cache_dir, rel)
    try:
        image = resize(load_image(Path(root) / rel), size)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        save_image(image, tmp)
        tmp.replace(target)  # atomic: an interrupted run never leaves a half-written cache file
    except ImageDecodeError as exc:
        return rel, exc.reason
    except Exception as exc:  # a bad file must not stop the run: it is listed instead
        return rel, f"{type(exc).__name__}: {exc}"
    return rel, None


def _collect(results: Iterable[tuple[str, str | None]], bar: tqdm) -> dict[str, str]:
    """Advance the progress bar per finished image; return the errors by relative path."""
    errors = {}
    for rel, error in results:
        if error is not None:
            errors[rel] = error
        bar.update()
    return errors


def list_images(root: Path, annotation: str | None) -> list[str]:
    """Relative paths of the images to cache: all image files under ``root``, or the annotation's."""
    if annotation is not None:
        data = read_annotation(annotation)
        entries = [e for split in SPLITS for e in data.get(split, []) if isinstance(e, dict)]
        paths = [p for e in entries if isinstance(e.get("image_path"), list) for p in e["image_path"]]
        return sorted({normalise_relpath(p) for p in paths if isinstance(p, str)})
    files = (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return sorted(p.relative_to(root).as_posix() for p in files)


def build_cache(
    root: str | Path,
    out: str | Path,
    size: int = 224,
    workers: int = 0,
    annotation: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fill the cache; returns the manifest (with counts and throughput of this run)."""
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise UserError(f"image root not found: {root}")
    manifest = read_manifest(out)
    if manifest is not None and manifest.get("size") != size:
        raise UserError(f"{out} is a cache of size {manifest.get('size')}, not {size}: use another --out")
    if manifest is not None and manifest.get("root") != str(root.resolve()):
        raise UserError(
            f"{out} is a cache of {manifest.get('root')}, not of {root.resolve()}: use another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"size": size, "root": str(root.resolve()), "format": "png (gray 16-bit, colour 8-bit RGB)"}
    write_manifest(out, manifest)
    rels = list_images(root, annotation)
    errors = {rel: "path leaves the image root" for rel in rels if escapes_root(rel)}
    todo = [rel for rel in rels if rel not in errors and not cached_path(out, rel).is_file()]
    workers = workers or os.cpu_count() or 1
    jobs = [(str(root), rel, str(out), size) for rel in todo]
    start = time.perf_counter()
    with tqdm(total=len(jobs), unit="img", desc="caching", disable=not progress) as bar:
        if workers == 1 or len(jobs) < 2:
            errors |= _collect(map(cache_one, jobs), bar)
        else:  # fork where available, as torch's DataLoader does: workers start without re-importing torch
            context = get_context("fork" if sys.platform == "linux" else "spawn")
            chunksize = max(1, min(16, len(jobs) // (workers * 4)))
            with context.Pool(min(workers, len(jobs)), initializer=_init_worker) as pool:  # exit terminates
                errors |= _collect(pool.imap_unordered(cache_one, jobs, chunksize=chunksize), bar)
    seconds = time.perf_counter() - start
    with open(out / UNREADABLE_NAME, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"file": rel, "error": err}) + "\n" for rel, err in sorted(errors.items()))
    manifest.update(
        images=len(rels) - len(errors),
        unreadable=len(errors),
        cached_this_run=len(todo) - len(errors.keys() & set(todo)),
        already_cached=len(rels) - len(todo),
        seconds=round(seconds, 3),
        images_per_second=round(len(todo) / seconds, 2) if todo and seconds > 0 else None,
        workers=workers,
    )
    write_manifest(out, manifest)
    return manifest


def _run_images(args: argparse.Namespace) -> int:
    if args.size < 16 or args.workers < 0:
        raise UserError("--size must be >= 16 and --workers >= 0")
    manifest = build_cache(args.root, args.out, args.size, args.workers, args.annotation, progress=True)
    rate = manifest["images_per_second"]
    print(
        f"cached {manifest['cached_this_run']} image(s) "
        f"({manifest['already_cached']} already cached) into {args.out} at {args.size}px"
        + (f", {rate} images/s with {manifest['workers']} process(es)" if rate else "")
    )
    if manifest["unreadable"]:
        print(f"{manifest['unreadable']} unreadable file(s) listed in {Path(args.out) / UNREADABLE_NAME}")
    return 0


# ---------------------------------------------------------------------------------------------- the CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="command", required=True, metavar="{chexpert-plus,images}")
    cxp = commands.add_parser(
        "chexpert-plus", help="build an R2Gen-format annotation from the CheXpert Plus CSV"
    )
    cxp.add_argument("--csv", required=True, help="df_chexpert_plus_240401.csv")
    cxp.add_argument("--out", required=True, help="annotation.json to write")
    cxp.add_argument(
        "--images", default=None, help="image root: rows whose image is missing there are dropped"
    )
    cxp.add_argument(
        "--section", choices=sorted(SECTIONS), default="findings", help="report text (default: findings)"
    )
    cxp.add_argument(
        "--format",
        choices=IMAGE_FORMATS,
        default="png",
        help="image paths: PNG release, original JPG, or DICOM",
    )
    cxp.add_argument("--seed", type=int, default=0, help="seed of the patient-level 7:1:2 split (default: 0)")
    images = commands.add_parser("images", help="resize images once into a cache read by the DataModules")
    images.add_argument("--root", required=True, help="image root")
    images.add_argument("--out", required=True, help="cache folder")
    images.add_argument(
        "--size", type=int, default=224, help="side of the cached square images (default: 224)"
    )
    images.add_argument("--workers", type=int, default=0, help="processes (default: one per CPU)")
    images.add_argument("--annotation", default=None, help="only cache the images this annotation lists")


def run(args: argparse.Namespace) -> int:
    try:
        return _run_chexpert_plus(args) if args.command == "chexpert-plus" else _run_images(args)
    except (UserError, DataValidationError, OSError) as exc:
        print(f"mambaxray-ctl prepare {args.command}: error: {exc}", file=sys.stderr)
        return 1
