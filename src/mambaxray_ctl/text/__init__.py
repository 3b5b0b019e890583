"""Text side: the stage-2 report encoder, the frozen stage-3 report LM and model loading.

Names are imported lazily, so ``import mambaxray_ctl.text`` does not import transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TextEncoder": "encoder",
    "pool_hidden_states": "encoder",
    "ReportLM": "llm",
    "DEFAULT_PROMPT": "llm",
    "DEFAULT_TEMPLATE": "llm",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
