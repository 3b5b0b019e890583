"""``mambaxray-ctl ablation`` (``make ablation``): the rows of the paper's Table II on the demo world.

Each row file in ``configs/ablation/`` names the stage configs to run in order (stage 1 = ARM, MAE,
SimCLR or none; stage 2 on or off) and extra CLI arguments per stage (e.g. CTL-FT off with
``--model.init_args.ctl_weight=0``); ``budget.yaml`` there shortens the training of every row. Each
row runs the same pipeline as ``mambaxray-ctl demo`` into ``<out>/<row>/`` and is scored with the
paper's metrics and the demo labeller. The table is printed and written to ``<out>/ablation.json``
and ``<out>/ablation.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import yaml

from mambaxray_ctl.demo.run import prepare_demo_data, run_pipeline

COLUMNS = (("BLEU_4", "BLEU-4"), ("ROUGE_L", "ROUGE-L"), ("CIDEr", "CIDEr"), ("CE_F1_macro", "CE-F1"))
STAGE_CONFIGS = {"stage1_arm", "stage1_mae", "stage1_simclr", "stage2_contrastive", "stage3_reportgen"}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rows", nargs="*", help="row files (default: configs/ablation/[0-9]*.yaml)")
    parser.add_argument("--data", default="data/demo", help="world folder (default: data/demo)")
    parser.add_argument("--out", default="outputs/ablation", help="output root (default: outputs/ablation)")
    parser.add_argument("--configs", default="configs", help="config folder (default: configs)")
    parser.add_argument("--budget", default="configs/ablation/budget.yaml", help="shared extra arguments")


def read_row(path: Path) -> dict[str, Any]:
    """A row file: ``name``, ``stages`` (config names, ending with stage3_reportgen), optional ``args``."""
    row = yaml.safe_load(path.read_text()) or {}
    stages = row.get("stages") or []
    if not row.get("name") or not stages or stages[-1] != "stage3_reportgen":
        raise ValueError(f"{path}: needs a name and stages ending with stage3_reportgen")
    unknown = [stage for stage in [*stages, *(row.get("args") or {})] if stage not in STAGE_CONFIGS]
    if unknown:
        raise ValueError(f"{path}: unknown stage config(s) {unknown}; known: {sorted(STAGE_CONFIGS)}")
    return row


def merge_args(*sources: dict[str, list[str]] | None) -> dict[str, list[str]]:
    merged: dict[str, list[str]] = {}
    for source in sources:
        for stage, values in (source or {}).items():
            merged.setdefault(stage, []).extend(values)
    return merged


def markdown_table(results: list[dict[str, Any]]) -> str:
    header = "| row | stages | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for result in results:
        scores = " | ".join(f"{result['metrics'][key]:.3f}" for key, _ in COLUMNS)
        lines.append(f"| {result['name']} | {' → '.join(result['stages'])} | {scores} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from mambaxray_ctl.evaluation.evaluate import evaluate_predictions

    configs, data, out = Path(args.configs), Path(args.data), Path(args.out)
    row_files = [Path(p) for p in args.rows] or sorted((configs / "ablation").glob("[0-9]*.yaml"))
    rows = [(path, read_row(path)) for path in row_files]  # all validated before any training
    budget = yaml.safe_load(Path(args.budget).read_text()).get("args") if args.budget else None
    timings: dict[str, float] = {}
    if not prepare_demo_data(data, 2400, 0, timings):
        return 1
    results = []
    for path, row in rows:
        start = time.perf_counter()
        extra = merge_args(budget, row.get("args"))
        predictions, _ = run_pipeline(configs, data, out / path.stem, row["stages"], extra, timings)
        metrics = evaluate_predictions(predictions, "demo", labeler="demo")
        results.append(
            {
                "row": path.stem,
                "name": row["name"],
                "stages": row["stages"],
                "metrics": metrics,
                "predictions": str(predictions),
                "wall_time_s": round(time.perf_counter() - start, 1),
            }
        )
        print(markdown_table(results), flush=True)
    table = markdown_table(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(table + "\n")
    (out / "ablation.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{table}\n\nwritten: {out / 'ablation.md'}, {out / 'ablation.json'}")
    return 0
