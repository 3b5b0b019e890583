"""The package's log lines reach the user (:mod:`mambaxray_ctl.logs`): one handler on the
``mambaxray_ctl`` logger, rank 0 only below WARNING, the level from ``MAMBAXRAY_LOG_LEVEL``; and the
real command (``python -m mambaxray_ctl``, in a subprocess) prints the hand-off, export, split-size and
prediction lines."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mambaxray_ctl import logs
from mambaxray_ctl.cli import main
from mambaxray_ctl.logs import configure_logging, rank_from_env
from test_ddp import DDP, run_command, run_mambaxray
from test_stages_cli import cli_args

# The hand-off argument (the stage's first backbone weights).
HANDOFF = "--model.init_args.handoff.source"
RANK_ENV = (
    "RANK",
    "LOCAL_RANK",
    "NODE_RANK",
    "GROUP_RANK",
    "LOCAL_WORLD_SIZE",
    "SLURM_PROCID",
    "SLURM_NODEID",
    "JSM_NAMESPACE_RANK",
)


@pytest.fixture
def package_logger(monkeypatch: pytest.MonkeyPatch) -> Iterator[logging.Logger]:
    """The ``mambaxray_ctl`` logger, restored afterwards; no launcher rank nor level in the environment."""
    for key in (*RANK_ENV, logs.LEVEL_ENV):
        monkeypatch.delenv(key, raising=False)
    logger = logging.getLogger(logs.LOGGER_NAME)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield logger
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def our_handlers(logger: logging.Logger) -> list[logging.Handler]:
    return [h for h in logger.handlers if isinstance(h, logs._Handler)]


def test_one_handler_even_when_configured_twice(package_logger: logging.Logger) -> None:
    root_handlers = list(logging.getLogger().handlers)
    lightning_handlers = list(logging.getLogger("lightning.pytorch").handlers)
    first, second = io.StringIO(), io.StringIO()
    configure_logging(stream=first)
    configure_logging(stream=second)
    logging.getLogger("mambaxray_ctl.stages.base").info("stage2: exported the backbone to %s", "x")
    assert len(our_handlers(package_logger)) == 1 and not package_logger.propagate
    assert first.getvalue() == ""
    assert second.getvalue() == "[mambaxray_ctl] INFO stage2: exported the backbone to x\n"
    assert logging.getLogger().handlers == root_handlers  # the root logger and Lightning's are left alone
    assert logging.getLogger("lightning.pytorch").handlers == lightning_handlers


def test_a_handler_on_the_root_logger_does_not_print_the_lines_twice(package_logger: logging.Logger) -> None:
    ours, root = io.StringIO(), io.StringIO()
    root_handler = logging.StreamHandler(root)
    logging.getLogger().addHandler(root_handler)
    try:
        configure_logging(stream=ours)
        logging.getLogger("mambaxray_ctl.data.datamodules").info("train 21, val 3, test 6")
    finally:
        logging.getLogger().removeHandler(root_handler)
    assert ours.getvalue().count("train 21, val 3, test 6") == 1 and root.getvalue() == ""


@pytest.mark.parametrize(
    ("env", "rank"),
    [
        ({}, None),
        ({"RANK": "3", "LOCAL_RANK": "1", "GROUP_RANK": "1"}, "3"),  # torchrun
        ({"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2"}, "1"),  # Lightning's DDP launcher
        ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, "node 1 local 0"),  # ... on the second node
        ({"LOCAL_RANK": "1", "NODE_RANK": "1", "LOCAL_WORLD_SIZE": "4"}, "5"),
        ({"NODE_RANK": "1"}, "node 1"),  # the second node's first process, before the launcher
        ({"NODE_RANK": "0"}, "0"),
        ({"SLURM_PROCID": "2", "SLURM_NODEID": "1"}, "2"),  # srun starting every process
        ({"SLURM_PROCID": "0", "LOCAL_RANK": "1"}, "1"),  # Lightning's processes inside one SLURM task
        ({"SLURM_NODEID": "1", "LOCAL_RANK": "0"}, "node 1 local 0"),
        ({"JSM_NAMESPACE_RANK": "1"}, "1"),
        ({"RANK": "", "LOCAL_RANK": "one", "NODE_RANK": "x"}, None),  # not integers: ignored
    ],
)
def test_rank_from_the_launcher_environment(env: dict[str, str], rank: str | None) -> None:
    assert rank_from_env(env) == rank


def test_other_ranks_print_warnings_only(
    package_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = logging.getLogger("mambaxray_ctl.stages.base")
    stream = io.StringIO()
    monkeypatch.setenv("LOCAL_RANK", "1")
    configure_logging(stream=stream)
    log.info("stage2: backbone initialised from a")
    log.warning("rank 1: skipped at load time")
    assert stream.getvalue() == "[mambaxray_ctl rank 1] WARNING rank 1: skipped at load time\n"

    # Lightning's own rank (set by its strategies, also in processes they start) counts as well
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setattr(rank_zero_only, "rank", 2, raising=False)
    log.info("stage2: exported the backbone to b")
    assert "exported" not in stream.getvalue()
    monkeypatch.setattr(rank_zero_only, "rank", 0, raising=False)
    log.info("stage2: exported the backbone to c")
    assert stream.getvalue().endswith("[mambaxray_ctl] INFO stage2: exported the backbone to c\n")


@pytest.mark.parametrize(
    ("value", "printed"),
    [
        ("WARNING", ["WARNING w"]),
        ("debug", ["DEBUG d", "INFO i", "WARNING w"]),
        ("20", ["INFO i", "WARNING w"]),
        ("LOUD", ["WARNING MAMBAXRAY_LOG_LEVEL='LOUD' is not a logging level", "INFO i", "WARNING w"]),
    ],
)
def test_level_from_the_environment(
    value: str, printed: list[str], package_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = io.StringIO()
    monkeypatch.setenv(logs.LEVEL_ENV, value)
    configure_logging(stream=stream)
    log = logging.getLogger("mambaxray_ctl.x")
    log.debug("d")
    log.info("i")
    log.warning("w")
    lines = stream.getvalue().splitlines()
    assert len(lines) == len(printed)
    assert all(line.startswith(f"[mambaxray_ctl] {want}") for line, want in zip(lines, printed, strict=True))


def test_an_explicit_bad_level_is_an_error(package_logger: logging.Logger) -> None:
    with pytest.raises(ValueError, match="not a logging level"):
        configure_logging("LOUD", stream=io.StringIO())


def test_the_command_configures_logging_a_caller_with_its_own_argv_does_not(
    package_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert main(["--help"]) == 0
    assert our_handlers(package_logger) == []
    monkeypatch.setattr(sys, "argv", ["mambaxray-ctl", "--help"])
    assert main() == 0
    assert len(our_handlers(package_logger)) == 1


def test_a_process_started_as_rank_1_keeps_its_info_lines_to_itself() -> None:
    """A fresh process, as Lightning's DDP launcher starts one (``LOCAL_RANK`` set): the command's
    entry point reads the rank before anything else."""
    code = (
        "import logging, sys; from mambaxray_ctl.cli import main; sys.argv = ['mambaxray-ctl', '--help']; "
        "main(); log = logging.getLogger('mambaxray_ctl.t'); log.info('an info'); log.warning('a warning')"
    )
    rank1 = run_command([sys.executable, "-c", code], timeout=60, LOCAL_RANK="1", NODE_RANK="0")
    assert "an info" not in rank1.stderr
    assert "[mambaxray_ctl rank 1] WARNING a warning" in rank1.stderr
    rank0 = run_command([sys.executable, "-c", code], timeout=60, LOCAL_RANK="0", NODE_RANK="0")
    assert "[mambaxray_ctl] INFO an info" in rank0.stderr


# The real command ---------------------------------------------------------------------------------------
def stage1_export(out: Path) -> Path:
    """A stage-1-like export: a fresh tiny backbone of stage 2's test shape, saved as a stage saves it."""
    from mambaxray_ctl.backbone import create_backbone, save_backbone

    path, _ = save_backbone(create_backbone("test_arm_tiny", depth=4), None, out / "backbone.safetensors")
    return path


