"""``mambaxray-ctl ablation`` (``make ablation``): the rows of the paper's Table II on the demo world.

Each row file in ``configs/ablation/`` says which stages the row trains and how (:class:`Row`)::

    name: ARM + stage 2 + no CTL-FT
    stage1: arm        # arm | mae | simclr | none
    stage2: true       # the contrastive stage on or off
    ctl_ft: false      # CTL-FT in stage 3 on or off (off: its weight is 0)
    overrides:         # optional, per stage (stage1 | stage2 | stage3): nested config dicts
      stage3: {trainer: {max_epochs: 5}}

``budget.yaml`` there (``<configs>/ablation/budget.yaml`` unless ``--budget`` names another;
``overrides:`` as above) shortens the training of every row. Each row runs the same
:mod:`mambaxray_ctl.pipeline` steps as ``mambaxray-ctl demo`` into ``<out>/<row>/``; with
validation skipped in stage 3 (the budget), predict takes its ``last.ckpt`` by the pipeline's
checkpoint rule. Each row is scored with the paper's metrics and the demo labeller. The table is
printed and written to ``<out>/ablation.json`` and ``<out>/ablation.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mambaxray_ctl.demo.run import demo_pipeline, prepare_demo_data, run_pipeline
from mambaxray_ctl.pipeline import (
    STAGE1_METHODS,
    STAGE2,
    STAGE3,
    Overrides,
    PipelineError,
    Stage,
    evaluate,
    stage1,
)

COLUMNS = (("BLEU_4", "BLEU-4"), ("ROUGE_L", "ROUGE-L"), ("CIDEr", "CIDEr"), ("CE_F1_macro", "CE-F1"))
STAGE_NAMES = ("stage1", "stage2", "stage3")
ROW_KEYS = {"name", "stage1", "stage2", "ctl_ft", "overrides"}
# Stage 3's override that turns CTL-FT off (the row's ``ctl_ft: false``).
CTL_FT_OFF: Overrides = {"model": {"init_args": {"ctl_ft": {"weight": 0}}}}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rows", nargs="*", help="row files (default: configs/ablation/[0-9]*.yaml)")
    parser.add_argument("--data", default="data/demo", help="world folder (default: data/demo)")
    parser.add_argument("--out", default="outputs/ablation", help="output root (default: outputs/ablation)")
    parser.add_argument("--configs", default="configs", help="config folder (default: configs)")
    parser.add_argument(
        "--budget",
        default=None,
        help="overrides shared by every row (default: CONFIGS/ablation/budget.yaml; '': none)",
    )


@dataclass(frozen=True)
class Row:
    """One row of Table II.

    Args:
        name: its label in the table.
        stage1: the stage-1 method (``arm``, ``mae``, ``simclr``) or ``None`` (no stage 1).
        stage2: whether the contrastive stage 2 runs.
        ctl_ft: whether stage 3 trains with CTL-FT (off: :data:`CTL_FT_OFF`).
        overrides: per stage name, nested config dicts applied after its config files.
    """

    name: str
    stage1: str | None = "arm"
    stage2: bool = True
    ctl_ft: bool = True
    overrides: Mapping[str, Overrides] = field(default_factory=dict)

    @property
    def stages(self) -> list[Stage]:
        """The stages it trains, in order (each from the previous one's export); always ends with stage 3."""
        first = [stage1(self.stage1)] if self.stage1 else []
        return [*first, *([STAGE2] if self.stage2 else []), STAGE3]

    def stage_overrides(self, stage: str) -> list[Overrides]:
        """The overrides of one stage: the row's, then CTL-FT off for stage 3 when ``ctl_ft`` is false."""
        found = [self.overrides[stage]] if stage in self.overrides else []
        return [*found, CTL_FT_OFF] if stage == STAGE3.name and not self.ctl_ft else found


def read_overrides(value: Any, where: str) -> dict[str, Overrides]:
    """A per-stage overrides mapping (``{stage1|stage2|stage3: nested config dict}``), checked."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: overrides must map a stage ({', '.join(STAGE_NAMES)}) to a config dict")
    for stage, config in value.items():
        if stage not in STAGE_NAMES:
            raise ValueError(f"{where}: overrides for an unknown stage {stage!r}; known: {list(STAGE_NAMES)}")
        if not isinstance(config, Mapping) or not all(isinstance(key, str) for key in config):
            raise ValueError(
                f"{where}: the {stage} overrides must be a nested config dict such as "
                f"{{trainer: {{max_epochs: 1}}}}, got {config!r}"
            )
    return dict(value)


def read_row(path: Path) -> Row:
    """A row file (see the module docstring); :class:`ValueError` naming the file and the problem."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: a row is a mapping with {sorted(ROW_KEYS)}")
    unknown = set(raw) - ROW_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(ROW_KEYS)}")
    if not isinstance(raw.get("name"), str) or not raw["name"].strip():
        raise ValueError(f"{path}: needs a name")
    method = raw.get("stage1", "arm")
    if method not in (*STAGE1_METHODS, "none", None):
        raise ValueError(f"{path}: stage1 must be one of {[*STAGE1_METHODS, 'none']}, got {method!r}")
    for key in ("stage2", "ctl_ft"):
        if not isinstance(raw.get(key, True), bool):
            raise ValueError(f"{path}: {key} must be true or false, got {raw[key]!r}")
    return Row(
        name=raw["name"],
        stage1=None if method in ("none", None) else method,
        stage2=raw.get("stage2", True),
        ctl_ft=raw.get("ctl_ft", True),
        overrides=read_overrides(raw.get("overrides"), str(path)),
    )


