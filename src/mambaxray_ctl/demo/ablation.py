"""``mambaxray-ctl ablation`` (``make ablation``): the rows of the paper's Table II on the demo world.

The paper's Table II (IU X-ray, Large model) has seven rows, each file in ``configs/ablation/`` one of
them, named by its index (``1_simclr_ctl_ctlft.yaml`` ... ``7_arm.yaml``). A row says which stages it
trains and how (:class:`Row`)::

    paper_row: 6       # its number in the paper's Table II (optional for a row of your own)
    name: ARM + CTL (no CTL-FT)
    stage1: arm        # arm | mae | simclr | none
    stage2: true       # stage 2, the image-report contrastive stage (the paper's "CTL"), on or off
    ctl_ft: false      # CTL-FT in stage 3 on or off (off: its weight is 0)
    overrides:         # optional, per stage (stage1 | stage2 | stage3): nested config dicts
      stage3: {trainer: {max_epochs: 5}}

A row with ``paper_row: N`` must train what the paper's row #N trained (stage 1, stage 2, CTL-FT;
:data:`mambaxray_ctl.evaluation.paper.TABLE_II`), else reading it fails. Every row ends with stage 3
(the paper's SFT).

``budget.yaml`` there (``<configs>/ablation/budget.yaml`` unless ``--budget`` names another;
``overrides:`` as above) shortens the training of every row. Each row runs the same
:mod:`mambaxray_ctl.pipeline` steps as ``mambaxray-ctl demo`` into ``<out>/<row>/``; with
validation skipped in stage 3 (the budget), predict takes its ``last.ckpt`` by the pipeline's
checkpoint rule. Each row is scored with the paper's metrics and the demo labeller. The table
(:func:`markdown_table`) puts beside our numbers the paper's Table II numbers of the same row and metric;
ours come from the demo world with a small budget, so only the ordering of the rows compares with the
paper's, not the values. It is printed and written to ``<out>/ablation.md`` and ``<out>/ablation.json``
(:func:`ablation_json`).
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
from mambaxray_ctl.evaluation import paper
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

# The table's metrics: the paper's Table II ones (ours / the paper's), then ours only (demo labeller).
PAPER_COLUMNS = tuple((key, paper.TITLES[key]) for key in paper.TABLE_II_METRICS)
OUR_COLUMNS = (("CE_F1_macro", "CE-F1"),)
COLUMNS = (*PAPER_COLUMNS, *OUR_COLUMNS)
STAGE_NAMES = ("stage1", "stage2", "stage3")
ROW_KEYS = {"paper_row", "name", "stage1", "stage2", "ctl_ft", "overrides"}
# Above the table (ablation.md, the printed table) and in ablation.json: what the two sets of numbers are.
TABLE_NOTE = "\n".join(
    (
        "Table II: ours beside the paper's, row by row.",
        "Ours: the demo world (synthetic), a small training budget (the ablation budget,",
        "configs/ablation/budget.yaml by default), its test split. The paper's: the MambaXray-CTL paper's",
        f"Table II ({paper.TABLE_II_SETTING}).",
        "Only the ordering of the rows is comparable, not the values.",
        "Cells: ours / paper ('-': no number from the paper); CE-F1: ours only (demo labeller, macro).",
        "Every row ends with stage 3 (the paper's SFT); CTL = stage 2, image-report contrastive.",
    )
)
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
        paper_row: its number in the paper's Table II (``None``: a row of your own, no paper numbers).
        stage1: the stage-1 method (``arm``, ``mae``, ``simclr``) or ``None`` (no stage 1).
        stage2: whether the contrastive stage 2 runs.
        ctl_ft: whether stage 3 trains with CTL-FT (off: :data:`CTL_FT_OFF`).
        overrides: per stage name, nested config dicts applied after its config files.
    """

    name: str
    paper_row: int | None = None
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
    index = raw.get("paper_row")
    if index is not None and (not isinstance(index, int) or isinstance(index, bool)):
        raise ValueError(f"{path}: paper_row must be a row number of the paper's Table II, got {index!r}")
    row = Row(
        name=raw["name"],
        paper_row=raw.get("paper_row"),
        stage1=None if method in ("none", None) else method,
        stage2=raw.get("stage2", True),
        ctl_ft=raw.get("ctl_ft", True),
        overrides=read_overrides(raw.get("overrides"), str(path)),
    )
    check_paper_row(row, str(path))
    return row


