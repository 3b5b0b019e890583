"""The findings' regions of the synthetic world and the pointing game of the heat maps
(:mod:`mambaxray_ctl.demo.pointing`)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from math import ceil, floor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mambaxray_ctl.cli import main
from mambaxray_ctl.data.cleaning import clean_report, split_sentences
from mambaxray_ctl.demo import pointing as pg
from mambaxray_ctl.demo.findings import LABEL_NAMES, Findings
from mambaxray_ctl.demo.render import render_frontal, sample_patient
from mambaxray_ctl.demo.world import REGIONS_FILE, add_regions, generate_world, read_regions
from mambaxray_ctl.evaluation.qualitative import load_stage3
from test_stages_cli import cli_args, run_cli

# sha256 of the pixels of every PNG (path, then decoded bytes, sorted by path) and the bytes of
# annotation.json of generate_world(n=20, seed=3, size=64), computed with the renderer BEFORE regions
# were recorded (commit b447967): recording them must not change one pixel or one report byte.
WORLD_HASH = "112247fe33ca049725c0961b9e99b24dc771d7fd4dba624bf052ef0e43a187e0"


def _world_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted((root / "images").rglob("*.png")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(np.asarray(Image.open(path)).tobytes())
    digest.update((root / "annotation.json").read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("regions_world")
    generate_world(root, n=20, seed=3, size=64, workers=1)
    return root


# Regions of the world ----------------------------------------------------------------------------------
def test_recording_regions_leaves_the_world_unchanged(small_world: Path) -> None:
    assert _world_hash(small_world) == WORLD_HASH


def test_every_finding_has_its_regions(small_world: Path) -> None:
    annotation = json.loads((small_world / "annotation.json").read_text())
    regions = read_regions(small_world)
    entries = [entry for split in ("train", "val", "test") for entry in annotation[split]]
    assert set(regions) == {entry["id"] for entry in entries}
    for entry in entries:
        present = {name for name, value in zip(LABEL_NAMES, entry["labels"], strict=True) if value}
        frontal, lateral = regions[entry["id"]]
        assert set(frontal) == present, entry["id"]  # every finding on the frontal view, nothing else
        assert set(lateral) == {name for name in present if not name.startswith("pneumothorax")}
        for boxes in (*frontal.values(), *lateral.values()):
            assert boxes and all(0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 for x0, y0, x1, y1 in boxes)


@pytest.mark.parametrize(
    ("findings", "sign"),
    [
        (Findings(effusion={"left": "moderate"}), 1),
        (Findings(consolidation=("right lower",)), 1),
        (Findings(consolidation=("left upper",)), 1),
        (Findings(pneumothorax={"right": "large"}), -1),  # the rim: air without lung markings
        (Findings(nodule=("left", "mid", 25)), 1),
        (Findings(device="nasogastric tube"), 1),
    ],
    ids=["effusion", "consolidation-rll", "consolidation-lul", "pneumothorax", "nodule", "device"],
)
@pytest.mark.parametrize("seed", [5, 6])
def test_the_regions_hold_what_the_finding_draws(findings: Findings, sign: int, seed: int) -> None:
    """The pixels a finding makes brighter (darker: the pneumothorax's rim) by more than 20 grey
    levels, against the same study without it, lie in its boxes; the boxes are small."""
    patient = sample_patient(np.random.default_rng(seed), findings)
    regions: dict = {}
    drawn = render_frontal(findings, patient, 224, np.random.default_rng(seed), regions).astype(np.float32)
    normal = render_frontal(Findings(), patient, 224, np.random.default_rng(seed)).astype(np.float32)
    (label,) = regions
    mask = np.zeros((224, 224), dtype=bool)
    for x0, y0, x1, y1 in regions[label]:
        mask[floor(y0 * 224) : ceil(y1 * 224), floor(x0 * 224) : ceil(x1 * 224)] = True
    difference = sign * (drawn - normal) > 20
    assert difference.sum() > 30
    assert (difference & mask).sum() / difference.sum() > 0.95, label
    assert mask.mean() < 0.1


def test_regions_of_an_older_world_are_recomputed_and_checked(small_world: Path, tmp_path: Path) -> None:
    older = tmp_path / "older"
    older.mkdir()
    (older / "images").symlink_to(small_world / "images")
    (older / "annotation.json").write_bytes((small_world / "annotation.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="--regions-only"):
        read_regions(older)
    with pytest.raises(ValueError, match="seed 4"):
        add_regions(older, seed=4, workers=1)
    assert (
        main(["make-demo-data", "--out", str(older), "--regions-only", "--seed", "3", "--workers", "1"]) == 0
    )
    assert (older / REGIONS_FILE).read_bytes() == (small_world / REGIONS_FILE).read_bytes()


# The game's rules ---------------------------------------------------------------------------------------
def test_region_cells_count_any_overlap() -> None:
    cells = pg.region_cells([(0.3, 0.3, 0.55, 0.45)], (4, 4))
    assert sorted(zip(*np.nonzero(cells), strict=True)) == [(1, 1), (1, 2)]
    edge = pg.region_cells([(0.25, 0.0, 0.5, 0.25)], (4, 4))  # touching a cell's border is not overlap
    assert sorted(zip(*np.nonzero(edge), strict=True)) == [(0, 1)]
    union = pg.region_cells([(0.0, 0.0, 0.1, 0.1), (0.9, 0.9, 1.0, 1.0)], (6, 6))
    assert union.sum() == 2 and union[0, 0] and union[5, 5]
    assert pg.region_cells([], (6, 6)).sum() == 0


def test_pointing_score_of_hand_made_maps() -> None:
    cells = pg.region_cells([(0.5, 0.5, 1.0, 1.0)], (4, 4))  # the bottom-right quarter
    heat = np.zeros((4, 4))
    heat[3, 3] = 2.0
    assert pg.pointing_score(heat, cells) == 1.0
    heat[0, 0] = 5.0
    assert pg.pointing_score(heat, cells) == 0.0
    heat[3, 3] = 5.0  # a tie, one inside one outside: the expected hit of a random tie-break
    assert pg.pointing_score(heat, cells) == 0.5
    assert pg.pointing_score(np.zeros((4, 4)), cells) == 0.25  # a flat map: the region's share


def test_lung_prior_peaks_at_the_lung_centres() -> None:
    prior = pg.lung_prior((6, 6))
    peaks = np.argwhere(prior >= prior.max() - 1e-9)
    # the cells holding the lung centres (x 0.34 and 0.66, y 0.5 on a row border): on a 6x6 grid the
    # inner columns 2 and 3
    assert sorted((int(r), int(c)) for r, c in peaks) == [(2, 2), (2, 3), (3, 2), (3, 3)]
    np.testing.assert_allclose(prior, prior[:, ::-1])  # the two lungs mirror each other
    y, x = (np.array([2, 2]) + 0.5) / 6  # the centre of cell (2, 2)
    expected = np.exp(-((x - 0.34) ** 2 + (y - 0.5) ** 2) / (2 * pg.PRIOR_SIGMA**2))
    assert prior[2, 2] == pytest.approx(expected)
    fine = pg.lung_prior((14, 14))  # 224 px: the peaks move out to the lungs' own columns
    assert sorted({int(c) for _, c in np.argwhere(fine >= fine.max() - 1e-9)}) == [4, 9]
    lateral = pg.lung_prior((6, 6), view=1)
    assert [tuple(map(int, cell)) for cell in np.argwhere(lateral >= lateral.max() - 1e-9)] == [(2, 3)]


def test_sentences_are_matched_to_findings_by_the_labeller() -> None:
    assert pg.named_findings("small left pleural effusion") == ["pleural_effusion_left"]
    assert pg.named_findings("bilateral pleural effusions") == [
        "pleural_effusion_left",
        "pleural_effusion_right",
    ]
    assert pg.named_findings("no pneumothorax") == []


# The game on a tiny model -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny stage-3 checkpoint and a predictions file whose generated reports are the references."""
    out = tmp_path_factory.mktemp("pointing")
    with pytest.MonkeyPatch.context() as monkeypatch:
        cli = run_cli(cli_args(world, out, "stage3", "fit", "--trainer.max_steps=2"), monkeypatch)
    annotation = json.loads((world / "annotation.json").read_text())
    rows = [
        {"id": e["id"], "generated": clean_report(e["report"], "iu_xray"), "reference": ""}
        for e in annotation["test"]
    ]
    predictions = out / "predictions.jsonl"
    predictions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"checkpoint": Path(cli.trainer.checkpoint_callback.last_model_path), "predictions": predictions}


