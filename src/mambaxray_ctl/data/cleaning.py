"""Report cleaning exactly as the R2Gen family does it (docs/METHOD.md#report-cleaning).

Two rules exist:

* ``iu_xray`` (R2Gen's IU X-ray rule): ``..`` collapsed in three passes, list numbering removed,
  lower-cased, split on ``". "``, then per sentence quotes, slashes, backslashes and apostrophes
  are removed, followed by the characters ``. , ? ; * ! % ^ & _ + ( ) [ ] { }`` and the whole
  code-point range ``:`` .. ``[`` (so ``: ; < = > ? @`` go too). Hyphens and digits survive.
* ``mimic_cxr`` (R2GenGPT's variant, used for MIMIC-CXR and CheXpert Plus): newlines become
  spaces, runs of ``_``, of double spaces and of ``..`` are collapsed with a fixed number of
  passes, the same numbering removal, a space is inserted before every ``:`` (colons are KEPT as
  tokens), then the same per-sentence removal without the ``:``..``[`` range.

Both end with the sentences joined by ``" . "`` and a final ``" ."``.

Two quirks of the originals are reproduced on purpose, because the cleaned text is the training
target and the evaluation reference of published numbers:

1. Empty sentences are never filtered (the originals compare a string with a list), so ``"a. . b"``
   keeps an empty sentence: ``"a .  . b ."``.
2. The deletion of ``"1. "`` hits any number ending in 1 followed by ``". "``:
   ``"seen in 2011. stable"`` becomes ``"seen in 201stable ."``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal

CleaningRule = Literal["iu_xray", "mimic_cxr", "none"]

# "1. " is deleted anywhere; the other list numbers become a sentence break.
_NUMBERING = [("1. ", "")]
_NUMBERING += [(f". {n}. ", ". ") for n in range(2, 6)] + [(f" {n}. ", ". ") for n in range(2, 6)]
_IU_DELETE = re.compile(r"[.,?;*!%^&_+():-\[\]{}]")  # ":-\[" is a range: : ; < = > ? @ A-Z [
_MIMIC_DELETE = re.compile(r"[.,?;*!%^&_+()\[\]{}]")


def _collapse(text: str, old: str, new: str, passes: int) -> str:
    """``str.replace`` applied ``passes`` times, as the originals chain it (long runs may survive)."""
    for _ in range(passes):
        text = text.replace(old, new)
    return text


def _remove_numbering(text: str) -> str:
    for old, new in _NUMBERING:
        text = text.replace(old, new)
    return text


def _clean_sentences(text: str, delete: re.Pattern[str]) -> str:
    sentences = text.strip().lower().split(". ")
    cleaned = []
    for sentence in sentences:
        for char in ('"', "/", "\\", "'"):
            sentence = sentence.replace(char, "")
        cleaned.append(delete.sub("", sentence.strip().lower()))
    return " . ".join(cleaned) + " ."


def clean_report_iu_xray(report: str) -> str:
    """R2Gen's IU X-ray cleaning rule."""
    text = _remove_numbering(_collapse(report, "..", ".", 3))
    return _clean_sentences(text, _IU_DELETE)


def clean_report_mimic_cxr(report: str) -> str:
    """R2GenGPT's MIMIC-CXR cleaning rule (also used for CheXpert Plus)."""
    text = report.replace("\n", " ")
    text = _collapse(text, "__", "_", 7)
    text = _collapse(text, "  ", " ", 6)
    text = _collapse(text, "..", ".", 8)
    text = _remove_numbering(text).replace(":", " :")
    return _clean_sentences(text, _MIMIC_DELETE)


CLEANERS: dict[str, Callable[[str], str]] = {
    "iu_xray": clean_report_iu_xray,
    "mimic_cxr": clean_report_mimic_cxr,
    "none": str.strip,
}


def clean_report(report: str, rule: CleaningRule) -> str:
    """Clean ``report`` with the named rule (``none`` only strips surrounding whitespace)."""
    try:
        return CLEANERS[rule](report)
    except KeyError:
        raise ValueError(f"unknown cleaning rule {rule!r}; choose one of {sorted(CLEANERS)}") from None


# A period standing alone between blanks (or at an end): the sentence separator of a cleaned report.
_SEPARATOR = re.compile(r"(?<!\S)\.(?!\S)")
_SENTENCE_EDGES = " \t\n\r\f\v."


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the sentences of an R2Gen-cleaned report (``"a . b ."``):
    the text between stand-alone periods, blanks and periods trimmed from both ends, empty ones left
    out. :func:`split_sentences` gives their text."""
    spans, start = [], 0
    for end, next_start in [(m.start(), m.end()) for m in _SEPARATOR.finditer(text)] + [(len(text), 0)]:
        piece = text[start:end]
        first = start + len(piece) - len(piece.lstrip(_SENTENCE_EDGES))
        last = start + len(piece.rstrip(_SENTENCE_EDGES))
        if first < last:
            spans.append((first, last))
        start = next_start
    return spans


def split_sentences(text: str) -> list[str]:
    """Sentences of an R2Gen-cleaned report (``"a . b ."``), lower-cased with blanks collapsed: the
    text of :func:`sentence_spans`."""
    return [" ".join(text[start:end].split()).lower() for start, end in sentence_spans(text)]


def shared_sentences(generated: str, reference: str) -> set[str]:
    """The sentences (as :func:`split_sentences` gives them) found in both reports: those the HTML page
    of ``evaluate --html`` and the notebooks mark."""
    return set(split_sentences(generated)) & set(split_sentences(reference))


def is_empty_report(cleaned: str) -> bool:
    """True when a cleaned report holds no word at all (the rules turn ``""`` into ``" ."``)."""
    return not any(char.isalnum() for char in cleaned)
