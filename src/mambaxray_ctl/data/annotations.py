"""R2Gen-format annotations: reading, validation and the ``on_invalid`` policy.

An annotation is ``{"train": [...], "val": [...], "test": [...]}``; each entry is
``{"id", "report", "image_path": [paths relative to the image root], "labels"?: [numbers]}``.
An optional top-level ``"label_names"`` list names the label columns.

Nothing is dropped silently: every problem is a :class:`Problem` with a ``kind``; the policy either
raises one :class:`DataValidationError` listing them, or drops the samples, logs the counts per kind
and writes them to ``skipped.jsonl``.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from mambaxray_ctl.data.cleaning import CleaningRule, clean_report, is_empty_report
from mambaxray_ctl.data.images import ImageDecodeError, check_image_header, load_image

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
OnInvalid = Literal["error", "skip"]
ImageCheck = Literal["exists", "header", "decode"]
MAX_LISTED_PROBLEMS = 20


class DataValidationError(ValueError):
    """The data does not satisfy the checks; the message lists what is wrong and where."""


@dataclass(frozen=True)
class Study:
    """One annotation entry after parsing; ``report`` is cleaned, ``raw_report`` is as written."""

    id: str
    split: str
    raw_report: str
    report: str
    image_paths: tuple[str, ...]
    labels: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one sample (``file`` is the image path concerned, if any)."""

    split: str
    id: str
    kind: str
    detail: str
    file: str | None = None

    def __str__(self) -> str:
        where = f"[{self.split}] id={self.id}" + (f" file={self.file}" if self.file else "")
        return f"{where}: {self.kind}: {self.detail}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def read_annotation(path: str | Path) -> dict[str, Any]:
    """Load an annotation JSON file; errors name the file (and the position of a JSON error)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataValidationError(f"annotation file not found: {path}") from None
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise DataValidationError(f"{path}: invalid JSON at {where}: {exc.msg}") from None
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise DataValidationError(f"{path}: expected an object with 'train'/'val'/'test' lists, got {kind}")
    return data


def require_splits(data: dict[str, Any], splits: Iterable[str], source: str | Path) -> None:
    """Raise when a requested split is absent or not a list (never skippable)."""
    for split in splits:
        if not isinstance(data.get(split), list):
            present = ", ".join(k for k, v in data.items() if isinstance(v, list)) or "none"
            raise DataValidationError(f"{source}: split {split!r} not found (splits present: {present})")


def label_names_of(data: dict[str, Any], source: str | Path) -> list[str] | None:
    """The optional top-level ``label_names`` list."""
    names = data.get("label_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise DataValidationError(f"{source}: 'label_names' must be a list of strings")
    return names


def escapes_root(path: str) -> bool:
    """True for absolute paths and for relative paths that leave the root through ``..``."""
    posix = path.replace("\\", "/")
    if posix.startswith("/") or PurePosixPath(posix).is_absolute() or (len(posix) > 1 and posix[1] == ":"):
        return True
    normal = posixpath.normpath(posix)
    return normal == ".." or normal.startswith("../")


def _with_suffix(path: str, suffix: str | None) -> str:
    return path if suffix is None else str(PurePosixPath(path).with_suffix(suffix))


def parse_split(
    entries: list[Any],
    split: str,
    cleaning: CleaningRule,
    *,
    num_views: int | None = None,
    image_suffix: str | None = None,
    num_labels: int | None = None,
    check_reports: bool = True,
) -> tuple[list[Study], list[Problem]]:
    """Parse the entries of one split; every entry with a problem yields a :class:`Problem`.

    Entries with problems are still returned when they could be parsed (their problems decide
    their fate later), so that all problems of a sample are reported at once.
    """
    studies: list[Study] = []
    problems: list[Problem] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "id" not in entry:
            problems.append(Problem(split, f"#{index}", "bad_entry", "entry is not an object with an 'id'"))
            continue
        sid = str(entry["id"])
        raw = entry.get("report")
        paths = entry.get("image_path")
        if not isinstance(raw, str) or not (
            isinstance(paths, list) and paths and all(isinstance(p, str) and p for p in paths)
        ):
            detail = "needs a string 'report' and a non-empty list of strings 'image_path'"
            problems.append(Problem(split, sid, "bad_entry", detail))
            continue
        report = clean_report(raw, cleaning)
        if check_reports and is_empty_report(report):
            problems.append(Problem(split, sid, "empty_report", f"report is empty after cleaning: {raw!r}"))
        if num_views is not None and len(paths) != num_views:
            problems.append(Problem(split, sid, "view_count", f"{len(paths)} images, expected {num_views}"))
        for path in paths:
            if escapes_root(path):
                problems.append(Problem(split, sid, "path_escape", "path leaves the image root", path))
        labels = entry.get("labels")
        if labels is not None or num_labels is not None:
            valid = isinstance(labels, list) and all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in labels
            )
            if not valid or (num_labels is not None and len(labels) != num_labels):
                detail = f"expected {num_labels or 'a list of'} numbers, got {labels!r}"
                problems.append(Problem(split, sid, "bad_labels", detail))
                labels = None
        studies.append(
            Study(
                id=sid,
                split=split,
                raw_report=raw,
                report=report,
                image_paths=tuple(_with_suffix(p, image_suffix) for p in paths),
                labels=tuple(float(v) for v in labels) if labels is not None else None,
            )
        )
    return studies, problems


def find_duplicate_ids(studies: Iterable[Study]) -> list[Problem]:
    """Every occurrence of an id after its first one (across splits) is a problem."""
    first: dict[str, str] = {}
    problems = []
    for study in studies:
        if study.id in first:
            detail = f"id already used in split {first[study.id]!r}"
            problems.append(Problem(study.split, study.id, "duplicate_id", detail))
        else:
            first[study.id] = study.split
    return problems


def check_image(path: Path, mode: ImageCheck) -> str | None:
    """The reason ``path`` is unusable under ``mode``, or None."""
    if mode == "exists":
        return None if path.is_file() else "file not found"
    try:
        if mode == "header":
            check_image_header(path)
        else:
            load_image(path)
    except ImageDecodeError as exc:
        return exc.reason
    return None


def check_images(
    files: Sequence[tuple[str, str, str]],
    locate: Callable[[str], Path],
    mode: ImageCheck,
    workers: int = 8,
) -> list[Problem]:
    """Check ``(split, id, relative path)`` triples; I/O-bound, so a thread pool overlaps latency."""
    paths = [locate(rel) for _, _, rel in files]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(lambda p: check_image(p, mode), paths))
    problems = []
    for (split, sid, rel), path, reason in zip(files, paths, reasons, strict=True):
        if reason is not None:
            kind = "missing_file" if reason.startswith("file not found") else "unreadable_image"
            problems.append(Problem(split, sid, kind, f"{reason} ({path})", rel))
    return problems


def format_problems(problems: Sequence[Problem], source: str | Path) -> str:
    """One message: counts per kind, then the first :data:`MAX_LISTED_PROBLEMS` problems."""
    counts = Counter(p.kind for p in problems)
    samples = len({(p.split, p.id) for p in problems})
    lines = [
        f"{source}: {len(problems)} problem(s) in {samples} sample(s) "
        "(on_invalid='error'; use on_invalid='skip' to drop these samples and list them in skipped.jsonl)",
        "counts: " + ", ".join(f"{kind}={n}" for kind, n in sorted(counts.items())),
    ]
    lines += [f"  {p}" for p in problems[:MAX_LISTED_PROBLEMS]]
    if len(problems) > MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    return "\n".join(lines)


def write_skipped(problems: Iterable[Problem], path: str | Path) -> None:
    """Append problems to a JSON-lines file, one object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(p.to_json() + "\n" for p in problems)


def apply_policy(
    items: Sequence[Any],
    problems: Sequence[Problem],
    policy: OnInvalid,
    source: str | Path,
    skipped_file: str | Path,
    key: Callable[[Any], tuple[str, str]] = lambda s: (s.split, s.id),
) -> list[Any]:
    """Raise on problems (``error``) or drop the items they concern and log them (``skip``); the
    caller lists them in ``skipped_file`` (named in the log)."""
    if not problems:
        return list(items)
    if policy == "error":
        raise DataValidationError(format_problems(problems, source))
    bad = {(p.split, p.id) for p in problems}
    kept = [item for item in items if key(item) not in bad]
    counts = Counter(p.kind for p in problems)
    log.warning(
        "%s: skipped %d sample(s) with %d problem(s) (%s); listed in %s",
        source,
        len(items) - len(kept),
        len(problems),
        ", ".join(f"{kind}={n}" for kind, n in sorted(counts.items())),
        skipped_file,
    )
    return kept
