"""The synthetic chest X-ray world: determinism, visible and lateralised findings, report ↔ labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mambaxray_ctl.cli import main
from mambaxray_ctl.data.cleaning import clean_report_iu_xray
from mambaxray_ctl.demo.findings import LABEL_NAMES, Findings
from mambaxray_ctl.demo.labeller import extract_labels
from mambaxray_ctl.demo.render import render_frontal, render_lateral, sample_patient
from mambaxray_ctl.demo.world import generate_world, sample_study


def test_extract_reads_back_the_labels_of_many_studies() -> None:
    labels, reports = [], set()
    for index in range(3000):
        findings, report = sample_study(7, index)
        assert extract_labels(report) == findings.labels(), report
        assert extract_labels(clean_report_iu_xray(report)) == findings.labels(), report
        labels.append(findings.labels())
        reports.add(report)
    counts = np.sum(labels, axis=0)
    assert all(counts >= 60), dict(zip(LABEL_NAMES, counts, strict=True))  # every finding occurs
    normal = sum(not any(row) for row in labels) / len(labels)
    assert 0.35 < normal < 0.6
    assert sum(sum(row) >= 2 for row in labels) > 200  # combinations occur
    assert len(reports) > 1500  # several phrasings: reports are not one template


def test_extract_on_free_text() -> None:
    assert extract_labels("No pneumothorax. Heart size is normal.") == [0] * len(LABEL_NAMES)
    labels = extract_labels("Bilateral pleural effusions. Left lower lobe consolidation. New right PICC.")
    named = {name for name, value in zip(LABEL_NAMES, labels, strict=True) if value}
    assert named == {
        "pleural_effusion_left",
        "pleural_effusion_right",
        "consolidation_left_lower_lobe",
        "support_device",
    }


def _difference(findings: Findings, seed: int = 5) -> tuple[int, int]:
    """Pixels changed by more than 20 grey levels (image-left half, image-right half) by ``findings``."""
    patient = sample_patient(np.random.default_rng(seed), findings)
    normal = Findings(cardiomegaly=findings.cardiomegaly)
    a = render_frontal(normal, patient, 224, np.random.default_rng(seed)).astype(np.float32)
    b = render_frontal(findings, patient, 224, np.random.default_rng(seed)).astype(np.float32)
    changed = np.abs(b - a) > 20
    return int(changed[:, :112].sum()), int(changed[:, 112:].sum())


@pytest.mark.parametrize(
    ("findings", "side"),
    [
        (Findings(effusion={"left": "small"}), "left"),
        (Findings(effusion={"right": "small"}), "right"),
        (Findings(pneumothorax={"left": "small"}), "left"),
        (Findings(pneumothorax={"right": "small"}), "right"),
        (Findings(consolidation=("left upper",)), "left"),
        (Findings(consolidation=("right middle",)), "right"),
        (Findings(nodule=("right", "mid", 8)), "right"),
    ],
)
def test_findings_are_visible_on_their_side(findings: Findings, side: str) -> None:
    image_left, image_right = _difference(findings)  # the patient's left is the image's right
    near, far = (image_right, image_left) if side == "left" else (image_left, image_right)
    assert near > 40 and far == 0, (near, far)


def test_cardiomegaly_and_devices_are_visible() -> None:
    rng = np.random.default_rng(0)
    normal, enlarged = Findings(), Findings(cardiomegaly=True)
    widths = []
    for findings in (normal, enlarged):
        patient = sample_patient(np.random.default_rng(1), findings)
        image = render_frontal(findings, patient, 224, rng).astype(np.float32)
        between_lungs = image[140, 56:176]  # a row through the heart
        widths.append(int((between_lungs > image[140, 60:70].mean() + 40).sum()))
    assert widths[1] > widths[0] * 1.2
    for device in ("endotracheal tube", "right internal jugular catheter", "left picc", "nasogastric tube"):
        patient = sample_patient(np.random.default_rng(2), normal)
        with_device = Findings(device=device)
        plain = render_lateral(normal, patient, 224, np.random.default_rng(3))
        tube = render_lateral(with_device, patient, 224, np.random.default_rng(3))
        assert (tube.astype(int) - plain > 60).sum() > 100, device


def test_pneumothorax_deflates_the_lung_and_devices_show_at_the_demo_resolution() -> None:
    def frontal(findings: Findings, size: int = 96) -> np.ndarray:
        patient = sample_patient(np.random.default_rng(5), findings)
        image = render_frontal(findings, patient, 224, np.random.default_rng(5))
        return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR), np.float32)

    normal = frontal(Findings(), 224)
    inner_left_lung = (slice(100, 134), slice(139, 157))  # medial to the pleural line (image right)
    denser = [
        frontal(Findings(pneumothorax={"left": size}), 224)[inner_left_lung].mean()
        - normal[inner_left_lung].mean()
        for size in ("small", "large")
    ]
    assert 8 < denser[0] < denser[1], denser  # the deflated lung is brighter, more so when large
    normal = frontal(Findings())
    for device in ("endotracheal tube", "right internal jugular catheter", "left picc", "nasogastric tube"):
        changed = np.abs(frontal(Findings(device=device)) - normal) > 20  # at the 96 px demo stages see
        assert changed.sum() >= 40, (device, changed.sum())


def test_world_is_deterministic_and_labelled(tmp_path: Path) -> None:
    one = generate_world(tmp_path / "a", n=12, seed=3, size=48, workers=1)
    two = generate_world(tmp_path / "b", n=12, seed=3, size=48, workers=2)
    other = generate_world(tmp_path / "c", n=12, seed=4, size=48, workers=1)
    assert one.read_text() == two.read_text() != other.read_text()
    for rel in ("demo_00000/0.png", "demo_00011/1.png"):
        assert (tmp_path / "a" / "images" / rel).read_bytes() == (
            tmp_path / "b" / "images" / rel
        ).read_bytes()
    annotation = json.loads(one.read_text())
    assert annotation["label_names"] == list(LABEL_NAMES)
    assert [len(annotation[s]) for s in ("train", "val", "test")] == [8, 2, 2]  # 70/10/20 rounded
    for split in ("train", "val", "test"):
        for entry in annotation[split]:
            assert extract_labels(entry["report"]) == entry["labels"]
            assert entry["image_path"] == [f"{entry['id']}/0.png", f"{entry['id']}/1.png"]


def test_make_demo_data_command_and_datamodule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mambaxray_ctl.demo.datamodule import DemoDataModule

    out = tmp_path / "demo"
    assert main(["make-demo-data", "--out", str(out), "--n", "10", "--size", "32", "--workers", "1"]) == 0
    assert "train 7, val 1, test 2" in capsys.readouterr().out
    assert main(["make-demo-data", "--out", str(out), "--n", "3"]) == 1
    generated = tmp_path / "gen"
    dm = DemoDataModule(
        annotation=str(generated / "annotation.json"),
        image_root=str(generated / "images"),
        num_studies=10,
        image_size=32,
        batch_size=2,
    )
    dm.prepare_data()  # generates the missing world
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (2, 2, 3, 32, 32) and batch["labels"].shape == (2, len(LABEL_NAMES))
    assert dm.label_names == list(LABEL_NAMES)
