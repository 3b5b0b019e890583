"""The paper's numbers beside ours: the Table II rows in ``configs/ablation/`` against the paper's
definitions, the paper data of :mod:`mambaxray_ctl.evaluation.paper` (Table I and Table II of the
MambaXray-CTL paper), and the two tables that print them (``ablation``, ``evaluate``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from mambaxray_ctl.demo import ablation
from mambaxray_ctl.evaluation import evaluate, paper
from test_stages_cli import CONFIGS

# The paper's Table II (IU X-ray, Large model), written out here independently of paper.py:
# index -> (stage 1, stage 2 "CTL", CTL-FT, {metric: number}). Every row has stage-3 SFT.
TABLE_II = {
    1: ("simclr", True, True, {"BLEU_1": 0.488, "BLEU_4": 0.175, "ROUGE_L": 0.365, "CIDEr": 0.456}),
    2: ("mae", True, True, {"BLEU_1": 0.471, "BLEU_4": 0.177, "ROUGE_L": 0.358, "CIDEr": 0.431}),
    3: ("arm", True, True, {"BLEU_1": 0.479, "BLEU_4": 0.193, "ROUGE_L": 0.375, "CIDEr": 0.607}),
    4: ("arm", False, True, {"BLEU_1": 0.463, "BLEU_4": 0.185, "ROUGE_L": 0.364, "CIDEr": 0.451}),
    5: (None, False, True, {"BLEU_1": 0.444, "BLEU_4": 0.175, "ROUGE_L": 0.358, "CIDEr": 0.352}),
    6: ("arm", True, False, {"BLEU_1": 0.482, "BLEU_4": 0.178, "ROUGE_L": 0.362, "CIDEr": 0.461}),
    7: ("arm", False, False, {"BLEU_1": 0.457, "BLEU_4": 0.174, "ROUGE_L": 0.353, "CIDEr": 0.467}),
}
# The paper's Table I cells printed "-" (not reported), by (dataset, method).
NOT_REPORTED = {
    ("iu_xray", "R2Gen"): {"CIDEr"},
    ("chexpert_plus", "MambaXray-VL"): {"BLEU_1", "BLEU_2", "BLEU_3"},
}
# The paper's Table I rows of the method itself (Large), per dataset.
TABLE_I_LARGE = {
    "iu_xray": {
        "BLEU_1": 0.491,
        "BLEU_2": 0.334,
        "BLEU_3": 0.252,
        "BLEU_4": 0.199,
        "ROUGE_L": 0.374,
        "CIDEr": 0.544,
    },
    "chexpert_plus": {
        "BLEU_1": 0.381,
        "BLEU_2": 0.240,
        "BLEU_3": 0.162,
        "BLEU_4": 0.114,
        "ROUGE_L": 0.283,
        "CIDEr": 0.242,
    },
}
ROW_FILES = sorted((CONFIGS / "ablation").glob("[0-9]*.yaml"))


# The rows in configs/ablation/ ------------------------------------------------------------------------
def test_the_rows_are_the_papers_seven_each_once() -> None:
    rows = [ablation.read_row(path) for path in ROW_FILES]
    assert [row.paper_row for row in rows] == sorted(TABLE_II)
    assert [path.name.split("_")[0] for path in ROW_FILES] == [str(index) for index in TABLE_II]


@pytest.mark.parametrize("path", ROW_FILES, ids=lambda path: path.stem)
def test_each_row_trains_what_the_papers_row_trained(path: Path) -> None:
    row = ablation.read_row(path)
    stage1, stage2, ctl_ft, _ = TABLE_II[row.paper_row]
    expected = [f"stage1_{stage1}"] if stage1 else []
    expected += ["stage2_contrastive"] if stage2 else []
    assert [stage.config for stage in row.stages] == [*expected, "stage3_reportgen"]
    assert (row.stage1, row.stage2, row.ctl_ft) == (stage1, stage2, ctl_ft)
    assert (ablation.CTL_FT_OFF in row.stage_overrides("stage3")) is not ctl_ft
    assert row.name == paper.table_ii_row(row.paper_row).name


# The paper data -----------------------------------------------------------------------------------------
def test_table_ii_holds_every_row_and_metric_of_the_paper() -> None:
    assert [row.index for row in paper.TABLE_II] == list(TABLE_II)
    for row in paper.TABLE_II:
        stage1, stage2, ctl_ft, metrics = TABLE_II[row.index]
        assert (row.stage1, row.stage2, row.ctl_ft) == (stage1, stage2, ctl_ft)
        assert set(row.metrics) == set(paper.TABLE_II_METRICS)
        assert dict(row.metrics) == metrics
        assert row.dataset == paper.TABLE_II_DATASET == "iu_xray"
    with pytest.raises(ValueError, match="no row 8"):
        paper.table_ii_row(8)


def test_table_i_holds_every_metric_the_paper_reports() -> None:
    assert set(paper.TABLE_I) == {"iu_xray", "chexpert_plus"}
    for dataset, rows in paper.TABLE_I.items():
        names = [row.name for row in rows]
        assert names == ["R2Gen", "R2GenGPT", "MambaXray-VL", "MambaXray-CTL-Base", "MambaXray-CTL-Large"]
        for row in rows:
            missing = NOT_REPORTED.get((dataset, row.name), set())
            assert set(row.metrics) == set(paper.TABLE_I_METRICS) - missing, (dataset, row.name)
            assert all(0 < value < 1 for value in row.metrics.values())
            assert row.dataset == dataset
        assert dict(rows[-1].metrics) == TABLE_I_LARGE[dataset]
    assert paper.table_i("demo") == ()


# The ablation table -------------------------------------------------------------------------------------
OURS = {"BLEU_1": 0.6123, "BLEU_4": 0.3012, "ROUGE_L": 0.5456, "CIDEr": 1.2345, "CE_F1_macro": 0.789}


def run_ablation_without_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows: list[Path]
) -> tuple[int, str]:
    """``mambaxray-ctl ablation`` on ``rows``, every step replaced (no world, no training): each row
    scores :data:`OURS`."""
    monkeypatch.setattr(ablation, "prepare_demo_data", lambda *args: True)
    monkeypatch.setattr(ablation, "run_pipeline", lambda *args: (tmp_path / "predictions.jsonl", {}))
    monkeypatch.setattr(ablation, "evaluate", lambda *args, **kwargs: dict(OURS))
    parser = argparse.ArgumentParser()
    ablation.configure_parser(parser)
    args = parser.parse_args([*map(str, rows), "--out", str(tmp_path / "out"), "--configs", str(CONFIGS)])
    return ablation.run(args), str(args.out)


def test_the_ablation_table_puts_the_papers_numbers_beside_ours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    code, out = run_ablation_without_training(tmp_path, monkeypatch, ROW_FILES)
    assert code == 0
    printed = capsys.readouterr().out
    table = (Path(out) / "ablation.md").read_text()
    assert table.strip() in printed
    assert "Only the ordering of the rows is comparable, not the values." in table
    assert "demo world" in table and "IU X-ray" in table
    header = next(line for line in table.splitlines() if line.startswith("| # |"))
    assert header == (
        "| # | row | stages | BLEU-1 (ours / paper) | BLEU-4 (ours / paper) | ROUGE-L (ours / paper) | "
        "CIDEr (ours / paper) | CE-F1 (ours) |"
    )
    lines = {
        line.split(" | ")[0]: line for line in table.splitlines() if line[:3] in {f"| {i}" for i in TABLE_II}
    }
    assert sorted(lines) == [f"| {index}" for index in TABLE_II]
    for index, (_, _, _, metrics) in TABLE_II.items():
        for key, value in metrics.items():
            assert f"{OURS[key]:.3f} / {value:.3f}" in lines[f"| {index}"], (index, key)
        assert lines[f"| {index}"].endswith(" | 0.789 |")

    saved: dict[str, Any] = json.loads((Path(out) / "ablation.json").read_text())
    assert saved["note"] == ablation.TABLE_NOTE
    assert saved["paper"]["dataset"] == "iu_xray" and saved["paper"]["metrics"] == list(
        paper.TABLE_II_METRICS
    )
    assert [row["paper_row"] for row in saved["rows"]] == list(TABLE_II)
    for row in saved["rows"]:
        assert row["paper"] == TABLE_II[row["paper_row"]][3]
        assert row["metrics"] == OURS


def test_a_row_of_ones_own_has_no_paper_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    own = tmp_path / "8_own.yaml"
    own.write_text("name: own\nstage1: mae\nstage2: false\n")
    code, out = run_ablation_without_training(tmp_path, monkeypatch, [own])
    assert code == 0
    row = next(line for line in (Path(out) / "ablation.md").read_text().splitlines() if "| own |" in line)
    assert row.startswith("| - | own | stage1_mae → stage3_reportgen | 0.612 / - | 0.301 / - |")
    assert json.loads((Path(out) / "ablation.json").read_text())["rows"][0]["paper"] == {}


# The evaluate table -------------------------------------------------------------------------------------
def evaluate_output(tmp_path: Path, dataset: str, capsys: pytest.CaptureFixture) -> tuple[str, dict]:
    predictions = tmp_path / "predictions.jsonl"
    rows = [
        {
            "id": "1",
            "generated": "the heart is normal . no effusion .",
            "reference": "heart normal . no effusion .",
        },
        {"id": "2", "generated": "small left effusion .", "reference": "left pleural effusion ."},
    ]
    predictions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    parser = argparse.ArgumentParser()
    evaluate.configure_parser(parser)
    assert evaluate.run(parser.parse_args([str(predictions), "--dataset", dataset, "--meteor", "off"])) == 0
    return capsys.readouterr().out, json.loads((tmp_path / "metrics.json").read_text())


@pytest.mark.parametrize("dataset", ["iu_xray", "chexpert_plus"])
def test_evaluate_prints_the_papers_table_i_rows_of_the_dataset(
    dataset: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, metrics = evaluate_output(tmp_path, dataset, capsys)
    assert f"the MambaXray-CTL paper's Table I, {paper.DATASET_NAMES[dataset]}" in out
    lines = out.splitlines()
    header = lines[0].split()
    assert header == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "METEOR", "CIDEr"]
    for row in paper.TABLE_I[dataset]:
        line = next(line for line in lines if line.startswith(row.name + " "))
        cells = line[len(row.name) :].split()
        expected = [f"{row.metrics[k]:.3f}" if k in row.metrics else "-" for k in paper.TABLE_I_METRICS]
        assert cells == [*expected[:5], "-", expected[5]]  # the paper reports no METEOR
    large = next(line for line in lines if line.startswith("MambaXray-CTL-Large"))
    assert f"{TABLE_I_LARGE[dataset]['BLEU_4']:.3f}" in large
    assert not any(isinstance(value, dict) for value in metrics.values())
    assert not {"paper", "paper_rows"} & set(metrics)


def test_evaluate_prints_no_paper_rows_for_the_demo(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, _ = evaluate_output(tmp_path, "demo", capsys)
    assert "Table I" not in out and "MambaXray" not in out
    assert "paper's" not in out
