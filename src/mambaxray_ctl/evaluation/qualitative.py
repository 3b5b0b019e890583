"""Qualitative inspection of stage-3 results: the logic behind ``notebooks/01-*`` and ``notebooks/02-*``.

* Reports (the paper's Fig. 2): :func:`load_predictions` reads a ``predictions.jsonl``,
  :func:`rank_by_bleu4` orders its studies by sentence BLEU-4,
  :func:`~mambaxray_ctl.data.cleaning.shared_sentences` finds the sentences a generated report shares
  with its reference (the ones ``evaluate --html`` marks too), :func:`highlight_html` /
  :func:`highlight_table_html` mark them in HTML and :func:`show_study` draws a study's images
  beside both texts, shared sentences highlighted.
* Embedding space (the paper's Fig. 3): :func:`collect_embeddings` (from
  :mod:`mambaxray_ctl.callbacks.embeddings`) gives, per study, the mean mapped visual token and
  ``text_proj`` of the mean frozen embedding of the reference's target tokens (the two sides of the
  CTL-FT loss); :func:`tsne_figure` draws one t-SNE panel per run (with and without
  CTL-FT) and :func:`alignment_summary` measures how well the pairs line up.
* Notebook parameters: :func:`notebook_parameters` applies ``MXR_<NAME>`` environment variables and
  fills ``None`` paths with the artefacts of ``make demo`` (``outputs/demo/metrics.json``) and of the
  ablation without CTL-FT (the newest stage-3 run under ``outputs/`` trained with ``ctl_ft.weight: 0``).

matplotlib and scikit-learn (the ``notebooks`` extra) are imported only by the functions that draw.
"""

from __future__ import annotations

import html
import json
import os
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mambaxray_ctl.callbacks.embeddings import collect_embeddings
from mambaxray_ctl.compat import upgrade_stage3_hparams
from mambaxray_ctl.data.cleaning import shared_sentences, split_sentences
from mambaxray_ctl.data.images import IMAGE_SUFFIXES, load_image
from mambaxray_ctl.evaluation.evaluate import read_prediction_rows

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch.utils.data import DataLoader

    from mambaxray_ctl.data.datamodules import ReportDataModule
    from mambaxray_ctl.stages.reportgen import ReportGenModule

ENV_PREFIX = "MXR_"
DEMO_ROOT = "outputs/demo"
RUNS_ROOT = "outputs"
HIGHLIGHT = "#ffe066"  # the colour of shared sentences, in HTML and in figures
_PATH_PARAMETERS = frozenset(
    {
        "PREDICTIONS",
        "IMAGE_ROOT",
        "ANNOTATION",
        "FIGURE_DIR",
        "CKPT_CTL",
        "CKPT_NO_CTL",
        "LLM",
        "DEMO_ROOT",
        "WORLD",
    }
)


# Sentences -----------------------------------------------------------------------------------------------
def _marked_sentences(text: str, shared: set[str]) -> str:
    parts = []
    for sentence in split_sentences(text):
        escaped = html.escape(sentence) + " ."
        parts.append(
            f'<mark style="background:{HIGHLIGHT}">{escaped}</mark>' if sentence in shared else escaped
        )
    return " ".join(parts) or "<i>(empty)</i>"


def highlight_html(generated: str, reference: str) -> str:
    """Both reports side by side in an HTML table, the sentences they share in ``<mark>``."""
    shared = shared_sentences(generated, reference)
    return (
        '<table style="border-collapse:collapse;text-align:left">'
        "<tr><th>generated</th><th>reference</th></tr>"
        f'<tr><td style="vertical-align:top;padding:4px">{_marked_sentences(generated, shared)}</td>'
        f'<td style="vertical-align:top;padding:4px">{_marked_sentences(reference, shared)}</td></tr></table>'
    )


def highlight_table_html(rows: Iterable[Mapping[str, Any]]) -> str:
    """One table row per prediction (id, BLEU-4 when present, generated, reference), shared sentences
    in ``<mark>``."""
    cell = 'style="vertical-align:top;padding:4px;border-top:1px solid #ccc"'
    lines = [
        '<table style="border-collapse:collapse;text-align:left">',
        "<tr><th>study</th><th>BLEU-4</th><th>generated</th><th>reference</th></tr>",
    ]
    for row in rows:
        shared = shared_sentences(row["generated"], row["reference"])
        bleu = f"{row['bleu4']:.3f}" if "bleu4" in row else ""
        lines.append(
            f"<tr><td {cell}>{html.escape(str(row['id']))}</td><td {cell}>{bleu}</td>"
            f"<td {cell}>{_marked_sentences(row['generated'], shared)}</td>"
            f"<td {cell}>{_marked_sentences(row['reference'], shared)}</td></tr>"
        )
    lines.append("</table>")
    return "\n".join(lines)


