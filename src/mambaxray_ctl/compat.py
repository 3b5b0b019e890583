"""Names that changed, so that what users wrote before still works (with a warning).

Class paths moved between packages, and the stages' flat arguments grouped into typed specs: runs,
checkpoints and command lines written before the change are read through :func:`upgrade_class_path`,
:func:`upgrade_model_args` and :func:`upgrade_argv`.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

MOVED_CLASS_PATHS = {
    "mambaxray_ctl.data.DemoDataModule": "mambaxray_ctl.demo.datamodule.DemoDataModule",
    "mambaxray_ctl.data.datamodules.DemoDataModule": "mambaxray_ctl.demo.datamodule.DemoDataModule",
}


def upgrade_class_path(path: str) -> str:
    """``path``, or where its class lives now (warns)."""
    new = MOVED_CLASS_PATHS.get(path)
    if new is None:
        return path
    warnings.warn(f"{path} moved to {new}", FutureWarning, stacklevel=2)
    return new


def import_class(path: str) -> type:
    """The class at ``package.module.Name`` (a moved path is followed)."""
    module_name, _, name = upgrade_class_path(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import class {path!r}: {exc}") from exc


# Flat stage arguments (before the typed groups) -> their place now: "group.field".
SHARED_MODEL_ARGS = {
    "backbone_overrides": "backbone.overrides",
    "ssm_impl": "backbone.ssm_impl",
    "init_from": "handoff.source",
    "init_format": "handoff.format",
    "init_prefix": "handoff.prefix",
    **{name: f"optimizer.{name}" for name in ("lr", "weight_decay", "betas", "warmup_steps", "min_lr_ratio")},
}
REPORTGEN_MODEL_ARGS = {
    "llm": "lm.name",
    "llm_dtype": "lm.dtype",
    **{name: f"lm.{name}" for name in ("lora", "prompt", "template", "max_target_tokens")},
    **{f"ctl_{name}": f"ctl_ft.{name}" for name in ("weight", "temperature", "include_padding", "gather")},
    **{
        name: f"decoding.{name}"
        for name in (
            "num_beams",
            "min_new_tokens",
            "max_new_tokens",
            "repetition_penalty",
            "length_penalty",
            "do_sample",
            "temperature",
            "no_repeat_ngram_size",
        )
    },
    **{name: f"evaluation.{name}" for name in ("reference_source", "labeler", "meteor")},
}
# On the command line the stage is not known yet: names still valid in some stage stay as they are.
_ARGV_RENAMES = {
    **SHARED_MODEL_ARGS,
    **{k: v for k, v in REPORTGEN_MODEL_ARGS.items() if k != "temperature"},
}
_MODEL_PREFIX = "--model.init_args."


def upgrade_model_args(args: Mapping[str, Any], report_generation: bool = False) -> dict[str, Any]:
    """A stage's arguments (e.g. the hyper-parameters of an older checkpoint) with flat names moved
    into their groups (warns, naming them); a string ``backbone`` becomes ``backbone.preset``.
    ``report_generation`` adds stage 3's renames."""
    renames = {**SHARED_MODEL_ARGS, **(REPORTGEN_MODEL_ARGS if report_generation else {})}
    upgraded: dict[str, Any] = {}
    moved = []
    for name, value in args.items():
        if name == "backbone" and isinstance(value, str):
            name, value = "backbone.preset", value
        elif name in renames:
            name = renames[name]
        else:
            upgraded[name] = value
            continue
        moved.append(name)
        group, _, field = name.partition(".")
        upgraded.setdefault(group, {})
        upgraded[group] = {**upgraded[group], field: value}
    if moved:
        warnings.warn(
            f"flat stage arguments are deprecated; read as {', '.join(moved)}", FutureWarning, stacklevel=2
        )
    return upgraded


def upgrade_argv(argv: Sequence[str]) -> list[str]:
    """Command-line arguments with the old spellings of the stage arguments rewritten, each warned
    about: ``--model.init_args.init_from=X`` -> ``--model.init_args.handoff.source=X``.

    A group field set to ``null`` (``--model.init_args.handoff.source=null``) is passed as the group
    ``--model.init_args.handoff={"source": null}``, which jsonargparse merges field by field (it
    rejects a nested ``null`` given directly).
    """
    upgraded = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        name = key[len(_MODEL_PREFIX) :] if key.startswith(_MODEL_PREFIX) else None
        whole_group = value.lstrip().startswith("{")  # e.g. backbone={"preset": ...}: already a group
        new = "backbone.preset" if name == "backbone" and not whole_group else _ARGV_RENAMES.get(name or "")
        if new is not None:
            warnings.warn(f"{key} is deprecated: use {_MODEL_PREFIX}{new}", FutureWarning, stacklevel=2)
            name, arg = new, f"{_MODEL_PREFIX}{new}{sep}{value}"
        group, dot, field = (name or "").partition(".")
        if dot and "." not in field and sep and value.strip() in {"null", "None"}:
            arg = f'{_MODEL_PREFIX}{group}={{"{field}": null}}'
        upgraded.append(arg)
    return upgraded


__all__ = [
    "MOVED_CLASS_PATHS",
    "REPORTGEN_MODEL_ARGS",
    "SHARED_MODEL_ARGS",
    "import_class",
    "upgrade_argv",
    "upgrade_class_path",
    "upgrade_model_args",
]
