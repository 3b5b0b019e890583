"""``evaluate --html``: one offline page of the scored studies, shared sentences marked, sortable."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mambaxray_ctl.data.cleaning import clean_report, shared_sentences
from mambaxray_ctl.evaluation import evaluate
from mambaxray_ctl.evaluation.html_report import _SCRIPT, render_html
from mambaxray_ctl.evaluation.qualitative import highlight_table_html
from mambaxray_ctl.metrics.report import sentence_bleu4

FIXTURE = Path(__file__).parent / "fixtures" / "evaluation" / "golden_pairs.json"


@dataclass
class Row:
    attrs: dict[str, str]
    cells: list[str] = field(default_factory=list)  # each cell's text, unescaped
    marks: list[list[str]] = field(default_factory=list)  # each cell's <mark> texts


class RowParser(HTMLParser):
    """The ``<tr>`` rows of the page's ``<tbody>``, and the text of every ``<script>``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[Row] = []
        self.scripts: list[str] = []
        self._in = {"tbody": False, "td": False, "mark": False, "script": False}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._in:
            self._in[tag] = True
        if tag == "script":
            self.scripts.append("")
        elif tag == "tr" and self._in["tbody"]:
            self.rows.append(Row({key: value or "" for key, value in attrs}))
        elif tag == "td" and self._in["tbody"]:
            self.rows[-1].cells.append("")
            self.rows[-1].marks.append([])
        elif tag == "mark" and self._in["td"]:
            self.rows[-1].marks[-1].append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._in:
            self._in[tag] = False

    def handle_data(self, data: str) -> None:
        if self._in["script"]:
            self.scripts[-1] += data
        elif self._in["td"]:
            self.rows[-1].cells[-1] += data
            if self._in["mark"]:
                self.rows[-1].marks[-1][-1] += data


def parse(page: str) -> RowParser:
    parser = RowParser()
    parser.feed(page)
    parser.close()
    return parser


