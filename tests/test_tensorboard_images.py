"""Pictures in TensorBoard: stage-1 reconstructions beside their targets, the projector's thumbnails,
stage 3's sample X-rays and sentence heat maps, read back from the event files of tiny fits through the
real configs; the pictures' helpers (un-normalising, the heat-map overlay); the heat maps' memory bound
and what an out-of-memory error does; training unchanged by the pictures; nothing without a TensorBoard
logger."""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mambaxray_ctl.callbacks import tensorboard
from mambaxray_ctl.callbacks.images import overlay, unnormalize
from mambaxray_ctl.callbacks.tensorboard import Reconstructions, SampleReports
from mambaxray_ctl.data.cleaning import split_sentences
from mambaxray_ctl.data.images import Normalize
from mambaxray_ctl.stages import ARMModule, MAEModule, ReportGenModule
from mambaxray_ctl.stages.attribution import sentence_heat_maps
from mambaxray_ctl.stages.specs import BackboneSpec
from test_stages_cli import cli_args, run_cli

TINY_PRETRAIN = BackboneSpec(preset="test_arm_tiny_pretrain")  # 96 px, 16-px patches: a 6x6 grid
ONE_BATCH = ["--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1"]


def read_events(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    return events


def table(events: EventAccumulator, tag: str) -> list[list[str]]:
    """The rows (cells) of the last markdown table logged as text under ``tag``."""
    text = events.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in text.splitlines()[2:]]


def pictures(events: EventAccumulator, tag: str) -> list[np.ndarray]:
    """The pictures logged under ``tag``, one per step, as (H, W, 3) uint8."""
    return [
        np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB")) for e in events.Images(tag)
    ]


# Helpers -----------------------------------------------------------------------------------------------


def test_unnormalize_inverts_the_datamodule_normalisation() -> None:
    normalize = Normalize()  # ImageNet mean and std, the DataModules' default
    grey = torch.rand(2, 1, 8, 8)
    inputs = torch.stack([normalize(image) for image in grey])
    torch.testing.assert_close(unnormalize(inputs, normalize), grey.expand(-1, 3, -1, -1))
    with pytest.raises(ValueError, match="3, H, W"):
        unnormalize(grey, normalize)


def test_overlay_colours_the_hot_cell_and_leaves_cold_cells_as_they_are() -> None:
    image = np.linspace(0.0, 1.0, 12 * 12).reshape(12, 12)
    heat = np.zeros((3, 3))
    heat[1, 2] = 2.0  # one patch cell of a 3x3 grid: pixels 4..7 x 8..11
    out = overlay(image, heat)
    assert out.shape == (12, 12, 3) and out.dtype == np.uint8
    grey = np.rint(image * 255).astype(np.uint8)
    cold = np.ones((12, 12), dtype=bool)
    cold[4:8, 8:12] = False
    assert (out[cold] == grey[cold][:, None]).all()  # zero heat: the X-ray as it is
    hot = out[4:8, 8:12].astype(int)
    assert (hot[..., 0] - hot[..., 2] > 100).all()  # red, the top of the ramp
    half = overlay(image, heat, vmax=4.0)[4:8, 8:12].astype(int)  # half the heat on a shared scale
    assert ((half[..., 0] - half[..., 2]) < (hot[..., 0] - hot[..., 2])).all()
    assert (
        overlay((image * 255).astype(np.uint8), np.zeros((2, 2)))[..., 0] == (image * 255).astype(np.uint8)
    ).all()
    for bad in (-heat, np.full((3, 3), np.nan)):
        with pytest.raises(ValueError, match="finite and non-negative"):
            overlay(image, bad)
    with pytest.raises(ValueError, match="2-D"):
        overlay(np.zeros((12, 12, 3)), heat)


# Stage-1 reconstructions -------------------------------------------------------------------------------