# Predictions ---------------------------------------------------------------------------------------------
def load_predictions(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``predictions.jsonl`` (first row of each id kept); errors name the file and line."""
    rows: dict[str, dict[str, Any]] = {}
    for row in read_prediction_rows(path):
        rows.setdefault(row["id"], row)
    return list(rows.values())


def rank_by_bleu4(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``rows`` with their sentence BLEU-4 (``"bleu4"``), best first (stable for ties)."""
    from mambaxray_ctl.metrics.report import sentence_bleu4

    scored = [{**row, "bleu4": sentence_bleu4(row["generated"], row["reference"])} for row in rows]
    return sorted(scored, key=lambda row: -row["bleu4"])


def _annotation_paths(annotation: str | Path | Mapping[str, Any]) -> dict[str, list[str]]:
    data = annotation if isinstance(annotation, Mapping) else json.loads(Path(annotation).read_text())
    paths: dict[str, list[str]] = {}
    for entries in data.values():
        if isinstance(entries, list):
            for entry in entries:
                if isinstance(entry, dict) and "id" in entry:
                    image_path = entry.get("image_path") or []
                    paths.setdefault(
                        str(entry["id"]), [image_path] if isinstance(image_path, str) else image_path
                    )
    return paths


def study_image_paths(
    study_id: str, image_root: str | Path, annotation: str | Path | Mapping[str, Any] | None = None
) -> list[Path]:
    """The image files of a study: its ``image_path`` entries in ``annotation`` when given, else the
    images in ``image_root/<study_id>/`` (the IU X-ray and demo layout), sorted.

    :raises FileNotFoundError: naming the study and where it was looked for.
    """
    root = Path(image_root)
    if annotation is not None:
        relative = _annotation_paths(annotation).get(str(study_id))
        if not relative:
            raise FileNotFoundError(f"study {study_id!r} is not in the annotation {annotation}")
        return [root / rel for rel in relative]
    folder = root / str(study_id)
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no images for study {study_id!r} in {folder}")
    return files


# Figures -------------------------------------------------------------------------------------------------
_LINE_INCHES = 0.2  # height of one line of report text in a figure


def _wrapped(text: str, width: int) -> list[tuple[str, str]]:
    """(sentence, its wrapped text) of every sentence of a report."""
    return [
        (sentence, textwrap.fill(sentence + " .", width=width)) for sentence in split_sentences(text)
    ] or [("", "(empty)")]


def _draw_text(ax: Any, blocks: list[tuple[str, str]], shared: set[str], width: int, line: float) -> None:
    """Titled blocks of sentences from the top of ``ax`` down; ``line`` is one line in axes fraction."""
    y = 1.0
    for title, text in blocks:
        ax.text(0.0, y, title, fontsize=10, fontweight="bold", va="top", transform=ax.transAxes)
        y -= line * 1.4
        for sentence, wrapped in _wrapped(text, width):
            box = {"facecolor": HIGHLIGHT, "edgecolor": "none", "pad": 1.0} if sentence in shared else None
            ax.text(0.0, y, wrapped, fontsize=9, va="top", transform=ax.transAxes, bbox=box)
            y -= line * (wrapped.count("\n") + 1.3)
        y -= line


def show_study(
    row: Mapping[str, Any],
    image_root: str | Path,
    annotation: str | Path | Mapping[str, Any] | None = None,
    text_width: int = 60,
) -> Figure:
    """A study's images beside its generated and reference reports, shared sentences highlighted
    (the layout of the paper's Fig. 2). ``row`` is a prediction (``id``, ``generated``, ``reference``)."""
    from matplotlib.figure import Figure

    paths = study_image_paths(row["id"], image_root, annotation)
    blocks = [("Generated", row["generated"]), ("Reference", row["reference"])]
    lines = sum(
        2.4 + sum(wrapped.count("\n") + 1.3 for _, wrapped in _wrapped(text, text_width))
        for _, text in blocks
    )
    height = max(4.2, _LINE_INCHES * lines + 1.0)
    fig = Figure(figsize=(3.2 * len(paths) + 6.5, height), layout="constrained")
    grid = fig.add_gridspec(1, len(paths) + 2)
    for index, path in enumerate(paths):
        ax = fig.add_subplot(grid[0, index])
        image = load_image(path)
        if image.shape[0] == 1:
            ax.imshow(image[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0)
        else:
            ax.imshow(image.permute(1, 2, 0).numpy())
        ax.set_title(path.name, fontsize=9)
        ax.axis("off")
    ax = fig.add_subplot(grid[0, len(paths) :])
    ax.axis("off")
    shared = shared_sentences(row["generated"], row["reference"])
    _draw_text(ax, blocks, shared, text_width, _LINE_INCHES / (height - 0.6))
    bleu = f", BLEU-4 {row['bleu4']:.3f}" if "bleu4" in row else ""
    fig.suptitle(f"study {row['id']}{bleu}: shared sentences highlighted", fontsize=10)
    return fig


def save_figure(fig: Figure, folder: str | Path, name: str, dpi: int = 110) -> Path:
    """Save ``fig`` as ``folder/name`` (the folder is created); returns the path."""
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def save_html(text: str, folder: str | Path, name: str) -> Path:
    """Write an HTML fragment as a page ``folder/name`` (the folder is created); returns the path."""
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"></head><body>\n{text}\n</body></html>\n'
    )
    return path


# Embeddings ----------------------------------------------------------------------------------------------
def _normalize(array: np.ndarray) -> np.ndarray:
    return array / np.clip(np.linalg.norm(array, axis=1, keepdims=True), 1e-12, None)


def alignment_summary(image: np.ndarray, text: np.ndarray) -> dict[str, float]:
    """Cosine similarity of the matched (image, text) pairs vs the unmatched ones, and image→text and
    text→image recall@1/5 over the given studies (chance: k / N)."""
    from mambaxray_ctl.metrics.retrieval import recall_at_k

    similarity = torch.from_numpy(_normalize(image) @ _normalize(text).T)
    n = similarity.shape[0]
    matched = similarity.diagonal()
    unmatched = (similarity.sum() - matched.sum()) / max(n * n - n, 1)
    summary = {"matched_cosine": float(matched.mean()), "unmatched_cosine": float(unmatched)}
    summary |= {f"i2t_{k}": v for k, v in recall_at_k(similarity, (1, 5)).items()}
    summary |= {f"t2i_{k}": v for k, v in recall_at_k(similarity.T, (1, 5)).items()}
    return summary


def tsne_points(image: np.ndarray, text: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A joint 2-D t-SNE (cosine metric) of the image and text embeddings: ``(image_2d, text_2d)``."""
    from sklearn.manifold import TSNE

    points = np.concatenate([_normalize(image), _normalize(text)])
    perplexity = float(min(30.0, max(2.0, (len(points) - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca", random_state=seed)
    flat = tsne.fit_transform(points)
    return flat[: len(image)], flat[len(image) :]


def tsne_figure(
    embeddings_by_run: Mapping[str, tuple[np.ndarray, np.ndarray]], seed: int = 0, max_links: int = 40
) -> Figure:
    """One t-SNE panel per run (e.g. with and without CTL-FT, the paper's Fig. 3): image embeddings
    as dots, text embeddings as crosses, the first ``max_links`` pairs joined by a grey line; the
    title gives the matched vs unmatched cosine similarity."""
    from matplotlib.figure import Figure

    runs = list(embeddings_by_run.items())
    if not runs:
        raise ValueError("no runs to draw")
    fig = Figure(figsize=(5.5 * len(runs), 5.2), layout="constrained")
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, (name, (image, text)) in zip(axes, runs, strict=True):
        if image.shape != text.shape:
            raise ValueError(f"{name}: image {image.shape} and text {text.shape} embeddings differ in shape")
        image_2d, text_2d = tsne_points(image, text, seed)
        for a, b in list(zip(image_2d, text_2d, strict=True))[:max_links]:
            ax.plot([a[0], b[0]], [a[1], b[1]], color="0.75", linewidth=0.6, zorder=1)
        ax.scatter(image_2d[:, 0], image_2d[:, 1], s=14, c="tab:blue", label="image", zorder=2)
        ax.scatter(text_2d[:, 0], text_2d[:, 1], s=18, c="tab:orange", marker="x", label="text", zorder=2)
        summary = alignment_summary(image, text)
        ax.set_title(
            f"{name} ({len(image)} studies)\ncosine matched {summary['matched_cosine']:.2f}, "
            f"unmatched {summary['unmatched_cosine']:.2f}",
            fontsize=10,
        )
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(loc="best", fontsize=8)
    return fig


# Loading runs --------------------------------------------------------------------------------------------
def study_loader(
    checkpoint: str | Path,
    split: str = "test",
    annotation: str | Path | None = None,
    image_root: str | Path | None = None,
    batch_size: int = 16,
) -> DataLoader:
    """A dataloader over ``split`` built like the run's own: the DataModule class and arguments
    recorded in the stage-3 ``checkpoint`` (``annotation``/``image_root`` replace moved files)."""
    from mambaxray_ctl.compat import import_class
    from mambaxray_ctl.data.datamodules import ReportDataModule
    from mambaxray_ctl.evaluation.generate import inspect_checkpoint

    recorded = dict(inspect_checkpoint(checkpoint).datamodule_hparams)
    cls = import_class(str(recorded.pop("_class_path", "mambaxray_ctl.data.ReportDataModule")))
    recorded.pop("_instantiator", None)
    if not (isinstance(cls, type) and issubclass(cls, ReportDataModule)):
        raise ValueError(f"{checkpoint} records the DataModule {cls!r}, not a ReportDataModule")
    if "annotation" not in recorded and annotation is None:
        raise ValueError(f"{checkpoint} records no DataModule arguments; pass annotation= and image_root=")
    overrides: dict[str, Any] = {
        "predict_split": split,
        "eval_batch_size": batch_size,
        "num_workers": 0,
        "persistent_workers": False,
        "mode": "reports",
    }
    if annotation is not None:
        overrides["annotation"] = str(annotation)
    if image_root is not None:
        overrides["image_root"] = str(image_root)
    for key in ("annotation", "image_root"):  # relative to where the run was started: the project root
        if recorded.get(key):
            recorded[key] = str(_from_project_root(recorded[key], checkpoint))
    datamodule: ReportDataModule = cls(**{**recorded, **overrides})
    datamodule.setup("predict")
    return datamodule.predict_dataloader()


def load_stage3(checkpoint: str | Path, llm: str | None = None, device: str = "cpu") -> ReportGenModule:
    """The stage-3 module of ``checkpoint`` in eval mode (``llm`` replaces a moved LM folder)."""
    from mambaxray_ctl.evaluation.generate import inspect_checkpoint, load_module

    info = inspect_checkpoint(checkpoint)
    if llm is None and info.hparams.get("lm", {}).get("name"):
        llm = str(_from_project_root(info.hparams["lm"]["name"], checkpoint))
    return load_module(info, llm, device)


def _from_project_root(path: str | Path, checkpoint: str | Path) -> Path:
    """A relative ``path`` recorded in a run: as is if it exists from here, else from the project root
    that holds ``checkpoint`` (the notebooks run from ``notebooks/``)."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    candidate = project_root(Path(checkpoint).resolve().parent) / path
    return candidate if candidate.exists() else path


def checkpoint_hparams(checkpoint: str | Path) -> dict[str, Any]:
    """The hyper-parameters recorded in a stage-3 checkpoint (``ctl_ft``, ``lm``, ...)."""
    from mambaxray_ctl.evaluation.generate import inspect_checkpoint

    return inspect_checkpoint(checkpoint).hparams


def embeddings_from_checkpoint(
    checkpoint: str | Path,
    dataloader: Iterable[Mapping[str, Any]],
    max_studies: int | None,
    llm: str | None = None,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """:func:`collect_embeddings` of the stage-3 module in ``checkpoint``."""
    return collect_embeddings(load_stage3(checkpoint, llm), dataloader, max_studies)


# Notebook parameters -------------------------------------------------------------------------------------
def project_root(start: str | Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the working directory) holding
    ``pyproject.toml``: notebooks run in ``notebooks/`` but the artefacts are relative to the project."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file():
            return folder
    return here


def demo_artefacts(demo_root: str | Path = DEMO_ROOT) -> dict[str, Path]:
    """``predictions`` and the stage-3 ``ckpt_ctl`` (its ``last.ckpt``) of a ``make demo`` run, from
    ``<demo_root>/metrics.json`` (relative paths there are taken from the project root)."""
    metrics_path = Path(demo_root) / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(
            f"{metrics_path} not found: run `make demo` first, or set the MXR_* variables"
        )
    metrics = json.loads(metrics_path.read_text())
    base = project_root(demo_root)  # the demo writes paths relative to where it ran: the project root
    return {
        "predictions": base / metrics["predictions"],
        "ckpt_ctl": base / metrics["runs"]["stage3_reportgen"] / "checkpoints" / "last.ckpt",
    }


def _ctl_weight(run_dir: Path) -> float | None:
    import yaml

    from mambaxray_ctl.stages.reportgen import CTLFTSpec

    hparams = run_dir / "hparams.yaml"
    if not hparams.is_file():
        return None
    try:
        data = yaml.safe_load(hparams.read_text())
    except yaml.YAMLError:
        return None
    if not isinstance(data, dict):
        return None
    data = upgrade_stage3_hparams(data)
    value = data.get("ctl_ft", {}).get("weight", CTLFTSpec.weight) if "lm" in data else None
    return float(value) if isinstance(value, int | float) else None


def find_stage3_checkpoint(runs_root: str | Path = RUNS_ROOT, ctl: bool = False) -> Path:
    """The newest ``checkpoints/last.ckpt`` under ``runs_root`` of a stage-3 run (its ``hparams.yaml``
    has ``lm``) trained with CTL-FT (``ctl_ft.weight > 0``) or without (``ctl_ft.weight == 0``)."""
    found = []
    for ckpt in Path(runs_root).rglob("checkpoints/last.ckpt"):
        weight = _ctl_weight(ckpt.parent.parent)
        if weight is not None and (weight > 0) == ctl:
            found.append(ckpt)
    if not found:
        kind = "with CTL-FT (ctl_ft.weight > 0)" if ctl else "without CTL-FT (ctl_ft.weight 0)"
        raise FileNotFoundError(
            f"no stage-3 run {kind} under {runs_root}: train one (e.g. `make stage3 "
            f"ARGS=--model.init_args.ctl_ft.weight=0`) or set MXR_CKPT_{'CTL' if ctl else 'NO_CTL'}"
        )
    return max(found, key=lambda path: path.stat().st_mtime)


def notebook_parameters(env: Mapping[str, str] | None = None, **defaults: Any) -> dict[str, Any]:
    """The notebook's parameters: each ``NAME=default`` is replaced by the ``MXR_NAME`` environment
    variable when set (converted to the default's type for ints, floats and bools).

    Path parameters (``PREDICTIONS``, ``IMAGE_ROOT``, ``ANNOTATION``, ``FIGURE_DIR``, ``CKPT_CTL``,
    ``CKPT_NO_CTL``, ``LLM``, ``DEMO_ROOT``, ``WORLD``) become :class:`Path` objects, relative ones taken
    from the project root. ``None`` for ``PREDICTIONS`` / ``CKPT_CTL`` means the ``make demo`` artefact
    (:func:`demo_artefacts` of ``DEMO_ROOT``); for ``CKPT_NO_CTL``, the newest stage-3 run without
    CTL-FT under ``outputs/`` (:func:`find_stage3_checkpoint`). Other ``None`` values stay ``None``.
    """
    env = os.environ if env is None else env
    root = project_root()
    values: dict[str, Any] = {}
    for name, default in defaults.items():
        raw = env.get(ENV_PREFIX + name)
        value: Any = default if raw is None or raw == "" else _convert(raw, default)
        if name in _PATH_PARAMETERS and value is not None:
            value = Path(value).expanduser()
            value = value if value.is_absolute() else root / value
        values[name] = value
    demo_root = values.get("DEMO_ROOT") or root / DEMO_ROOT
    for name, key in (("PREDICTIONS", "predictions"), ("CKPT_CTL", "ckpt_ctl")):
        if name in values and values[name] is None:
            values[name] = demo_artefacts(demo_root)[key]
    if "CKPT_NO_CTL" in values and values["CKPT_NO_CTL"] is None:
        values["CKPT_NO_CTL"] = find_stage3_checkpoint(root / RUNS_ROOT, ctl=False)
    return values


def _convert(raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw
