"""What users wrote before the stage arguments were grouped still works: command lines, config files,
checkpoint hyper-parameters and moved class paths are upgraded, each with a FutureWarning; the typed
specs fill partial dicts from the stage's own defaults."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
import yaml

from mambaxray_ctl.compat import upgrade_argv, upgrade_class_path, upgrade_config, upgrade_model_args
from mambaxray_ctl.stages.specs import BackboneSpec, OptimizerSpec, as_spec, plain

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
M = "--model.init_args."

# Stage 3's hyper-parameters as checkpoints stored them before the groups (bb236c7's signature).
OLD_STAGE3 = {
    "backbone": "demo_arm",
    "backbone_overrides": {"depth": 4},
    "ssm_impl": None,
    "freeze_backbone": False,
    "gradient_checkpointing": False,
    "llm": "data/demo/text/lm",
    "llm_dtype": "float32",
    "lora": None,
    "prompt": "p",
    "template": "Human: <Img><ImageHere></Img> {prompt} \nAssistant:",
    "max_target_tokens": 64,
    "ctl_weight": 0.4,
    "ctl_temperature": 0.07,
    "ctl_include_padding": False,
    "ctl_gather": True,
    "mapper_init_scale": "embedding_rms",
    "num_beams": 3,
    "min_new_tokens": 8,
    "max_new_tokens": 72,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "do_sample": False,
    "temperature": 1.0,
    "no_repeat_ngram_size": 0,
    "reference_source": "cleaned",
    "labeler": "demo",
    "meteor": "auto",
    "init_from": "outputs/demo/stage2/version_0/backbone.safetensors",
    "init_format": "auto",
    "init_prefix": None,
    "export": True,
    "lr": 0.003,
    "weight_decay": 0.01,
    "betas": [0.9, 0.999],
    "warmup_steps": 0.05,
    "min_lr_ratio": 0.01,
}


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ([f"{M}init_from=a.safetensors"], [f"{M}handoff.source=a.safetensors"]),
        ([f"{M}init_from", "a.safetensors"], [f"{M}handoff.source", "a.safetensors"]),  # space-separated
        (["--model.lr=0.1"], [f"{M}optimizer.lr=0.1"]),  # jsonargparse's short form
        ([f"{M}backbone=arm_base_pz16"], [f"{M}backbone.preset=arm_base_pz16"]),
        ([f"{M}ctl_weight=0", f"{M}num_beams=2"], [f"{M}ctl_ft.weight=0", f"{M}decoding.num_beams=2"]),
        ([f"{M}llm=/m", f"{M}labeler=demo"], [f"{M}lm.name=/m", f"{M}evaluation.labeler=demo"]),
    ],
)
def test_old_argument_names_are_rewritten_with_a_warning(old: list[str], new: list[str]) -> None:
    with pytest.warns(FutureWarning, match="deprecated"):
        upgraded = upgrade_argv(["fit", *old, "--trainer.max_epochs=1"])
    assert upgraded == ["fit", *new, "--trainer.max_epochs=1"]


@pytest.mark.parametrize(
    "argv",
    [
        [f"{M}handoff.source=x", "--trainer.max_epochs=1", "--print_config"],
        [f"{M}backbone={{\"preset\": \"x\"}}"],  # a whole group is not a preset name
        [f"{M}temperature=0.2"],  # stage 2's and SimCLR's own argument
        ["-c", "{\"trainer\": {\"max_epochs\": 1}}"],  # a config string, not a file
    ],
)
def test_current_spellings_pass_unchanged_and_silently(argv: list[str]) -> None:
    with warnings_as_errors():
        assert upgrade_argv(argv) == argv


def test_a_group_field_set_to_null_is_passed_as_its_group() -> None:
    """jsonargparse would read ``--model.init_args.handoff.source=null`` as the text "None"."""
    expected = [f"{M}handoff={json.dumps({'source': None})}"]
    assert upgrade_argv([f"{M}handoff.source=null"]) == expected
    assert upgrade_argv([f"{M}handoff.source", "null"]) == [f"{M}handoff", json.dumps({"source": None})]
    with pytest.warns(FutureWarning):
        assert upgrade_argv([f"{M}init_from=null"]) == expected
    assert upgrade_argv([f"{M}backbone.ssm_impl=None"]) == [f"{M}backbone={json.dumps({'ssm_impl': None})}"]


def test_moved_class_paths_are_followed() -> None:
    old = "mambaxray_ctl.data.DemoDataModule"
    with pytest.warns(FutureWarning, match="moved"):
        assert upgrade_class_path(old) == "mambaxray_ctl.demo.datamodule.DemoDataModule"
    with pytest.warns(FutureWarning):
        assert upgrade_argv(["--data", old]) == ["--data", "mambaxray_ctl.demo.datamodule.DemoDataModule"]


def test_old_stage3_hyper_parameters_become_the_groups() -> None:
    with pytest.warns(FutureWarning, match="llm -> lm.name"):
        new = upgrade_model_args(OLD_STAGE3, report_generation=True)
    assert new["backbone"] == {"preset": "demo_arm", "overrides": {"depth": 4}, "ssm_impl": None}
    assert new["handoff"] == {"source": OLD_STAGE3["init_from"], "format": "auto", "prefix": None}
    assert new["optimizer"]["lr"] == 0.003 and new["optimizer"]["betas"] == [0.9, 0.999]
    assert new["lm"]["name"] == "data/demo/text/lm" and new["lm"]["max_target_tokens"] == 64
    assert new["ctl_ft"] == {"weight": 0.4, "temperature": 0.07, "include_padding": False, "gather": True}
    assert new["decoding"]["temperature"] == 1.0 and new["decoding"]["num_beams"] == 3
    assert new["evaluation"] == {"reference_source": "cleaned", "labeler": "demo", "meteor": "auto"}
    kept = {"freeze_backbone", "gradient_checkpointing", "mapper_init_scale", "export"}
    groups = {"backbone", "handoff", "optimizer", "lm", "ctl_ft", "decoding", "evaluation"}
    assert set(new) == kept | groups


def test_an_old_stage3_checkpoints_hyper_parameters_build_the_module(world: Path) -> None:
    from mambaxray_ctl.stages.reportgen import ReportGenModule

    old = {**OLD_STAGE3, "backbone": "test_arm_tiny", "llm": str(world / "text" / "lm"), "init_from": None}
    with pytest.warns(FutureWarning):
        module = ReportGenModule(**upgrade_model_args(old, report_generation=True))
    assert module.decoding.num_beams == 3 and module.ctl_ft.weight == 0.4
    assert module.hparams["lm"]["name"] == old["llm"]


def test_an_old_config_file_reads_as_the_new_one(tmp_path: Path) -> None:
    """A user's YAML with the flat names (and the old DataModule path) prints the same resolved config
    as the repository's grouped files."""
    from mambaxray_ctl.cli import main

    old = {
        "data": {"class_path": "mambaxray_ctl.data.DemoDataModule"},
        "model": {
            "class_path": "mambaxray_ctl.stages.ReportGenModule",
            "init_args": {"backbone": "demo_arm", "llm": "data/demo/text/lm", "temperature": 0.5, "lr": 3e-3},
        },
    }
    new = {
        "model": {
            "init_args": {
                "backbone": {"preset": "demo_arm"},
                "lm": {"name": "data/demo/text/lm"},
                "decoding": {"temperature": 0.5},
                "optimizer": {"lr": 3e-3},
            }
        }
    }
    with pytest.warns(FutureWarning):
        upgraded = upgrade_config(old)
    assert upgraded is not None and upgraded["data"]["class_path"].endswith("demo.datamodule.DemoDataModule")
    assert upgrade_config(new) is None  # nothing old: the file is passed on as it is
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    base = ["fit", "-c", str(CONFIGS / "data" / "demo.yaml"), "-c", str(CONFIGS / "stage3_reportgen.yaml")]

    def printed(extra: str) -> dict:
        out = io.StringIO()
        with redirect_stdout(out), pytest.raises(SystemExit):
            main([*base, "-c", extra, "--print_config"])
        return yaml.safe_load(out.getvalue())

    with pytest.warns(FutureWarning):
        from_old = printed(str(tmp_path / "old.yaml"))
    assert from_old == printed(json.dumps(new))


