"""Metrics: report-generation language metrics with R2Gen's protocol, clinical efficacy (with the
``Labeler`` interface a findings labeller implements, and the built-in CheXbert labeller) and image–report
retrieval recall.

Names are imported lazily (``from mambaxray_ctl.metrics import ReportMetrics`` works), so that
importing the package does not pull in torchmetrics.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "report": (
        "SCORE_KEYS",
        "ReportMetrics",
        "score_reports",
        "sentence_bleu4",
        "truncate_references",
        "meteor_enabled",
        "deduplicate",
    ),
    "clinical": (
        "BUILTIN_LABELERS",
        "ClinicalEfficacy",
        "Labeler",
        "clinical_scores",
        "label_reports",
        "load_labeler",
        "subset_scores",
    ),
    "chexbert": ("CheXbertLabeler",),
    "retrieval": ("RetrievalRecall",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name in _MODULE_OF:
        module = importlib.import_module(f"{__name__}.{_MODULE_OF[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
