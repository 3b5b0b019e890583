"""``mambaxray-ctl evaluate``: score a predictions file offline.

``mambaxray-ctl evaluate predictions.jsonl --dataset iu_xray|chexpert_plus|demo`` reads one JSON
object per line with at least ``id``, ``generated`` and ``reference`` (other keys are ignored),
keeps the first line of each study id, scores the corpus with :func:`score_reports` — plus clinical
efficacy when a labeller is given (``demo`` by default for the demo dataset: :func:`resolve_labeler`) —
prints a paper-style table (for ``iu_xray`` and ``chexpert_plus`` with the paper's Table I rows of that
dataset below ours: :mod:`~mambaxray_ctl.evaluation.paper`) and, with a labeller that has named subsets
or settings (CheXbert), the micro and macro CE precision/recall/F1 over its findings and its subsets
(CheXbert's 14 and 5 observations), and writes ``metrics.json`` next to the predictions (``--out`` to
change; it records none of the paper's numbers). ``--labeler chexbert`` needs ``--labeler-weights`` and
``--labeler-tokenizer`` (:class:`~mambaxray_ctl.metrics.chexbert.CheXbertLabeler`). ``--html OUT.html``
also writes the scored studies to one offline page (:mod:`~mambaxray_ctl.evaluation.html_report`),
after ``metrics.json``.
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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mambaxray_ctl.data.cleaning import clean_report, is_empty_report
from mambaxray_ctl.evaluation import paper
from mambaxray_ctl.evaluation.html_report import write_html_report
from mambaxray_ctl.metrics.clinical import (
    UNCERTAIN_CHOICES,
    Labeler,
    clinical_scores,
    label_reports,
    load_labeler,
    subset_scores,
)
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
CHEXBERT_LABELER = "chexbert"
NO_LABELER = "none"
# The labeller's constructor options (``labeler_options``) and the flags of the command that give them.
LABELER_FLAGS = {
    "weights": "--labeler-weights",
    "tokenizer": "--labeler-tokenizer",
    "uncertain": "--labeler-uncertain",
}


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


@dataclass(frozen=True)
class ScoredStudies:
    """The studies of a predictions file as they are scored: the first row of each id, in file order,
    both texts cleaned with ``cleaning`` (``none``: as written). ``rows`` holds the 1-based number of each
    study's row among the file's rows."""

    rows: list[int]
    ids: list[str]
    generated: list[str]
    references: list[str]
    cleaning: str
    num_duplicates: int
    num_conflicts: int
    recorded: dict[str, Any]


def read_scored_studies(path: str | Path, dataset: str, clean: bool = False) -> ScoredStudies:
    """The studies of a predictions file that :func:`evaluate_predictions` scores, with ``clean`` the
    dataset's R2Gen rule applied to both texts; errors name the file (and line)."""
    if dataset not in DATASET_RULES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASET_RULES)}")
    rows = read_prediction_rows(path)
    records = [(row["id"], row["generated"], row["reference"]) for row in rows]
    recorded = {key: _recorded(rows, key, path) for key in ("reference_source", "checkpoint")}
    dedup = deduplicate([study for study, _, _ in records], [(gen, ref) for _, gen, ref in records])
    rule = DATASET_RULES[dataset] if clean else "none"
    kept = [records[index] for index in dedup.keep]
    return ScoredStudies(
        rows=[index + 1 for index in dedup.keep],
        ids=[study for study, _, _ in kept],
        generated=[clean_report(gen, rule) if clean else gen for _, gen, _ in kept],
        references=[clean_report(ref, rule) if clean else ref for _, _, ref in kept],
        cleaning=rule,
        num_duplicates=dedup.duplicates,
        num_conflicts=dedup.conflicts,
        recorded=recorded,
    )


