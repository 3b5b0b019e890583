"""Loading Hugging Face tokenizers and models from a local folder or a hub name, with clear errors.

A *random-init folder* holds a ``config.json``, a tokenizer and :data:`RANDOM_INIT_MARKER`, but no
weights: :func:`load_model` builds its model from the config with random weights. ``mambaxray-ctl
profile`` uses such folders to build the paper's model sizes without a download or a multi-GB file.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from transformers import AutoConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

T = TypeVar("T")
log = logging.getLogger(__name__)
RANDOM_INIT_MARKER = "random_init.json"

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


def save_random_init(
    out_dir: str | Path, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase
) -> Path:
    """Write a random-init folder: ``config``, ``tokenizer`` and the marker, no weights."""
    out = Path(out_dir)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    note = {"weights": "random", "note": "built from config.json by load_model; no weights are stored"}
    (out / RANDOM_INIT_MARKER).write_text(json.dumps(note, indent=2) + "\n", encoding="utf-8")
    return out


def is_random_init(name_or_path: str) -> bool:
    """Whether ``name_or_path`` is a random-init folder (see :func:`save_random_init`)."""
    return (Path(name_or_path).expanduser() / RANDOM_INIT_MARKER).is_file()


def load_model(
    auto_class: Any, name_or_path: str, *, what: str, local_files_only: bool | None, **kwargs: Any
) -> PreTrainedModel:
    """``auto_class.from_pretrained`` through :func:`load_pretrained`; a random-init folder is built
    with ``auto_class.from_config`` instead (random weights, ``kwargs`` such as ``dtype`` apply). The
    model is returned in eval mode either way, as ``from_pretrained`` returns it."""
    if not is_random_init(name_or_path):
        return load_pretrained(
            auto_class.from_pretrained, name_or_path, what=what, local_files_only=local_files_only, **kwargs
        )
    log.warning("%s %s: a random-init folder (%s): RANDOM weights", what, name_or_path, RANDOM_INIT_MARKER)
    config = AutoConfig.from_pretrained(str(Path(name_or_path).expanduser()))
    return auto_class.from_config(config, **kwargs).eval()