def write_predictions(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def run_command(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    evaluate.configure_parser(parser)
    return evaluate.run(parser.parse_args(list(argv)))


def test_the_command_writes_one_row_per_scored_study_in_file_order(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rows = json.loads(FIXTURE.read_text())
    duplicate = {**rows[1], "generated": "another text ."}  # dropped: the first row of an id is scored
    predictions = write_predictions(tmp_path / "predictions.jsonl", [*rows[:3], duplicate, *rows[3:]])
    page = tmp_path / "report.html"
    assert run_command(str(predictions), "--dataset", "iu_xray", "--meteor", "off", "--html", str(page)) == 0
    assert f"wrote {page}" in capsys.readouterr().out
    assert (tmp_path / "metrics.json").is_file()

    parsed = parse(page.read_text(encoding="utf-8"))
    assert [row.attrs["data-id"] for row in parsed.rows] == [row["id"] for row in rows]
    row_numbers = [*range(1, 4), *range(5, len(rows) + 2)]  # the file's 4th row is the duplicate
    assert [int(row.attrs["data-row"]) for row in parsed.rows] == row_numbers
    for row, expected in zip(parsed.rows, rows, strict=True):
        number, study, _, generated, reference = row.cells
        assert (int(number), study) == (int(row.attrs["data-row"]), expected["id"])
        assert generated == (expected["generated"] if expected["generated"].strip() else "(empty)")
        assert reference == expected["reference"]
    assert f"{len(rows)} studies" in page.read_text(encoding="utf-8")


def test_per_study_bleu4_is_sentence_bleu4(tmp_path: Path) -> None:
    rows = json.loads(FIXTURE.read_text())
    parsed = parse(
        render_html([(i + 1, r["id"], r["generated"], r["reference"]) for i, r in enumerate(rows)], "t")
    )
    scores = [float(row.attrs["data-bleu4"]) for row in parsed.rows]
    expected = [sentence_bleu4(row["generated"], row["reference"]) for row in rows]
    assert scores == expected  # exact: the attribute holds the float's repr
    assert len(set(scores)) > len(rows) // 2  # the studies' scores differ, so a mix-up would show
    assert [row.cells[2] for row in parsed.rows] == [f"{score:.3f}" for score in expected]


def test_exactly_the_shared_sentences_are_marked() -> None:
    generated = "the lungs are clear . No pleural effusion . the heart is enlarged . the lungs are clear ."
    reference = "no  pleural effusion . lungs are clear . the lungs are clear . there is a nodule ."
    (row,) = parse(render_html([(1, "s1", generated, reference)], "t")).rows
    # equal after whitespace and case are normalised; "lungs are clear" is a part, not an equal sentence
    assert row.marks[3] == ["the lungs are clear", "No pleural effusion", "the lungs are clear"]
    assert row.marks[4] == ["no  pleural effusion", "the lungs are clear"]
    assert row.cells[3:] == [generated, reference]  # the texts as written, marks around sentences only

    (unshared,) = parse(render_html([(1, "s2", "heart is normal .", "no effusion .")], "t")).rows
    assert unshared.marks[3:] == [[], []]
    # the sentences of data.cleaning.shared_sentences, which the notebooks' tables mark too
    shared = shared_sentences(generated, reference)
    assert {" ".join(mark.split()).lower() for mark in row.marks[3] + row.marks[4]} == shared
    table = highlight_table_html([{"id": "s1", "generated": generated, "reference": reference}])
    (*_, notebook_row) = parse(f"<tbody>{table}</tbody>").rows  # the data row, after the header
    assert {mark.strip(" .") for mark in notebook_row.marks[2] + notebook_row.marks[3]} == shared


def test_text_is_escaped_and_the_page_is_self_contained() -> None:
    generated = 'no effusion . <script>alert("x")</script> & <b>bold</b> .'
    study = '"><script>alert(1)</script>'  # would close the data-id attribute if left unescaped
    page = render_html([(1, study, generated, "no effusion .")], "<title> & co")
    parsed = parse(page)
    assert len(parsed.scripts) == 1 and parsed.scripts[0].strip() == _SCRIPT.strip()  # ours only
    assert "<script>alert" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "<b>" not in page and "<title> &" not in page
    (row,) = parsed.rows
    assert row.attrs["data-id"] == row.cells[1] == study
    assert row.cells[3] == generated and row.marks[3] == ["no effusion"]
    assert not re.search(r"(src|href)\s*=|https?:|@import|url\(", page)  # no external asset


def test_clean_shows_the_cleaned_texts_that_were_scored(tmp_path: Path) -> None:
    rows = [{"id": "1", "generated": "The heart is normal. No effusion.", "reference": "No effusion. Clear."}]
    predictions = write_predictions(tmp_path / "raw.jsonl", rows)
    page = tmp_path / "raw.html"
    argv = [str(predictions), "--dataset", "iu_xray", "--meteor", "off", "--clean", "--html", str(page)]
    assert run_command(*argv) == 0
    (row,) = parse(page.read_text(encoding="utf-8")).rows
    generated, reference = (clean_report(rows[0][key], "iu_xray") for key in ("generated", "reference"))
    assert row.cells[3:] == [generated, reference]
    assert row.marks[3:] == [["no effusion"], ["no effusion"]]
    assert float(row.attrs["data-bleu4"]) == sentence_bleu4(generated, reference)


def test_the_pages_folder_is_created_and_an_unwritable_page_is_an_error_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    predictions = write_predictions(tmp_path / "p.jsonl", json.loads(FIXTURE.read_text())[:2])
    page = tmp_path / "missing" / "report.html"
    assert run_command(str(predictions), "--dataset", "iu_xray", "--meteor", "off", "--html", str(page)) == 0
    assert len(parse(page.read_text(encoding="utf-8")).rows) == 2
    unwritable = tmp_path / "p.jsonl" / "report.html"  # under a file
    assert (
        run_command(str(predictions), "--dataset", "iu_xray", "--meteor", "off", "--html", str(unwritable))
        == 1
    )
    assert str(tmp_path / "p.jsonl") in capsys.readouterr().err


# The sort script, run by node against a minimal stand-in for the DOM it touches.
_DOM = """
function element(attrs) {
  return {attrs: attrs, dataset: {}, getAttribute: function (k) { return this.attrs[k]; },
          setAttribute: function (k, v) { this.attrs[k] = v; }};
}
var rows = INPUT_ROWS.map(function (r) { var e = element({}); e.dataset = r; return e; });
var body = {rows: rows, appendChild: function (row) {
  this.rows.splice(this.rows.indexOf(row), 1); this.rows.push(row); }};
var headers = HEADERS.map(function (h) {
  var th = element({"aria-sort": "none"}); th.dataset = h;
  th.button = {addEventListener: function (name, fn) { th.click = fn; }};
  th.querySelector = function () { return th.button; };
  return th;
});
var table = {tBodies: [body], querySelectorAll: function () { return headers; }};
var document = {getElementById: function () { return table; }};
SCRIPT
var orders = [];
CLICKS.forEach(function (i) {
  headers[i].click();
  var ids = body.rows.map(function (r) { return r.dataset.id; });
  orders.push({ids: ids, sort: headers[i].getAttribute("aria-sort")});
});
console.log(JSON.stringify(orders));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's script")
def test_clicking_a_header_sorts_the_rows() -> None:
    rows = [{"row": "1", "id": "s10", "bleu4": "0.25"}, {"row": "2", "id": "s9", "bleu4": "1e-09"}]
    rows += [{"row": "3", "id": "s2", "bleu4": "0.75"}, {"row": "4", "id": "s1", "bleu4": "0.25"}]
    headers = [
        {"key": "row", "type": "number", "first": "ascending"},
        {"key": "id", "type": "text", "first": "ascending"},
        {"key": "bleu4", "type": "number", "first": "descending"},
    ]
    program = (
        _DOM.replace("INPUT_ROWS", json.dumps(rows))
        .replace("HEADERS", json.dumps(headers))
        .replace("CLICKS", json.dumps([2, 2, 1, 0]))
        .replace("SCRIPT", _SCRIPT)
    )
    result = subprocess.run(["node", "-e", program], capture_output=True, text=True, timeout=60, check=True)
    orders = json.loads(result.stdout)
    assert orders == [
        {"ids": ["s2", "s10", "s1", "s9"], "sort": "descending"},  # BLEU-4: best first, ties stable
        {"ids": ["s9", "s10", "s1", "s2"], "sort": "ascending"},  # second click: worst first
        {"ids": ["s1", "s2", "s9", "s10"], "sort": "ascending"},  # study ids, numbers in them as numbers
        {"ids": ["s10", "s9", "s2", "s1"], "sort": "ascending"},  # "#": back to the file's order
    ]
