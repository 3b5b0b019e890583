"""Loading Hugging Face tokenizers and models from a local folder or a hub name, with clear errors."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_HUB_NAME = re.compile(r"^[A-Za-z0-9_][\w.-]*(/[\w.-]+)?$")  # "model" or "org/model"
_HUB_HINT = (
    "a hub name like 'org/model' needs network access or a copy in the Hugging Face cache"
    "; with HF_HUB_OFFLINE=1 only the cache is used"
)


def load_pretrained(
    loader: Callable[..., T], name_or_path: str, *, what: str, local_files_only: bool | None, **kwargs: Any
) -> T:
    """``loader(name_or_path, **kwargs)`` (a ``from_pretrained``); never passes ``trust_remote_code``.

    A string that is not an existing folder and does not look like a hub name raises
    :class:`FileNotFoundError` naming the path; a failing hub name raises :class:`OSError` naming it.
    ``local_files_only=None`` keeps the library default (which honours ``HF_HUB_OFFLINE``).
    """
    path = Path(name_or_path).expanduser()
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    if path.is_dir():
        return loader(str(path), **kwargs)
    if path.exists() or not _HUB_NAME.match(name_or_path):
        raise FileNotFoundError(f"{what} folder not found: {path}; {_HUB_HINT}")
    try:
        return loader(name_or_path, **kwargs)
    except OSError as exc:
        raise OSError(f"cannot load {what} {name_or_path!r}: no such local folder, and {_HUB_HINT}") from exc
