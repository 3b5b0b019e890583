"""The notebooks (committed without outputs, run end to end on tiny artefacts) and the helpers of
:mod:`mambaxray_ctl.evaluation.qualitative` that hold their logic."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

from mambaxray_ctl.evaluation import qualitative as q
from test_stages_cli import cli_args, run_cli

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOK_NAMES = ("01-qualitative-inspection.ipynb", "02-embedding-space.ipynb", "03-heat-maps.ipynb")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# Helpers -------------------------------------------------------------------------------------------------
def test_sentences_are_split_on_the_cleaned_separator() -> None:
    assert q.split_sentences("the heart is normal . no effusion .") == ["the heart is normal", "no effusion"]
    assert q.split_sentences("  No  Effusion .  . the lungs are clear") == [
        "no effusion",
        "the lungs are clear",
    ]
    assert q.split_sentences("") == [] and q.split_sentences(" . ") == []


def test_shared_sentences() -> None:
    generated = "the heart is normal . no pleural effusion . a small pneumothorax ."
    reference = "no pleural effusion . the heart is enlarged . a small pneumothorax ."
    assert q.shared_sentences(generated, reference) == {"no pleural effusion", "a small pneumothorax"}
    assert q.shared_sentences("a . b .", "c .") == set()


def test_highlight_marks_the_shared_sentences_only() -> None:
    page = q.highlight_html("heart normal . lungs clear <ok> .", "lungs clear <ok> . effusion .")
    marked = [part.split("</mark>")[0].split(">", 1)[1] for part in page.split("<mark")[1:]]
    assert marked == ["lungs clear &lt;ok&gt; ."] * 2  # once in each column, escaped
    assert "heart normal ." in page and "heart normal .</mark>" not in page
    assert "effusion .</mark>" not in page
    assert "<mark" not in q.highlight_html("a .", "b .")


def test_highlight_table_has_one_row_per_prediction() -> None:
    rows = [
        {"id": "s1", "generated": "a . b .", "reference": "a .", "bleu4": 0.5},
        {"id": "s<2>", "generated": "c .", "reference": "d ."},
    ]
    table = q.highlight_table_html(rows)
    assert table.count("<tr>") == 3 and "s&lt;2&gt;" in table and "0.500" in table
    assert table.count("<mark") == 2


def test_load_predictions_keeps_the_first_row_of_an_id(tmp_path: Path) -> None:
    path = tmp_path / "predictions.jsonl"
    rows = [
        {"id": 1, "generated": "a .", "reference": "a .", "dataset": "demo"},
        {"id": "2", "generated": "b .", "reference": "c ."},
        {"id": "1", "generated": "other .", "reference": "a ."},
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    loaded = q.load_predictions(path)
    assert [row["id"] for row in loaded] == ["1", "2"] and loaded[0]["generated"] == "a ."
    assert loaded[0]["dataset"] == "demo"
    ranked = q.rank_by_bleu4(loaded)
    assert [row["id"] for row in ranked] == ["1", "2"] and ranked[0]["bleu4"] > ranked[1]["bleu4"]
    path.write_text('{"id": "1", "generated": "a"}\n')
    with pytest.raises(ValueError, match=r"predictions.jsonl:1: missing key\(s\) reference"):
        q.load_predictions(path)


def test_show_study_and_save_figure(world: Path, tmp_path: Path) -> None:
    study = json.loads((world / "annotation.json").read_text())["test"][0]
    row = {
        "id": study["id"],
        "generated": "no focal consolidation . x .",
        "reference": study["report"].lower(),
    }
    fig = q.show_study(row, world / "images", world / "annotation.json")
    assert len(fig.axes) == 3  # two views and the text
    path = q.save_figure(fig, tmp_path / "figures", "study.png")
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert q.study_image_paths(study["id"], world / "images") == [
        world / "images" / p for p in study["image_path"]
    ]
    with pytest.raises(FileNotFoundError, match="nope"):
        q.study_image_paths("nope", world / "images")


def test_alignment_summary_and_tsne_figure(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(12, 8)).astype(np.float32)
    aligned = image + 0.01 * rng.normal(size=image.shape).astype(np.float32)
    summary = q.alignment_summary(image, aligned)
    assert summary["matched_cosine"] > 0.99 > summary["unmatched_cosine"] and summary["i2t_R@1"] == 1.0
    fig = q.tsne_figure({"aligned": (image, aligned), "random": (image, rng.normal(size=(12, 8)))})
    assert len(fig.axes) == 2
    assert q.save_figure(fig, tmp_path, "tsne.png").read_bytes().startswith(PNG_MAGIC)


def test_notebook_parameters_from_the_environment(tmp_path: Path) -> None:
    env = {"MXR_NUM_STUDIES": "7", "MXR_FIGURE_DIR": str(tmp_path / "figs"), "MXR_PREDICTIONS": ""}
    metrics = tmp_path / "demo" / "metrics.json"
    metrics.parent.mkdir()
    metrics.write_text(json.dumps({"predictions": "/abs/p.jsonl", "runs": {"stage3_reportgen": "/abs/run"}}))
    params = q.notebook_parameters(
        env, PREDICTIONS=None, CKPT_CTL=None, FIGURE_DIR="x", NUM_STUDIES=3, DEMO_ROOT=str(metrics.parent)
    )
    assert params["NUM_STUDIES"] == 7 and params["FIGURE_DIR"] == tmp_path / "figs"
    assert params["PREDICTIONS"] == Path("/abs/p.jsonl")
    assert params["CKPT_CTL"] == Path("/abs/run/checkpoints/last.ckpt")
    assert q.notebook_parameters({}, IMAGE_ROOT="data/x")["IMAGE_ROOT"] == q.project_root() / "data/x"


def test_find_stage3_checkpoint_by_ctl_ft_weight(tmp_path: Path) -> None:
    for name, weight in (("a", 0.4), ("b", 0.0)):
        run = tmp_path / "stage3" / name
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "last.ckpt").write_bytes(b"")
        (run / "hparams.yaml").write_text(f"lm: {{name: lm}}\nctl_ft: {{weight: {weight}}}\n")
    assert q.find_stage3_checkpoint(tmp_path, ctl=True) == tmp_path / "stage3/a/checkpoints/last.ckpt"
    assert q.find_stage3_checkpoint(tmp_path, ctl=False) == tmp_path / "stage3/b/checkpoints/last.ckpt"
    with pytest.raises(FileNotFoundError, match="MXR_CKPT_NO_CTL"):
        q.find_stage3_checkpoint(tmp_path / "stage3" / "a", ctl=False)


# Notebooks -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_committed_notebooks_have_no_outputs(name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and "MXR_" not in code[0].source  # parameters are plain variables; the env is read later
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"{name}: cell {cell.id} has outputs"


@pytest.fixture(scope="module")
def artefacts(world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny stage-3 runs with (ctl_ft.weight 0.4) and without (0) CTL-FT, and predictions of the first."""
    out = tmp_path_factory.mktemp("runs")
    checkpoints = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name, weight in (("ctl", "0.4"), ("no_ctl", "0")):
            args = ["--trainer.max_steps=2", f"--model.init_args.ctl_ft.weight={weight}"]
            cli = run_cli(cli_args(world, out / name, "stage3", "fit", *args), monkeypatch)
            checkpoints[name] = Path(cli.trainer.checkpoint_callback.last_model_path)
        predict_args = cli_args(
            world, out / "predict", "stage3", "predict", f"--ckpt_path={checkpoints['ctl']}"
        )
        predict = run_cli(predict_args, monkeypatch)
    return {**checkpoints, "predictions": Path(predict.trainer.log_dir) / "predictions.jsonl"}


