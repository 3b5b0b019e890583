"""Multi-process DDP through the real Trainer, the real config files and the CLI.

Each run is ``python -m mambaxray_ctl fit|predict`` in a subprocess with ``configs/trainer/ddp.yaml``,
its accelerator and precision overridden for the CPU: 2 processes on gloo, the code path NCCL takes on
GPUs. Stages 2 and 3 must end with the weights of a 1-process run on the same global batch (every
trainable parameter, the learnable logit scale included, and the gradients of the first step), with
dropout and drop-path off. Stage 3's L_SFT is a per-rank token mean: the test truncates every report to
``max_target_tokens`` so that all ranks hold the same number of target tokens (a per-rank mean then
equals the global one). ``tests/ddp_probe.py`` records what each rank saw.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from mambaxray_ctl.demo.ablation import read_row
from mambaxray_ctl.lightning_cli import MambaXrayCLI
from mambaxray_ctl.stages import SimCLRModule
from test_data_helpers import write_truncated_png
from test_stage1_alternatives import SIMCLR_TINY
from test_stage_losses import free_port
from test_stages_cli import CONFIGS, STAGE_CONFIGS, cli_args

ROOT = Path(__file__).resolve().parents[1]
DDP = [
    "-c",
    str(CONFIGS / "trainer" / "ddp.yaml"),
    "--trainer.accelerator=cpu",
    "--trainer.devices=2",
    "--trainer.precision=32-true",
    "--model.init_args.backbone.ssm_impl=null",
]
NO_DROP_PATH = "--model.init_args.backbone.overrides={depth: 4, drop_path_rate: 0.0}"
LAUNCHER_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV and not k.startswith("TORCHELASTIC")}
    env.update(PYTHONPATH=str(ROOT / "tests"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    return env


def run_command(command: list[str], timeout: float = 400, **env: str) -> subprocess.CompletedProcess:
    """Run ``command`` from the repository root; fail with the end of its output."""
    done = subprocess.run(command, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command[:6]} exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done


def run_mambaxray(args: list[str], timeout: float = 400, **env: str) -> subprocess.CompletedProcess:
    return run_command([sys.executable, "-m", "mambaxray_ctl", *args], timeout, **env)


def probe(out_dir: Path) -> list[str]:
    return ["--trainer.callbacks+=ddp_probe.Probe", f"--trainer.callbacks.init_args.out_dir={out_dir}"]


def only(paths: list[Path]) -> Path:
    assert len(paths) == 1, paths
    return paths[0]


def trainable_state(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(only(list(run_dir.rglob("last.ckpt"))), weights_only=False)
    return checkpoint["state_dict"]


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=2e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def encoder_without_dropout(world: Path, out: Path) -> Path:
    """A copy of the world's text encoder with dropout off (runs must be deterministic to compare)."""
    shutil.copytree(world / "text" / "text_encoder", out)
    config = json.loads((out / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (out / "config.json").write_text(json.dumps(config))
    return out


def fit_once_and_on_two_ranks(world: Path, tmp_path: Path, stage: str, extra: list[str]) -> dict[str, Any]:
    """Fit ``stage`` in 1 process and in 2; return the run folders and the probes' records."""
    runs: dict[str, Any] = {}
    for name, launch in (("single", []), ("ddp", DDP)):
        out = tmp_path / name
        run_mambaxray(cli_args(world, out, stage, "fit", *extra, *probe(out / "probe"), *launch))
        runs[name] = out
        runs[f"{name}_probe"] = [torch.load(p) for p in sorted((out / "probe").glob("rank*.pt"))]
    return runs


def check_equal_to_single_process(runs: dict[str, Any]) -> None:
    single, (rank0, rank1) = runs["single_probe"][0], runs["ddp_probe"]
    assert rank1["seed"] == rank0["seed"] + 1  # each rank draws its own randomness ...
    assert_same_tensors(rank1["initial_weights"], rank0["initial_weights"])  # ... from the same weights
    assert_same_tensors(rank0["gradients"], single["gradients"])  # DDP's average = 1-process gradient
    assert_same_tensors(trainable_state(runs["ddp"]), trainable_state(runs["single"]))
    only(list(runs["ddp"].rglob("backbone.safetensors")))
    checkpoint = torch.load(only(list(runs["ddp"].rglob("last.ckpt"))), weights_only=False)
    torch_states = [states["torch"] for states in checkpoint["rng_states_per_rank"]]
    assert len(torch_states) == 2 and not torch.equal(*torch_states)


def test_stage2_on_two_processes_equals_one_process(world: Path, tmp_path: Path) -> None:
    encoder = encoder_without_dropout(world, tmp_path / "encoder")
    extra = [f"--model.init_args.text_encoder={encoder}", NO_DROP_PATH, "--trainer.max_steps=2"]
    runs = fit_once_and_on_two_ranks(world, tmp_path, "stage2", extra)
    assert "logit_scale.log_scale" in runs["single_probe"][0]["gradients"]
    check_equal_to_single_process(runs)


def test_stage3_on_two_processes_equals_one_process_then_predicts(world: Path, tmp_path: Path) -> None:
    max_tokens = 8
    tokenizer = AutoTokenizer.from_pretrained(world / "text" / "lm")
    annotation = json.loads((world / "annotation.json").read_text())
    assert min(len(tokenizer(e["report"])["input_ids"]) for e in annotation["train"]) >= max_tokens
    extra = [
        NO_DROP_PATH,
        f"--model.init_args.lm.max_target_tokens={max_tokens}",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
    ]
    runs = fit_once_and_on_two_ranks(world, tmp_path, "stage3", extra)
    assert "text_proj.weight" in runs["single_probe"][0]["gradients"]
    check_equal_to_single_process(runs)

    exports = {name: only(list(runs[name].rglob("model.safetensors"))) for name in ("single", "ddp")}
    assert_same_tensors(load_file(exports["ddp"]), load_file(exports["single"]))  # written once, complete

    predicted = {}
    for source in (only(list(runs["ddp"].rglob("last.ckpt"))), exports["ddp"]):
        out = tmp_path / f"predict_{source.suffix[1:]}"
        run_mambaxray(cli_args(world, out, "stage3", "predict", "--ckpt_path", str(source), *DDP))
        lines = only(list(out.rglob("predictions.jsonl"))).read_text().splitlines()
        predicted[source.suffix] = {row["id"]: row["generated"] for row in map(json.loads, lines)}
    assert sorted(predicted[".ckpt"]) == sorted(entry["id"] for entry in annotation["test"])
    assert predicted[".safetensors"] == predicted[".ckpt"]  # the model export predicts as its checkpoint


def test_stage3_without_ctl_ft_on_two_processes_validates_with_its_pictures(
    world: Path, tmp_path: Path
) -> None:
    """Table II rows without CTL-FT: ``text_proj`` gets no gradient, so it must not be trainable. One
    validation runs, with rank 0's sample reports, thumbnails and heat maps (the other rank waits)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    extra = [
        "--model.init_args.ctl_ft.weight=0",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1",
        "--trainer.check_val_every_n_epoch=1",
    ]
    run_mambaxray(cli_args(world, tmp_path, "stage3", "fit", *extra, *DDP))
    only(list(tmp_path.rglob("backbone.safetensors")))
    events = EventAccumulator(
        str(only(list(tmp_path.rglob("events.out.tfevents.*")))), size_guidance={"images": 0}
    )
    images = events.Reload().Tags()["images"]
    assert any(tag.startswith("val/images/") for tag in images)
    assert any(tag.startswith("val/heat_maps/") for tag in images)


def _world_with_bad_image_on_rank1(world: Path, out: Path) -> tuple[Path, str]:
    """A copy of ``world`` whose study served to rank 1 in the second step of epoch 0 (batch 4 per rank,
    the DataModule's sampler seed 42, stage 2's drop_last) has a truncated image: the header check at
    setup passes, decoding fails mid-epoch on rank 1 only."""
    shutil.copytree(world, out, ignore=shutil.ignore_patterns("text"))
    annotation = json.loads((out / "annotation.json").read_text())
    order = torch.randperm(len(annotation["train"]), generator=torch.Generator().manual_seed(42)).tolist()
    entry = annotation["train"][order[1::2][4]]
    write_truncated_png(out / "images" / entry["image_path"][0])
    return out, entry["id"]


def test_bad_image_on_one_rank_mid_epoch_is_replaced_counted_and_listed(world: Path, tmp_path: Path) -> None:
    bad_world, bad_id = _world_with_bad_image_on_rank1(world, tmp_path / "world")
    args = cli_args(world, tmp_path / "run", "stage2", "fit", "--trainer.max_steps=2", *DDP)
    args += [
        f"--data.init_args.annotation={bad_world / 'annotation.json'}",
        f"--data.init_args.image_root={bad_world / 'images'}",
        f"--model.init_args.text_encoder={world / 'text' / 'text_encoder'}",
        "--data.init_args.on_invalid=skip",
    ]
    done = run_mambaxray(args, timeout=300)
    skipped = only(list((tmp_path / "run").rglob("skipped.jsonl")))
    rows = [json.loads(line) for line in skipped.read_text().splitlines()]
    assert [(row["id"], row["kind"]) for row in rows] == [(bad_id, "undecodable_image")]
    assert f"rank 1: skipped at load time (replaced by another sample): [train] id={bad_id}" in done.stderr
    assert "samples skipped at load time: undecodable_image=1" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stage1", "stage1_mae", "stage1_simclr"])
def test_stage1_on_two_processes_exports_once(stage: str, world: Path, tmp_path: Path) -> None:
    run_mambaxray(cli_args(world, tmp_path, stage, "fit", "--trainer.max_steps=2", *DDP))
    only(list(tmp_path.rglob("backbone.safetensors")))


@pytest.mark.slow  # about 2 min on 2 CPU cores
def test_the_paper_recipe_runs_its_three_fits_in_one_command_on_two_ranks(
    world: Path, tmp_path: Path
) -> None:
    """``make paper`` under DDP: stage 2, stage 3 and predict are three Trainers in one process; Lightning
    starts rank 1 once, and both ranks must agree on every run, hand-off and checkpoint."""
    from mambaxray_ctl.backbone import create_backbone

    pretraining = tmp_path / "checkpoint-100.pth"  # the official ARM pretraining file's layout
    torch.save({"model": create_backbone("test_arm_tiny_pretrain").state_dict()}, pretraining)
    out = tmp_path / "runs"
    out.mkdir()
    driver = ROOT / "tests" / "ddp_paper.py"
    run_command([sys.executable, str(driver), str(world), str(out), str(pretraining)])
    rank0, rank1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0.pop("scored") is True and rank1.pop("scored") is False  # only rank 0 scores
    assert rank0 == rank1
    for stage in ("stage2", "stage3"):  # one run each: rank 1 trained in rank 0's runs
        assert len(list(out.glob(f"{stage}/*/checkpoints"))) == 1
    stage2_meta = json.loads(Path(rank0["stage2_export"]).with_suffix(".json").read_text())
    stage3_meta = json.loads((Path(rank0["stage3"]) / "backbone.json").read_text())
    assert stage2_meta["init_from"] == str(pretraining)
    assert stage3_meta["init_sha256"] == stage2_meta["sha256"]
    predictions = Path(rank0["predictions"])
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    test_ids = {study["id"] for study in json.loads((world / "annotation.json").read_text())["test"]}
    assert {row["id"] for row in rows} == test_ids and len(rows) == len(test_ids)  # sampler padding removed
    assert "BLEU_4" in json.loads((predictions.parent / "metrics.json").read_text())


@pytest.mark.parametrize("stage", ["stage2", "stage3"])
def test_two_nodes_with_torchrun_equal_one_node_with_two_processes(
    stage: str, world: Path, tmp_path: Path
) -> None:
    """2 nodes × 1 process on localhost (``torchrun --nnodes 2 --node_rank {0,1}``) end with the weights
    of 1 node × 2 processes."""
    extra = [NO_DROP_PATH, "--trainer.max_steps=2", "--trainer.limit_val_batches=0"]
    if stage == "stage2":
        extra.append(f"--model.init_args.text_encoder={encoder_without_dropout(world, tmp_path / 'enc')}")
    else:
        extra.append("--model.init_args.lm.max_target_tokens=8")
    run_mambaxray(cli_args(world, tmp_path / "one_node", stage, "fit", *extra, *DDP))

    port = free_port()
    nodes_args = cli_args(world, tmp_path / "two_nodes", stage, "fit", *extra, *DDP)
    nodes_args += ["--trainer.devices=1", "--trainer.num_nodes=2"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1"]
    launch += ["--master-addr=127.0.0.1", f"--master-port={port}"]
    nodes = [
        subprocess.Popen(
            [*launch, f"--node-rank={rank}", "-m", "mambaxray_ctl", *nodes_args],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    errors = [node.communicate(timeout=400)[1] for node in nodes]
    for node, error in zip(nodes, errors, strict=True):
        assert node.returncode == 0, error[-4000:]
    assert_same_tensors(trainable_state(tmp_path / "two_nodes"), trainable_state(tmp_path / "one_node"))
    only(list((tmp_path / "two_nodes").rglob("backbone.safetensors")))


def _ablation_stage_runs() -> list[tuple[str, tuple[str, ...]]]:
    """Every (stage config, extra arguments) that a Table II row in configs/ablation/ trains (its
    overrides, each given as a config in a JSON string, as the pipeline gives them)."""
    runs = set()
    for path in sorted((CONFIGS / "ablation").glob("[0-9]*.yaml")):
        row = read_row(path)
        for stage in row.stages:
            configs = row.stage_overrides(stage.name)
            runs.add((stage.config, tuple(arg for c in configs for arg in ("-c", json.dumps(c)))))
    return sorted(runs)


@pytest.mark.parametrize(
    ("config", "extra"), _ablation_stage_runs(), ids=lambda value: " ".join(value) if value else None
)
def test_every_trainable_parameter_gets_a_gradient(
    config: str, extra: tuple[str, ...], world: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DDP (find_unused_parameters=False) stops at the second step on a trainable parameter that gets
    no gradient: none may exist in any stage of any ablation row."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    stage = {name: key for key, name in STAGE_CONFIGS.items()}[config]
    cli = MambaXrayCLI(args=cli_args(world, world / "unused", stage, "fit", *extra)[1:], run=False)
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    cli.model.training_step(batch, 0).backward()
    trainable = [name for name, p in cli.model.named_parameters() if p.requires_grad]
    assert trainable
    assert [name for name, p in cli.model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_each_rank_resumes_its_own_rng_states(caplog: pytest.LogCaptureFixture) -> None:
    module = SimCLRModule(**SIMCLR_TINY)
    per_rank, draws = [], []
    for rank in (0, 1):  # what on_save_checkpoint gathers from two ranks
        torch.manual_seed(100 + rank)
        checkpoint: dict[str, Any] = {}
        module.on_save_checkpoint(checkpoint)
        per_rank += checkpoint["rng_states_per_rank"]
        draws.append(torch.rand(3))
    module._trainer = SimpleNamespace(world_size=2, global_rank=1)
    module.on_load_checkpoint({"rng_states_per_rank": per_rank})
    torch.testing.assert_close(torch.rand(3), draws[1])

    module._trainer = SimpleNamespace(world_size=3, global_rank=1)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    module.on_load_checkpoint({"rng_states_per_rank": per_rank})
    torch.testing.assert_close(torch.rand(3), expected)  # untouched, with a warning
    assert "holds the RNG states of 2 rank(s), this run has 3" in caplog.text
