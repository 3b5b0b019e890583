"""Evaluation: R2Gen-protocol language metrics, clinical efficacy and the ``evaluate`` command.

Names are imported lazily (``from mambaxray_ctl.evaluation import ReportMetrics`` works), so that
importing the package does not pull in torchmetrics.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "report_metrics": (
        "SCORE_KEYS",
        "ReportMetrics",
        "score_reports",
        "sentence_bleu4",
        "truncate_references",
        "meteor_enabled",
        "deduplicate",
    ),
    "clinical": (
        "ClinicalEfficacy",
        "DemoWorldLabeler",
        "Labeler",
        "clinical_scores",
        "label_reports",
        "load_labeler",
    ),
    "evaluate": ("evaluate_predictions", "format_table", "read_predictions"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name in _MODULE_OF:
        module = importlib.import_module(f"mambaxray_ctl.evaluation.{_MODULE_OF[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
