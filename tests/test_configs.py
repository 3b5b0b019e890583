"""Every config file under ``configs/`` through the real command's parser (``mambaxray-ctl fit -c ...
--print_config``, in this process), composed as the pipeline composes them.

A stage's files (:meth:`mambaxray_ctl.pipeline.Pipeline.config_files`): ``configs/data/<dataset>.yaml``,
``configs/<stage>.yaml``, the dataset's overlay ``configs/<dataset>/<stage>.yaml`` when present, then
``configs/trainer/<preset>.yaml``. The files are found by globbing, so a new file is covered without
editing this test: each stage config with each dataset (and its overlay), under the CPU presets
(``cpu``, ``debug``) for the demo world and under the other (GPU) presets for the real datasets, as
they are meant to run. The printed YAML must parse, name the stage's LightningModule and the dataset's
DataModule, and hold every value the files set (later files win, as in ``-c`` order).
:func:`test_every_config_file_is_exercised` fails on a file no combination reaches (e.g. an overlay
whose dataset or stage config does not exist).

The ablation rows (``configs/ablation/[0-9]*.yaml``, with ``budget.yaml``) are read by
:mod:`mambaxray_ctl.demo.ablation`; each stage a row trains is printed with the row's overrides, on the
pipeline's argument list (demo data, CPU).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightning.pytorch import LightningDataModule

from mambaxray_ctl import pipeline as pl
from mambaxray_ctl.cli import main
from mambaxray_ctl.compat import import_class
from mambaxray_ctl.demo import ablation
from mambaxray_ctl.demo.run import demo_pipeline
from mambaxray_ctl.pipeline import Pipeline, Stage
from mambaxray_ctl.stages.base import BackboneStage
from test_stages_cli import CONFIGS

CPU_PRESETS = ("cpu", "debug")  # the demo world runs on CPUs, the real datasets on GPUs
ABLATION = "ablation"  # rows of Table II and their budget, not `-c` files: read by demo/ablation.py


def recipes(root: Path, datasets: Sequence[str]) -> list[str]:
    """Recipe folders (``configs/<recipe>/<dataset>/``, e.g. ``paper``)."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any((p / d).is_dir() for d in datasets))


def combinations(root: Path) -> Iterator[tuple[Path, ...]]:
    """The ``-c`` files of every (stage, dataset, trainer preset[, recipe]) run tested, in command-line
    order (a recipe only where it has a file for the stage and dataset)."""
    presets = sorted((root / "trainer").glob("*.yaml"))
    datasets = sorted((root / "data").glob("*.yaml"))
    for stage in sorted(root.glob("stage*.yaml")):
        for data in datasets:
            for trainer in presets:
                if (data.stem == "demo") != (trainer.stem in CPU_PRESETS):
                    continue
                for recipe in [None, *recipes(root, [d.stem for d in datasets])]:
                    if recipe is not None and not (root / recipe / data.stem / stage.name).is_file():
                        continue
                    pipeline = Pipeline(data=data.stem, trainer=trainer.stem, configs=root, recipe=recipe)
                    yield tuple(pipeline.config_files(Stage(stage.stem, stage.stem)))


def ablation_files(root: Path) -> list[Path]:
    """The files ``mambaxray-ctl ablation`` reads by default: the rows, then the budget."""
    return [*sorted((root / ABLATION).glob("[0-9]*.yaml")), root / ABLATION / "budget.yaml"]


def uncovered(root: Path) -> list[Path]:
    """YAML files under ``root`` that no combination loads (nor the ablation command reads)."""
    covered = {path for files in combinations(root) for path in files} | set(ablation_files(root))
    return sorted(set(root.rglob("*.y*ml")) - covered)


def ablation_runs(root: Path) -> dict[str, tuple[Stage, list[Mapping[str, Any]]]]:
    """Each distinct (stage, overrides) that the ablation rows train, named by stage config and rows."""
    *rows, budget_file = ablation_files(root)
    budget = ablation.read_budget(budget_file)
    runs: dict[str, tuple[Stage, list[Mapping[str, Any]], list[str]]] = {}
    for path in rows:
        row = ablation.read_row(path)
        overrides = ablation.row_overrides(row, budget)
        for stage in row.stages:
            key = json.dumps([stage.config, overrides[stage.name]], sort_keys=True)
            runs.setdefault(key, (stage, overrides[stage.name], []))[2].append(path.stem)
    return {f"{stage.config}-{'+'.join(names)}": (stage, found) for stage, found, names in runs.values()}


COMBINATIONS = list(combinations(CONFIGS))
ABLATION_RUNS = ablation_runs(CONFIGS)


def _id(files: tuple[Path, ...]) -> str:
    data, stage, *middle, trainer = files
    recipe = [f"-{p.parent.parent.name}" for p in middle if p.parent.parent != data.parent.parent]
    return f"{stage.stem}-{data.stem}-{trainer.stem}{''.join(recipe)}"


