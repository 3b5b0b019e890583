"""`mambaxray-ctl profile` at tiny sizes: measured fields, counts, projections, batches, the CPU check."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import Qwen2ForCausalLM

from mambaxray_ctl import hardware
from mambaxray_ctl.backbone import create_backbone
from mambaxray_ctl.cli import main
from mambaxray_ctl.profile import command, measure
from mambaxray_ctl.profile.models import LLM_CONFIGS
from mambaxray_ctl.profile.report import duration, project

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["--backbone", "test_arm_tiny", "--batch-size", "2", "--steps", "2", "--accelerator", "cpu"]


def _profile(tmp_path: Path, *options: str) -> dict[str, Any]:
    out = tmp_path / "profile.json"
    assert main(["profile", *TINY, "--configs", str(CONFIGS), "--json", str(out), *options]) == 0
    return json.loads(out.read_text())


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _check_common(result: dict[str, Any]) -> None:
    params = result["params"]
    assert params["total"] == params["trainable"] + params["frozen"]
    assert len(result["step_seconds"]) == 2 and min(result["step_seconds"]) > 0
    assert result["seconds_per_step"] == result["step_seconds"][1]  # the warm-up step is left out
    assert result["peak_memory_bytes"] > 100e6  # a Python process with torch loaded
    tokens = sum(result["tokens_per_step"].values())
    assert result["tokens_per_second"] == pytest.approx(tokens / result["seconds_per_step"])


def test_stage3_counts_tokens_generation_and_projection(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    result = _profile(tmp_path, "--stage", "3", "--llm", "tiny")
    _check_common(result)
    assert result["ssm_impl"] == "auto"  # on a CPU the preset's scan; on a GPU, cuda
    backbone = create_backbone("test_arm_tiny")
    hidden = LLM_CONFIGS["tiny"]().hidden_size
    mapper = nn.Sequential(nn.Linear(backbone.config.embed_dim, hidden), nn.LayerNorm(hidden))
    text_proj = nn.Linear(hidden, hidden)
    assert result["params"]["trainable"] == _count(backbone) + _count(mapper) + _count(text_proj)
    assert result["params"]["frozen"] == _count(Qwen2ForCausalLM(LLM_CONFIGS["tiny"]()))
    visual = backbone.config.num_tokens
    assert result["tokens_per_step"]["image"] == 2 * 2 * visual  # batch 2, two views
    text = result["tokens_per_step"]["text"]  # prompt + visual tokens + a full 60-token target, per study
    assert text % 2 == 0 and text > 2 * (visual + 60)
    generation = result["generation"]
    assert generation["num_beams"] == 5 and 2 * 40 <= generation["new_tokens"] <= 2 * 100
    assert generation["peak_memory_bytes"] is None  # a CPU's peak RSS cannot be reset
    iu, chexpert = result["projection"]
    assert (iu["train_samples"], iu["epochs"], iu["steps_per_epoch"]) == (2069, 30, 1035)
    assert (chexpert["train_samples"], chexpert["epochs"]) == (40463, 6)  # configs/chexpert_plus/
    assert iu["run_seconds"] == pytest.approx(1035 * 30 * result["seconds_per_step"])
    assert (result["batch_size"], result["global_batch_size"]) == (2, 2)
    printed = capsys.readouterr().out
    assert printed.startswith("CPU: float32") and "| parameters: total / trainable / frozen |" in printed
    assert f"{result['params']['frozen']:,}" in printed


def test_stage3_with_gradient_checkpointing(tmp_path: Path) -> None:
    result = _profile(tmp_path, "--stage", "3", "--llm", "tiny", "--gradient-checkpointing", "--no-generate")
    _check_common(result)
    assert result["gradient_checkpointing"] and not result["generation"]


def test_stage2_warns_about_emulated_bf16(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(command, "cpu_flags", lambda: {"avx2", "fma"})
    options = [
        "--stage",
        "2",
        "--text-encoder",
        "tiny",
        "--precision",
        "bf16-mixed",
        "--ssm-impl",
        "reference",
    ]
    result = _profile(tmp_path, *options)
    _check_common(result)
    assert result["ssm_impl"] == "reference"
    assert result["params"]["frozen"] == 0 and result["llm"] is None
    assert result["tokens_per_step"]["text"] == 2 * 128  # long reports fill text_max_length
    assert [row["epochs"] for row in result["projection"]] == [50, 50]
    captured = capsys.readouterr()
    assert "bfloat16 emulated" in captured.out and "warning: bfloat16 on a CPU" in captured.err


def test_stage1_projects_images(tmp_path: Path) -> None:
    result = _profile(tmp_path, "--stage", "stage1_simclr", "--backbone", "test_arm_tiny_pretrain")
    _check_common(result)
    assert result["tokens_per_step"]["text"] == 0
    iu, chexpert = result["projection"]
    assert iu["train_samples"] == 2 * 2069 and iu["steps_per_epoch"] == math.ceil(2 * 2069 / 2)
    assert chexpert["train_samples"] == 40463 and iu["epochs"] == 101


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--stage", "2", "--gradient-checkpointing"], "stage-3 setting"),
        (["--steps", "1"], "--steps >= 2"),
        (["--configs", "missing"], "run from the repository root"),
        (
            ["--stage", "3", "--devices", "3"],
            "data.batch_size=20 is the GLOBAL batch size and must be a positive multiple of the world size 3",
        ),
        (["--devices", "0"], "--devices >= 1"),
        pytest.param(
            ["--accelerator", "gpu"],
            "no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present"),
        ),
    ],
)
def test_bad_options_are_errors(options: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    args = ["profile", "--configs", str(CONFIGS), *options]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def _resolved(*options: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.configure_parser(parser)
    args = parser.parse_args(["--configs", str(CONFIGS), "--accelerator", "cpu", *options])
    assert command.resolve(args) is None
    return args


def test_default_batch_is_the_configs_global_batch_per_device() -> None:
    """data.batch_size is global (the DataModule splits it across ranks): 20 over 2 devices is 10 each."""
    one = _resolved("--stage", "3")
    assert (one.batch_size, one.global_batch_size) == (20, 20)
    two = _resolved("--stage", "3", "--devices", "2", "--strategy", "ddp")
    assert (two.batch_size, two.global_batch_size) == (10, 20)
    explicit = _resolved("--stage", "2", "--devices", "2", "--batch-size", "4")  # --batch-size is per device
    assert (explicit.batch_size, explicit.global_batch_size) == (4, 8)
    # the projection is at the global batch: the same steps per epoch on 1 device or 2
    epochs = {"iu_xray": 30, "chexpert_plus": 6}
    for args in (one, two):
        iu, _ = project(1.0, args.global_batch_size, args.stage, epochs)
        assert iu["steps_per_epoch"] == math.ceil(2069 / 20) == 104


def test_cpu_flags_model_and_native_precision(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC  7B13 64-Core Processor\n"
        "flags\t\t: fpu avx2 avx512f amx_bf16\n\nflags\t\t: fpu avx2\n"
    )
    flags = hardware.cpu_flags(cpuinfo)
    assert hardware.cpu_model(cpuinfo) == "AMD EPYC 7B13 64-Core Processor"
    assert {"avx2", "avx512f", "amx_bf16"} <= flags
    assert measure.native_bf16_flags(flags) == ["amx_bf16"]
    assert "bfloat16 native (amx_bf16)" in measure.describe_cpu(flags)
    assert "bfloat16 emulated" in measure.describe_cpu({"avx2"})
    assert hardware.cpu_flags(tmp_path / "missing") == set()
    assert hardware.cpu_model(tmp_path / "missing")  # platform's answer, never empty
    info = hardware.machine()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert hardware.describe_machine(info).startswith(f"{info['cpu_model']}, {info['cpu_capability']}, ")


def test_duration_units() -> None:
    assert [duration(s) for s in (50, 150, 7200, 3 * 86400)] == [
        "50.0 s",
        "2.5 min",
        "2.0 h",
        "3.0 d",
    ]
