"""The demo world's labeller: :func:`extract_labels` reads a report (raw or cleaned) back into the label
vector, and :class:`DemoWorldLabeler` puts it behind the core's ``Labeler`` interface.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mambaxray_ctl.demo.findings import LABEL_NAMES

_NEGATED = re.compile(r"\b(no|not|without|negative|normal|unremarkable|clear|sharp)\b")
_SIDE = re.compile(r"\b(left|right|bilateral)\b")
_LOBE = re.compile(r"\b(right|left) (upper|middle|lower) lobe")
_HEART = re.compile(r"cardiomegaly|(heart|cardiac silhouette) is enlarged|enlargement of the cardiac")
_DEVICE = re.compile(r"\b(tube|catheter|picc)\b|central line")


def _sides(sentence: str) -> set[str]:
    found = set(_SIDE.findall(sentence))
    return {"left", "right"} if "bilateral" in found else found


def extract_labels(report: str) -> list[int]:
    """Labels (in :data:`LABEL_NAMES` order) read from report text, raw or R2Gen-cleaned.

    A sentence that carries a negation or normality cue asserts nothing; otherwise keywords mark
    findings, with sides and lobes taken from the same sentence.
    """
    present: set[str] = set()
    for sentence in re.split(r"[.\n]", report.lower()):
        if not sentence.strip() or _NEGATED.search(sentence):
            continue
        if _HEART.search(sentence):
            present.add("cardiomegaly")
        if "effusion" in sentence:
            present |= {f"pleural_effusion_{side}" for side in _sides(sentence)}
        if "pneumothora" in sentence:
            present |= {f"pneumothorax_{side}" for side in _sides(sentence)}
        if "consolidation" in sentence:
            present |= {f"consolidation_{side}_{lobe}_lobe" for side, lobe in _LOBE.findall(sentence)}
        if "nodul" in sentence:
            present.add("lung_nodule")
        if _DEVICE.search(sentence):
            present.add("support_device")
    return [int(name in present) for name in LABEL_NAMES]


class DemoWorldLabeler:
    """Reads the findings of a demo-world report (:func:`extract_labels`).

    Selected with ``evaluation.labeler: demo`` (see :data:`mambaxray_ctl.metrics.clinical.BUILTIN_LABELERS`).
    """

    label_names: Sequence[str] = LABEL_NAMES

    def __call__(self, reports: Sequence[str]) -> list[list[int]]:
        return [extract_labels(report) for report in reports]