def test_pointing_game_scores_the_sentences_naming_a_present_finding(
    world: Path, run: dict[str, Path]
) -> None:
    result = pg.run_pointing_game(run["checkpoint"], run["predictions"], world, studies=6, seed=1)
    counts = result["counts"]
    assert counts["studies"] == 6 and counts["unscorable"] == 0  # the references name present findings only
    overall = result["overall"]
    assert overall["n"] == sum(row["n"] for row in result["per_finding"].values()) > 0
    assert set(result["per_finding"]) <= set(LABEL_NAMES)
    for row in [*result["per_finding"].values(), overall]:
        assert all(0.0 <= row[method] <= 1.0 for method in pg.METHODS)

    # the baselines as defined, recomputed from the regions and the sentences
    regions = read_regions(world)
    studies = pg.demo_studies(run["checkpoint"], run["predictions"], world, 6)
    expected: dict[str, list[float]] = {}
    prior = pg.lung_prior((4, 4))
    for study in studies:
        frontal = regions[study.id][0]
        for sentence in split_sentences(study.report):
            targets = [name for name in pg.named_findings(sentence) if name in frontal]
            cells = pg.region_cells([box for name in targets for box in frontal[name]], (4, 4))
            for name in targets:
                expected.setdefault(name, []).append((cells.mean(), pg.pointing_score(prior, cells)))
    for name, values in expected.items():
        row = result["per_finding"][name]
        assert row["n"] == len(values)
        assert row["random expected"] == pytest.approx(np.mean([v[0] for v in values]))
        assert row["lung prior"] == pytest.approx(np.mean([v[1] for v in values]))

    again = pg.run_pointing_game(run["checkpoint"], run["predictions"], world, studies=6, seed=1)
    assert again["overall"] == overall  # seeded: the random map and the untrained backbone too
    table = pg.format_pointing_table(result)
    assert "overall" in table and "lung prior" in table and "6 studies" in table


def test_a_sentence_naming_an_absent_finding_is_counted_not_scored(world: Path, run: dict[str, Path]) -> None:
    regions = read_regions(world)
    study = next(
        study
        for study in pg.demo_studies(run["checkpoint"], run["predictions"], world, 6)
        if "pneumothorax_right" not in regions[study.id][0]
    )
    study = replace(study, report="large right pneumothorax . the heart is normal .")
    result = pg.pointing_game(load_stage3(run["checkpoint"]), [study], regions)
    assert result["counts"] == {"studies": 1, "sentences": 2, "naming_a_finding": 1, "unscorable": 1}
    assert result["overall"] == {"n": 0, **dict.fromkeys(pg.METHODS)} and result["per_finding"] == {}
    assert re.search(r"^overall +0 +- +- ", pg.format_pointing_table(result), re.MULTILINE)
