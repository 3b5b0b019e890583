"""Names that changed, so that what users wrote before still works (with a warning).

Class paths moved between packages, and the stages' flat arguments grouped into typed specs: command
lines, config files, runs and checkpoints written before the change are read through
:func:`upgrade_argv`, :func:`upgrade_config`, :func:`upgrade_model_args` and :func:`upgrade_class_path`.
"""

from __future__ import annotations

import importlib
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

MOVED_CLASS_PATHS = {
    "mambaxray_ctl.data.DemoDataModule": "mambaxray_ctl.demo.datamodule.DemoDataModule",
    "mambaxray_ctl.data.datamodules.DemoDataModule": "mambaxray_ctl.demo.datamodule.DemoDataModule",
}


def _deprecated(message: str) -> None:
    warnings.warn(message, FutureWarning, stacklevel=3)


def upgrade_class_path(path: str) -> str:
    """``path``, or where its class lives now (warns)."""
    new = MOVED_CLASS_PATHS.get(path)
    if new is None:
        return path
    _deprecated(f"{path} moved to {new}")
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
# Names that meant the same in every stage that had them; stage 3's flat ``temperature`` (decoding) is
# renamed only where the stage is known to be ReportGenModule: stage 2 and SimCLR keep a ``temperature``.
_UNAMBIGUOUS = {**SHARED_MODEL_ARGS, **{k: v for k, v in REPORTGEN_MODEL_ARGS.items() if k != "temperature"}}
_MODEL_PREFIXES = ("--model.init_args.", "--model.")  # jsonargparse accepts both for init arguments
_CANONICAL_PREFIX = "--model.init_args."
_CLASS_PATH_FLAGS = {"--model", "--model.class_path", "--data", "--data.class_path"}
_CONFIG_FLAGS = {"-c", "--config"}


def upgrade_model_args(args: Mapping[str, Any], report_generation: bool = False) -> dict[str, Any]:
    """A stage's arguments (a checkpoint's hyper-parameters, a config's ``model.init_args``) with the
    flat names of earlier versions moved into their groups, warning once with the names; a string
    ``backbone`` becomes ``backbone.preset``. ``report_generation``: the stage is ReportGenModule (its
    flat ``temperature`` is then ``decoding.temperature``)."""
    renames = {**_UNAMBIGUOUS, **({"temperature": "decoding.temperature"} if report_generation else {})}
    upgraded: dict[str, Any] = {}
    moved = []
    for name, value in args.items():
        new = "backbone.preset" if name == "backbone" and isinstance(value, str) else renames.get(name)
        if new is None:
            upgraded[name] = value
            continue
        moved.append(f"{name} -> {new}")
        group, _, field = new.partition(".")
        previous = upgraded.get(group)
        upgraded[group] = {**(previous if isinstance(previous, Mapping) else {}), field: value}
    if moved:
        _deprecated(f"flat stage arguments are deprecated, read as: {', '.join(moved)}")
    return upgraded


def upgrade_stage3_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """A stage-3 run's hyper-parameters (checkpoint, ``hparams.yaml``), upgraded when written before the
    groups (they then name the LM ``llm``)."""
    return upgrade_model_args(hparams, report_generation=True) if "llm" in hparams else dict(hparams)


def upgrade_config(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """A config (one ``-c`` file's content) with moved class paths and flat stage arguments upgraded;
    ``None`` when nothing in it is old."""
    upgraded = json.loads(json.dumps(config, default=str))
    changed = False
    for section in ("model", "data"):
        part = upgraded.get(section)
        if isinstance(part, dict) and part.get("class_path") in MOVED_CLASS_PATHS:
            part["class_path"] = upgrade_class_path(part["class_path"])
            changed = True
    model = upgraded.get("model")
    init_args = model.get("init_args") if isinstance(model, dict) else None
    if isinstance(init_args, dict):
        stage3 = str(model.get("class_path", "")).endswith("ReportGenModule")
        new = upgrade_model_args(init_args, report_generation=stage3)
        if new != init_args:
            model["init_args"], changed = new, True
    return upgraded if changed else None


def _upgrade_config_arg(value: str) -> str:
    """A ``-c`` value: a config file with old names becomes its upgraded content (a JSON string)."""
    path = Path(value)
    if not path.is_file():
        return value
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return value  # the parser reports it
    upgraded = upgrade_config(config) if isinstance(config, Mapping) else None
    return value if upgraded is None else json.dumps(upgraded)


def _upgrade_model_arg(key: str, value: str | None) -> tuple[str, str | None]:
    """One ``--model...`` option: an old name renamed (warns); a group field set to null passed as
    its group (jsonargparse would read a nested ``null`` as the text "None")."""
    prefix = next(p for p in _MODEL_PREFIXES if key.startswith(p))
    name = key[len(prefix) :]
    whole_group = value is not None and value.lstrip().startswith("{")  # backbone={"preset": ...}
    new = "backbone.preset" if name == "backbone" and not whole_group else _UNAMBIGUOUS.get(name)
    if new is not None:
        _deprecated(f"{key} is deprecated: use {_CANONICAL_PREFIX}{new}")
        key, name = f"{_CANONICAL_PREFIX}{new}", new
    group, dot, field = name.partition(".")
    if dot and "." not in field and value is not None and value.strip() in {"null", "None"}:
        return f"{_CANONICAL_PREFIX}{group}", json.dumps({field: None})
    return key, value


def upgrade_argv(argv: Sequence[str]) -> list[str]:
    """Command-line arguments with what changed upgraded, each warned about: old stage argument names
    (``--model.init_args.init_from=X`` -> ``--model.init_args.handoff.source=X``; also the
    ``--model.<name>`` short form and ``--key value`` spellings), moved class paths, and ``-c`` files
    holding either. A group field set to null (``--model.init_args.handoff.source=null``) is passed as
    ``--model.init_args.handoff={"source": null}``, which jsonargparse merges field by field.
    """
    args, upgraded, index = list(argv), [], 0
    while index < len(args):
        key, sep, value = args[index].partition("=")
        index += 1
        known = key in _CONFIG_FLAGS or key in _CLASS_PATH_FLAGS or key.startswith(_MODEL_PREFIXES)
        if not known:
            upgraded.append(args[index - 1])
            continue
        given: str | None = value if sep else None
        separate = given is None and index < len(args) and not args[index].startswith("--")
        if separate:  # "--key value": the value is the next token
            given, index = args[index], index + 1
        if key in _CONFIG_FLAGS and given is not None:
            given = _upgrade_config_arg(given)
        elif key in _CLASS_PATH_FLAGS and given in MOVED_CLASS_PATHS:
            given = upgrade_class_path(given)
        elif key.startswith(_MODEL_PREFIXES) and key not in _CLASS_PATH_FLAGS:
            key, given = _upgrade_model_arg(key, given)
        if given is None:
            upgraded.append(key)
        else:  # in the form it was given ("-c=..." would not parse)
            upgraded += [key, given] if separate else [f"{key}={given}"]
    return upgraded


__all__ = [
    "MOVED_CLASS_PATHS",
    "REPORTGEN_MODEL_ARGS",
    "SHARED_MODEL_ARGS",
    "import_class",
    "upgrade_argv",
    "upgrade_class_path",
    "upgrade_config",
    "upgrade_model_args",
    "upgrade_stage3_hparams",
]
