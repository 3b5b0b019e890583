"""``mambaxray-ctl evaluate``: score a predictions file offline.

``mambaxray-ctl evaluate predictions.jsonl --dataset iu_xray|chexpert_plus|demo`` reads one JSON
object per line with at least ``id``, ``generated`` and ``reference`` (other keys are ignored),
keeps the first line of each study id, scores the corpus with :func:`score_reports` — plus clinical
efficacy when a labeller is given (``demo`` by default for the demo dataset: :func:`resolve_labeler`) —
prints a paper-style table (for ``iu_xray`` and ``chexpert_plus`` with the paper's Table I rows of that
dataset below ours: :mod:`~mambaxray_ctl.evaluation.paper`) and writes ``metrics.json`` next to the
predictions (``--out`` to change; it records none of the paper's numbers).
``mambaxray-ctl pipeline evaluate`` (``make evaluate``) does the same through :func:`evaluate_file` and
:func:`print_report`.

Texts are scored as written by default: the predict step writes R2Gen-cleaned text, and cleaning is
not idempotent (the last sentence gains a space before its final ``"."`` on every pass, which
changes ROUGE-L's tokens). Pass ``--clean`` for raw reports: both sides are then cleaned with the
dataset's R2Gen rule.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mambaxray_ctl.data.cleaning import clean_report, is_empty_report
from mambaxray_ctl.evaluation import paper
from mambaxray_ctl.metrics.clinical import Labeler, clinical_scores, label_reports, load_labeler
from mambaxray_ctl.metrics.report import MeteorOption, deduplicate, score_reports

# --clean: the rule each dataset's DataModule cleans its reports with (IUXrayDataModule,
# CheXpertPlusDataModule, DemoDataModule), so that --clean scores texts as training saw them.
DATASET_RULES = {"iu_xray": "iu_xray", "chexpert_plus": "mimic_cxr", "demo": "iu_xray"}
REQUIRED_KEYS = ("id", "generated", "reference")
# The metrics file written next to the predictions (``<run dir>/metrics.json``).
METRICS_NAME = "metrics.json"
# ``--labeler`` default: the demo labeller for the demo dataset, none otherwise (:func:`resolve_labeler`).
AUTO_LABELER = "auto"
DEMO_DATASET = "demo"
DEMO_LABELER = "demo"  # metrics.clinical.BUILTIN_LABELERS
NO_LABELER = "none"


def read_prediction_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a ``predictions.jsonl``, validated (``id`` made a string); errors name the file
    and the line number."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            missing = [key for key in REQUIRED_KEYS if key not in row]
            if missing:
                raise ValueError(f"{path}:{number}: missing key(s) {', '.join(missing)}")
            if not isinstance(row["id"], str | int) or isinstance(row["id"], bool):
                raise ValueError(f"{path}:{number}: 'id' must be a string or an integer")
            for key in ("generated", "reference"):
                if not isinstance(row[key], str):
                    raise ValueError(
                        f"{path}:{number}: {key!r} must be a string, got {type(row[key]).__name__}"
                    )
            rows.append({**row, "id": str(row["id"])})
    if not rows:
        raise ValueError(f"{path}: no predictions")
    return rows


def read_predictions(path: str | Path) -> list[tuple[str, str, str]]:
    """``(id, generated, reference)`` of every line (see :func:`read_prediction_rows`)."""
    return [(row["id"], row["generated"], row["reference"]) for row in read_prediction_rows(path)]


def resolve_labeler(dataset: str, labeler: Labeler | str | None = AUTO_LABELER) -> Labeler | str | None:
    """The labeller to score ``dataset`` with: for ``auto``, the demo labeller for the demo dataset and
    none otherwise; ``"none"`` or ``None``: none; anything else (a :func:`load_labeler` spec or a
    :class:`Labeler`) as given."""
    if labeler == AUTO_LABELER:
        return DEMO_LABELER if dataset == DEMO_DATASET else None
    return None if labeler in (None, NO_LABELER) else labeler


def metrics_path(predictions: str | Path) -> Path:
    """The default metrics file of a predictions file: :data:`METRICS_NAME` beside it."""
    return Path(predictions).with_name(METRICS_NAME)


def evaluate_predictions(
    path: str | Path,
    dataset: str,
    labeler: Labeler | str | None = None,
    meteor: MeteorOption = "auto",
    clean: bool = False,
) -> dict[str, Any]:
    """Metrics of a predictions file, with the counts and settings that ``metrics.json`` records.

    ``labeler`` is a :class:`Labeler`, a :func:`load_labeler` spec or None (no clinical scores);
    ``clean`` cleans both texts with the dataset's R2Gen rule first.
    """
    if dataset not in DATASET_RULES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASET_RULES)}")
    if isinstance(labeler, str):
        labeler = load_labeler(labeler)
    rows = read_prediction_rows(path)
    records = [(row["id"], row["generated"], row["reference"]) for row in rows]
    recorded = {key: _recorded(rows, key, path) for key in ("reference_source", "checkpoint")}
    dedup = deduplicate([study for study, _, _ in records], [(gen, ref) for _, gen, ref in records])
    records = [records[index] for index in dedup.keep]
    rule = DATASET_RULES[dataset] if clean else "none"
    ids = [study for study, _, _ in records]
    generated = [clean_report(gen, rule) if clean else gen for _, gen, _ in records]
    references = [clean_report(ref, rule) if clean else ref for _, _, ref in records]
    metrics: dict[str, Any] = score_reports(
        dict(zip(ids, generated, strict=True)), dict(zip(ids, references, strict=True)), meteor=meteor
    )
    if labeler is not None:
        metrics.update(
            clinical_scores(
                label_reports(labeler, generated), label_reports(labeler, references), labeler.label_names
            )
        )
    metrics.update(
        num_studies=len(records),
        num_empty_generated=sum(is_empty_report(text) for text in generated),
        num_duplicate_ids=dedup.duplicates,
        num_conflicting_duplicates=dedup.conflicts,
        dataset=dataset,
        cleaning=rule,
        labeler=None if labeler is None else type(labeler).__name__,
        predictions=str(path),
        reference_source=recorded["reference_source"] or "cleaned",
        checkpoint=recorded["checkpoint"],
    )
    return metrics


def _recorded(rows: list[dict[str, Any]], key: str, path: str | Path) -> Any:
    """The value every row of a predictions file records under ``key`` (``None`` when none does).

    :raises ValueError: the rows disagree (a file merged from different runs or settings).
    """
    values = {json.dumps(row.get(key)) for row in rows}
    if len(values) > 1:
        raise ValueError(f"{path}: its rows record different {key!r} values: {sorted(values)[:4]}")
    return json.loads(values.pop()) if values else None


def evaluate_file(
    predictions: str | Path,
    dataset: str,
    labeler: Labeler | str | None = AUTO_LABELER,
    out: str | Path | None = None,
    meteor: MeteorOption = "auto",
    clean: bool = False,
) -> dict[str, Any]:
    """Score a predictions file (:func:`evaluate_predictions`, the labeller by :func:`resolve_labeler`)
    and write the metrics as JSON to ``out`` (e.g. :func:`metrics_path`; ``None``: no file).

    Raises :class:`OSError`, :class:`ValueError` or :class:`RuntimeError` with a message for the user.
    """
    metrics = evaluate_predictions(
        predictions, dataset, labeler=resolve_labeler(dataset, labeler), meteor=meteor, clean=clean
    )
    if out is not None:
        Path(out).write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    return metrics


def print_report(metrics: dict[str, Any], name: str, out: str | Path | None = None) -> None:
    """Print what ``mambaxray-ctl evaluate`` prints: the table (:func:`format_table`), what was left out
    and why, the counts of studies, empty texts and duplicate ids, and the metrics file ``out``."""
    print(format_table(metrics, metrics["dataset"], name))
    if "METEOR" not in metrics:
        print("METEOR: n/a (needs Java; `mambaxray-ctl evaluate --meteor on` requires it)")
    if metrics.get("labeler") is None:
        print(
            "clinical scores: omitted (no labeller; `mambaxray-ctl evaluate --labeler "
            "package.module:ClassName` takes one)"
        )
    print(
        f"{metrics['num_studies']} studies, {metrics['num_empty_generated']} with empty generated text, "
        f"{metrics['num_duplicate_ids']} duplicate ids dropped "
        f"({metrics['num_conflicting_duplicates']} with different text; the first line was kept)"
    )
    if out is not None:
        print(f"wrote {out}")


def format_table(metrics: dict[str, Any], dataset: str, name: str) -> str:
    """A paper-style table of our row; for iu_xray and chexpert_plus, the paper's Table I rows of that
    dataset below it (:func:`mambaxray_ctl.evaluation.paper.table_i`; ``-``: not reported by the paper)."""
    columns = [("BLEU-1", "BLEU_1"), ("BLEU-2", "BLEU_2"), ("BLEU-3", "BLEU_3"), ("BLEU-4", "BLEU_4")]
    columns += [("ROUGE-L", "ROUGE_L"), ("METEOR", "METEOR"), ("CIDEr", "CIDEr")]
    if "CE_F1_macro" in metrics:
        columns += [("CE-P", "CE_precision_macro"), ("CE-R", "CE_recall_macro"), ("CE-F1", "CE_F1_macro")]
    label = f"ours ({name})"
    theirs = paper.table_i(dataset)
    width = max(len(label), 10, *(len(row.name) for row in theirs))

    def line(label: str, cells: list[str]) -> str:
        return f"{label:<{width}}  " + "  ".join(f"{cell:>7}" for cell in cells)

    lines = [
        line("", [title for title, _ in columns]),
        line(label, [f"{metrics[key]:.3f}" if key in metrics else "n/a" for _, key in columns]),
    ]
    if theirs:
        lines.append(
            f"the MambaXray-CTL paper's Table I, {paper.DATASET_NAMES[dataset]} "
            f"(its numbers, '{paper.NOT_REPORTED}': not reported):"
        )
        lines += [line(row.name, [row.cell(key) for _, key in columns]) for row in theirs]
    if "CE_F1_macro" in metrics:
        lines.append("CE-P/R/F1: macro averages over the labeller's findings")
    return "\n".join(lines)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("predictions", type=Path, help="JSON lines with id, generated and reference")
    parser.add_argument(
        "--dataset", required=True, choices=sorted(DATASET_RULES), help="dataset of the predictions"
    )
    parser.add_argument(
        "--labeler",
        default=AUTO_LABELER,
        help="clinical labeller: demo, package.module:ClassName, none, or auto (the default: demo for the "
        "demo dataset, none otherwise)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"metrics file (default: {METRICS_NAME} next to the predictions)",
    )
    parser.add_argument(
        "--meteor",
        choices=("auto", "on", "off"),
        default="auto",
        help="METEOR needs Java (default: auto = if java is found)",
    )
    parser.add_argument(
        "--clean",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="clean both texts with the dataset's R2Gen rule first, for raw reports (default: as written)",
    )


def run(args: argparse.Namespace) -> int:
    meteor: MeteorOption = {"auto": "auto", "on": True, "off": False}[args.meteor]
    out = args.out or metrics_path(args.predictions)
    try:
        metrics = evaluate_file(args.predictions, args.dataset, args.labeler, out, meteor, args.clean)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"mambaxray-ctl evaluate: error: {exc}", file=sys.stderr)
        return 1
    print_report(metrics, args.predictions.name, out)
    return 0