def test_arm_reconstruction_puts_each_predicted_patch_back_in_its_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a perfect prediction (the norm-pix targets themselves), the picture is the image, but for
    cluster 1 (the top-left 2x2 patches, never predicted), which stays 0."""
    module = ARMModule(backbone=TINY_PRETRAIN, cluster_size=2, decoder_dim=16, decoder_heads=2).eval()
    monkeypatch.setattr(module, "forward", module.targets)
    images = torch.randn(2, 3, 96, 96)
    panels = module.reconstruct(images)
    assert list(panels) == ["prediction", "target"]
    prediction = panels["prediction"]
    first = torch.zeros(96, 96, dtype=torch.bool)
    first[:32, :32] = True
    assert (prediction[..., first] == 0).all()
    torch.testing.assert_close(prediction[..., ~first], images[..., ~first], atol=1e-5, rtol=1e-5)


def test_mae_reconstruction_shows_the_masked_input_and_pastes_the_visible_patches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = MAEModule(backbone=TINY_PRETRAIN, decoder_dim=32, decoder_depth=2, decoder_heads=4).eval()
    images = torch.randn(2, 3, 96, 96)
    monkeypatch.setattr(module, "forward", lambda x, keep: torch.zeros(2, 36, 16 * 16 * 3))
    torch.manual_seed(0)
    panels = module.reconstruct(images)
    assert list(panels) == ["masked", "reconstruction", "target"]
    cells = panels["masked"].unflatten(-2, (6, 16)).unflatten(-1, (6, 16))  # (B, C, 6, 16, 6, 16)
    hidden = (cells == 0).all(dim=(1, 3, 5))  # (B, 6, 6): patches shown as 0
    assert (hidden.sum(dim=(1, 2)) == 36 - module.num_keep).all()  # mask_ratio 0.75: 27 of 36 hidden
    recon = panels["reconstruction"].unflatten(-2, (6, 16)).unflatten(-1, (6, 16))
    image_cells = images.unflatten(-2, (6, 16)).unflatten(-1, (6, 16))
    visible = ~hidden[:, None, :, None, :, None].expand_as(recon)
    assert torch.equal(recon[visible], image_cells[visible])
    # hidden patches: the prediction (0 in norm-pix space) given back each target patch's own mean
    means = image_cells.mean(dim=(1, 3, 5), keepdim=True).expand_as(recon)
    torch.testing.assert_close(recon[~visible], means[~visible], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("stage", "columns"), [("stage1", 2), ("stage1_mae", 3)])
def test_stage1_logs_fixed_reconstructions_beside_their_targets(
    stage: str, columns: int, world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = run_cli(cli_args(world, tmp_path, stage, "fit", "--trainer.max_epochs=2", *ONE_BATCH), monkeypatch)
    logged = pictures(read_events(Path(cli.trainer.log_dir)), "val/reconstructions")
    assert len(logged) == 2  # one per validation
    assert all(p.shape == (4 * 96, columns * 96, 3) for p in logged)  # 4 images, a 96-px panel each
    target = slice((columns - 1) * 96, None)
    assert np.array_equal(logged[0][:, target], logged[1][:, target])  # the same images every epoch
    if stage == "stage1_mae":  # and the same mask
        assert np.array_equal(logged[0][:, :96], logged[1][:, :96])


# Stages 2 and 3 ---------------------------------------------------------------------------------------


def test_stage2_projector_shows_each_study_first_view(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = run_cli(cli_args(world, tmp_path, "stage2", "fit", "--trainer.max_steps=1"), monkeypatch)
    run_dir = Path(cli.trainer.log_dir)
    config = (run_dir / "projector_config.pbtxt").read_text()
    assert "sprite" in config and config.count("single_image_dim: 32") == 2

    def path(key: str) -> Path:
        return run_dir / config.split(f'{key}: "')[1].split('"')[0]

    points = len(path("metadata_path").read_text().splitlines()) - 1  # a header, then image and text
    side = math.ceil(math.sqrt(points)) * 32
    with Image.open(path("image_path")) as sprite:
        assert sprite.size == (side, side)
        cells = np.asarray(sprite.convert("L"))
    assert cells[:32, :32].std() > 0  # a picture, not a blank cell


def test_stage3_logs_the_sample_studies_views_and_sentence_heat_maps(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = cli_args(world, tmp_path, "stage3", "fit", "--trainer.max_epochs=1", *ONE_BATCH)
    cli = run_cli(args, monkeypatch)
    events = read_events(Path(cli.trainer.log_dir))
    samples = next(c for c in cli.trainer.callbacks if type(c).__name__ == "SampleReports")
    tags = events.Tags()["images"]
    shown = [tag.removeprefix("val/images/") for tag in tags if tag.startswith("val/images/")]
    generated = dict(row[:2] for row in table(events, "val/samples"))
    assert shown and sorted(shown) == list(generated)[: samples.image_samples]  # the table's first studies
    listed = table(events, "val/heat_map_sentences")
    for study in shown:
        (views,) = pictures(events, f"val/images/{study}")
        assert views.shape == (128, 2 * 128, 3)  # two views, 128 px each
        assert (views.max(axis=2) - views.min(axis=2) <= 1).all()  # grey X-rays (8-bit rounding)
        sentences = [sentence for sid, _, sentence in listed if sid == study]
        assert sentences and sentences == split_sentences(generated[study])[: samples.heat_map_sentences]
        assert sorted(t for t in tags if t.startswith(f"val/heat_maps/{study}/")) == [
            f"val/heat_maps/{study}/{k}" for k in range(1, len(sentences) + 1)
        ]
        for k in range(1, len(sentences) + 1):
            (heat,) = pictures(events, f"val/heat_maps/{study}/{k}")
            assert heat.shape == views.shape
            coloured = heat.max(axis=2) != heat.min(axis=2)
            assert coloured.any()  # the sentence's supporting cells
            cold = np.abs(heat[~coloured].astype(int) - views[~coloured]).max()
            assert cold <= 1  # elsewhere the X-ray as it is (8-bit rounding)


def test_the_heat_maps_of_a_reports_first_sentences_are_those_of_the_whole_report(world: Path) -> None:
    """heat_map_sentences bounds the LM pass to that many rows by cutting the report after them; the LM
    is causal, so their maps are the ones the whole report gives."""
    torch.manual_seed(0)
    lm = {"name": str(world / "text" / "lm"), "max_target_tokens": 40}
    module = ReportGenModule(backbone={"preset": "test_arm_tiny"}, lm=lm).eval()
    images, valid = torch.randn(2, 3, 64, 64), torch.ones(2, dtype=torch.bool)
    report = "the heart is enlarged . small left pleural effusion . no pneumothorax . lungs are clear ."
    callback = SampleReports(heat_map_sentences=2)
    cut = callback._cut(report)
    assert cut == "the heart is enlarged . small left pleural effusion"
    assert callback._cut("no pneumothorax .") == "no pneumothorax ."  # shorter: whole
    full = sentence_heat_maps(module, images, valid, report)
    first = sentence_heat_maps(module, images, valid, cut)
    assert [m.sentence for m in first] == [m.sentence for m in full[:2]]
    for part, whole in zip(first, full, strict=False):
        assert part.maps.sum() > 0
        torch.testing.assert_close(part.maps, whole.maps, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="heat_map_sentences >= 1"):
        SampleReports(heat_map_sentences=0)


def test_out_of_memory_turns_heat_maps_off_and_the_images_go_on(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = []

    def out_of_memory(*args: Any) -> list:
        calls.append(args)
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(tensorboard, "sentence_heat_maps", out_of_memory)
    args = cli_args(world, tmp_path, "stage3", "fit", "--trainer.max_epochs=2", *ONE_BATCH)
    with caplog.at_level(logging.WARNING, logger=tensorboard.__name__):
        cli = run_cli(args, monkeypatch)
    assert cli.trainer.state.finished
    samples = next(c for c in cli.trainer.callbacks if isinstance(c, SampleReports))
    assert len(calls) == 1 and samples.heat_maps is False  # tried once, then off for the run
    assert sum("out of memory drawing the heat maps" in r.getMessage() for r in caplog.records) == 1
    events = read_events(Path(cli.trainer.log_dir))
    tags = events.Tags()["images"]
    shown = [tag for tag in tags if tag.startswith("val/images/")]
    assert shown and all(len(events.Images(tag)) == 2 for tag in shown)  # both validations
    assert not [tag for tag in tags if tag.startswith("val/heat_maps/")]


def test_projector_without_every_first_view_writes_the_points_without_pictures(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A study the thumbnails missed must not fail rank 0 before the export (the ranks would hang)."""
    collect = tensorboard.collect_embeddings

    def with_an_unseen_study(*args: Any) -> tuple[list[str], np.ndarray, np.ndarray]:
        ids, image, text = collect(*args)
        return [*ids, "unseen"], np.concatenate([image, image[:1]]), np.concatenate([text, text[:1]])

    monkeypatch.setattr(tensorboard, "collect_embeddings", with_an_unseen_study)
    cli = run_cli(cli_args(world, tmp_path, "stage2", "fit", "--trainer.max_steps=1"), monkeypatch)
    run_dir = Path(cli.trainer.log_dir)
    config = (run_dir / "projector_config.pbtxt").read_text()
    assert "metadata_path" in config and "sprite" not in config
    assert (run_dir / "backbone.safetensors").is_file()  # the export after the projector


