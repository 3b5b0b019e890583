"""``mambaxray-ctl prepare``: the CheXpert Plus builder on a synthetic CSV with the official columns,
and the resumable, parallel image cache."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from mambaxray_ctl.cli import main
from mambaxray_ctl.data.datamodules import CheXpertPlusDataModule
from mambaxray_ctl.data.prepare import build_cache, build_chexpert_plus, split_patients
from test_data_helpers import make_dataset, write_corrupt_png, write_dicom, write_png

# df_chexpert_plus_240401.csv, in order
COLUMNS = [
    *(
        "path_to_image",
        "path_to_dcm",
        "frontal_lateral",
        "ap_pa",
        "deid_patient_id",
        "patient_report_date_order",
    ),
    *("report", "section_narrative", "section_clinical_history", "section_history", "section_comparison"),
    *("section_technique", "section_procedure_comments", "section_findings", "section_impression"),
    *("section_end_of_impression", "section_summary", "section_accession_number", "age", "sex", "race"),
    *("ethnicity", "interpreter_needed", "insurance_type", "recent_bmi", "deceased", "split"),
]
N_PATIENTS = 30


def _write_csv(path: Path) -> dict[str, int]:
    """30 patients, 1-3 studies each, 1-2 views per study; some findings missing. Returns expected counts."""
    rng = np.random.default_rng(0)
    rows, expected = [], {"rows": 0, "no_findings": 0, "studies": 0}
    for p in range(N_PATIENTS):
        for s in range(1, int(rng.integers(1, 4)) + 1):
            views = int(rng.integers(1, 3))
            missing = (p * 3 + s) % 7 == 0  # the whole study lacks findings
            expected["studies"] += not missing
            for v in range(views, 0, -1):  # lateral listed first: the builder puts frontal first
                base = f"train/patient{p:05d}/study{s}/view{v}_{'frontal' if v == 1 else 'lateral'}"
                row = dict.fromkeys(COLUMNS, "")
                row |= {
                    "path_to_image": base + ".jpg",
                    "path_to_dcm": base + ".dcm",
                    "frontal_lateral": "Frontal" if v == 1 else "Lateral",
                    "deid_patient_id": f"patient{p:05d}",
                    "patient_report_date_order": str(s),
                    "report": f"NARRATIVE: CHEST.\nFINDINGS: Study {s}, of patient {p}.\nIMPRESSION: Normal.",
                    "section_findings": "nan" if missing else f"Study {s}, of patient {p}.\nNo effusion.",
                    "section_impression": "Normal.",
                    "split": "train",
                }
                rows.append(row)
                expected["rows"] += 1
                expected["no_findings"] += missing
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return expected


def test_chexpert_plus_builder(tmp_path: Path) -> None:
    expected = _write_csv(tmp_path / "df.csv")
    annotation, counts, dropped = build_chexpert_plus(tmp_path / "df.csv", seed=3)
    assert counts["rows"] == expected["rows"]
    assert counts["rows without findings"] == expected["no_findings"] == len(dropped)
    studies = [e for split in ("train", "val", "test") for e in annotation[split]]
    assert len(studies) == expected["studies"]
    patients = {split: {e["patient_id"] for e in annotation[split]} for split in ("train", "val", "test")}
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"])
    assert not patients["val"] & patients["test"]  # no patient in two splits
    assert {e["split"] for e in annotation["val"]} == {"val"}
    entry = next(e for e in studies if len(e["image_path"]) == 2)
    assert entry["image_path"][0].endswith("view1_frontal.png") and entry["image_path"][1].endswith(
        "_lateral.png"
    )
    assert entry["id"] == entry["image_path"][0].rsplit("/", 1)[0].replace("/", "_")
    assert "\n" in entry["report"]  # raw text kept; cleaning happens in the DataModule
    again, _, _ = build_chexpert_plus(tmp_path / "df.csv", seed=3)
    other, _, _ = build_chexpert_plus(tmp_path / "df.csv", seed=4)
    assert again == annotation and other != annotation
    dicom, _, _ = build_chexpert_plus(tmp_path / "df.csv", image_format="dicom", section="both", seed=3)
    first = dicom["train"][0]
    assert first["image_path"][0].endswith(".dcm") and first["report"].endswith("No effusion. Normal.")


def test_split_patients_is_7_1_2() -> None:
    split = split_patients((f"p{i}" for i in range(100)), seed=0)
    assert sorted(list(split.values()).count(s) for s in ("train", "val", "test")) == [10, 20, 70]


def test_chexpert_plus_command_and_datamodule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_csv(tmp_path / "df.csv")
    png_root = tmp_path / "PNG"
    with open(tmp_path / "df.csv", encoding="utf-8") as f:
        paths = [row["path_to_image"] for row in csv.DictReader(f)]
    for i, path in enumerate(paths):
        if i != 5:  # one image missing: its row is dropped and counted
            write_png(png_root / Path(path).with_suffix(".png"), size=8)
    out = tmp_path / "annotation.json"
    args = ["prepare", "chexpert-plus", "--csv", str(tmp_path / "df.csv"), "--images", str(png_root)]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rows with a missing image: 1" in printed and "rows without findings:" in printed
    assert "train: " in printed and "patients" in printed and "dropped rows listed in" in printed
    dm = CheXpertPlusDataModule(annotation=str(out), image_root=str(png_root), image_size=8, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape[0] == 2 and batch["reports"][0].endswith("no effusion .")
    assert main(["prepare", "chexpert-plus", "--csv", str(tmp_path / "nope.csv"), "--out", str(out)]) == 1
    (tmp_path / "bad.csv").write_text("path_to_image,section_findings\na.jpg,x\n")
    assert main(["prepare", "chexpert-plus", "--csv", str(tmp_path / "bad.csv"), "--out", str(out)]) == 1
    assert "missing column(s) path_to_dcm, frontal_lateral, deid_patient_id" in capsys.readouterr().err


def test_image_cache_is_resumable_and_lists_unreadable_files(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_png(root / "a" / "x.png", size=40, mode="I;16")
    write_png(root / "a" / "y.png", size=30, mode="RGBA")
    write_dicom(
        root / "b" / "z.dcm", np.arange(400, dtype=np.uint16).reshape(20, 20), photometric="MONOCHROME1"
    )
    write_corrupt_png(root / "b" / "broken.png")
    cache = tmp_path / "cache"
    first = build_cache(root, cache, size=16, workers=2, progress=False)
    assert (first["images"], first["unreadable"], first["cached_this_run"]) == (3, 1, 3)
    assert first["images_per_second"] > 0
    (error,) = [json.loads(line) for line in (cache / "unreadable.jsonl").read_text().splitlines()]
    assert error["file"] == "b/broken.png" and "cannot decode" in error["error"]
    assert sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*.png")) == [
        "a/x.png.png",
        "a/y.png.png",
        "b/z.dcm.png",
    ]
    (cache / "a" / "y.png.png").unlink()  # as if interrupted before this file
    (cache / "b" / "z.dcm.png.tmp").write_bytes(b"half-written")
    second = build_cache(root, cache, size=16, workers=1, progress=False)
    assert (second["cached_this_run"], second["already_cached"], second["unreadable"]) == (1, 2, 1)
    assert main(["prepare", "images", "--root", str(root), "--out", str(cache), "--size", "32"]) == 1


def test_image_cache_command_for_an_annotation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    annotation, _ = make_dataset(tmp_path, counts=(2, 1, 1), size=24)
    write_png(tmp_path / "images" / "unlisted.png")
    cache = tmp_path / "cache"
    args = ["--root", str(tmp_path / "images"), "--out", str(cache), "--size", "16", "--workers", "1"]
    assert main(["prepare", "images", *args, "--annotation", str(annotation)]) == 0
    assert "cached 8 image(s) (0 already cached)" in capsys.readouterr().out
    assert not (cache / "unlisted.png.png").exists()
    assert main(["prepare", "images", *args]) == 0
    assert "cached 1 image(s) (8 already cached)" in capsys.readouterr().out
