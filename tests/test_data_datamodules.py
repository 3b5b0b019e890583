"""DataModules: batch shapes, view masks, labels, global batch size, seeded shuffling, stage-1 mode,
the image cache, LightningCLI-friendly signatures, and one short Lightning run."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.utils.data import DistributedSampler

from mambaxray_ctl.data import CheXpertPlusDataModule, IUXrayDataModule, ReportDataModule
from mambaxray_ctl.data.annotations import DataValidationError
from mambaxray_ctl.data.prepare import build_cache
from mambaxray_ctl.demo.datamodule import DemoDataModule
from test_data_helpers import make_dataset, write_png, write_truncated_png


def _module(annotation: Path, **kwargs: Any) -> ReportDataModule:
    kwargs.setdefault("image_root", str(annotation.parent / "images"))
    kwargs.setdefault("image_size", 16)
    kwargs.setdefault("batch_size", 4)
    return ReportDataModule(annotation=str(annotation), **kwargs)


def test_batches_pad_views_and_carry_labels(tmp_path: Path) -> None:
    annotation, _ = make_dataset(tmp_path, counts=(6, 3, 3), views=(1, 2, 3), labels=5)
    dm = _module(annotation, shuffle=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["ids"] == ["train_0", "train_1", "train_2", "train_3"]
    assert batch["images"].shape == (4, 3, 3, 16, 16)
    assert batch["view_mask"].tolist() == [
        [True, False, False],
        [True, True, False],
        [True, True, True],
        [True, False, False],
    ]
    assert torch.all(batch["images"][0, 1:] == 0) and batch["images"][0, 0].abs().sum() > 0
    assert batch["labels"].shape == (4, 5) and batch["labels"].dtype == torch.float32
    assert batch["reports"][0] == "study 0 of train . no acute disease ."
    assert batch["raw_reports"][0] == "Study 0 of train. No acute disease."
    assert dm.num_labels == 5 and dm.label_names is None
    val = next(iter(dm.val_dataloader()))
    assert val["images"].shape == (3, 3, 3, 16, 16)


def test_no_labels_key_without_labels_and_iu_two_views(tmp_path: Path) -> None:
    annotation, _ = make_dataset(tmp_path)
    dm = IUXrayDataModule(annotation=str(annotation), image_root=str(tmp_path / "images"), image_size=16)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert "labels" not in batch and batch["images"].shape == (2, 2, 3, 16, 16)
    assert batch["view_mask"].all() and dm.num_labels == 0
    assert dm.hparams.cleaning == "iu_xray" and dm.hparams.num_views == 2
    assert next(iter(dm.predict_dataloader()))["ids"] == ["test_0", "test_1"]


def test_seeded_shuffling(tmp_path: Path) -> None:
    annotation, _ = make_dataset(tmp_path, counts=(16, 1, 1), views=1, size=8)

    def orders(**kwargs: Any) -> list[list[str]]:
        dm = _module(annotation, batch_size=16, image_size=8, **kwargs)
        dm.setup("fit")
        loader = dm.train_dataloader()
        epochs = []
        for epoch in range(2):
            if hasattr(loader.sampler, "set_epoch"):  # what Lightning does: order = f(seed, epoch)
                loader.sampler.set_epoch(epoch)
            epochs.append(next(iter(loader))["ids"])
        return epochs

    first, again, other = orders(seed=1), orders(seed=1), orders(seed=2)
    assert first == again and first != other
    assert first[0] != first[1] and sorted(first[0]) == sorted(first[1])  # a new order each epoch
    assert orders(shuffle=False)[0] == [f"train_{i}" for i in range(16)]


def test_global_batch_size_split_across_ranks(tmp_path: Path) -> None:
    annotation, _ = make_dataset(tmp_path, counts=(8, 2, 2), views=1, size=8)
    dm = _module(annotation, batch_size=8, eval_batch_size=4, image_size=8)
    dm.trainer = SimpleNamespace(world_size=4, global_rank=1, log_dir=None, callbacks=[])  # type: ignore[assignment]
    dm.setup("fit")
    assert (dm.batch_size_per_device, dm.eval_batch_size_per_device) == (2, 1)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.seed == 42
    assert loader.sampler.rank == 1 and len(loader) == 1
    bad = _module(annotation, batch_size=6, image_size=8)
    bad.trainer = SimpleNamespace(world_size=4, global_rank=0, log_dir=None, callbacks=[])  # type: ignore[assignment]
    with pytest.raises(ValueError, match=r"batch_size=6 is the GLOBAL batch size .* world size 4"):
        bad.setup("fit")


def test_stage1_images_mode(tmp_path: Path) -> None:
    annotation, _ = make_dataset(tmp_path, counts=(3, 2, 2), views=2, size=24)
    extra = tmp_path / "extra"
    write_png(extra / "a.png", size=20)
    write_png(extra / "sub" / "b.png", size=20, mode="RGB")
    (extra / "notes.txt").write_text("not an image")
    dm = _module(annotation, mode="images", batch_size=4, image_size=12)
    dm.setup("fit")
    assert len(dm.dataset("train")) == 6  # train images only: no val/test leakage by default
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (4, 3, 12, 12) and set(batch) == {"ids", "images"}
    assert all(i.startswith("train_") for i in batch["ids"])
    assert next(iter(dm.val_dataloader()))["images"].shape == (4, 3, 12, 12)
    with_eval = _module(annotation, mode="images", pretrain_on_eval_images=True, extra_image_dir=str(extra))
    with_eval.setup("fit")
    ids = {item[1] for item in with_eval.dataset("train").items}
    assert len(ids) == 6 + 4 + 4 + 2 and {"a.png", "sub/b.png"} <= ids
    empty_report, _ = make_dataset(tmp_path / "r", counts=(2, 1, 1))
    raw = empty_report.read_text().replace("Study 0 of train. No acute disease.", "")
    empty_report.write_text(raw)
    _module(empty_report, mode="images").setup("fit")  # reports do not matter for stage 1
    with pytest.raises(DataValidationError, match="empty_report=1"):
        _module(empty_report).setup("fit")


def test_reads_from_the_image_cache(tmp_path: Path) -> None:
    annotation, data = make_dataset(tmp_path, counts=(2, 1, 1), size=40)
    cache = tmp_path / "cache"
    manifest = build_cache(tmp_path / "images", cache, size=16, workers=1, progress=False)
    assert manifest["images"] == 8 and manifest["unreadable"] == 0
    direct, cached = (
        _module(annotation, shuffle=False),
        _module(annotation, shuffle=False, image_cache=str(cache)),
    )
    direct.setup("fit")
    cached.setup("fit")
    a, b = next(iter(direct.train_dataloader())), next(iter(cached.train_dataloader()))
    assert torch.allclose(a["images"], b["images"], atol=1e-3)  # same pixels, 16-bit cache quantisation
    with pytest.raises(
        DataValidationError, match="built at size 16, the data is configured for image_size=32"
    ):
        _module(annotation, image_cache=str(cache), image_size=32).setup("fit")
    with pytest.raises(DataValidationError, match="not an image cache"):
        _module(annotation, image_cache=str(tmp_path / "images")).setup("fit")
    (cache / (data["train"][0]["image_path"][0] + ".png")).unlink()
    with pytest.raises(
        DataValidationError, match=r"missing_file: file not found \(.*cache/train_0/0.png.png\)"
    ):
        _module(annotation, image_cache=str(cache)).setup("fit")


def test_keep_in_memory_decodes_each_study_once(tmp_path: Path) -> None:
    annotation, _ = make_dataset(tmp_path, counts=(4, 1, 1), views=(2,), size=24)
    plain, kept = _module(annotation, shuffle=False), _module(annotation, shuffle=False, keep_in_memory=True)
    plain.setup("fit")
    kept.setup("fit")
    first = next(iter(kept.train_dataloader()))
    assert torch.equal(first["images"], next(iter(plain.train_dataloader()))["images"])
    for path in (tmp_path / "images").rglob("*.png"):  # later epochs read no file
        path.unlink()
    assert torch.equal(next(iter(kept.train_dataloader()))["images"], first["images"])
    with pytest.raises(DataValidationError, match="file not found"):
        next(iter(plain.train_dataloader()))


def test_signatures_are_plain_for_lightning_cli() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(CheXpertPlusDataModule, "data")
    cfg = parser.parse_args(["--data.batch_size=16", "--data.mode=images", "--data.mean=[0.5,0.5,0.5]"])
    assert cfg.data.batch_size == 16 and cfg.data.mode == "images" and cfg.data.cleaning == "mimic_cxr"
    assert cfg.data.mean == [0.5, 0.5, 0.5] and cfg.data.on_invalid == "error"
    with pytest.raises(SystemExit):
        parser.parse_args(["--data.on_invalid=ignore"])
    demo = ArgumentParser()
    demo.add_class_arguments(DemoDataModule, "data")
    assert demo.parse_args([]).data.num_studies == 2400


class _TinyModel:
    """Built lazily so that the module imports without Lightning's import cost in other tests."""

    @staticmethod
    def make() -> Any:
        import lightning.pytorch as pl

        class Tiny(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.weight = torch.nn.Parameter(torch.zeros(1))

            def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
                assert "failed" not in batch
                return (batch["images"].mean() - self.weight).pow(2)

            def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
                assert batch["images"].ndim == 5

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return Tiny()


def test_lightning_fit_reports_load_failures(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import lightning.pytorch as pl

    annotation, data = make_dataset(tmp_path, counts=(6, 2, 2), views=2, size=16)
    write_truncated_png(tmp_path / "images" / data["train"][4]["image_path"][1])
    dm = _module(annotation, batch_size=2, on_invalid="skip", image_size=16)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path / "run"),
    )
    with caplog.at_level(logging.WARNING, logger="mambaxray_ctl"):
        trainer.fit(_TinyModel.make(), datamodule=dm)
    assert dm.skipped_at_load == {"undecodable_image": 1}  # one sample for the run ...
    assert caplog.text.count("samples skipped at load time: undecodable_image=1") == 2  # ... each epoch
    assert "train epoch 0" in caplog.text and "train epoch 1" in caplog.text
    lines = (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"train_4"' in lines[0]


def test_micro_batch_size_reaches_the_global_batch_by_accumulation(tmp_path: Path) -> None:
    """batch_size stays global; micro_batch_size sets the per-device batch and the trainer's
    accumulate_grad_batches = batch_size / (micro x world), so the optimiser steps once per global batch."""
    import lightning.pytorch as pl

    from mambaxray_ctl.data.datamodules import micro_batches
    from test_stage1_arm import quiet_trainer

    assert micro_batches(192, 24, 8) == 1 and micro_batches(160, 2, 8) == 10
    with pytest.raises(ValueError, match=r"batch_size=20 \(GLOBAL\) is not a positive multiple of .* 3 x 1"):
        micro_batches(20, 3, 1)
    annotation, _ = make_dataset(tmp_path, counts=(8, 2, 2), views=2, size=16)
    dm = _module(annotation, batch_size=4, micro_batch_size=2, drop_last=True)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(_TinyModel.make(), datamodule=dm)
    assert dm.batch_size_per_device == 2 and trainer.accumulate_grad_batches == 2
    assert trainer.global_step == 2  # 8 studies: 4 micro-batches of 2, two optimiser steps of 4
    clash = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, accumulate_grad_batches=3)
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=3 disagrees with data\.micro_batch"):
        clash.fit(_TinyModel.make(), datamodule=_module(annotation, batch_size=4, micro_batch_size=2))
