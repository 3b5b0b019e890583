"""Evaluation commands: ``evaluate`` (score a predictions file with the paper's protocol),
``generate`` (the report of one study) and the qualitative-inspection helpers of the notebooks.

Names are imported lazily (``from mambaxray_ctl.evaluation import evaluate_predictions`` works).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"evaluate": ("evaluate_predictions", "format_table", "read_predictions")}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name in _MODULE_OF:
        module = importlib.import_module(f"{__name__}.{_MODULE_OF[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