@pytest.mark.parametrize(
    ("dataset", "annotation", "image_root"),
    [
        ("iu_xray", "data/iu_xray/annotation.json", "data/iu_xray/images"),
        ("chexpert_plus", "data/chexpert_plus/annotation.json", "data/chexpert_plus/PNG"),
        ("demo", "data/demo/annotation.json", "data/demo/images"),
    ],
)
def test_dataset_configs_resolve_to_the_paths_they_used_to_write(
    dataset: str, annotation: str, image_root: str
) -> None:
    """The dataset configs no longer repeat the DataModule's defaults; the resolved paths are those
    the files used to set."""
    from mambaxray_ctl.cli import main

    out = io.StringIO()
    stage2 = str(CONFIGS / "stage2_contrastive.yaml")
    args = ["fit", "-c", str(CONFIGS / "data" / f"{dataset}.yaml"), "-c", stage2]
    with redirect_stdout(out), pytest.raises(SystemExit):
        main([*args, "--print_config"])
    data = yaml.safe_load(out.getvalue())["data"]["init_args"]
    assert (data["annotation"], data["image_root"]) == (annotation, image_root)


def test_specs_complete_partial_dicts_from_the_given_default() -> None:
    stage1 = OptimizerSpec(lr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95))
    assert as_spec(OptimizerSpec, {"lr": 1e-3}, stage1) == OptimizerSpec(1e-3, 0.05, (0.9, 0.95))
    assert as_spec(OptimizerSpec, {"lr": 1e-3}) == OptimizerSpec(lr=1e-3)
    assert as_spec(BackboneSpec, BackboneSpec("x")) == BackboneSpec("x")
    with pytest.raises(TypeError, match=r"no field\(s\) \['rate'\]"):
        as_spec(OptimizerSpec, {"rate": 1.0})
    assert plain(stage1)["betas"] == [0.9, 0.95]


def test_the_stage3_step_output_logs_what_it_holds() -> None:
    from mambaxray_ctl.stages.reportgen import ReportGenOutput

    sft, ctl = torch.tensor(2.0, requires_grad=True), torch.tensor(1.0)
    out = ReportGenOutput(loss=sft + 0.4 * ctl, sft=sft, ctl=ctl)
    assert set(out.logged()) == {"loss", "sft", "ctl"} and not out.logged()["loss"].requires_grad
    assert set(ReportGenOutput(loss=sft, sft=sft).logged()) == {"loss", "sft"}


class warnings_as_errors:
    """Within: any warning fails the test."""

    def __enter__(self) -> None:
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc: object) -> None:
        self._catch.__exit__(*exc)