def merge(files: Sequence[Path], overrides: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The files' mappings, then ``overrides``, merged in order: nested mappings key by key, anything
    else replaced."""

    def into(base: Any, new: Any) -> Any:
        if isinstance(base, dict) and isinstance(new, Mapping):
            return {**base, **{k: into(base.get(k), v) for k, v in new.items()}}
        return new

    merged: dict[str, Any] = {}
    for config in [*(yaml.safe_load(path.read_text()) or {} for path in files), *overrides]:
        merged = into(merged, config)
    return merged


def _same_scalar(want: Any, got: Any) -> bool:
    if isinstance(want, bool) or isinstance(got, bool):
        return want is got
    if isinstance(want, str) and isinstance(got, (int, float)):
        try:  # YAML 1.1 reads 1e-4 as text; the parser types it
            want = float(want)
        except ValueError:
            return False
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        return math.isclose(want, got, rel_tol=1e-12)
    return want == got


def missing(want: Any, got: Any, where: str = "") -> list[str]:
    """Where ``got`` (the printed config) lacks a value of ``want`` (the merged files); class paths
    match when they name the same class."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [f"{where or '<root>'}: expected a mapping, printed {got!r}"]
        problems = []
        for key, value in want.items():
            if key not in got:
                problems.append(f"{where}{key}: not in the printed config")
            elif key == "class_path":
                if import_class(value) is not import_class(got[key]):
                    problems.append(f"{where}{key}: {value} printed as {got[key]}")
            else:
                problems += missing(value, got[key], f"{where}{key}.")
        return problems
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [f"{where.rstrip('.')}: {want!r} printed as {got!r}"]
        return [
            p for i, (w, g) in enumerate(zip(want, got, strict=True)) for p in missing(w, g, f"{where}{i}.")
        ]
    return [] if _same_scalar(want, got) else [f"{where.rstrip('.')}: {want!r} printed as {got!r}"]


def print_config(argv: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> dict:
    """``mambaxray-ctl <argv> --print_config`` (the command's ``main``, in this process): the printed YAML."""
    monkeypatch.setattr(sys, "argv", ["mambaxray-ctl"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--print_config"])
    out, err = capsys.readouterr()
    assert exit_info.value.code in (0, None), f"{argv}: exit {exit_info.value.code}\n{err[-3000:]}"
    printed = yaml.safe_load(out)
    assert isinstance(printed, dict), out[:500]
    return printed


def check_printed(printed: dict, want: dict, what: str) -> None:
    model, data = printed["model"], printed["data"]
    assert issubclass(import_class(model["class_path"]), BackboneStage)
    assert import_class(model["class_path"]) is import_class(want["model"]["class_path"])
    assert issubclass(import_class(data["class_path"]), LightningDataModule)
    assert import_class(data["class_path"]) is import_class(want["data"]["class_path"])
    problems = missing(want, printed)
    assert not problems, f"{what}:\n" + "\n".join(problems)


@pytest.mark.parametrize("files", COMBINATIONS, ids=_id)
def test_config_files_print_the_merged_config(
    files: tuple[Path, ...], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    printed = print_config(
        ["fit", *(arg for path in files for arg in ("-c", str(path)))], capsys, monkeypatch
    )
    check_printed(printed, merge(files), str([p.relative_to(CONFIGS).as_posix() for p in files]))


@pytest.mark.parametrize(("stage", "overrides"), ABLATION_RUNS.values(), ids=ABLATION_RUNS.keys())
def test_each_stage_of_the_ablation_rows_prints_with_the_rows_overrides(
    stage: Stage,
    overrides: list[Mapping[str, Any]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipeline = demo_pipeline(CONFIGS, tmp_path / "world", tmp_path / "runs")
    printed = print_config(pl._cli_args(pipeline, "fit", stage, overrides), capsys, monkeypatch)
    run_root = {"trainer": {"logger": {"init_args": {"save_dir": str(pipeline.runs_root)}}}}
    want = merge(pipeline.config_files(stage), [run_root, *pipeline.overrides, *overrides])
    check_printed(printed, want, f"{stage.config} with {overrides}")


def test_every_config_file_is_exercised() -> None:
    assert COMBINATIONS, f"no stage config found in {CONFIGS}"
    left = [p.relative_to(CONFIGS).as_posix() for p in uncovered(CONFIGS)]
    assert not left, f"config files that no tested combination loads: {left}"


def test_an_orphan_config_file_is_reported(tmp_path: Path) -> None:
    def write(name: str) -> Path:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}\n")
        return tmp_path / name

    for name in (
        "stage2_contrastive.yaml",
        "data/demo.yaml",
        "data/iu_xray.yaml",
        "iu_xray/stage2_contrastive.yaml",
    ):
        write(name)
    for name in ("trainer/cpu.yaml", "trainer/gpu.yaml", "ablation/01_row.yaml", "ablation/budget.yaml"):
        write(name)
    assert uncovered(tmp_path) == []
    not_a_row = write("ablation/full.yaml")  # the ablation command reads [0-9]*.yaml
    typo = write("iu_xray/stage9_typo.yaml")  # no configs/stage9_typo.yaml
    unknown_dataset = write("mimic/stage2_contrastive.yaml")  # no configs/data/mimic.yaml
    assert uncovered(tmp_path) == [not_a_row, typo, unknown_dataset]


def test_the_comparison_finds_a_value_the_parser_dropped() -> None:
    want = {"model": {"class_path": "mambaxray_ctl.stages.ContrastiveModule", "init_args": {"lr": 1.0e-4}}}
    got = {"model": {"class_path": "mambaxray_ctl.stages.contrastive.ContrastiveModule", "init_args": {}}}
    assert missing(want, got) == ["model.init_args.lr: not in the printed config"]
    got["model"]["init_args"]["lr"] = 1.0e-4
    assert missing(want, got) == []
    assert missing({"a": [1, 2]}, {"a": [1]}) == ["a: [1, 2] printed as [1]"]
    assert missing({"a": "1e-4"}, {"a": 0.0001}) == []