def check_paper_row(row: Row, where: str) -> None:
    """A row with ``paper_row: N`` trains what the paper's Table II row #N trained; else a
    :class:`ValueError` naming the difference."""
    if row.paper_row is None:
        return
    try:
        theirs = paper.table_ii_row(row.paper_row)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    differences = [
        f"{key}: {_switch(ours)} here, {_switch(want)} in the paper"
        for key, ours, want in (
            ("stage1", row.stage1, theirs.stage1),
            ("stage2", row.stage2, theirs.stage2),
            ("ctl_ft", row.ctl_ft, theirs.ctl_ft),
        )
        if ours != want
    ]
    if differences:
        raise ValueError(
            f"{where}: not the paper's Table II row #{theirs.index} ({theirs.name}): {'; '.join(differences)}"
        )


def _switch(value: str | bool | None) -> str:
    """A row switch as a row file writes it (``none``, ``true``, ``arm``)."""
    return "none" if value is None else str(value).lower()


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


def paper_metrics(row: Row) -> dict[str, float]:
    """The paper's Table II numbers of ``row`` (its ``paper_row``), by metric key; none without one."""
    return {} if row.paper_row is None else dict(paper.table_ii_row(row.paper_row).metrics)


def _cell(value: float | None) -> str:
    return paper.NOT_REPORTED if value is None else f"{value:.3f}"


def markdown_table(results: list[dict[str, Any]], note: bool = True) -> str:
    """The table of ``results`` (the rows of :func:`run`): per row its paper index, name and stages, then
    per metric ``ours / paper`` (the paper's Table II, ``-`` where it has no number) and CE-F1 (ours);
    :data:`TABLE_NOTE` above it when ``note``."""
    titles = [f"{title} (ours / paper)" for _, title in PAPER_COLUMNS]
    titles += [f"{title} (ours)" for _, title in OUR_COLUMNS]
    lines = [TABLE_NOTE, ""] if note else []
    lines += ["| # | row | stages | " + " | ".join(titles) + " |", "|" + "---|" * (len(titles) + 3)]
    for result in results:
        ours, theirs = result["metrics"], result.get("paper") or {}
        cells = [f"{_cell(ours.get(key))} / {_cell(theirs.get(key))}" for key, _ in PAPER_COLUMNS]
        cells += [_cell(ours.get(key)) for key, _ in OUR_COLUMNS]
        index = paper.NOT_REPORTED if result.get("paper_row") is None else str(result["paper_row"])
        stages = " → ".join(result["stages"])
        lines.append(f"| {index} | {result['name']} | {stages} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_json(results: list[dict[str, Any]]) -> dict[str, Any]:
    """What ``ablation.json`` holds: :data:`TABLE_NOTE`, where the paper's numbers come from, and the
    rows (each with ``metrics``, ours, and ``paper``, the paper's Table II numbers of its ``paper_row``)."""
    return {
        "note": TABLE_NOTE,
        "paper": {
            "source": "the MambaXray-CTL paper, Table II",
            "dataset": paper.TABLE_II_DATASET,
            "model": paper.TABLE_II_MODEL,
            "metrics": list(paper.TABLE_II_METRICS),
        },
        "rows": results,
    }


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
                "paper_row": row.paper_row,
                "name": row.name,
                "stages": [stage.config for stage in row.stages],
                "metrics": metrics,
                "paper": paper_metrics(row),
                "predictions": str(predictions),
                "wall_time_s": round(time.perf_counter() - start, 1),
            }
        )
        print(markdown_table(results, note=False), flush=True)
    table = markdown_table(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(table + "\n")
    (out / "ablation.json").write_text(json.dumps(ablation_json(results), indent=2) + "\n")
    print(f"\n{table}\n\nwritten: {out / 'ablation.md'}, {out / 'ablation.json'}")
    return 0