def read_budget(path: Path | None) -> dict[str, Overrides]:
    """The overrides every row gets (``budget.yaml``: ``overrides:`` per stage); none without a file."""
    if path is None:
        return {}
    raw = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(raw) - {"overrides"} if isinstance(raw, Mapping) else {"(not a mapping)"}
    if unknown:
        raise ValueError(f"{path}: a budget holds only overrides, found {sorted(unknown)}")
    return read_overrides(raw.get("overrides"), str(path))


def row_overrides(row: Row, budget: Mapping[str, Overrides]) -> dict[str, list[Overrides]]:
    """Per stage name: the budget's overrides, then the row's."""
    return {
        stage.name: [
            *([budget[stage.name]] if stage.name in budget else []),
            *row.stage_overrides(stage.name),
        ]
        for stage in row.stages
    }


def markdown_table(results: list[dict[str, Any]]) -> str:
    header = "| row | stages | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for result in results:
        scores = " | ".join(f"{result['metrics'][key]:.3f}" for key, _ in COLUMNS)
        lines.append(f"| {result['name']} | {' → '.join(result['stages'])} | {scores} |")
    return "\n".join(lines)


def budget_path(configs: Path, budget: str | None) -> Path | None:
    """The budget file: ``budget`` if given (``''``: none), else ``<configs>/ablation/budget.yaml``."""
    if budget is None:
        return Path(configs) / "ablation" / "budget.yaml"
    return Path(budget) if budget else None


def run(args: argparse.Namespace) -> int:
    configs, data, out = Path(args.configs), Path(args.data), Path(args.out)
    row_files = [Path(p) for p in args.rows] or sorted((configs / "ablation").glob("[0-9]*.yaml"))
    try:  # all validated before any training
        rows: Sequence[tuple[Path, Row]] = [(path, read_row(path)) for path in row_files]
        budget = read_budget(budget_path(configs, args.budget))
    except (OSError, ValueError, PipelineError) as exc:
        print(f"mambaxray-ctl ablation: error: {exc}", file=sys.stderr)
        return 2
    timings: dict[str, float] = {}
    if not prepare_demo_data(data, 2400, 0, timings):
        return 1
    results = []
    for path, row in rows:
        start = time.perf_counter()
        pipeline = demo_pipeline(configs, data, out / path.stem)
        predictions, _ = run_pipeline(pipeline, row.stages, timings, row_overrides(row, budget))
        metrics = evaluate(predictions, "demo", labeler="demo")
        results.append(
            {
                "row": path.stem,
                "name": row.name,
                "stages": [stage.config for stage in row.stages],
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
