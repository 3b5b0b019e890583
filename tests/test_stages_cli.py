"""The three stages through the real config files and the LightningCLI, shrunk to tiny models.

The session fixture ``world`` (tests/conftest.py) builds a tiny synthetic world and tiny text models
(the demo's stand-ins for Bio_ClinicalBERT and Qwen), loaded back with ``from_pretrained`` from their
folders. Other test files reuse :func:`cli_args` and :func:`run_cli` from here.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mambaxray_ctl.backbone import CheckpointError
from mambaxray_ctl.evaluation.evaluate import evaluate_predictions
from mambaxray_ctl.lightning_cli import MambaXrayCLI
from mambaxray_ctl.metrics.report import truncate_references
from mambaxray_ctl.ops.cuda import mamba_ssm_problem

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGE_CONFIGS = {
    "stage1": "stage1_arm",
    "stage1_mae": "stage1_mae",
    "stage1_simclr": "stage1_simclr",
    "stage2": "stage2_contrastive",
    "stage3": "stage3_reportgen",
}
STAGE1_IMAGES = ["--data.init_args.image_size=96", "--data.init_args.batch_size=8"]
TINY = {
    "stage1": [
        "--model.init_args.backbone.preset=test_arm_tiny_pretrain",
        "--model.init_args.cluster_size=2",
        "--model.init_args.decoder_dim=16",
        "--model.init_args.decoder_heads=2",
        *STAGE1_IMAGES,
    ],
    "stage1_mae": [
        "--model.init_args.backbone.preset=test_arm_tiny_pretrain",
        "--model.init_args.decoder_dim=32",
        "--model.init_args.decoder_depth=2",
        "--model.init_args.decoder_heads=4",
        *STAGE1_IMAGES,
    ],
    "stage1_simclr": [
        "--model.init_args.backbone.preset=test_arm_tiny_pretrain",
        "--model.init_args.proj_hidden_dim=64",
        "--model.init_args.proj_dim=16",
        *STAGE1_IMAGES,
    ],
    "stage2": [
        "--model.init_args.backbone.preset=test_arm_tiny",
        "--model.init_args.backbone.overrides={depth: 4}",
        "--model.init_args.projection_dim=16",
        "--data.init_args.image_size=64",
        "--data.init_args.batch_size=8",
    ],
    "stage3": [
        "--model.init_args.backbone.preset=test_arm_tiny",
        "--model.init_args.backbone.overrides={depth: 4}",
        "--model.init_args.lm.dtype=float32",
        "--model.init_args.lm.max_target_tokens=24",
        "--model.init_args.decoding.num_beams=2",
        "--model.init_args.decoding.min_new_tokens=2",
        "--model.init_args.decoding.max_new_tokens=8",
        "--model.init_args.evaluation.labeler=demo",
        "--data.init_args.image_size=64",
        "--data.init_args.batch_size=8",
    ],
}


def cli_args(world: Path, out: Path, stage: str, command: str = "fit", *extra: str) -> list[str]:
    files = [CONFIGS / "data" / "demo.yaml", CONFIGS / f"{STAGE_CONFIGS[stage]}.yaml"]
    files.append(CONFIGS / "trainer" / "cpu.yaml")
    args = [command, *(arg for path in files for arg in ("-c", str(path)))]
    args += [
        f"--data.init_args.annotation={world / 'annotation.json'}",
        f"--data.init_args.image_root={world / 'images'}",
        f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *TINY[stage],
    ]
    if stage == "stage2":
        args.append(f"--model.init_args.text_encoder={world / 'text' / 'text_encoder'}")
    if stage == "stage3":
        args.append(f"--model.init_args.lm.name={world / 'text' / 'lm'}")
    return [*args, *extra]


def run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch) -> MambaXrayCLI:
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    return MambaXrayCLI(args=args)


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
def test_fast_dev_run_of_each_stage_from_the_config_files(
    stage: str, world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fast_dev_run swaps the logger for a dummy, so checkpoints go to default_root_dir (else the cwd)
    root = f"--trainer.default_root_dir={tmp_path}"
    args = cli_args(world, tmp_path, stage, "fit", "--trainer.fast_dev_run=1", root)
    cli = run_cli(args, monkeypatch)
    assert cli.trainer.state.finished
    losses = {k: v for k, v in cli.trainer.callback_metrics.items() if k.startswith("train/loss")}
    assert losses and all(torch.isfinite(v) for v in losses.values())


def _fit(world: Path, out: Path, stage: str, monkeypatch: pytest.MonkeyPatch, *extra: str) -> MambaXrayCLI:
    return run_cli(cli_args(world, out, stage, "fit", "--trainer.max_steps=2", *extra), monkeypatch)


@pytest.mark.slow
def test_chain_stage1_to_stage3_with_hand_off_and_predict(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage1 = _fit(world, tmp_path, "stage1", monkeypatch)
    export1 = Path(stage1.trainer.log_dir) / "backbone.safetensors"
    assert (Path(stage1.trainer.log_dir) / "config.yaml").is_file() and export1.is_file()

    stage2 = _fit(world, tmp_path, "stage2", monkeypatch, f"--model.init_args.handoff.source={export1}")
    report = stage2.model.init_report
    assert report is not None and report.source_format == "arm-pretrain"
    export2 = Path(stage2.trainer.log_dir) / "backbone.safetensors"

    stage3 = _fit(world, tmp_path, "stage3", monkeypatch, f"--model.init_args.handoff.source={export2}")
    # stage 3 started from exactly the stage-2 export: same tensors, same recorded hash
    recorded = json.loads(export2.with_suffix(".json").read_text())["sha256"]
    assert stage3.model.init_report.source_format == "backbone"
    assert stage3.model.init_report.sha256 == recorded
    assert set(load_file(str(export2))) == set(stage3.model.backbone.state_dict())

    ckpt = stage3.trainer.checkpoint_callback.last_model_path
    predict = run_cli(cli_args(world, tmp_path, "stage3", "predict", f"--ckpt_path={ckpt}"), monkeypatch)
    rows = [json.loads(line) for line in (Path(predict.trainer.log_dir) / "predictions.jsonl").open()]
    test_ids = {entry["id"] for entry in json.loads((world / "annotation.json").read_text())["test"]}
    assert {row["id"] for row in rows} == test_ids
    assert all(row["dataset"] == "demo" and row["checkpoint"] == ckpt for row in rows)
    assert rows[0]["decoding"]["num_beams"] == 2
    assert all(row["reference_source"] == "cleaned" for row in rows)

    # the official code's truncated references, in predict as in validate/test, recorded end to end
    truncated = run_cli(
        cli_args(
            world, tmp_path, "stage3", "predict", f"--ckpt_path={ckpt}",
            "--model.init_args.evaluation.reference_source=truncated",
        ),
        monkeypatch,
    )
    short = {}
    for line in (Path(truncated.trainer.log_dir) / "predictions.jsonl").open():
        row = json.loads(line)
        short[row["id"]] = row["reference"]
        assert row["reference_source"] == "truncated"
    full = {row["id"]: row["reference"] for row in rows}
    model = truncated.model
    expected = truncate_references(full, model.llm.tokenizer, model.lm_spec.max_target_tokens)
    assert short == expected and short != full
    metrics = evaluate_predictions(Path(truncated.trainer.log_dir) / "predictions.jsonl", "demo")
    assert metrics["reference_source"] == "truncated" and metrics["checkpoint"] == ckpt


def test_resumed_stage_ends_with_the_weights_of_an_uninterrupted_run(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # constant learning rate: the schedule's length depends on max_epochs, which differs between the halves
    common = [
        "--trainer.limit_val_batches=0",
        "--model.init_args.optimizer.warmup_steps=0",
        "--model.init_args.optimizer.min_lr_ratio=1.0",
    ]
    full = _run_epochs(world, tmp_path / "full", 2, monkeypatch, *common)
    first = _run_epochs(world, tmp_path / "split", 1, monkeypatch, *common)
    ckpt = first.trainer.checkpoint_callback.last_model_path
    assert ckpt, "the first half wrote no last.ckpt"
    resumed = _run_epochs(world, tmp_path / "split", 2, monkeypatch, *common, f"--ckpt_path={ckpt}")
    assert resumed.trainer.global_step == full.trainer.global_step
    for (name, a), (_, b) in zip(
        full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} differs after resume")


def _run_epochs(
    world: Path, out: Path, epochs: int, monkeypatch: pytest.MonkeyPatch, *extra: str
) -> MambaXrayCLI:
    args = cli_args(world, out, "stage2", "fit", f"--trainer.max_epochs={epochs}", *extra)
    return run_cli(args, monkeypatch)


def test_hand_off_from_a_mismatched_checkpoint_names_the_key(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = tmp_path / "wrong.safetensors"
    from mambaxray_ctl.backbone import create_backbone, save_backbone

    save_backbone(create_backbone("test_arm_tiny", embed_dim=48, depth=4), None, wrong)
    with pytest.raises(CheckpointError, match=r"shape mismatch for \S+"):
        _fit(world, tmp_path, "stage2", monkeypatch, f"--model.init_args.handoff.source={wrong}")


def test_print_config_of_each_stage(
    world: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    for stage in STAGE_CONFIGS:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(cli_args(world, tmp_path, stage, "fit", "--print_config"), monkeypatch)
        assert exit_info.value.code in (0, None)
        printed = capsys.readouterr().out
        assert "seed_everything: 42" in printed and "mambaxray_ctl.stages." in printed


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(world: Path) -> None:
    from mambaxray_ctl.stages import ReportGenModule

    batch = {
        "ids": ["a", "b"],
        "images": torch.randn(2, 2, 3, 64, 64),
        "view_mask": torch.ones(2, 2, dtype=torch.bool),
        "reports": ["the heart is enlarged .", "no pleural effusion ."],
    }
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = ReportGenModule(
            backbone={"preset": "test_arm_tiny"},
            lm={"name": str(world / "text" / "lm"), "max_target_tokens": 16},
            gradient_checkpointing=checkpointing,
        ).train()
        loss = module(batch).loss
        loss.backward()
        results.append((loss.detach(), module.mapper[0].weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_mapper_starts_on_the_scale_of_the_lm_token_embeddings(world: Path) -> None:
    from mambaxray_ctl.stages.reportgen import ReportGenModule

    def build(scale: float | str) -> ReportGenModule:
        lm = {"name": str(world / "text" / "lm")}
        return ReportGenModule(backbone={"preset": "test_arm_tiny"}, lm=lm, mapper_init_scale=scale)

    official = build(1.0)
    embeddings = official.llm.model.get_input_embeddings().weight
    assert torch.equal(official.mapper[1].weight, torch.ones(embeddings.shape[1]))  # the official LayerNorm
    module = build("embedding_rms")
    images = torch.randn(2, 2, 3, 64, 64)
    visual = module.encode_visual(images)
    token_rms, visual_rms = embeddings.pow(2).mean().sqrt(), visual.pow(2).mean().sqrt()
    torch.testing.assert_close(visual_rms, token_rms, rtol=0.05, atol=0.0)  # LayerNorm bias starts at 0
    for bad in (0.0, "largest"):
        with pytest.raises(ValueError, match="mapper_init_scale"):
            build(bad)


def test_stage3_validation_logs_samples_metrics_and_embeddings(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    extra = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1"]
    cli = run_cli(cli_args(world, tmp_path, "stage3", "fit", *extra), monkeypatch)
    run_dir = Path(cli.trainer.log_dir)
    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    scalars, tensors = set(events.Tags()["scalars"]), set(events.Tags()["tensors"])
    assert {"val/BLEU_4", "val/CIDEr", "val/score", "val/CE_F1_macro", "params/frozen"} <= scalars
    assert {"val/samples/text_summary", "config/text_summary"} <= tensors
    table = events.Tensors("val/samples/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert table.startswith("| id | generated | reference | BLEU-4 |") and table.count("\n") >= 2
    assert (run_dir / "projector_config.pbtxt").is_file()


@pytest.mark.parametrize("trainer", ["gpu.yaml", "ddp.yaml", "fsdp.yaml", "deepspeed.yaml"])
def test_gpu_trainer_configs_select_the_cuda_scan_and_stop_without_mamba_ssm(
    trainer: str, world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU configs never fall back to the reference scan (far too much memory at the paper's
    batches): without mamba-ssm's kernel the run stops before training, saying how to install it."""
    if mamba_ssm_problem() is None:
        pytest.skip("mamba-ssm's kernel works here")
    args = cli_args(world, tmp_path, "stage2", "fit", "-c", str(CONFIGS / "trainer" / trainer))
    args += ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true"]
    args += ["--trainer.strategy=auto"]
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    cli = MambaXrayCLI(args=args[1:], run=False)
    assert cli.model.backbone.config.ssm_impl == "cuda"
    with pytest.raises(ImportError, match="make setup-cuda"):
        run_cli(args, monkeypatch)


def test_a_failing_embedding_projector_is_logged_and_the_backbone_still_exported(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The projector is an optional view run on rank 0 while the other ranks wait in the export: its
    failure must not stop the run (nor leave them waiting)."""
    from mambaxray_ctl.stages import ContrastiveModule

    def broken_embed(self: ContrastiveModule, batch: dict) -> None:
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(ContrastiveModule, "embed", broken_embed)
    with caplog.at_level(logging.ERROR, logger="mambaxray_ctl"):
        cli = _fit(world, tmp_path, "stage2", monkeypatch, "--trainer.limit_val_batches=0")
    assert "EmbeddingProjector: writing the validation split's embeddings failed" in caplog.text
    assert "CUDA out of memory (simulated)" in caplog.text
    assert (Path(cli.trainer.log_dir) / "backbone.safetensors").is_file()