def evaluate_predictions(
    path: str | Path,
    dataset: str,
    labeler: Labeler | str | None = None,
    meteor: MeteorOption = "auto",
    clean: bool = False,
    labeler_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Metrics of a predictions file (its :func:`read_scored_studies`), with the counts and settings
    that ``metrics.json`` records.

    ``labeler`` is a :class:`Labeler`, a :func:`load_labeler` spec (built with ``labeler_options``) or
    None (no clinical scores); ``clean`` cleans both texts with the dataset's R2Gen rule first. A
    labeller with named subsets (``label_subsets``) adds their scores and ``clinical_subsets``; one with
    ``settings`` adds them as ``labeler_settings``.
    """
    if labeler_options and not isinstance(labeler, str):
        given = ", ".join(sorted(labeler_options))
        raise ValueError(f"labeller options ({given}) need a labeller given by name, and none is")
    studies = read_scored_studies(path, dataset, clean)
    if isinstance(labeler, str):
        labeler = load_labeler(labeler, **(labeler_options or {}))
    ids, generated, references = studies.ids, studies.generated, studies.references
    metrics: dict[str, Any] = score_reports(
        dict(zip(ids, generated, strict=True)), dict(zip(ids, references, strict=True)), meteor=meteor
    )
    if labeler is not None:
        predicted, reference = label_reports(labeler, generated), label_reports(labeler, references)
        metrics.update(clinical_scores(predicted, reference, labeler.label_names))
        subsets = {name: list(labels) for name, labels in getattr(labeler, "label_subsets", {}).items()}
        if subsets:
            metrics.update(subset_scores(predicted, reference, labeler.label_names, subsets))
            metrics["clinical_subsets"] = subsets
        settings = getattr(labeler, "settings", None)
        if settings:
            metrics["labeler_settings"] = settings
    metrics.update(
        num_studies=len(ids),
        num_empty_generated=sum(is_empty_report(text) for text in generated),
        num_duplicate_ids=studies.num_duplicates,
        num_conflicting_duplicates=studies.num_conflicts,
        dataset=dataset,
        cleaning=studies.cleaning,
        labeler=None if labeler is None else type(labeler).__name__,
        predictions=str(path),
        reference_source=studies.recorded["reference_source"] or "cleaned",
        checkpoint=studies.recorded["checkpoint"],
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
    labeler_options: Mapping[str, Any] | None = None,
    html: str | Path | None = None,
) -> dict[str, Any]:
    """Score a predictions file (:func:`evaluate_predictions`, the labeller by :func:`resolve_labeler`,
    built with ``labeler_options``) and write the metrics as JSON to ``out`` (e.g. :func:`metrics_path`;
    ``None``: no file), then, with ``html``, the scored studies to that page (:mod:`~.html_report`). The
    folders of ``out`` and ``html`` are created first, so that a path that cannot be written fails before
    the scoring.

    Raises :class:`OSError`, :class:`ValueError` or :class:`RuntimeError` with a message for the user.
    """
    for target in (out, html):
        if target is not None:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
    metrics = evaluate_predictions(
        predictions,
        dataset,
        labeler=resolve_labeler(dataset, labeler),
        meteor=meteor,
        clean=clean,
        labeler_options=labeler_options,
    )
    if out is not None:
        Path(out).write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    if html is not None:  # the file is read again: evaluate_predictions returns the metrics only
        studies = read_scored_studies(predictions, dataset, clean)
        table = zip(studies.rows, studies.ids, studies.generated, studies.references, strict=True)
        write_html_report(html, list(table), f"{Path(predictions).name} ({dataset}): generated and reference")
    return metrics


def print_report(metrics: dict[str, Any], name: str, out: str | Path | None = None) -> None:
    """Print what ``mambaxray-ctl evaluate`` prints: the table (:func:`format_table`), with a labeller
    that has subsets or settings (CheXbert) its micro and macro CE (:func:`format_clinical`), what was
    left out and why, the counts of studies, empty texts and duplicate ids, and the metrics file ``out``."""
    print(format_table(metrics, metrics["dataset"], name))
    if "clinical_subsets" in metrics or "labeler_settings" in metrics:
        print(format_clinical(metrics))
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


def format_clinical(metrics: dict[str, Any]) -> str:
    """Micro and macro CE precision/recall/F1 over all the labeller's findings and over each of its
    subsets (:func:`~mambaxray_ctl.metrics.clinical.subset_scores`), one row each."""
    kinds = ("precision", "recall", "F1")
    subsets = metrics.get("clinical_subsets", {})
    groups = {"CE": sum(key.startswith("CE_F1/") for key in metrics)}
    groups.update({f"CE{name}": len(labels) for name, labels in subsets.items()})
    settings = metrics.get("labeler_settings") or {}
    uncertain = f", uncertain counted as {settings['uncertain']}" if "uncertain" in settings else ""
    lines = [f"clinical efficacy ({metrics['labeler']}{uncertain}):", f"{'':<20}       P        R       F1"]
    for prefix, count in groups.items():
        for average in ("micro", "macro"):
            cells = "  ".join(f"{metrics[f'{prefix}_{kind}_{average}']:>7.3f}" for kind in kinds)
            lines.append(f"{f'{count} findings, {average}':<20}  {cells}")
    lines += [f"CE{name}_* in metrics.json: {', '.join(labels)}" for name, labels in subsets.items()]
    return "\n".join(lines)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("predictions", type=Path, help="JSON lines with id, generated and reference")
    parser.add_argument(
        "--dataset", required=True, choices=sorted(DATASET_RULES), help="dataset of the predictions"
    )
    parser.add_argument(
        "--labeler",
        default=AUTO_LABELER,
        help="clinical labeller: chexbert, demo, package.module:ClassName, none, or auto (the default: demo "
        "for the demo dataset, none otherwise)",
    )
    parser.add_argument(
        "--labeler-weights",
        type=Path,
        default=None,
        help="the labeller's weights: for chexbert, the CheXbert checkpoint file (chexbert.pth)",
    )
    parser.add_argument(
        "--labeler-tokenizer",
        type=Path,
        default=None,
        help="the labeller's tokenizer folder: for chexbert, a local bert-base-uncased folder and config",
    )
    parser.add_argument(
        "--labeler-uncertain",
        choices=UNCERTAIN_CHOICES,
        default=None,
        help="for chexbert: what an uncertain mention counts as (default: negative, R2Gen's recipe)",
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
    parser.add_argument(
        "--html",
        type=Path,
        default=None,
        metavar="OUT.html",
        help="also write one offline HTML page of the studies: generated and reference side by side, shared "
        "sentences marked, per-study BLEU-4, sortable",
    )


def run(args: argparse.Namespace) -> int:
    meteor: MeteorOption = {"auto": "auto", "on": True, "off": False}[args.meteor]
    out = args.out or metrics_path(args.predictions)
    options = {name: getattr(args, flag[2:].replace("-", "_")) for name, flag in LABELER_FLAGS.items()}
    options = {name: value for name, value in options.items() if value is not None}
    if args.labeler == CHEXBERT_LABELER and not {"weights", "tokenizer"} <= options.keys():
        return _error(
            "--labeler chexbert needs --labeler-weights FILE (the CheXbert checkpoint, chexbert.pth) and "
            "--labeler-tokenizer DIR (a local bert-base-uncased folder)"
        )
    if options and not isinstance(resolve_labeler(args.dataset, args.labeler), str):
        flags = ", ".join(LABELER_FLAGS[name] for name in options)
        return _error(f"{flags} configure a labeller named by --labeler, and none is")
    try:
        metrics = evaluate_file(
            args.predictions,
            args.dataset,
            args.labeler,
            out,
            meteor,
            args.clean,
            labeler_options=options,
            html=args.html,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        return _error(str(exc))
    print_report(metrics, args.predictions.name, out)
    if args.html is not None:
        print(f"wrote {args.html}")
    return 0


def _error(message: str) -> int:
    """Print ``message`` as the command's error and return its exit status."""
    print(f"mambaxray-ctl evaluate: error: {message}", file=sys.stderr)
    return 1
