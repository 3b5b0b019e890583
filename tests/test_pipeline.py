"""The pipeline's rules (src/mambaxray_ctl/pipeline.py): config composition, the hand-off, the checkpoint
to predict from, the ablation rows; and one tiny stage 2 → stage 3 → predict run through it."""

from __future__ import annotations

import argparse
import json
import logging
import os
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml

from mambaxray_ctl import pipeline as pl
from mambaxray_ctl.demo import ablation
from mambaxray_ctl.pipeline import STAGE2, STAGE3, Pipeline, PipelineError, StageRun
from test_stages_cli import CONFIGS, cli_args

DATASETS = sorted(path.stem for path in (CONFIGS / "data").glob("*.yaml"))
TRAINERS = sorted(path.stem for path in (CONFIGS / "trainer").glob("*.yaml"))
STAGES = [pl.stage1("arm"), pl.stage1("mae"), pl.stage1("simclr"), STAGE2, STAGE3]


# Config composition ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("data", DATASETS)
@pytest.mark.parametrize("trainer", TRAINERS)
def test_config_files_compose_data_stage_dataset_stage_and_trainer(data: str, trainer: str) -> None:
    pipeline = Pipeline(data=data, trainer=trainer, configs=CONFIGS)
    for stage in STAGES:
        specific = CONFIGS / data / f"{stage.config}.yaml"
        expected = [CONFIGS / "data" / f"{data}.yaml", CONFIGS / f"{stage.config}.yaml"]
        expected += [specific] if specific.is_file() else []
        assert pipeline.config_files(stage) == [*expected, CONFIGS / "trainer" / f"{trainer}.yaml"]


def test_dataset_specific_configs_are_used_where_present() -> None:
    demo = Pipeline(data="demo", configs=CONFIGS)
    assert all(CONFIGS / "demo" / f"{stage.config}.yaml" in demo.config_files(stage) for stage in STAGES)
    chexpert = Pipeline(data="chexpert_plus", configs=CONFIGS)
    assert CONFIGS / "chexpert_plus" / "stage3_reportgen.yaml" in chexpert.config_files(STAGE3)
    assert len(chexpert.config_files(STAGE2)) == 3
    assert len(Pipeline(data="iu_xray", configs=CONFIGS).config_files(STAGE3)) == 3


def test_default_trainer_and_run_root() -> None:
    assert Pipeline(data="demo").trainer_preset == "cpu"
    assert Pipeline(data="iu_xray").trainer_preset == "gpu"
    assert Pipeline(data="iu_xray", trainer="ddp").trainer_preset == "ddp"
    assert Pipeline(data="iu_xray").stage_dir(STAGE2) == Path("outputs/iu_xray/stage2")
    assert Pipeline(data="demo", out=Path("/runs")).stage_dir("stage3") == Path("/runs/stage3")


def test_unknown_dataset_trainer_or_stage_is_an_error() -> None:
    with pytest.raises(PipelineError, match=r"unknown dataset 'nope'.*known: .*iu_xray"):
        Pipeline(data="nope", configs=CONFIGS).config_files(STAGE2)
    with pytest.raises(PipelineError, match=r"unknown trainer preset 'tpu'.*known: .*ddp"):
        Pipeline(data="demo", trainer="tpu", configs=CONFIGS).config_files(STAGE2)
    with pytest.raises(PipelineError, match="unknown stage-1 method 'byol'"):
        pl.stage1("byol")
    with pytest.raises(PipelineError, match="unknown stage 'stage4'"):
        pl.get_stage("stage4")


def test_cli_args_order_files_run_root_overrides_handoff_then_extra() -> None:
    pipeline = Pipeline(
        data="iu_xray", configs=CONFIGS, out=Path("/runs"), overrides=({"data": {"init_args": {"a": 1}}},)
    )
    argv = pl._cli_args(
        pipeline, "fit", STAGE3, [{"trainer": {"max_epochs": 1}}], ["--x=1"], handoff=Path("/e.safetensors")
    )
    assert argv[0] == "fit" and [Path(f) for f in _configs(argv)[:3]] == pipeline.config_files(STAGE3)
    assert [json.loads(f) for f in _configs(argv)[3:]] == [
        {"data": {"init_args": {"a": 1}}},
        {"trainer": {"max_epochs": 1}},
        pl.nested(pl.HANDOFF_ARG, "/e.safetensors"),
    ]
    assert "--trainer.logger.init_args.save_dir=/runs" in argv and argv[-1] == "--x=1"
    assert "--trainer.logger.init_args.name=stage3" in argv
    stage2 = pl._cli_args(pipeline, "fit", STAGE2, handoff=None)
    assert _handoff(stage2) == [None] and "--trainer.logger.init_args.name=stage2" in stage2
    predict = pl._cli_args(pipeline, "predict", STAGE3, ckpt=Path("/c.ckpt"))
    assert predict[-1] == "--ckpt_path=/c.ckpt" and _handoff(predict) == []


