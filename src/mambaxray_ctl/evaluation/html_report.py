"""``mambaxray-ctl evaluate --html OUT.html``: every scored study on one page that works offline.

One self-contained HTML file (inline CSS and a short inline script, no external assets). It has one
table row per scored study, in the order of the predictions file. A row holds the number of the
study's row in that file, its id, its sentence BLEU-4
(:func:`~mambaxray_ctl.metrics.report.sentence_bleu4`: the coco-caption scorer on that one pair, not a
share of the corpus BLEU-4), and the generated and reference texts side by side. Texts are shown as
scored, HTML-escaped, and the sentences the two texts share are marked. Clicking a column header sorts
by it; BLEU-4 sorts best first on the first click.

*Shared* sentences are equal after :func:`~mambaxray_ctl.data.cleaning.split_sentences`: cleaned
reports split at their stand-alone ``"."``, whitespace collapsed (the whitespace tokens that BLEU,
ROUGE-L and CIDEr see) and case folded (R2Gen-cleaned text is lower-case already): those of
:func:`~mambaxray_ctl.data.cleaning.shared_sentences`, which the notebooks highlight too.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

from mambaxray_ctl.data.cleaning import sentence_spans, shared_sentences, split_sentences
from mambaxray_ctl.metrics.report import sentence_bleu4

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; width: 100%; }
th, td { border-top: 1px solid #ccc; padding: 6px 8px; text-align: left; vertical-align: top; }
th { position: sticky; top: 0; background: #f4f4f4; }
th button { font: inherit; font-weight: bold; border: 0; background: none; cursor: pointer; padding: 0; }
th[aria-sort="ascending"] button::after { content: " \\25B2"; }
th[aria-sort="descending"] button::after { content: " \\25BC"; }
td.number { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.report { width: 42%; white-space: pre-wrap; }
mark { background: #ffe066; }
.empty { color: #888; font-style: italic; }
"""

# Sorts the rows by the clicked column's data attribute, first in the header's data-first direction,
# then reversed on every click; equal values keep their order (Array.prototype.sort is stable).
_SCRIPT = """
(function () {
  var table = document.getElementById("studies");
  var body = table.tBodies[0];
  var headers = table.querySelectorAll("th[aria-sort]");
  headers.forEach(function (th) {
    th.querySelector("button").addEventListener("click", function () {
      var key = th.dataset.key, numeric = th.dataset.type === "number";
      var state = th.getAttribute("aria-sort");
      var descending = state === "none" ? th.dataset.first === "descending" : state === "ascending";
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.dataset[key], y = b.dataset[key];
        var order = numeric ? Number(x) - Number(y) : x.localeCompare(y, undefined, {numeric: true});
        return descending ? -order : order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
      headers.forEach(function (other) { other.setAttribute("aria-sort", "none"); });
      th.setAttribute("aria-sort", descending ? "descending" : "ascending");
    });
  });
})();
"""


def marked_text(text: str, shared: set[str]) -> str:
    """``text`` HTML-escaped as written, each of its sentences (:func:`sentence_spans`) whose
    :func:`split_sentences` form is in ``shared`` wrapped in ``<mark>``."""
    if not text.strip():
        return '<span class="empty">(empty)</span>'
    parts, position = [], 0
    for (start, end), sentence in zip(sentence_spans(text), split_sentences(text), strict=True):
        if sentence in shared:
            parts += [html.escape(text[position:start]), f"<mark>{html.escape(text[start:end])}</mark>"]
            position = end
    return "".join([*parts, html.escape(text[position:])])


def study_row(row: int, study: str, generated: str, reference: str) -> str:
    """One ``<tr>``: the row number, the id, the sentence BLEU-4 (exact in ``data-bleu4``, three
    decimals shown) and both texts with their shared sentences marked."""
    shared = shared_sentences(generated, reference)
    bleu4 = sentence_bleu4(generated, reference)
    return (
        f'<tr data-row="{row}" data-id="{html.escape(study)}" data-bleu4="{bleu4!r}">'
        f'<td class="number">{row}</td><td>{html.escape(study)}</td><td class="number">{bleu4:.3f}</td>'
        f'<td class="report">{marked_text(generated, shared)}</td>'
        f'<td class="report">{marked_text(reference, shared)}</td></tr>'
    )


def render_html(studies: Sequence[tuple[int, str, str, str]], title: str) -> str:
    """The page for ``(row, id, generated, reference)`` studies (``row``: the 1-based number of the
    study's row in the predictions file), one table row each in the given order."""
    headers = [
        ("#", "row", "number", "ascending"),
        ("study", "id", "text", "ascending"),
        ("BLEU-4", "bleu4", "number", "descending"),
    ]
    sortable = "".join(
        f'<th aria-sort="none" data-key="{key}" data-type="{kind}" data-first="{first}">'
        f'<button type="button">{name}</button></th>'
        for name, key, kind, first in headers
    )
    rows = "\n".join(study_row(*study) for study in studies)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p>{len(studies)} studies. BLEU-4: sentence BLEU-4 of each study alone (the coco-caption scorer), not
its share of the corpus score. <mark>Marked</mark>: sentences found in both texts (equal after
whitespace and case are normalised). Click a column header to sort.</p>
<table id="studies">
<thead><tr>{sortable}<th>generated</th><th>reference</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def write_html_report(path: str | Path, studies: Sequence[tuple[int, str, str, str]], title: str) -> Path:
    """Write :func:`render_html` of ``studies`` to ``path`` (UTF-8; its folder created) and return the
    path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(studies, title), encoding="utf-8")
    return out