def _execute(name: str) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)  # in memory: the file keeps no outputs
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()
    return notebook


def _outputs_text(notebook: nbformat.NotebookNode, cell_id: str) -> str:
    cell = next(cell for cell in notebook.cells if cell.id == cell_id)
    parts = [out.get("text", "") for out in cell.outputs]
    parts += [out.get("data", {}).get("text/plain", "") for out in cell.outputs]
    return "\n".join(parts)


def _assert_png(path: Path) -> None:
    assert path.is_file(), f"{path} was not written"
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_notebooks_run_on_tiny_artefacts(
    artefacts: dict[str, Path], world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figures = tmp_path / "figures"
    monkeypatch.setenv("MXR_FIGURE_DIR", str(figures))
    monkeypatch.setenv("MXR_PREDICTIONS", str(artefacts["predictions"]))
    monkeypatch.setenv("MXR_IMAGE_ROOT", str(world / "images"))
    monkeypatch.setenv("MXR_ANNOTATION", str(world / "annotation.json"))
    monkeypatch.setenv("MXR_NUM_STUDIES", "2")
    qualitative = _execute(NOTEBOOK_NAMES[0])
    _assert_png(figures / "qualitative_best.png")
    _assert_png(figures / "qualitative_worst.png")
    assert "<table" in (figures / "qualitative.html").read_text()
    assert "6 studies" in _outputs_text(qualitative, "load")

    monkeypatch.delenv("MXR_IMAGE_ROOT")  # notebook 02 takes the data recorded in the checkpoint
    monkeypatch.delenv("MXR_ANNOTATION")
    monkeypatch.setenv("MXR_CKPT_CTL", str(artefacts["ctl"]))
    monkeypatch.setenv("MXR_CKPT_NO_CTL", str(artefacts["no_ctl"]))
    monkeypatch.setenv("MXR_SPLIT", "train")
    monkeypatch.setenv("MXR_MAX_STUDIES", "16")
    embedding = _execute(NOTEBOOK_NAMES[1])
    _assert_png(figures / "embedding_tsne.png")
    weights = _outputs_text(embedding, "setup")
    assert "'with CTL-FT': 0.4" in weights and "'without CTL-FT': 0.0" in weights
    assert "matched_cosine" in _outputs_text(embedding, "embed")


def test_heat_map_notebook_runs_on_tiny_artefacts(
    artefacts: dict[str, Path], world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Notebook 03 on the tiny run, with the references as generated reports (the tiny model's own
    reports need not name a finding)."""
    from mambaxray_ctl.data.cleaning import clean_report

    annotation = json.loads((world / "annotation.json").read_text())
    predictions = tmp_path / "predictions.jsonl"
    rows = [
        {"id": e["id"], "generated": clean_report(e["report"], "iu_xray"), "reference": ""}
        for e in annotation["test"]
    ]
    predictions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    figures = tmp_path / "figures"
    monkeypatch.setenv("MXR_FIGURE_DIR", str(figures))
    monkeypatch.setenv("MXR_CKPT_CTL", str(artefacts["ctl"]))
    monkeypatch.setenv("MXR_PREDICTIONS", str(predictions))
    monkeypatch.setenv("MXR_WORLD", str(world))
    monkeypatch.setenv("MXR_NUM_STUDIES", "4")
    heat_maps = _execute(NOTEBOOK_NAMES[2])
    _assert_png(figures / "heat_maps.png")
    assert "4 test studies, patch grid (4, 4)" in _outputs_text(heat_maps, "setup")
    table = _outputs_text(heat_maps, "game")
    assert "overall" in table and "lung prior" in table and "4 studies" in table


def test_collect_embeddings_are_the_ctl_features(artefacts: dict[str, Path]) -> None:
    module = q.load_stage3(artefacts["ctl"])
    loader = q.study_loader(artefacts["ctl"], "train", batch_size=4)
    ids, image, text = q.collect_embeddings(module, loader, max_studies=6)
    assert len(ids) == 6 and len(set(ids)) == 6 and image.shape == text.shape == (6, module.llm.hidden_size)
    batch = next(iter(loader))
    with torch.no_grad():
        visual = module.encode_visual(batch["images"], batch["view_mask"])
        inputs = module.llm.build_inputs(visual, batch["reports"])
        expected = module.text_proj(module.llm.target_embedding(inputs["target_ids"], inputs["target_mask"]))
    normalize = torch.nn.functional.normalize
    np.testing.assert_allclose(image[:4], normalize(visual.mean(1), dim=-1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(text[:4], normalize(expected, dim=-1).numpy(), rtol=1e-5, atol=1e-6)
    assert ids[:4] == batch["ids"]
