"""``mambaxray-ctl generate`` on a tiny stage-3 checkpoint trained on the tiny world."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mambaxray_ctl.cli import main
from mambaxray_ctl.data.images import EvalTransform, load_image
from mambaxray_ctl.evaluation.generate import eval_transform, inspect_checkpoint, load_module, load_study
from test_stages_cli import cli_args, run_cli

REAL_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_images"


@pytest.fixture(scope="module")
def checkpoint(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stage3")
    with pytest.MonkeyPatch.context() as monkeypatch:
        cli = run_cli(cli_args(world, out, "stage3", "fit", "--trainer.max_steps=2"), monkeypatch)
    return Path(cli.trainer.checkpoint_callback.last_model_path)


@pytest.fixture(scope="module")
def study(world: Path) -> list[Path]:
    folder = sorted(p for p in (world / "images").iterdir() if p.is_dir())[0]
    return [folder / "0.png", folder / "1.png"]


def _generate(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    code = main(["generate", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_prints_a_deterministic_report(
    checkpoint: Path, study: list[Path], capsys: pytest.CaptureFixture
) -> None:
    code, first, err = _generate(capsys, "--ckpt", checkpoint, *study)
    assert code == 0, err
    assert first.strip()
    assert "2 view(s) at 64x64" in err
    code, second, _ = _generate(capsys, "--ckpt", checkpoint, *study)
    assert code == 0 and second == first


def test_generate_applies_decoding_overrides_and_an_llm_folder(
    checkpoint: Path, study: list[Path], world: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    moved = tmp_path / "moved_lm"
    shutil.copytree(world / "text" / "lm", moved)
    args = ["--num-beams", "1", "--min-new-tokens", "1", "--max-new-tokens", "3", "--llm", moved]
    code, out, err = _generate(capsys, "--ckpt", checkpoint, *args, study[0])
    assert code == 0, err
    assert out.strip()
    assert "1 view(s)" in err and "1 beam(s), 1-3 new tokens" in err and str(moved) in err


def test_the_images_go_through_the_datamodules_eval_transform(checkpoint: Path, study: list[Path]) -> None:
    info = inspect_checkpoint(checkpoint)
    module = load_module(info)
    transform = eval_transform(module, info)
    assert isinstance(transform, EvalTransform) and transform.size == module.backbone.config.img_size == 64
    images, view_mask = load_study(study, transform)
    assert images.shape == (1, 2, 3, 64, 64) and view_mask.tolist() == [[True, True]]
    torch.testing.assert_close(images[0, 1], transform(load_image(study[1])))
    # the weights are the trained ones, the LM the one of the recorded folder
    trained = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    torch.testing.assert_close(module.state_dict()["mapper.0.weight"], trained["mapper.0.weight"])
    assert not module.training


def test_a_missing_image_is_named(checkpoint: Path, study: list[Path], capsys: pytest.CaptureFixture) -> None:
    missing = study[0].parent / "nope.png"
    code, out, err = _generate(capsys, "--ckpt", checkpoint, study[0], missing)
    assert code == 1 and not out
    assert "image not found" in err and str(missing) in err


def test_an_unreadable_image_is_named(
    checkpoint: Path, study: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    code, out, err = _generate(capsys, "--ckpt", checkpoint, study[0], broken)
    assert code == 1 and not out
    assert "cannot read image" in err and str(broken) in err


def test_a_checkpoint_of_another_stage_is_refused(
    checkpoint: Path, study: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    full = torch.load(checkpoint, map_location="cpu", weights_only=True)
    backbone = {k: v for k, v in full["state_dict"].items() if k.startswith("backbone.")}
    stage2 = tmp_path / "stage2.ckpt"
    hparams = {"_class_path": "mambaxray_ctl.stages.ContrastiveModule", "text_encoder": "x"}
    torch.save(
        {"state_dict": {**backbone, "text_proj.weight": torch.zeros(2)}, "hyper_parameters": hparams}, stage2
    )
    code, out, err = _generate(capsys, "--ckpt", stage2, *study)
    assert code == 1 and not out
    assert "written by mambaxray_ctl.stages.ContrastiveModule" in err and "stage-3" in err

    anonymous = tmp_path / "anonymous.ckpt"
    torch.save(
        {"state_dict": {**backbone, "text_encoder.w": torch.zeros(2)}, "hyper_parameters": {}}, anonymous
    )
    code, _, err = _generate(capsys, "--ckpt", anonymous, *study)
    assert code == 1
    assert "unknown class" in err and "mapper.*" in err and "text_proj.*" in err and "'lm.name'" in err
    assert "backbone, text_encoder" in err

    export = checkpoint.parents[1] / "backbone.safetensors"  # the run's backbone export
    code, _, err = _generate(capsys, "--ckpt", export, *study)
    assert code == 1 and "not a Lightning checkpoint" in err and str(export) in err

    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    code, _, err = _generate(capsys, "--ckpt", garbage, *study)
    assert code == 1 and "cannot read checkpoint" in err and str(garbage) in err

    code, _, err = _generate(capsys, "--ckpt", tmp_path / "absent.ckpt", *study)
    assert code == 1 and "checkpoint not found" in err


def _flat_hyper_parameters(grouped: dict) -> dict:
    """Hyper-parameters as stage 3 stored them before its arguments were grouped."""
    from mambaxray_ctl.compat import REPORTGEN_MODEL_ARGS, SHARED_MODEL_ARGS

    old_name = {new: old for old, new in {**SHARED_MODEL_ARGS, **REPORTGEN_MODEL_ARGS}.items()}
    old_name["backbone.preset"] = "backbone"
    flat = {name: value for name, value in grouped.items() if not isinstance(value, dict)}
    for group, values in grouped.items():
        if isinstance(values, dict):
            for field, value in values.items():
                name = old_name.get(f"{group}.{field}")
                if name is not None:  # fields added since (e.g. decoding.top_p) did not exist
                    flat[name] = value
    flat.pop("_instantiator", None)
    return flat


def test_a_checkpoint_written_before_the_grouped_arguments_still_generates(
    checkpoint: Path, study: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    full = torch.load(checkpoint, map_location="cpu", weights_only=True)
    old = tmp_path / "old.ckpt"
    torch.save({**full, "hyper_parameters": _flat_hyper_parameters(full["hyper_parameters"])}, old)
    assert "llm" in torch.load(old, weights_only=True)["hyper_parameters"]
    code, expected, _ = _generate(capsys, "--ckpt", checkpoint, *study)
    assert code == 0
    with pytest.warns(FutureWarning, match="lm.name"):
        code, out, err = _generate(capsys, "--ckpt", old, *study)
    assert code == 0, err
    assert out == expected


def test_a_moved_lm_folder_suggests_llm(
    checkpoint: Path, study: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, _, err = _generate(capsys, "--ckpt", checkpoint, "--llm", tmp_path / "gone", *study)
    assert code == 1 and "cannot load the report LM" in err and "gone" in err


@pytest.mark.skipif(not REAL_IMAGES.is_dir(), reason="../shared/data/real_images is absent")
def test_real_png_jpeg_and_dicom_files(checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("pydicom")
    files = [
        REAL_IMAGES / "nih_cxr14" / "00000001_000.png",
        REAL_IMAGES / "other" / "frontal_sample.jpg",
        REAL_IMAGES / "other" / "siim_pneumothorax_sample.dcm",
    ]
    code, out, err = _generate(capsys, "--ckpt", checkpoint, *files)
    assert code == 0, err
    assert out.strip() and "3 view(s) at 64x64" in err