# Training unchanged by the pictures ---------------------------------------------------------------------


def _states_equal(a: Any, b: Any) -> bool:
    """Nested checkpoint values (dicts, lists, tuples, tensors, arrays, numbers) equal exactly."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_states_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_states_equal, a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    return a == b


@pytest.mark.parametrize(
    ("stage", "tag"), [("stage3", "val/heat_maps/"), ("stage1_mae", "val/reconstructions")]
)
def test_the_pictures_leave_training_unchanged(
    stage: str, tag: str, world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two epochs with the pictures drawn at each validation and without: the same weights and the same
    RNG states of every generator in ``last.ckpt`` (saved after the first validation's pictures) and in a
    checkpoint of the end of training (after the second epoch trained on from the first's pictures)."""
    args = ["--trainer.max_epochs=2", *ONE_BATCH]
    drawn = run_cli(cli_args(world, tmp_path / "on", stage, "fit", *args), monkeypatch)
    tags = read_events(Path(drawn.trainer.log_dir)).Tags()["images"]
    assert any(t.startswith(tag) for t in tags)  # the pictures were drawn
    with monkeypatch.context() as off:
        off.setattr(SampleReports, "_log_images", lambda *args: None)
        off.setattr(Reconstructions, "on_validation_epoch_end", lambda *args: None)
        plain = run_cli(cli_args(world, tmp_path / "off", stage, "fit", *args), monkeypatch)
    assert not read_events(Path(plain.trainer.log_dir)).Tags()["images"]
    files: dict[str, dict[str, Path]] = {}
    for name, cli in (("on", drawn), ("off", plain)):
        files[name] = {"last": Path(cli.trainer.checkpoint_callback.last_model_path)}
        files[name]["end"] = tmp_path / f"{name}_end.ckpt"
        cli.trainer.save_checkpoint(files[name]["end"])
    for which in ("last", "end"):
        on, off_ = (torch.load(files[name][which], map_location="cpu", weights_only=True) for name in files)
        assert on["state_dict"].keys() == off_["state_dict"].keys()
        assert _states_equal(on["state_dict"], off_["state_dict"]), which
        assert _states_equal(on["rng_states_per_rank"], off_["rng_states_per_rank"]), which
    assert on["global_step"] == 2  # the end: both epochs trained


# Without TensorBoard ------------------------------------------------------------------------------------


def test_no_pictures_and_no_error_without_a_tensorboard_logger(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn = []
    reconstruct = ARMModule.reconstruct
    monkeypatch.setattr(ARMModule, "reconstruct", lambda self, x: drawn.append(x) or reconstruct(self, x))
    csv = [
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]
    cli = run_cli(
        cli_args(world, tmp_path, "stage1", "fit", "--trainer.max_epochs=1", *csv, *ONE_BATCH), monkeypatch
    )
    assert cli.trainer.state.finished and type(cli.trainer.logger).__name__ == "CSVLogger"
    assert "val/loss" in cli.trainer.logged_metrics  # validation ran, with the Reconstructions callback
    assert any(type(callback).__name__ == "Reconstructions" for callback in cli.trainer.callbacks)
    assert drawn == [] and not list(tmp_path.rglob("events.out.tfevents*"))