def info_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("[mambaxray_ctl] INFO ")]


def only_line(lines: list[str], pattern: str) -> re.Match:
    found = [m for m in map(re.compile(pattern).fullmatch, lines) if m]
    assert len(found) == 1, f"{pattern!r}: {len(found)} lines in\n" + "\n".join(lines)
    return found[0]


def test_the_command_prints_hand_off_export_split_and_prediction_lines(world: Path, tmp_path: Path) -> None:
    from mambaxray_ctl.stages import ContrastiveModule

    export = stage1_export(tmp_path / "stage1")
    recorded = json.loads(export.with_suffix(".json").read_text())["sha256"]
    annotation = json.loads((world / "annotation.json").read_text())
    sizes = {split: len(annotation[split]) for split in ("train", "val", "test")}

    run_dir = tmp_path / "runs"
    extra = ["--trainer.max_steps=1", "--trainer.limit_val_batches=0", f"{HANDOFF}={export}"]
    done = run_mambaxray(cli_args(world, run_dir, "stage2", "fit", *extra), timeout=180)
    lines = info_lines(done.stderr)
    stage = re.escape(ContrastiveModule.stage_name)
    hand_off = only_line(
        lines, rf"\S+ INFO {stage}: backbone initialised from (\S+) \((\S+), (\d+) tensors, sha256 (\w+)\)"
    )
    assert hand_off.groups() == (str(export), "backbone", str(len(load_file(str(export)))), recorded)
    exported = only_line(lines, rf"\S+ INFO {stage}: exported the backbone to (\S+)")
    assert Path(exported[1]).is_file() and Path(exported[1]).parent.parent.parent == run_dir
    splits = only_line(lines, r"\S+ INFO \S+annotation\.json: train (\d+), val (\d+), test (\d+) .*")
    assert tuple(map(int, splits.groups())) == (sizes["train"], sizes["val"], sizes["test"])

    # stage 3's predict, fresh weights (no checkpoint): the prediction writer's line
    done = run_mambaxray(cli_args(world, tmp_path / "predict", "stage3", "predict"), timeout=180)
    wrote = only_line(info_lines(done.stderr), r"\S+ INFO wrote (\d+) predictions to (\S+) .*")
    assert int(wrote[1]) == sizes["test"] == len(Path(wrote[2]).read_text().splitlines())


@pytest.mark.slow
def test_two_ranks_print_each_info_line_once(world: Path, tmp_path: Path) -> None:
    """Lightning's DDP launcher starts rank 1 by running the command again: rank 1 prints no INFO."""
    export = stage1_export(tmp_path / "stage1")
    extra = ["--trainer.max_steps=1", "--trainer.limit_val_batches=0", f"{HANDOFF}={export}", *DDP]
    done = run_mambaxray(cli_args(world, tmp_path / "runs", "stage2", "fit", *extra), timeout=300)
    lines = info_lines(done.stderr)
    only_line(lines, r".* backbone initialised from .*")
    only_line(lines, r".* exported the backbone to .*")
    only_line(lines, r".*annotation\.json: train .*")
    assert not re.search(r"\[mambaxray_ctl rank \S+\] INFO", done.stderr)
