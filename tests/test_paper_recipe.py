"""The paper's recipe (configs/paper/<dataset>/, `make paper`, `mambaxray-ctl pipeline paper`).

- ``--print_config`` of the recipe on 8 GPUs (configs/trainer/ddp8.yaml; printing needs no GPU) holds the
  official effective settings: global batch = per-GPU batch x 8 with the per-GPU batch as the micro-batch,
  per-GPU negatives, learning rate, weight decay, epochs, decoding.
- The accumulation is whole on 1, 2, 4 and 8 GPUs.
- The composition order: data, stage, dataset overlay, recipe, trainer preset.
- The chain (stage 2 from the pretraining file → stage 3 from that run → predict → evaluate), with a fake
  LightningCLI, and the error for a missing pretraining file (PRETRAIN=).
- One tiny end-to-end run of the demo recipe on the test world (micro-batches accumulated; slow).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml

from mambaxray_ctl import pipeline as pl
from mambaxray_ctl.data.datamodules import micro_batches, per_device_batch_size
from mambaxray_ctl.pipeline import STAGE2, STAGE3, Pipeline, PipelineError
from test_configs import print_config
from test_pipeline import _configs, _handoff, _tiny_args, tiny_world_pipeline
from test_stages_cli import CONFIGS

REPO = CONFIGS.parent
GPUS = 8  # the official launchers' `devices: 8` (configs/profiles/*.yaml); the paper: 8 x RTX 4090
# (dataset, stage config) -> the official per-GPU settings the recipe must give (configs/profiles/*.yaml,
# configs/config.py, models/MambaXrayCTL_CLIP.py, models/MambaXrayCTL_DownStream.py)
OFFICIAL: dict[tuple[str, str], dict[str, Any]] = {
    ("iu_xray", "stage2_contrastive"): {"per_gpu": 192, "eval": None, "epochs": 50},
    ("chexpert_plus", "stage2_contrastive"): {"per_gpu": 192, "eval": None, "epochs": 50},
    ("iu_xray", "stage3_reportgen"): {
        "per_gpu": 20,
        "eval": 12,
        "epochs": 30,
        "lm": ("Qwen/Qwen1.5-1.8B-Chat", 60),
        "decoding": {"num_beams": 5, "min_new_tokens": 40, "max_new_tokens": 100},
    },
    ("chexpert_plus", "stage3_reportgen"): {
        "per_gpu": 2,
        "eval": 2,
        "epochs": 6,
        "lm": ("meta-llama/Llama-2-7b-chat-hf", 100),
        "decoding": {"num_beams": 3, "min_new_tokens": 80, "max_new_tokens": 120},
    },
}
STAGES = {"stage2_contrastive": STAGE2, "stage3_reportgen": STAGE3}


def paper_pipeline(data: str, trainer: str = pl.PAPER_TRAINER, **kwargs: Any) -> Pipeline:
    return Pipeline(data=data, trainer=trainer, configs=CONFIGS, recipe=pl.PAPER_RECIPE, **kwargs)


def printed(data: str, config: str, capsys: Any, monkeypatch: Any, trainer: str = pl.PAPER_TRAINER) -> dict:
    argv = pl._cli_args(paper_pipeline(data, trainer), "fit", STAGES[config], handoff=Path("pretrain.pth"))
    return print_config(argv, capsys, monkeypatch)


# The recipe on 8 GPUs -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("data", "config"), OFFICIAL, ids=lambda value: value)
def test_print_config_on_8_gpus_shows_the_official_effective_settings(
    data: str, config: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    official = OFFICIAL[data, config]
    config_ = printed(data, config, capsys, monkeypatch)
    trainer, model, batch = config_["trainer"], config_["model"]["init_args"], config_["data"]["init_args"]
    assert trainer["devices"] == GPUS and trainer["num_nodes"] == 1 and trainer["strategy"] == "ddp"
    assert trainer["precision"] == "bf16-mixed" and trainer["max_epochs"] == official["epochs"]
    assert batch["batch_size"] == official["per_gpu"] * GPUS  # GLOBAL
    assert batch["micro_batch_size"] == official["per_gpu"]  # per GPU: no accumulation on 8 GPUs
    assert micro_batches(batch["batch_size"], batch["micro_batch_size"], GPUS) == 1
    assert batch["image_size"] == 224
    optimizer = model["optimizer"]
    assert optimizer["lr"] == pytest.approx(1e-4) and optimizer["weight_decay"] == pytest.approx(0.01)
    assert optimizer["warmup_steps"] == 0 and optimizer["min_lr_ratio"] == pytest.approx(0.01)
    assert model["handoff"]["source"] == "pretrain.pth"
    if config == "stage2_contrastive":
        assert model["gather_negatives"] is False  # negatives per GPU
        assert model["text_encoder"] == "emilyalsentzer/Bio_ClinicalBERT"
        return
    assert model["ctl_ft"]["gather"] is False  # CTL-FT negatives per GPU
    assert model["ctl_ft"]["weight"] == pytest.approx(0.4)
    assert model["ctl_ft"]["temperature"] == pytest.approx(0.07)
    assert batch["eval_batch_size"] == official["eval"] * GPUS
    assert (model["lm"]["name"], model["lm"]["max_target_tokens"]) == official["lm"]
    decoding = model["decoding"]
    assert {key: decoding[key] for key in official["decoding"]} == official["decoding"]
    assert decoding["repetition_penalty"] == 2.0 and decoding["length_penalty"] == 2.0
    assert decoding["do_sample"] is False


@pytest.mark.parametrize(("data", "config"), OFFICIAL, ids=lambda value: value)
@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_the_global_batch_is_reached_by_whole_accumulation_on_fewer_gpus(
    data: str, config: str, gpus: int
) -> None:
    settings = yaml.safe_load((CONFIGS / "paper" / data / f"{config}.yaml").read_text())["data"]["init_args"]
    assert micro_batches(settings["batch_size"], settings["micro_batch_size"], gpus) == GPUS // gpus
    per_device_batch_size(settings["eval_batch_size"], "eval_batch_size", gpus)  # splits too


def test_the_demo_recipe_accumulates_micro_batches_with_negatives_per_device() -> None:
    for config in STAGES:
        recipe = yaml.safe_load((CONFIGS / "paper" / "demo" / f"{config}.yaml").read_text())
        settings = recipe["data"]["init_args"]
        assert micro_batches(settings["batch_size"], settings["micro_batch_size"], 1) > 1
        model = recipe["model"]["init_args"]
        assert model.get("gather_negatives", model.get("ctl_ft", {}).get("gather")) is False


# Composition ------------------------------------------------------------------------------------------------
def test_the_recipe_comes_after_the_dataset_overlay_and_before_the_trainer_preset() -> None:
    files = paper_pipeline("chexpert_plus").config_files(STAGE3)
    assert files == [
        CONFIGS / "data" / "chexpert_plus.yaml",
        CONFIGS / "stage3_reportgen.yaml",
        CONFIGS / "chexpert_plus" / "stage3_reportgen.yaml",
        CONFIGS / "paper" / "chexpert_plus" / "stage3_reportgen.yaml",
        CONFIGS / "trainer" / "ddp8.yaml",
    ]
    # no recipe file for a stage (stage 1: the paper does not retrain it): the usual files only
    stage1 = paper_pipeline("iu_xray").config_files(pl.stage1())
    assert stage1 == Pipeline(data="iu_xray", trainer="ddp8", configs=CONFIGS).config_files(pl.stage1())
    typo = Pipeline(data="iu_xray", configs=CONFIGS, recipe="papr")
    with pytest.raises(PipelineError, match=r"recipe 'papr' has no settings for the dataset 'iu_xray'"):
        typo.config_files(STAGE2)


def test_the_trainer_preset_sets_the_devices_and_the_recipe_the_batches(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    one_gpu = printed("iu_xray", "stage3_reportgen", capsys, monkeypatch, trainer="gpu")
    assert one_gpu["trainer"]["devices"] == 1
    assert one_gpu["data"]["init_args"]["batch_size"] == 160  # accumulated 8 x 20 on one GPU
    assert one_gpu["data"]["init_args"]["micro_batch_size"] == 20


# The chain and its errors -----------------------------------------------------------------------------------
def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    pl.configure_parser(parser)
    return parser.parse_args(["paper", *argv])


def test_a_missing_pretrain_file_says_to_pass_pretrain(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = _parse("--data", "iu_xray", "--out", str(tmp_path))
    assert args.recipe == "paper" and args.init is None and args.init_format == "auto"
    assert pl.run(args) == 2
    error = capsys.readouterr().err
    assert "PRETRAIN=path/to/official_pretrain.pth" in error and "does not retrain stage 1" in error
    assert pl.run(_parse("--data", "iu_xray", "--init", str(tmp_path / "nope.pth"))) == 2
    assert f"the pretraining file {tmp_path / 'nope.pth'}" in capsys.readouterr().err
    # the demo data: the newest demo stage-1 export by default
    assert pl.run(_parse("--data", "demo", "--out", str(tmp_path))) == 2
    assert "run make stage1 DATA=demo first or pass PRETRAIN=path" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_paper_passes_pretrain_and_defaults_to_8_gpus() -> None:
    def dry_run(*variables: str) -> str:
        done = subprocess.run(
            ["make", "-n", "paper", *variables], cwd=REPO, capture_output=True, text=True, check=True
        )
        return " ".join(done.stdout.replace("\\\n", " ").split())

    line = dry_run("DATA=iu_xray", "PRETRAIN=weights/Pretrain-L.pth")
    assert "pipeline paper --data iu_xray --trainer ddp8 --init weights/Pretrain-L.pth" in line
    assert "--trainer cpu --init-format auto" in dry_run("DATA=demo")  # no --init: the newest stage-1 export
    assert "--trainer gpu" in dry_run("DATA=chexpert_plus", "TRAINER=gpu", "PRETRAIN=x.pth")


def test_the_chain_hands_each_step_the_previous_ones_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []
    best = tmp_path / "run2" / "checkpoints" / "best.ckpt"

    def fake_cli(argv: list[str]) -> Any:
        calls.append(argv)
        run_dir = tmp_path / f"run{len(calls)}"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / pl.EXPORT_NAME).touch()
        if len(calls) == 2:
            best.parent.mkdir(parents=True)
            best.touch()
        callback = SimpleNamespace(
            last_model_path="", monitor=pl.PREDICT_MONITOR, best_model_path=str(best), best_model_score=0.5
        )
        return SimpleNamespace(trainer=SimpleNamespace(log_dir=str(run_dir), checkpoint_callback=callback))

    scored: list[tuple[Any, ...]] = []
    monkeypatch.setattr(pl, "_run_cli", fake_cli)
    monkeypatch.setattr(pl, "evaluate", lambda *a, **kw: scored.append((a, kw)) or {"BLEU_4": 1})
    pretraining = tmp_path / "Pretrain-L.pth"
    pretraining.touch()
    done = pl.run_paper(
        Pipeline(data="iu_xray", trainer="ddp8", configs=CONFIGS, out=tmp_path),
        pretraining,
        "arm-pretrain",
        args={"stage3": ["--x=1"]},
    )
    assert [argv[0] for argv in calls] == ["fit", "fit", "predict"]
    assert str(CONFIGS / "paper" / "iu_xray" / "stage2_contrastive.yaml") in _configs(calls[0])
    assert str(CONFIGS / "paper" / "iu_xray" / "stage3_reportgen.yaml") in _configs(calls[1])
    assert _handoff(calls[0]) == [str(pretraining)]
    given_format = {"model": {"init_args": {"handoff": {"format": "arm-pretrain"}}}}
    assert given_format in map(json.loads, _configs(calls[0])[4:])
    assert _handoff(calls[1]) == [str(tmp_path / "run1" / pl.EXPORT_NAME)]  # stage 2's export
    assert calls[1][-1] == "--x=1" and "arm-pretrain" not in " ".join(calls[1])
    assert calls[2][-1] == f"--ckpt_path={best}" and done.checkpoint.path == best
    assert done.predictions == tmp_path / "run3" / "predictions.jsonl" and done.metrics == {"BLEU_4": 1}
    assert scored[0][0] == (done.predictions, "iu_xray")


# End to end on the tiny world -------------------------------------------------------------------------------
@pytest.mark.slow  # about 40 s on 2 CPU cores
def test_the_demo_recipe_end_to_end_on_the_tiny_world(world: Path, tmp_path: Path) -> None:
    """Stage 2 from an ARM-pretraining-format file (detected) → stage 3 → predict → metrics, with the
    demo recipe's accumulated micro-batches (here 8 = 2 x 4) and per-device negatives."""
    from mambaxray_ctl.backbone import create_backbone

    pretraining = tmp_path / "checkpoint-100.pth"  # the official ARM pretraining file's layout
    torch.save({"model": create_backbone("test_arm_tiny_pretrain").state_dict()}, pretraining)
    pipeline = tiny_world_pipeline(world, tmp_path)
    micro = "--data.init_args.micro_batch_size=4"
    validated = [
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.check_val_every_n_epoch=1",
    ]
    done = pl.run_paper(
        pipeline,
        pretraining,
        args={
            "stage2": _tiny_args(world, tmp_path, "stage2", micro, "--trainer.max_steps=1"),
            "stage3": _tiny_args(world, tmp_path, "stage3", micro, *validated),
            "predict": _tiny_args(world, tmp_path, "stage3", micro),
        },
    )
    stage2_meta = json.loads(done.stage2.export.with_suffix(".json").read_text())
    assert stage2_meta["init_from"] == str(pretraining)
    stage3_meta = json.loads(done.stage3.export.with_suffix(".json").read_text())
    assert stage3_meta["init_sha256"] == stage2_meta["sha256"]
    assert done.checkpoint.path == done.stage3.best
    hparams = yaml.safe_load((done.stage3.run_dir / "config.yaml").read_text())
    assert hparams["model"]["init_args"]["ctl_ft"]["gather"] is False
    assert hparams["data"]["init_args"]["micro_batch_size"] == 4
    assert done.metrics is not None and "BLEU_4" in done.metrics
    assert done.predictions.is_file() and (done.predictions.parent / "metrics.json").is_file()
