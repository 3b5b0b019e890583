"""Stage 3's portable model export (``model.safetensors``) and its ``MODEL_CARD.md``, and the package
version and git commit that every checkpoint and export records (``stages/export.py``,
``provenance.py``), on a tiny stage-3 run trained on the tiny world through the real configs."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import mambaxray_ctl
from mambaxray_ctl import provenance
from mambaxray_ctl.backbone import create_backbone, save_backbone, state_dict_sha256
from mambaxray_ctl.cli import main
from mambaxray_ctl.pipeline import evaluate, record_in_model_card
from mambaxray_ctl.stages import sharding
from mambaxray_ctl.stages.export import (
    METRICS_END,
    METRICS_START,
    MODEL_CARD_NAME,
    MODEL_EXPORT_NAME,
    MODEL_FORMAT,
    ModelExportError,
    ModelExportIO,
    accept_model_exports,
    model_card,
    model_metadata,
    read_model_export,
    scored_file,
)
from mambaxray_ctl.stages.reportgen import ReportGenModule
from mambaxray_ctl.stages.sharding import StageDeepSpeedStrategy, StageFSDPStrategy
from mambaxray_ctl.text.llm import DEFAULT_PROMPT, DEFAULT_TEMPLATE
from test_sharding import reportgen, wrap_as_the_strategy_does
from test_stage_losses import free_port
from test_stages_cli import cli_args, run_cli

REPO = Path(__file__).resolve().parents[1]
CARD_SECTIONS = [
    "Files",
    "Model",
    "Training data and split",
    "Metrics (test split)",
    "Intended use",
    "Limitations",
    "How to load",
]


@dataclass
class Run:
    run_dir: Path
    ckpt: Path
    module: ReportGenModule

    @property
    def export(self) -> Path:
        return self.run_dir / MODEL_EXPORT_NAME


@pytest.fixture(scope="module")
def run(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("stage3")
    with pytest.MonkeyPatch.context() as monkeypatch:
        cli = run_cli(cli_args(world, out, "stage3", "fit", "--trainer.max_steps=2"), monkeypatch)
    return Run(Path(cli.trainer.log_dir), Path(cli.trainer.checkpoint_callback.last_model_path), cli.model)


@pytest.fixture(scope="module")
def study(world: Path) -> list[Path]:
    folder = sorted(p for p in (world / "images").iterdir() if p.is_dir())[0]
    return [folder / "0.png", folder / "1.png"]


def _predict(world: Path, out: Path, ckpt: Path) -> Path:
    with pytest.MonkeyPatch.context() as monkeypatch:
        cli = run_cli(cli_args(world, out, "stage3", "predict", f"--ckpt_path={ckpt}"), monkeypatch)
    return Path(cli.trainer.log_dir) / "predictions.jsonl"


@pytest.fixture(scope="module")
def predictions(run: Run, world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """predictions.jsonl of the test split, from the run's last.ckpt and from its model export."""
    out = tmp_path_factory.mktemp("predict")
    return {"ckpt": _predict(world, out, run.ckpt), "export": _predict(world, out, run.export)}


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def _head_commit() -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()


def _git(folder: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open()]


