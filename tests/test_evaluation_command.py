"""The ``evaluate`` command: predictions file validation, metrics.json, table."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mambaxray_ctl.data.cleaning import clean_report
from mambaxray_ctl.evaluation import evaluate
from mambaxray_ctl.metrics.report import score_reports

FIXTURE = Path(__file__).parent / "fixtures" / "evaluation" / "golden_pairs.json"


def write_predictions(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def golden_rows() -> list[dict]:
    rows = json.loads(FIXTURE.read_text())
    return [
        {**row, "dataset": "iu_xray", "checkpoint": "last.ckpt", "decoding": {"num_beams": 3}} for row in rows
    ]


def run_command(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    evaluate.configure_parser(parser)
    return evaluate.run(parser.parse_args(list(argv)))


def test_metrics_json_equals_score_reports(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = golden_rows()
    duplicate = {**rows[0], "generated": "another text ."}
    path = write_predictions(tmp_path / "predictions.jsonl", [*rows, duplicate])
    assert run_command(str(path), "--dataset", "iu_xray", "--meteor", "off") == 0

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    expected = score_reports(
        {r["id"]: r["generated"] for r in rows}, {r["id"]: r["reference"] for r in rows}, False
    )
    assert {key: metrics[key] for key in expected} == expected
    assert "METEOR" not in metrics and "CE_F1_macro" not in metrics
    assert metrics["num_studies"] == 20
    assert metrics["num_empty_generated"] == 1
    assert metrics["num_duplicate_ids"] == 1
    assert metrics["num_conflicting_duplicates"] == 1
    assert (metrics["dataset"], metrics["predictions"], metrics["cleaning"]) == ("iu_xray", str(path), "none")

    out = capsys.readouterr().out
    assert "ours (predictions.jsonl)" in out
    assert f"{expected['BLEU_4']:.3f}" in out
    assert "MambaXray-CTL-Large" in out  # the paper's Table I rows, beside ours
    assert "clinical scores: omitted" in out
    assert "METEOR: n/a" in out


def test_clean_applies_the_dataset_rule(tmp_path: Path) -> None:
    rows = [
        {
            "id": "1",
            "generated": "The heart is normal. No effusion.",
            "reference": "Heart size normal. No effusion.",
        },
        {
            "id": "2",
            "generated": "Findings: small left effusion.",
            "reference": "Findings: Left pleural effusion.",
        },
    ]
    path = write_predictions(tmp_path / "raw.jsonl", rows)
    out = tmp_path / "scores.json"
    assert (
        run_command(str(path), "--dataset", "chexpert_plus", "--meteor", "off", "--clean", "--out", str(out))
        == 0
    )
    metrics = json.loads(out.read_text())
    expected = score_reports(
        {r["id"]: clean_report(r["generated"], "mimic_cxr") for r in rows},
        {r["id"]: clean_report(r["reference"], "mimic_cxr") for r in rows},
        meteor=False,
    )
    assert {key: metrics[key] for key in expected} == expected
    assert metrics["cleaning"] == "mimic_cxr"


def test_clean_uses_the_rule_of_each_datasets_datamodule() -> None:
    import inspect

    from mambaxray_ctl.data.datamodules import CheXpertPlusDataModule, IUXrayDataModule
    from mambaxray_ctl.demo.datamodule import DemoDataModule

    modules = (IUXrayDataModule, CheXpertPlusDataModule, DemoDataModule)
    defaults = {m.dataset_name: inspect.signature(m).parameters["cleaning"].default for m in modules}
    assert defaults == evaluate.DATASET_RULES


@pytest.mark.parametrize("rule", ["iu_xray", "mimic_cxr"])
def test_cleaning_is_not_idempotent(rule: str) -> None:
    """Why texts are scored as written unless --clean: a second pass changes cleaned text."""
    once = clean_report("The heart is normal. No effusion.", rule)
    assert once == "the heart is normal . no effusion ."
    assert clean_report(once, rule) == "the heart is normal . no effusion  ."


def test_demo_dataset_gets_clinical_scores(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_predictions(tmp_path / "demo.jsonl", golden_rows())
    assert run_command(str(path), "--dataset", "demo", "--meteor", "off") == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {
        "CE_precision_macro",
        "CE_recall_macro",
        "CE_F1_macro",
        "CE_F1_micro",
        "CE_F1/cardiomegaly",
    } <= set(metrics)
    assert metrics["labeler"] == "DemoWorldLabeler"
    # a labeller without subsets or settings: no empty keys, and the CE macro columns of the table only
    assert "clinical_subsets" not in metrics and "labeler_settings" not in metrics
    out = capsys.readouterr().out
    assert "CE-F1" in out and "paper rows" not in out
    assert "clinical efficacy (" not in out and "findings, micro" not in out

    no_labels = evaluate.evaluate_predictions(path, "demo", labeler=None, meteor=False)
    assert "CE_F1_macro" not in no_labels


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"id": "x", "generated": "a ."}', "missing key(s) reference"),
        ('["x", "a .", "b ."]', "expected a JSON object"),
        ('{"id": "x", "generated": null, "reference": "b ."}', "'generated' must be a string"),
        ('{"id": [1], "generated": "a .", "reference": "b ."}', "'id' must be a string or an integer"),
    ],
)
def test_malformed_line_names_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, line: str, message: str
) -> None:
    rows = golden_rows()[:2]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + line + "\n" + json.dumps(rows[1]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3") as info:
        evaluate.read_predictions(path)
    assert message in str(info.value)
    assert run_command(str(path), "--dataset", "iu_xray", "--meteor", "off") == 1
    assert f"bad.jsonl:3: {message}" in capsys.readouterr().err
    assert not (tmp_path / "metrics.json").exists()


def test_errors_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    assert run_command(str(empty), "--dataset", "iu_xray") == 1
    assert "empty.jsonl: no predictions" in capsys.readouterr().err
    assert run_command(str(tmp_path / "missing.jsonl"), "--dataset", "iu_xray") == 1
    assert "missing.jsonl" in capsys.readouterr().err
    path = write_predictions(tmp_path / "p.jsonl", golden_rows()[:2])
    assert run_command(str(path), "--dataset", "iu_xray", "--labeler", "nope") == 1
    assert "unknown labeler 'nope'" in capsys.readouterr().err


def test_integer_ids_become_strings(tmp_path: Path) -> None:
    path = tmp_path / "ints.jsonl"
    path.write_text('{"id": 7, "generated": "a .", "reference": "b ."}\n', encoding="utf-8")
    assert evaluate.read_predictions(path) == [("7", "a .", "b .")]


def test_table_without_optional_columns() -> None:
    table = evaluate.format_table({"BLEU_1": 0.5, "BLEU_4": 0.1}, "demo", "x.jsonl")
    header, row = table.splitlines()
    assert "METEOR" in header and "CE-F1" not in header
    assert row.startswith("ours (x.jsonl)") and "0.500" in row and "n/a" in row


def test_reference_source_and_checkpoint_are_carried_into_the_metrics(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "generated": "no effusion .", "reference": "no effusion ."},
        {"id": "b", "generated": "heart is large .", "reference": "heart ."},
    ]
    rows = [{**row, "reference_source": "truncated"} for row in rows]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps({**row, "checkpoint": "best.ckpt"}) + "\n" for row in rows))
    metrics = evaluate.evaluate_predictions(path, "iu_xray", meteor=False)
    assert metrics["reference_source"] == "truncated" and metrics["checkpoint"] == "best.ckpt"
    rows[1]["reference_source"] = "cleaned"  # rows of two runs merged into one file
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"predictions.jsonl: its rows record different 'reference_source'"):
        evaluate.evaluate_predictions(path, "iu_xray", meteor=False)
    path.write_text(json.dumps({"id": "a", "generated": "x .", "reference": "x ."}) + "\n")  # older files
    assert evaluate.evaluate_predictions(path, "iu_xray", meteor=False)["reference_source"] == "cleaned"


def test_output_folders_are_created_and_a_bad_path_fails_before_scoring(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_predictions(tmp_path / "predictions.jsonl", golden_rows()[:3])
    out, page = tmp_path / "new" / "metrics.json", tmp_path / "pages" / "deep" / "report.html"
    argv = [str(path), "--dataset", "iu_xray", "--meteor", "off", "--out", str(out)]
    assert run_command(*argv, "--html", str(page)) == 0
    assert json.loads(out.read_text())["num_studies"] == 3 and page.is_file()
    capsys.readouterr()

    scored = []
    monkeypatch.setattr(evaluate, "score_reports", lambda *args, **kwargs: scored.append(args) or {})
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    bad_page = blocker / "report.html"  # its folder is a file: cannot be created
    argv = [str(path), "--dataset", "iu_xray", "--meteor", "off", "--out", str(tmp_path / "m.json")]
    assert run_command(*argv, "--html", str(bad_page)) == 1
    assert str(blocker) in capsys.readouterr().err
    assert scored == [] and not (tmp_path / "m.json").exists()  # failed before the scoring


def test_the_page_is_written_after_the_metrics(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_predictions(tmp_path / "predictions.jsonl", golden_rows()[:3])
    page = tmp_path / "report.html"
    page.mkdir()  # a folder where the page should go: writing it fails after the scoring
    assert run_command(str(path), "--dataset", "iu_xray", "--meteor", "off", "--html", str(page)) == 1
    assert str(page) in capsys.readouterr().err
    assert json.loads((tmp_path / "metrics.json").read_text())["num_studies"] == 3  # the scores are kept


def test_labeller_options_without_a_named_labeller_name_the_options(tmp_path: Path) -> None:
    path = write_predictions(tmp_path / "p.jsonl", golden_rows()[:2])
    with pytest.raises(
        ValueError, match=r"labeller options \(tokenizer, weights\) need a labeller given by name"
    ):
        evaluate.evaluate_predictions(
            path, "iu_xray", labeler=None, labeler_options={"weights": "w", "tokenizer": "t"}
        )


def test_importing_evaluate_does_not_import_the_chexbert_model() -> None:
    """The command's module names CheXbert's choices without importing BERT (transformers' BertModel)."""
    code = (
        "import sys, mambaxray_ctl.evaluation.evaluate as e; "
        "assert e.UNCERTAIN_CHOICES == ('negative', 'positive'); "
        "print('mambaxray_ctl.metrics.chexbert' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
