"""The real IU X-ray annotation (R2Gen split) with placeholder images; skipped without ../shared/data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mambaxray_ctl.data import IUXrayDataModule
from mambaxray_ctl.data.cleaning import clean_report_iu_xray, is_empty_report
from test_data_helpers import write_png

ANNOTATION = Path(__file__).resolve().parents[2] / "shared" / "data" / "iu_xray" / "annotation.json"
pytestmark = pytest.mark.skipif(not ANNOTATION.is_file(), reason="../shared/data is absent")


def test_iu_xray_split_sizes_and_cleaning(tmp_path: Path) -> None:
    data = json.loads(ANNOTATION.read_text(encoding="utf-8"))
    placeholder = write_png(tmp_path / "placeholder.png", size=8)
    for split in ("train", "val", "test"):
        for entry in data[split]:
            for rel in entry["image_path"]:
                target = tmp_path / "images" / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(placeholder, target)  # one tiny PNG, thousands of names
    dm = IUXrayDataModule(annotation=str(ANNOTATION), image_root=str(tmp_path / "images"), image_size=8)
    dm.setup(None)
    assert [len(dm.dataset(split)) for split in ("train", "val", "test")] == [2069, 296, 590]
    assert dm.skipped_at_setup == {}
    for split in ("train", "val", "test"):
        for study in dm.dataset(split).studies:
            assert study.report == clean_report_iu_xray(study.raw_report)
            assert not is_empty_report(study.report) and study.report.endswith(" .")
            assert study.report == study.report.lower()
            assert ("xxxx" in study.report) == ("xxxx" in study.raw_report.lower())  # marks kept as words
    batch = next(iter(dm.val_dataloader()))
    assert batch["images"].shape == (8, 2, 3, 8, 8) and batch["view_mask"].all()