# The export -------------------------------------------------------------------------------------------------
def test_the_export_holds_exactly_the_trained_tensors_in_float32(run: Run) -> None:
    export = load_file(str(run.export))
    checkpoint = torch.load(run.ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert set(export) == set(checkpoint)  # what a checkpoint holds: all but the frozen LM
    assert {key.split(".", 1)[0] for key in export} == {"backbone", "mapper", "text_proj"}
    lm = {f"llm.{key}" for key in run.module.llm.state_dict()}  # the tied lm_head.weight too
    assert "llm.model.lm_head.weight" in lm and not lm & set(export)
    trainable = {name for name, p in run.module.named_parameters() if p.requires_grad}
    assert trainable <= set(export)
    assert all(value.dtype == torch.float32 for value in export.values())
    for key, value in export.items():  # the weights at the end of training, as in last.ckpt
        torch.testing.assert_close(value, checkpoint[key].float(), rtol=0, atol=0, msg=key)
    # the backbone part is the backbone export's
    backbone = load_file(str(run.run_dir / "backbone.safetensors"))
    assert {f"backbone.{key}" for key in backbone} == {k for k in export if k.startswith("backbone.")}


def test_trainable_lm_parameters_such_as_lora_adapters_are_exported(run: Run) -> None:
    name, parameter = next(iter(run.module.llm.named_parameters()))
    assert f"llm.{name}" not in run.module.export_state()
    parameter.requires_grad_(True)  # what a LoRA adapter is: a trainable parameter inside the LM
    try:
        state = run.module.export_state()
    finally:
        parameter.requires_grad_(False)
    assert state[f"llm.{name}"].dtype == torch.float32
    torch.testing.assert_close(state[f"llm.{name}"], parameter.detach().float())


@pytest.fixture
def process_group() -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _without_the_lm(module: ReportGenModule) -> dict[str, torch.Tensor]:
    frozen = module._frozen_llm_keys()
    return {key: value.float() for key, value in module.state_dict().items() if key not in frozen}


def test_under_fsdp_the_export_state_is_gathered_whole_without_the_lm(
    world: Path, process_group: None
) -> None:
    module = reportgen(world)  # a bfloat16 LM beside float32 trainables
    expected = _without_the_lm(module)
    strategy = StageFSDPStrategy(parallel_devices=[torch.device("cpu")])
    strategy.model = wrap_as_the_strategy_does(module)
    module.trainer = SimpleNamespace(strategy=strategy)
    state = module.export_state()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert state[key].dtype == torch.float32 and torch.equal(state[key], value), key


def test_under_deepspeed_the_export_takes_the_float32_master_weights(
    world: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = reportgen(world)
    expected = _without_the_lm(module)
    masters = {"mapper.0.weight": torch.full_like(module.mapper[0].weight, 0.5)}
    asked: list[set[str]] = []

    def zero_masters(_: ReportGenModule, names: set[str]) -> dict[str, torch.Tensor]:
        asked.append(set(names))
        return masters

    monkeypatch.setattr(sharding, "zero_masters", zero_masters)  # deepspeed is not installed here
    module.trainer = SimpleNamespace(strategy=DeepSpeedStrategy.__new__(DeepSpeedStrategy))
    state = module.export_state()
    assert state.keys() == expected.keys()
    assert asked == [set(expected)]  # the masters of the exported parameters only, never the frozen LM
    assert torch.equal(state["mapper.0.weight"], masters["mapper.0.weight"])
    assert torch.equal(state["backbone.pos_embed"], expected["backbone.pos_embed"])


def test_the_export_metadata_rebuilds_the_module(run: Run, world: Path) -> None:
    metadata = _metadata(run.export)
    assert metadata["format"] == MODEL_FORMAT and metadata["stage"] == "stage3-reportgen"
    assert metadata["class_path"] == "mambaxray_ctl.stages.reportgen.ReportGenModule"
    assert metadata["lm_name"] == str(world / "text" / "lm") and metadata["lm_dtype"] == "float32"
    assert metadata["prompt"] == DEFAULT_PROMPT and metadata["template"] == DEFAULT_TEMPLATE
    assert json.loads(metadata["lora"]) is None
    decoding = json.loads(metadata["decoding"])
    assert decoding == asdict(run.module.decoding) and decoding["num_beams"] == 2
    hparams = json.loads(metadata["hyper_parameters"])
    assert hparams["backbone"]["preset"] == "test_arm_tiny" and hparams["backbone"]["overrides"] == {
        "depth": 4
    }
    assert hparams["lm"]["max_target_tokens"] == 24
    assert json.loads(metadata["datamodule_hyper_parameters"])["image_size"] == 64
    assert metadata["global_step"] == "2"
    assert metadata["sha256"] == state_dict_sha256(load_file(str(run.export)))
    assert metadata["package_version"] == mambaxray_ctl.__version__


# Version and commit -----------------------------------------------------------------------------------------
def test_checkpoints_and_exports_record_the_version_and_commit(run: Run) -> None:
    head = _head_commit()
    checkpoint = torch.load(run.ckpt, map_location="cpu", weights_only=True)
    sidecar = json.loads((run.run_dir / "backbone.json").read_text())
    records = {
        "checkpoint": checkpoint["provenance"],
        "model export": _metadata(run.export),
        "backbone export": _metadata(run.run_dir / "backbone.safetensors"),
        "backbone sidecar": sidecar,
    }
    for where, record in records.items():
        assert record["package_version"] == mambaxray_ctl.__version__, where
        assert record["git_commit"].removesuffix("-dirty") == head, where
    assert read_model_export(run.export)["provenance"] == checkpoint["provenance"]


def test_the_commit_is_the_checkouts_with_dirty_for_changed_tracked_files(tmp_path: Path) -> None:
    package = tmp_path / "repo" / "src" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    assert provenance.git_commit(package) is None  # not in a repository
    _git(tmp_path / "repo", "init", "-q")
    assert provenance.git_commit(package) is None  # in a repository, but not tracked there (a venv)
    _git(tmp_path / "repo", "add", "src")
    _git(tmp_path / "repo", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    head = subprocess.run(
        ["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert provenance.git_commit(package) == head
    (package / "new.py").write_text("")  # untracked files do not count
    assert provenance.git_commit(package) == head
    (package / "__init__.py").write_text("x = 1\n")
    assert provenance.git_commit(package) == f"{head}-dirty"


@pytest.fixture
def fresh_provenance() -> Iterator[None]:
    """The commit looked up anew, and forgotten after the test (the run's records need the real one)."""
    provenance.package_commit.cache_clear()
    yield
    provenance.package_commit.cache_clear()


def test_git_runs_once_per_process(run: Run, fresh_provenance: None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, ...]] = []
    real = provenance._git

    def counted(folder: Path, *args: str) -> str | None:
        calls.append(args)
        return real(folder, *args)

    monkeypatch.setattr(provenance, "_git", counted)
    found = provenance.provenance()
    assert len(calls) == 3  # tracked?, HEAD, dirty?
    for _ in range(3):
        run.module.on_save_checkpoint({"state_dict": {}})
    assert model_metadata(run.module, {})["git_commit"] == found["git_commit"]
    assert len(calls) == 3  # no more git: every checkpoint and export reuses the first answer
    provenance.provenance()["git_commit"] = "changed"  # each call returns its own dict
    assert provenance.provenance() == found


def test_outside_a_checkout_or_without_git_no_commit_is_recorded(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_provenance: None
) -> None:
    state = run.module.export_state()
    monkeypatch.setattr(provenance, "PACKAGE_DIR", tmp_path)  # the package installed outside a checkout
    assert provenance.provenance() == {"package_version": mambaxray_ctl.__version__}
    metadata = model_metadata(run.module, state)
    assert "git_commit" not in metadata and metadata["package_version"] == mambaxray_ctl.__version__
    checkpoint: dict = {"state_dict": {}}
    run.module.on_save_checkpoint(checkpoint)
    assert checkpoint["provenance"] == {"package_version": mambaxray_ctl.__version__}
    monkeypatch.undo()
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all: never an error
    provenance.package_commit.cache_clear()
    assert provenance.git_commit() is None
    assert "git_commit" not in provenance.provenance()


# The model card ---------------------------------------------------------------------------------------------
def test_the_card_describes_the_model_and_gets_the_test_metrics(
    run: Run, world: Path, predictions: dict[str, Path], tmp_path: Path
) -> None:
    card = run.run_dir / MODEL_CARD_NAME
    text = card.read_text()
    assert [line[3:] for line in text.splitlines() if line.startswith("## ")] == CARD_SECTIONS
    annotation = json.loads((world / "annotation.json").read_text())
    sizes = ", ".join(f"{split} {len(annotation[split])}" for split in ("train", "val", "test"))
    assert f"Studies per split, as loaded after validation: {sizes}." in text
    assert str(world / "annotation.json") in text and "Synthetic data" in text
    assert "**Not for clinical decisions**" in text and "Research" in text
    assert f"mambaxray-ctl generate --ckpt {run.export} frontal.png lateral.png" in text
    assert f"make predict DATA=demo CKPT={run.export}" in text
    assert _metadata(run.export)["sha256"] in text and "Not evaluated yet" in text
    assert "holds the weights at the end of training" in text and "chose the checkpoint" not in text

    metrics = evaluate(predictions["export"], "demo", out=tmp_path / "metrics.json")
    updated = card.read_text()
    assert "Not evaluated yet" not in updated and f"{metrics['BLEU_4']:.3f}" in updated
    assert str(predictions["export"]) in updated and str(tmp_path / "metrics.json") in updated
    assert f"**Scored: this card's `{MODEL_EXPORT_NAME}` (`{run.export}`" in updated
    assert updated.replace(updated[updated.index(METRICS_START) :], "") == text[: text.index(METRICS_START)]
    evaluate(predictions["ckpt"], "demo")  # the run's checkpoint finds the same card: rewritten, not added
    again = card.read_text()
    assert again.count(METRICS_START) == 1 and str(predictions["ckpt"]) in again
    assert str(predictions["export"]) not in again
    assert f"**Scored: the checkpoint `{run.ckpt}`, **not** this card's `{MODEL_EXPORT_NAME}`" in again


def test_the_card_names_an_export_other_than_its_own_as_such(tmp_path: Path) -> None:
    card = tmp_path / "run" / MODEL_CARD_NAME
    card.parent.mkdir()
    tensors = {"w": torch.zeros(1)}
    save_file(tensors, str(card.parent / MODEL_EXPORT_NAME), metadata={"sha256": "aaa"})
    other = tmp_path / "copy" / MODEL_EXPORT_NAME
    other.parent.mkdir()
    save_file(tensors, str(other), metadata={"sha256": "bbb"})
    assert scored_file(card, other).startswith(f"the model export `{other}`, **not** this card's")
    assert "sha256 `bbb`, this card's `aaa`" in scored_file(card, other)
    assert scored_file(card, card.parent / MODEL_EXPORT_NAME).startswith("this card's")


def test_the_card_gets_the_labellers_micro_and_subset_rows(tmp_path: Path) -> None:
    card = tmp_path / MODEL_CARD_NAME
    card.write_text(f"# card\n{METRICS_START}\nNot evaluated yet.\n{METRICS_END}\n")
    averages = {"micro": 0.125, "macro": 0.375}
    scores = {
        f"{group}_{kind}_{average}": value
        for group in ("CE", "CE5")
        for kind in ("precision", "recall", "F1")
        for average, value in averages.items()
    }
    metrics = {
        "checkpoint": str(tmp_path / "checkpoints" / "last.ckpt"),
        "predictions": str(tmp_path / "predictions.jsonl"),
        "num_studies": 3,
        "reference_source": "cleaned",
        "dataset": "demo",
        "labeler": "chexbert",
        "clinical_subsets": {"5": ["Atelectasis", "Edema"]},
        "CE_F1/Atelectasis": 0.5,
        "CE_F1/Edema": 0.5,
        **scores,
    }
    assert record_in_model_card(metrics) == card
    text = card.read_text()
    assert "2 findings, micro" in text and "0.125" in text  # micro: not in the macro table
    assert "CE5_* in metrics.json: Atelectasis, Edema" in text and "0.375" in text


def test_a_card_for_an_unnamed_dataset_offers_no_make_target(run: Run) -> None:
    metadata = _metadata(run.export)
    text = model_card(run.export, metadata, {"dataset": "custom"}, load_file(str(run.export)))
    assert "make predict" not in text and "DATA=custom" not in text
    assert f"mambaxray-ctl predict -c {run.run_dir / 'config.yaml'} --ckpt_path {run.export}" in text


# Loading the export -----------------------------------------------------------------------------------------
def test_generate_from_the_export_writes_the_checkpoints_report(
    run: Run, study: list[Path], capsys: pytest.CaptureFixture
) -> None:
    reports = []
    for ckpt in (run.ckpt, run.export):
        code = main(["generate", "--ckpt", str(ckpt), *map(str, study)])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        reports.append(captured.out)
    assert reports[0].strip() and reports[1] == reports[0]


def test_predict_from_the_export_writes_the_checkpoints_predictions(
    predictions: dict[str, Path], run: Run
) -> None:
    from_ckpt, from_export = _rows(predictions["ckpt"]), _rows(predictions["export"])
    assert {row["checkpoint"] for row in from_export} == {str(run.export)}
    assert [(r["id"], r["generated"]) for r in from_export] == [(r["id"], r["generated"]) for r in from_ckpt]


def test_a_backbone_export_given_as_a_model_export_is_named(
    run: Run, world: Path, study: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    stage2 = tmp_path / "stage2" / "backbone.safetensors"
    save_backbone(create_backbone("test_arm_tiny"), None, stage2, metadata={"stage": "stage2-contrastive"})
    code = main(["generate", "--ckpt", str(stage2), *map(str, study)])
    err = capsys.readouterr().err
    assert code == 1 and str(stage2) in err
    assert "not a Lightning checkpoint nor a stage-3 model export" in err
    assert "backbone export of a stage2-contrastive run" in err
    with pytest.raises(ModelExportError, match="backbone export of a stage2-contrastive run") as raised:
        _predict(world, tmp_path / "out", stage2)
    assert str(stage2) in str(raised.value)

    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"not safetensors")
    with pytest.raises(ModelExportError, match=f"cannot read {garbage}"):
        read_model_export(garbage)


def test_the_export_reader_keeps_lightnings_default_of_loading_onto_the_cpu() -> None:
    base = mock.create_autospec(TorchCheckpointIO, instance=True)
    reader = ModelExportIO(base)
    reader.load_checkpoint("last.ckpt", weights_only=True)  # as Strategy.load_checkpoint calls it
    base.load_checkpoint.assert_called_once_with("last.ckpt", weights_only=True)  # base's default holds
    reader.load_checkpoint("last.ckpt", map_location="cuda:1", weights_only=None)
    base.load_checkpoint.assert_called_with("last.ckpt", map_location="cuda:1", weights_only=None)


def test_an_export_is_refused_where_it_cannot_stand_for_a_checkpoint(
    run: Run, world: Path, tmp_path: Path
) -> None:
    refused = pytest.raises(ModelExportError, match="resuming fit needs the run's checkpoint")
    with refused as raised, pytest.MonkeyPatch.context() as monkeypatch:
        run_cli(cli_args(world, tmp_path, "stage3", "fit", f"--ckpt_path={run.export}"), monkeypatch)
    assert str(run.export) in str(raised.value)
    strategy = Trainer(accelerator="cpu", devices=1, logger=False).strategy
    accept_model_exports(strategy, "fit")
    accept_model_exports(strategy, "predict")  # the same trainer, predicting after fit: read, not refused
    assert strategy.checkpoint_io.load_checkpoint(run.export)["global_step"] == 2
    for sharded in (StageFSDPStrategy(), StageDeepSpeedStrategy.__new__(StageDeepSpeedStrategy)):
        with pytest.raises(ModelExportError, match="under FSDP and DeepSpeed, ckpt_path takes the run's"):
            sharded.load_checkpoint(run.export)


class Packed4bit(nn.Module):
    """What a bitsandbytes 4-bit layer saves: its packed uint8 weight and quantisation-state entries."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.arange(8, dtype=torch.uint8), requires_grad=False)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[f"{prefix}weight.absmax"] = torch.ones(2)
        destination[f"{prefix}weight.quant_state.bitsandbytes__nf4"] = torch.zeros(4, dtype=torch.uint8)


def test_the_frozen_lms_extra_state_entries_stay_out_of_checkpoints_and_exports(world: Path) -> None:
    module = reportgen(world)
    module.llm.add_module("packed", Packed4bit())
    module.trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    extra = {"llm.packed.weight.absmax", "llm.packed.weight.quant_state.bitsandbytes__nf4"}
    assert extra <= module._frozen_llm_keys() and "llm.packed.weight" in module._frozen_llm_keys()
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert not [key for key in checkpoint["state_dict"] if key.startswith("llm.")]
    module.on_load_checkpoint(checkpoint)  # and none of them is asked back on loading
    assert not [key for key in module.export_state() if key.startswith("llm.")]


def test_integer_entries_keep_their_dtype_in_the_export(world: Path) -> None:
    module = reportgen(world)
    module.mapper.register_buffer("steps", torch.tensor([3, 300]))
    module.trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    state = module.export_state()
    assert state["mapper.steps"].dtype == torch.int64 and state["mapper.steps"].tolist() == [3, 300]
    assert state["mapper.0.weight"].dtype == torch.float32


@pytest.mark.parametrize("rank", [0, 1])
def test_every_rank_gathers_once_before_rank_0_writes_both_exports(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rank: int
) -> None:
    """A collective after rank 0's writing would leave the other ranks waiting when a write fails."""
    module = reportgen(world)
    module.trainer = SimpleNamespace(fast_dev_run=False, is_global_zero=rank == 0, log_dir=str(tmp_path))
    gathered = {"backbone.pos_embed": torch.zeros(1), "mapper.0.weight": torch.ones(1)}
    events: list = []
    monkeypatch.setattr(module, "export_state", lambda: events.append("gather") or gathered)
    monkeypatch.setattr(module, "_export", lambda path, state: events.append(("backbone", path, [*state])))
    monkeypatch.setattr(module, "export_more", lambda folder, state: events.append(("model", folder, state)))
    module.on_train_end()
    written = [("backbone", tmp_path / "backbone.safetensors", ["pos_embed"]), ("model", tmp_path, gathered)]
    assert events == (["gather", *written] if rank == 0 else ["gather"])
