"""Annotation validation: each kind of invalid sample under on_invalid='error' and 'skip'."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from mambaxray_ctl.data.annotations import DataValidationError, escapes_root
from mambaxray_ctl.data.datamodules import ReportDataModule
from test_data_helpers import make_dataset, write_annotation, write_corrupt_png, write_truncated_png


def _module(annotation: Path, tmp_path: Path, **kwargs: Any) -> ReportDataModule:
    kwargs.setdefault("image_root", str(annotation.parent / "images"))
    kwargs.setdefault("skipped_file", str(tmp_path / "out" / "skipped.jsonl"))
    return ReportDataModule(annotation=str(annotation), batch_size=2, **kwargs)


def _skipped(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "out" / "skipped.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _break(kind: str, root: Path, data: dict[str, Any], index: int = 1) -> tuple[str, str]:
    """Break train study ``index`` with a problem of ``kind``; returns (id, text expected in the message)."""
    entry = data["train"][index]
    if kind == "missing_file":
        (root / "images" / entry["image_path"][0]).unlink()
        return entry["id"], f"file={entry['image_path'][0]}: missing_file: file not found"
    if kind == "unreadable_image":  # corrupt PNG: the header check finds it
        write_corrupt_png(root / "images" / entry["image_path"][1])
        return entry["id"], f"file={entry['image_path'][1]}: unreadable_image: unreadable header"
    if kind == "empty_report":
        entry["report"] = " ... , ; "
        return entry["id"], "empty_report: report is empty after cleaning: ' ... , ; '"
    if kind == "duplicate_id":
        data["test"][0]["id"] = entry["id"]
        return entry["id"], f"[test] id={entry['id']}: duplicate_id: id already used in split 'train'"
    if kind == "path_escape":
        entry["image_path"][0] = "../outside.png"
        return entry["id"], "file=../outside.png: path_escape: path leaves the image root"
    raise AssertionError(kind)


KINDS = ["missing_file", "unreadable_image", "empty_report", "duplicate_id", "path_escape"]


@pytest.mark.parametrize("kind", KINDS)
def test_error_policy_names_the_problem(kind: str, tmp_path: Path) -> None:
    annotation, data = make_dataset(tmp_path)
    sid, text = _break(kind, tmp_path, data)
    write_annotation(tmp_path, data)
    with pytest.raises(DataValidationError) as info:
        _module(annotation, tmp_path).setup("fit")
    message = str(info.value)
    assert f"counts: {kind}=1" in message
    assert f"id={sid}" in message and text in message
    assert "1 problem(s) in 1 sample(s)" in message and "on_invalid='skip'" in message


@pytest.mark.parametrize("kind", KINDS)
def test_skip_policy_counts_and_lists(kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    annotation, data = make_dataset(tmp_path)
    sid, _ = _break(kind, tmp_path, data)
    write_annotation(tmp_path, data)
    dm = _module(annotation, tmp_path, on_invalid="skip")
    with caplog.at_level(logging.WARNING):
        dm.setup(None)
    assert dm.skipped_at_setup == {kind: 1}
    kept = {split: len(dm.dataset(split)) for split in ("train", "val", "test")}
    if kind == "duplicate_id":  # the later occurrence (in test) is dropped
        assert kept == {"train": 4, "val": 2, "test": 1}
    else:
        assert kept == {"train": 3, "val": 2, "test": 2}
    assert sid not in [s.id for s in dm.dataset("train").studies] or kind == "duplicate_id"
    (record,) = _skipped(tmp_path)
    assert record["kind"] == kind and record["id"] == sid
    assert f"skipped 1 sample(s) with 1 problem(s) ({kind}=1)" in caplog.text


def test_all_kinds_at_once_and_the_first_20(tmp_path: Path) -> None:
    annotation, data = make_dataset(tmp_path, counts=(30, 2, 2))
    for index, kind in enumerate(KINDS, start=1):
        _break(kind, tmp_path, data, index)
    data["train"][5]["image_path"][1] = "/abs/elsewhere.png"  # a second problem in the same sample
    for entry in data["train"][10:28]:
        entry["report"] = ""
    write_annotation(tmp_path, data)
    with pytest.raises(DataValidationError) as info:
        _module(annotation, tmp_path).setup("fit")
    message = str(info.value)
    expected = "counts: duplicate_id=1, empty_report=19, missing_file=1, path_escape=2, unreadable_image=1"
    assert expected in message
    assert "24 problem(s) in 23 sample(s)" in message
    assert message.count("\n  [") == 20 and "... and 4 more" in message
    dm = _module(annotation, tmp_path, on_invalid="skip")
    dm.setup("fit")
    assert dm.skipped_at_setup == {
        "duplicate_id": 1,
        "empty_report": 19,
        "missing_file": 1,
        "path_escape": 2,
        "unreadable_image": 1,
    }
    assert len(dm.dataset("train")) == 30 - 22 and len(dm.dataset("test")) == 1
    assert len(_skipped(tmp_path)) == 24


def test_truncated_png_found_at_load_time(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    annotation, data = make_dataset(tmp_path)
    write_truncated_png(tmp_path / "images" / data["train"][2]["image_path"][0])
    strict = _module(annotation, tmp_path, shuffle=False)
    strict.setup("fit")  # the header check passes
    with pytest.raises(
        DataValidationError, match=r"\[train\] id=train_2 file=.*train_2/0.png: undecodable_image"
    ):
        list(strict.train_dataloader())
    lenient = _module(annotation, tmp_path, shuffle=False, on_invalid="skip")
    lenient.setup("fit")
    batches = []
    with caplog.at_level(logging.WARNING):
        for batch in lenient.train_dataloader():
            batches.append(lenient.on_before_batch_transfer(batch, 0))
        lenient.report_load_failures()
    # train_2 is replaced by the next sample that decodes: every batch keeps its size (DDP gathers)
    assert [b["ids"] for b in batches] == [["train_0", "train_1"], ["train_3", "train_3"]]
    assert batches[1]["images"].shape[0] == 2 and "failed" not in batches[1]
    assert lenient.skipped_at_load == {"undecodable_image": 1}
    assert "load: samples skipped at load time: undecodable_image=1" in caplog.text
    assert [r["id"] for r in _skipped(tmp_path)] == ["train_2"]
    decoded = _module(annotation, tmp_path, image_check="decode")  # a full decode at setup finds it
    with pytest.raises(DataValidationError, match="unreadable_image=1"):
        decoded.setup("fit")


def test_consecutive_bad_images_are_each_recorded_once_and_a_broken_folder_fails(tmp_path: Path) -> None:
    annotation, data = make_dataset(tmp_path, counts=(6, 2, 2))
    for index in (2, 3):
        write_truncated_png(tmp_path / "images" / data["train"][index]["image_path"][0])
    dm = _module(annotation, tmp_path, shuffle=False, on_invalid="skip")
    dm.setup("fit")
    dataset = dm.dataset("train")
    samples = [dataset[i] for i in range(len(dataset))]
    assert [s["id"] for s in samples] == ["train_0", "train_1", "train_4", "train_4", "train_4", "train_5"]
    assert [s["failed"].id if "failed" in s else None for s in samples] == [
        None,
        None,
        "train_2",
        "train_3",
        None,
        None,
    ]
    for entry in data["train"]:
        write_truncated_png(tmp_path / "images" / entry["image_path"][0])
    with pytest.raises(DataValidationError, match=r"id=train_0 .*none of the next 5 samples decodes"):
        dataset[0]


def test_missing_split_and_bad_files(tmp_path: Path) -> None:
    annotation, data = make_dataset(tmp_path)
    del data["val"]
    write_annotation(tmp_path, data)
    with pytest.raises(DataValidationError, match=r"split 'val' not found \(splits present: train, test\)"):
        _module(annotation, tmp_path, on_invalid="skip").setup("fit")
    _module(annotation, tmp_path).setup("test")  # val is not needed to test
    (tmp_path / "annotation.json").write_text('{"train": [}')
    with pytest.raises(DataValidationError, match=r"annotation\.json: invalid JSON at line 1 column 12"):
        _module(annotation, tmp_path).setup("fit")
    with pytest.raises(DataValidationError, match="annotation file not found"):
        _module(tmp_path / "nope.json", tmp_path).setup("fit")


def test_bad_entries_views_and_labels(tmp_path: Path) -> None:
    annotation, data = make_dataset(tmp_path, labels=3)
    data["train"][0] = {"id": "x", "report": 5, "image_path": []}
    data["train"][1]["labels"] = [1, 0]
    data["val"][0]["image_path"] = data["val"][0]["image_path"][:1]
    write_annotation(tmp_path, data)
    with pytest.raises(DataValidationError) as info:
        _module(annotation, tmp_path, num_views=2).setup("fit")
    assert "counts: bad_entry=1, bad_labels=1, view_count=1" in str(info.value)
    assert "expected 3 numbers, got [1, 0]" in str(info.value)


@pytest.mark.parametrize(
    ("path", "escapes"),
    [
        ("a/b.png", False),
        ("a/../b.png", False),
        ("../b.png", True),
        ("a/../../b.png", True),
        ("/b.png", True),
    ],
)
def test_escapes_root(path: str, escapes: bool) -> None:
    assert escapes_root(path) is escapes
    assert escapes_root("C:\\x.png") and escapes_root("..\\x.png")
