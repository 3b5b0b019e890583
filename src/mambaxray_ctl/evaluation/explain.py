"""``mambaxray-ctl generate --explain OUT_DIR``: the generated report with one heat map per sentence and
view (:func:`~mambaxray_ctl.stages.attribution.sentence_heat_maps`), as PNG overlays and an offline
HTML page.

``OUT_DIR`` receives ``report.txt``, ``view<v>.png`` (each input image in grey),
``sentence<k>_view<v>.png`` (the sentence's map stretched over the image, each patch cell over its
block, and blended over it in colour, blue → red, more opaque where higher:
:func:`~mambaxray_ctl.callbacks.images.overlay`, as TensorBoard shows it) and ``index.html``, which
shows them side by side and references only these files (relative paths, no external asset). A
sentence's maps share one scale over its views (its largest cell is red), so the views of a sentence
compare; sentences do not. Images wider or taller than :data:`MAX_SIDE` pixels are shown smaller.
Only PIL and NumPy draw.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from mambaxray_ctl.callbacks.images import gray, overlay
from mambaxray_ctl.data.images import load_image
from mambaxray_ctl.stages.attribution import SentenceMap, sentence_heat_maps

if TYPE_CHECKING:
    from torch import Tensor

    from mambaxray_ctl.stages.reportgen import ReportGenModule

MAX_SIDE = 512  # the longest side of the written images, in pixels


def grey_view(path: str | Path) -> np.ndarray:
    """The image file as grey values in [0, 1], (H, W), at most :data:`MAX_SIDE` pixels a side."""
    image = gray(load_image(path)).astype(np.float32)
    height, width = image.shape
    scale = min(1.0, MAX_SIDE / max(height, width))
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = np.asarray(Image.fromarray(image, mode="F").resize(size, Image.Resampling.BILINEAR))
    return np.clip(image, 0.0, 1.0)


def write_explanation(
    out_dir: str | Path, image_paths: Sequence[str | Path], report: str, maps: Sequence[SentenceMap]
) -> Path:
    """Write ``report.txt``, the grey views, one overlay per sentence and view, and ``index.html``
    into ``out_dir`` (created); returns the page's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.txt").write_text(report + "\n", encoding="utf-8")
    views = [grey_view(path) for path in image_paths]
    for v, grey in enumerate(views):
        Image.fromarray((grey * 255.0).round().astype(np.uint8), mode="L").save(out / f"view{v}.png")
    rows = []
    for k, item in enumerate(maps):
        heat = item.maps.numpy()
        if heat.shape[0] != len(views):
            raise ValueError(f"sentence {k}: maps for {heat.shape[0]} views, but {len(views)} images")
        scale = float(heat.max())
        for v, grey in enumerate(views):
            Image.fromarray(overlay(grey, heat[v], scale)).save(out / f"sentence{k:02d}_view{v}.png")
        rows.append((item.sentence, [f"sentence{k:02d}_view{v}.png" for v in range(len(views))], scale > 0))
    page = out / "index.html"
    page.write_text(_page(image_paths, report, rows), encoding="utf-8")
    return page


def _page(image_paths: Sequence[str | Path], report: str, rows: list[tuple[str, list[str], bool]]) -> str:
    names = [html.escape(Path(path).name) for path in image_paths]
    header = "".join(f"<th>{name}</th>" for name in names)
    originals = "".join(f'<td><img src="view{v}.png" alt="{name}"></td>' for v, name in enumerate(names))
    lines = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>Report heat maps</title>',
        "<style>body{font-family:sans-serif;margin:1em}img{max-width:320px;display:block}"
        "td,th{vertical-align:top;padding:4px;text-align:left}td.s{max-width:18em}</style>",
        "</head><body>",
        "<h1>Generated report</h1>",
        f"<p>{html.escape(report) or '<i>(empty)</i>'}</p>",
        "<p>One heat map per sentence and view: gradient &times; input of the sentence's log-likelihood "
        "with respect to the view's patch tokens (positive part), blue (low) to red (the sentence's "
        "highest cell over its views).</p>",
        f"<table><tr><th>sentence</th>{header}</tr>",
        f"<tr><td class=s><i>input</i></td>{originals}</tr>",
    ]
    for sentence, files, has_evidence in rows:
        note = "" if has_evidence else "<br><i>(no positive evidence: the map is empty)</i>"
        cells = "".join(f'<td><img src="{name}" alt="{name}"></td>' for name in files)
        lines.append(f"<tr><td class=s>{html.escape(sentence)}{note}</td>{cells}</tr>")
    lines += ["</table>", "</body></html>", ""]
    return "\n".join(lines)


def explain_study(
    module: ReportGenModule,
    images: Tensor,
    view_mask: Tensor,
    report: str,
    image_paths: Sequence[str | Path],
    out_dir: str | Path,
) -> Path:
    """The heat maps of ``report`` on one study (``images`` (views, C, H, W) as the module takes
    them, one per file of ``image_paths``), written by :func:`write_explanation`; returns the page."""
    maps = sentence_heat_maps(module, images, view_mask, report)
    return write_explanation(out_dir, image_paths, report, maps)