@pytest.mark.parametrize("stage", STAGES, ids=lambda stage: stage.config)
def test_each_stage_config_names_its_runs_as_the_pipeline_does(stage: pl.Stage) -> None:
    """The configs' logger name (a plain ``mambaxray-ctl fit -c ...``) is the stage's run folder, which the
    pipeline passes itself; no dataset-specific config renames it."""
    names = []
    for path in [CONFIGS / f"{stage.config}.yaml", *sorted(CONFIGS.glob(f"*/{stage.config}.yaml"))]:
        trainer = (yaml.safe_load(path.read_text()) or {}).get("trainer") or {}
        name = ((trainer.get("logger") or {}).get("init_args") or {}).get("name")
        if name is not None or path.parent == CONFIGS:
            names.append(name)
    assert names and set(names) == {stage.name}


def _configs(argv: list[str]) -> list[str]:
    return [arg for prev, arg in pairwise(argv) if prev == "-c"]


def _handoff(argv: list[str]) -> list[Any]:
    """The hand-off values an argument list sets."""
    found = []
    for text in _configs(argv):
        if text.startswith("{"):
            value: Any = json.loads(text)
            for key in pl.HANDOFF_ARG.split("."):
                value = value.get(key, {}) if isinstance(value, dict) else {}
            if value != {}:
                found.append(value)
    return found


def test_nested_turns_a_dotted_argument_into_a_config() -> None:
    assert pl.nested("model.init_args.handoff.source", None) == {
        "model": {"init_args": {"handoff": {"source": None}}}
    }


def test_export_name_is_the_stages_one() -> None:
    from mambaxray_ctl.stages.base import EXPORT_NAME

    assert pl.EXPORT_NAME == EXPORT_NAME


# The hand-off ---------------------------------------------------------------------------------------------
def _touch(path: Path, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    os.utime(path, (mtime, mtime))
    return path


def test_handoff_takes_the_newest_export_of_the_previous_stage(tmp_path: Path) -> None:
    pipeline = Pipeline(data="iu_xray", configs=CONFIGS, out=tmp_path)
    _touch(tmp_path / "stage1" / "version_0" / pl.EXPORT_NAME, 1000)
    newest = _touch(tmp_path / "stage1" / "version_1" / pl.EXPORT_NAME, 3000)
    _touch(tmp_path / "stage1" / "version_2" / pl.EXPORT_NAME, 2000)  # a higher version, older
    (tmp_path / "stage1" / "version_3").mkdir()  # a run that exported nothing
    _touch(tmp_path / "stage2" / "version_0" / pl.EXPORT_NAME, 9000)  # another stage's
    assert pl.resolve_handoff(pipeline, STAGE2) == newest
    assert pl.resolve_handoff(pipeline, pl.stage1()) is None  # stage 1 starts from nothing by default
    assert pl.resolve_handoff(pipeline, STAGE3) == tmp_path / "stage2" / "version_0" / pl.EXPORT_NAME
    assert pl.resolve_handoff(pipeline, STAGE2, "none") is None
    assert pl.resolve_handoff(pipeline, STAGE2, None) is None
    explicit = _touch(tmp_path / "elsewhere.safetensors", 0)
    assert pl.resolve_handoff(pipeline, STAGE2, str(explicit)) == explicit
    with pytest.raises(PipelineError, match="does not exist"):
        pl.resolve_handoff(pipeline, STAGE2, tmp_path / "missing.safetensors")


def test_no_previous_export_says_which_stage_to_run_or_how_to_pass_init(tmp_path: Path) -> None:
    pipeline = Pipeline(data="iu_xray", configs=CONFIGS, out=tmp_path)
    with pytest.raises(PipelineError) as error:
        pl.resolve_handoff(pipeline, STAGE3)
    message = str(error.value)
    assert f"no stage2 export under {tmp_path / 'stage2'}" in message
    assert "make stage2 DATA=iu_xray" in message and "INIT=path" in message and "INIT=none" in message


def test_pipeline_command_reports_a_missing_export(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    pl.configure_parser(parser)
    args = parser.parse_args(["stage2", "--data", "iu_xray", "--out", str(tmp_path), "--", "--trainer.x=1"])
    assert args.args == ["--trainer.x=1"] and args.init == pl.NEWEST and args.trainer is None
    assert pl.run(args) == 2
    assert "make stage1 DATA=iu_xray" in capsys.readouterr().err


def test_fit_chain_hands_each_stage_the_export_of_the_one_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []

    def fake_cli(argv: list[str]) -> Any:
        calls.append(argv)
        run_dir = tmp_path / f"run{len(calls)}"
        _touch(run_dir / pl.EXPORT_NAME, 0)
        return SimpleNamespace(trainer=SimpleNamespace(log_dir=str(run_dir), checkpoint_callback=None))

    monkeypatch.setattr(pl, "_run_cli", fake_cli)
    pipeline = Pipeline(data="demo", configs=CONFIGS, out=tmp_path)
    runs = pl.fit_chain(
        pipeline, [STAGE2, STAGE3], {"stage3": [{"trainer": {"max_epochs": 3}}]}, {"stage2": ["--a"]}
    )
    assert list(runs) == ["stage2", "stage3"] and runs["stage3"].run_dir == tmp_path / "run2"
    assert _handoff(calls[0]) == [None] and calls[0][-1] == "--a"  # the first: no hand-off
    assert _handoff(calls[1]) == [str(tmp_path / "run1" / pl.EXPORT_NAME)]
    assert '{"trainer": {"max_epochs": 3}}' in calls[1]
    pl.fit_stage(pipeline, pl.stage1())  # stage 1 by default: no hand-off argument at all
    assert _handoff(calls[-1]) == []


# The checkpoint to predict from -------------------------------------------------------------------------
def _fake_run(root: Path, name: str, best: str | None, mtime: float = 0, score: float = 0.5) -> Path:
    """A stage-3 run folder whose last.ckpt records the ModelCheckpoint state of ``best``."""
    run_dir = root / "stage3" / name
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    if best:
        (checkpoints / best).write_bytes(b"")
    state = {
        "monitor": pl.PREDICT_MONITOR,
        "best_model_path": str(checkpoints / best) if best else "",
        "best_model_score": torch.tensor(score) if best else None,
    }
    key = "ModelCheckpoint{'monitor': 'val/score', 'mode': 'max'}"
    torch.save({"state_dict": {}, "callbacks": {key: state}}, checkpoints / pl.LAST_CHECKPOINT)
    os.utime(checkpoints / pl.LAST_CHECKPOINT, (mtime, mtime))
    return run_dir


def test_predict_uses_the_best_val_score_checkpoint_when_validation_ran(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = _fake_run(tmp_path, "version_0", "epoch3-step12-score0.5000.ckpt")
    run = StageRun.from_dir(run_dir)
    assert run.best == run_dir / "checkpoints" / "epoch3-step12-score0.5000.ckpt" and run.best_score == 0.5
    with caplog.at_level(logging.INFO, logger="mambaxray_ctl.pipeline"):
        choice = pl.choose_checkpoint(run)
    assert choice.path == run.best and "best val/score 0.5000" in choice.reason
    assert f"predict: from {run.best} (the best val/score" in caplog.text


def test_predict_uses_last_ckpt_when_no_validation_ran(tmp_path: Path) -> None:
    run = StageRun.from_dir(_fake_run(tmp_path, "version_0", None))
    choice = pl.choose_checkpoint(run)
    assert run.best is None and choice.path == run.last and choice.path.name == "last.ckpt"
    assert "no val/score was recorded (no validation ran)" in choice.reason


def test_a_missing_best_checkpoint_falls_back_to_last_and_says_so(tmp_path: Path) -> None:
    run_dir = _fake_run(tmp_path, "version_0", "epoch1-score0.1.ckpt")
    (run_dir / "checkpoints" / "epoch1-score0.1.ckpt").unlink()
    choice = pl.choose_checkpoint(StageRun.from_dir(run_dir))
    assert choice.path.name == "last.ckpt" and "is missing" in choice.reason


def test_a_moved_run_folder_still_finds_its_best_checkpoint(tmp_path: Path) -> None:
    old = _fake_run(tmp_path / "old", "version_0", "best.ckpt")
    moved = tmp_path / "new" / "version_0"
    moved.parent.mkdir()
    old.rename(moved)
    assert StageRun.from_dir(moved).best == moved / "checkpoints" / "best.ckpt"


def test_the_rule_is_the_same_for_a_finished_trainer() -> None:
    def trainer(best: str) -> Any:
        callback = SimpleNamespace(
            monitor="val/score", best_model_path=best, best_model_score=None, last_model_path="/r/last.ckpt"
        )
        return SimpleNamespace(log_dir="/r", default_root_dir=".", checkpoint_callback=callback)

    assert StageRun.from_trainer(trainer("")).best is None
    assert pl.choose_checkpoint(StageRun.from_trainer(trainer(""))).path == Path("/r/last.ckpt")
    assert StageRun.from_trainer(trainer("/r/b.ckpt")).best == Path("/r/b.ckpt")


def test_default_checkpoint_is_the_newest_stage3_run_and_ckpt_overrides_it(tmp_path: Path) -> None:
    pipeline = Pipeline(data="demo", configs=CONFIGS, out=tmp_path)
    with pytest.raises(PipelineError, match=r"no stage3 checkpoint .*make stage3 DATA=demo.*CKPT=path"):
        pl.predict_checkpoint(pipeline)
    _fake_run(tmp_path, "version_0", "old-best.ckpt", mtime=1000)
    newer = _fake_run(tmp_path, "version_1", None, mtime=2000)
    (tmp_path / "stage3" / "version_2").mkdir()  # a predict run: no checkpoints
    assert pl.predict_checkpoint(pipeline).path == newer / "checkpoints" / "last.ckpt"
    older = tmp_path / "stage3" / "version_0"
    assert pl.predict_checkpoint(pipeline, older).path == older / "checkpoints" / "old-best.ckpt"
    explicit = older / "checkpoints" / "last.ckpt"
    choice = pl.predict_checkpoint(pipeline, str(explicit))
    assert choice.path == explicit and choice.reason == "given explicitly"
    with pytest.raises(PipelineError, match="does not exist"):
        pl.predict_checkpoint(pipeline, tmp_path / "nope.ckpt")


def test_evaluate_scores_with_the_demo_labeller_for_the_demo_data_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mambaxray_ctl.evaluation import evaluate as evaluation

    calls: list[tuple[Any, ...]] = []

    def fake(path: Any, data: str, labeler: Any = None, **settings: Any) -> dict[str, int]:
        calls.append((path, data, labeler))
        return {"n": 1}

    monkeypatch.setattr(evaluation, "evaluate_predictions", fake)
    assert pl.evaluate("p.jsonl", "demo") == {"n": 1}
    assert pl.evaluate("p.jsonl", "iu_xray", out=tmp_path / "metrics.json") == {"n": 1}
    assert pl.evaluate("p.jsonl", "demo", labeler=None) == {"n": 1}
    assert calls == [("p.jsonl", "demo", "demo"), ("p.jsonl", "iu_xray", None), ("p.jsonl", "demo", None)]
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"n": 1}


def test_newest_predictions_is_the_prediction_writers_file(tmp_path: Path) -> None:
    from mambaxray_ctl.callbacks.predictions import PREDICTIONS_NAME

    assert pl.predictions_name() == PREDICTIONS_NAME
    pipeline = Pipeline(data="demo", out=tmp_path)
    assert pl.newest_predictions(pipeline) is None
    _touch(tmp_path / "stage3" / "version_3" / PREDICTIONS_NAME, 2000)
    written = _touch(tmp_path / "stage3" / "version_4" / PREDICTIONS_NAME, 3000)
    assert pl.newest_predictions(pipeline) == written


def test_pipeline_evaluate_prints_and_writes_what_the_evaluate_command_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from mambaxray_ctl.evaluation import evaluate as evaluation

    def fake(path: Any, data: str, labeler: Any = None, **settings: Any) -> dict[str, Any]:
        counts = {"num_studies": 3, "num_empty_generated": 1, "num_duplicate_ids": 2}
        return {"BLEU_4": 0.25, **counts, "num_conflicting_duplicates": 1, "dataset": data, "labeler": None}

    monkeypatch.setattr(evaluation, "evaluate_predictions", fake)
    predictions = _touch(tmp_path / "stage3" / "version_0" / pl.predictions_name(), 0)
    metrics = predictions.with_name(evaluation.METRICS_NAME)

    parser = argparse.ArgumentParser()
    pl.configure_parser(parser)
    assert pl.run(parser.parse_args(["evaluate", "--data", "iu_xray", "--out", str(tmp_path)])) == 0
    from_pipeline = capsys.readouterr().out
    assert json.loads(metrics.read_text())["BLEU_4"] == 0.25
    metrics.unlink()

    parser = argparse.ArgumentParser()
    evaluation.configure_parser(parser)
    assert evaluation.run(parser.parse_args([str(predictions), "--dataset", "iu_xray"])) == 0
    assert capsys.readouterr().out == from_pipeline and metrics.is_file()
    assert "3 studies, 1 with empty generated text, 2 duplicate ids dropped" in from_pipeline
    assert "clinical scores: omitted" in from_pipeline and f"wrote {metrics}" in from_pipeline


def test_pipeline_evaluate_reports_a_bad_predictions_file(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n')
    parser = argparse.ArgumentParser()
    pl.configure_parser(parser)
    assert pl.run(parser.parse_args(["evaluate", "--predictions", str(bad)])) == 2
    assert "bad.jsonl:1: missing key(s) generated, reference" in capsys.readouterr().err
    assert not (tmp_path / "metrics.json").exists()


# Ablation rows --------------------------------------------------------------------------------------------
def test_the_seven_ablation_rows_parse_into_their_stages() -> None:
    paths = sorted((CONFIGS / "ablation").glob("[0-9]*.yaml"))
    rows = {path.stem: ablation.read_row(path) for path in paths}
    configs = {name: [stage.config for stage in row.stages] for name, row in rows.items()}
    assert configs == {
        "1_simclr_ctl_ctlft": ["stage1_simclr", "stage2_contrastive", "stage3_reportgen"],
        "2_mae_ctl_ctlft": ["stage1_mae", "stage2_contrastive", "stage3_reportgen"],
        "3_arm_ctl_ctlft": ["stage1_arm", "stage2_contrastive", "stage3_reportgen"],
        "4_arm_ctlft": ["stage1_arm", "stage3_reportgen"],
        "5_ctlft": ["stage3_reportgen"],
        "6_arm_ctl": ["stage1_arm", "stage2_contrastive", "stage3_reportgen"],
        "7_arm": ["stage1_arm", "stage3_reportgen"],
    }
    assert [row.paper_row for row in rows.values()] == [1, 2, 3, 4, 5, 6, 7]
    budget = ablation.read_budget(CONFIGS / "ablation" / "budget.yaml")
    assert budget == {
        "stage2": {"trainer": {"max_epochs": 1}},
        "stage3": {"trainer": {"max_epochs": 3, "limit_val_batches": 0}},
    }
    full = ablation.row_overrides(rows["3_arm_ctl_ctlft"], budget)
    assert full == {"stage1": [], "stage2": [budget["stage2"]], "stage3": [budget["stage3"]]}
    for name in ("6_arm_ctl", "7_arm"):
        assert ablation.row_overrides(rows[name], budget)["stage3"] == [budget["stage3"], ablation.CTL_FT_OFF]
    assert ablation.row_overrides(rows["5_ctlft"], budget) == {"stage3": [budget["stage3"]]}


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("stage1: arm", "needs a name"),
        ("name: x\nstage1: byol", "stage1 must be one of"),
        ("name: x\nstage2: 'no'", "stage2 must be true or false"),
        ("name: x\nctl_ft: 0", "ctl_ft must be true or false"),
        ("name: x\nstages: [stage1_arm]", r"unknown key\(s\) \['stages'\]"),
        ("name: x\npaper_row: '3'", "paper_row must be a row number"),
        ("name: x\npaper_row: 8", "Table II has no row 8"),
        ("name: x\npaper_row: 4", r"not the paper's Table II row #4 .*stage2: true here, false in the paper"),
        ("name: x\npaper_row: 5\nstage2: false", "stage1: arm here, none in the paper"),
        ("name: x\noverrides: {stage4: {trainer: {max_epochs: 1}}}", "unknown stage 'stage4'"),
        ("name: x\noverrides: {stage3: ['--trainer.max_epochs=1']}", "must be a nested config dict"),
        ("- name: x", "a row is a mapping"),
    ],
)
def test_a_bad_ablation_row_names_the_problem(text: str, error: str, tmp_path: Path) -> None:
    path = tmp_path / "row.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=error):
        ablation.read_row(path)


def test_ablation_command_checks_every_row_before_any_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(ablation, "prepare_demo_data", lambda *args: pytest.fail("a bad row ran"))
    (tmp_path / "01_good.yaml").write_text("name: good")
    (tmp_path / "02_bad.yaml").write_text("name: bad\nstage1: byol")
    parser = argparse.ArgumentParser()
    ablation.configure_parser(parser)
    args = parser.parse_args([str(tmp_path / "01_good.yaml"), str(tmp_path / "02_bad.yaml")])
    assert args.budget is None
    assert ablation.run(args) == 2
    assert "02_bad.yaml: stage1 must be one of" in capsys.readouterr().err


def test_ablation_budget_defaults_to_the_one_of_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert ablation.budget_path(CONFIGS, None) == CONFIGS / "ablation" / "budget.yaml"
    assert ablation.budget_path(CONFIGS, "") is None
    assert ablation.budget_path(CONFIGS, "b.yaml") == Path("b.yaml")
    monkeypatch.setattr(ablation, "prepare_demo_data", lambda *args: pytest.fail("a bad budget ran"))
    (tmp_path / "ablation").mkdir()
    (tmp_path / "ablation" / "01_row.yaml").write_text("name: row")
    (tmp_path / "ablation" / "budget.yaml").write_text("args: {stage2: ['--trainer.max_epochs=1']}")
    parser = argparse.ArgumentParser()
    ablation.configure_parser(parser)
    assert ablation.run(parser.parse_args(["--configs", str(tmp_path)])) == 2
    assert (
        f"{tmp_path / 'ablation' / 'budget.yaml'}: a budget holds only overrides" in capsys.readouterr().err
    )


def test_ablation_row_defaults_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "row.yaml"
    path.write_text("name: x\nstage1: none\noverrides: {stage2: {trainer: {max_epochs: 2}}}")
    row = ablation.read_row(path)
    assert [stage.name for stage in row.stages] == ["stage2", "stage3"] and row.ctl_ft
    assert ablation.row_overrides(row, {"stage2": {"a": 1}})["stage2"] == [
        {"a": 1},
        {"trainer": {"max_epochs": 2}},
    ]
    (tmp_path / "budget.yaml").write_text("args: {stage2: ['--trainer.max_epochs=1']}")
    with pytest.raises(ValueError, match="only overrides"):
        ablation.read_budget(tmp_path / "budget.yaml")


# End to end -------------------------------------------------------------------------------------------------
def _tiny_args(world: Path, out: Path, stage: str, *extra: str) -> list[str]:
    """test_stages_cli's tiny-model arguments of a stage, without its command and config files."""
    args = cli_args(world, out, stage)[1:]
    return [arg for i, arg in enumerate(args) if arg != "-c" and (i == 0 or args[i - 1] != "-c")] + list(
        extra
    )


def tiny_world_pipeline(world: Path, out: Path) -> Pipeline:
    """The demo data configs and CPU trainer on the tiny test world, runs in ``out``."""
    world_paths = {"annotation": str(world / "annotation.json"), "image_root": str(world / "images")}
    overrides = ({"data": {"init_args": world_paths}},)
    return Pipeline(data="demo", trainer="cpu", configs=CONFIGS, out=out, overrides=overrides)


def test_stage2_stage3_predict_through_the_pipeline(world: Path, tmp_path: Path) -> None:
    pipeline = tiny_world_pipeline(world, tmp_path)
    stage2 = pl.fit_stage(
        pipeline, STAGE2, "none", args=_tiny_args(world, tmp_path, "stage2", "--trainer.max_steps=2")
    )
    assert stage2.export is not None and stage2.run_dir.parent == tmp_path / "stage2"
    one_validated_epoch = [
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1",
        "--trainer.check_val_every_n_epoch=1",
    ]
    stage3 = pl.fit_stage(pipeline, STAGE3, args=_tiny_args(world, tmp_path, "stage3", *one_validated_epoch))
    assert stage3.export is not None  # stage 3 started from the newest stage-2 export, found on disk:
    exported = json.loads(stage2.export.with_suffix(".json").read_text())["sha256"]
    assert json.loads(stage3.export.with_suffix(".json").read_text())["init_sha256"] == exported
    assert stage3.best is not None and stage3.monitor == "val/score"
    assert StageRun.from_dir(stage3.run_dir).best == stage3.best  # the same rule from the folder

    predictions = pl.predict(pipeline, args=_tiny_args(world, tmp_path, "stage3"))
    rows = [json.loads(line) for line in predictions.open()]
    test_ids = {entry["id"] for entry in json.loads((world / "annotation.json").read_text())["test"]}
    assert {row["id"] for row in rows} == test_ids
    assert {row["checkpoint"] for row in rows} == {str(stage3.best)}
