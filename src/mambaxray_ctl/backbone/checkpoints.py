"""Backbone checkpoints: safe reading, official-format conversion, strict loading, export.

Official formats (docs/METHOD.md#official-checkpoint-formats and #stage-1-to-stage-2) are turned into
this package's backbone state dict by timm-style filter functions
``convert_*(state_dict, model) -> ConvertedCheckpoint``:

- ``"mambaxray-vl"``: MambaXray-VL/CTL stage-2 and stage-3 ``.pth`` files (ARM v3 backbone under
  ``visual_encoder.``; everything else is dropped and reported);
- ``"arm-pretrain"``: ARM stage-1 pretraining checkpoints (forward scan only, 12×12 sin-cos
  positions, decoder keys, no ``cls_token`` / ``norm_f``);
- ``"vim"``: hustvl Vim checkpoints (``head.*`` dropped);
- ``"backbone"``: already in this package's format (e.g. a stage export).

Nothing is dropped or initialised silently: every converter returns the keys it dropped and the
target keys it took from the freshly initialised model, and logs them. Files are read with
``weights_only=True`` (or safetensors) only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mambaxray_ctl.backbone.config import VisionMambaConfig
from mambaxray_ctl.backbone.layers import resample_pos_embed
from mambaxray_ctl.backbone.mixer import SCAN_DIRECTIONS
from mambaxray_ctl.backbone.vision_mamba import VisionMamba

log = logging.getLogger(__name__)

CheckpointFormat = Literal["mambaxray-vl", "arm-pretrain", "vim", "backbone"]
CHECKPOINT_FORMATS: tuple[str, ...] = get_args(CheckpointFormat)
VL_PREFIX = "visual_encoder."
EXPORT_FORMAT = "mambaxray-ctl-backbone"

# Metadata containers that official checkpoints pickle next to the weights (`args` of ARM/Vim,
# R2GenGPT's `config` = Lightning hparams). Allowlisted for the weights-only unpickler; an
# AttributeDict comes back as a plain dict. Anything else is refused.
_METADATA_GLOBALS: list[Any] = [
    argparse.Namespace,
    (dict, "lightning.fabric.utilities.data.AttributeDict"),
    (dict, "lightning_fabric.utilities.data.AttributeDict"),
    (dict, "pytorch_lightning.utilities.parsing.AttributeDict"),
]
# ARM stage-1 decoder side (docs/METHOD.md#stage-1-to-stage-2), never part of the backbone.
_ARM_DECODER_KEY = re.compile(
    r"^(ar_token|dec_pos_embed|mask)$|^(enc2dec|dec_block|norm_[1-4]|ar_norm|ar_pred)\."
)
# Backbone keys an ARM stage-1 checkpoint does not have; they keep the target's initialisation.
_ARM_PRETRAIN_ABSENT = re.compile(r"^(cls_token|norm_f\..+)$")
# Per-direction scan parameters: "<name>" -> "<name><suffix>", except A_log -> "A<suffix>_log".
_SCAN_PARAM = re.compile(
    r"^(?P<layer>layers\.\d+\.mixer\.)(?P<name>conv1d|x_proj|dt_proj|A_log|D)(?P<tail>\..+)?$"
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, recognised or loaded; the message names the file or key."""


@dataclass
class ConvertedCheckpoint:
    """Result of a filter function: the backbone state dict and what happened on the way."""

    state_dict: dict[str, Tensor]
    source_format: CheckpointFormat
    dropped: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class LoadReport:
    """What :func:`load_backbone_weights` did. ``sha256`` covers the ``loaded`` tensors only.

    There is no ``missing`` field: a missing backbone key is always an error.
    """

    loaded: list[str]
    unexpected: list[str]
    ignored: list[str]
    initialised: list[str]
    sha256: str
    source_format: CheckpointFormat | None = None
    notes: list[str] = field(default_factory=list)


# Reading ---------------------------------------------------------------------------------------------------
def read_state_dict(path: str | Path, *, key: str | None = None) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``), on CPU.

    Torch checkpoints are unwrapped: ``key`` if given (e.g. ``"model_ema"`` for Vim), else
    ``"model"``, then ``"state_dict"`` (Lightning); a flat dict of tensors is taken as is.
    Leading ``module.`` (DDP) prefixes are stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            checkpoint: Any = load_file(path, device="cpu")
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"cannot read safetensors file {path}: {err}") from err
    else:
        try:
            with torch.serialization.safe_globals(_METADATA_GLOBALS):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            refused = re.search(r"WeightsUnpickler error: (.+?)(?: Please use|$)", str(err), re.MULTILINE)
            if refused is None:
                raise CheckpointError(f"cannot read checkpoint {path}: {str(err).strip()}") from err
            raise CheckpointError(
                f"refusing to load {path} with weights_only=True: {refused[1]} "
                "(the file pickles objects other than tensors and plain containers; re-save its state dict)"
            ) from err
        except Exception as err:  # a damaged or foreign file: RuntimeError, KeyError, EOFError, ...
            raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    state_dict = _unwrap(checkpoint, key, path)
    return {_strip_module(name): tensor for name, tensor in state_dict.items()}


def _unwrap(checkpoint: Any, key: str | None, path: Path) -> Mapping[str, Tensor]:
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    if key is None and _is_state_dict(checkpoint):
        return checkpoint
    for candidate in (key,) if key is not None else ("model", "state_dict"):
        if candidate in checkpoint:
            state_dict = checkpoint[candidate]
            if not isinstance(state_dict, Mapping) or not _is_state_dict(state_dict):
                raise CheckpointError(f"{path}: entry {candidate!r} is not a state dict (str -> tensor)")
            return state_dict
    wanted = repr(key) if key is not None else "'model' or 'state_dict'"
    raise CheckpointError(f"{path}: no state dict under {wanted}; top-level keys: {_preview(checkpoint)}")


def _is_state_dict(mapping: Mapping) -> bool:
    return bool(mapping) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in mapping.items())


def _strip_module(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module.") :]
    return name


# Format detection and filter functions ---------------------------------------------------------------------
def detect_format(state_dict: Mapping[str, Tensor]) -> CheckpointFormat:
    """Tell the source format from key names (docs/METHOD.md#official-checkpoint-formats).

    ``visual_encoder.*`` → mambaxray-vl; ARM decoder keys, or a forward-only ARM mixer → arm-pretrain;
    ``head.*`` → vim; ``patch_embed.*`` / ``layers.*`` otherwise → backbone.
    """
    keys = list(state_dict)
    if any(k.startswith(VL_PREFIX) for k in keys):
        return "mambaxray-vl"
    forward_only_arm = (
        "layers.0.mixer.A_log" in state_dict
        and "layers.0.mixer.A_b_log" not in state_dict
        and any(k.startswith("layers.0.mlp.") for k in keys)
    )
    if forward_only_arm or any(_ARM_DECODER_KEY.match(k) for k in keys):
        return "arm-pretrain"
    if any(k.startswith("head.") for k in keys):
        return "vim"
    if any(k.startswith(("patch_embed.", "layers.")) for k in keys):
        return "backbone"
    raise CheckpointError(f"cannot tell the checkpoint format from its keys: {_preview(keys)}")


def extract_prefixed(
    state_dict: Mapping[str, Tensor], prefix: str, source_format: CheckpointFormat = "backbone"
) -> ConvertedCheckpoint:
    """Keep the keys under ``prefix`` with the prefix stripped; drop (and report) all others."""
    kept = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not kept:
        raise CheckpointError(f"no key starts with {prefix!r}; keys: {_preview(state_dict)}")
    dropped = [k for k in state_dict if not k.startswith(prefix)]
    return ConvertedCheckpoint(kept, source_format, dropped=dropped)


def convert_mambaxray_vl(state_dict: Mapping[str, Tensor], model: VisionMamba) -> ConvertedCheckpoint:
    """MambaXray-VL/CTL stage-2/3: the ARM v3 backbone is under ``visual_encoder.``
    (docs/METHOD.md#official-checkpoint-formats, #stage-2-to-stage-3).

    The other keys (vision_proj, text_proj, logit_scale, text_encoder.*, llama_proj, layer_norm, ...)
    are dropped and reported.
    """
    return extract_prefixed(state_dict, VL_PREFIX, "mambaxray-vl")


def convert_arm_pretrain(state_dict: Mapping[str, Tensor], model: VisionMamba) -> ConvertedCheckpoint:
    """ARM stage-1 → stage-2 hand-over (docs/METHOD.md#stage-1-to-stage-2), as the official code's
    ``MambaXrayCTL_CLIP`` does it.

    The forward scan's ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D`` are copied to every other
    direction of ``model`` (``_b``, ``_c``, ``_c_b``; ``A_log`` → ``A_b_log``, ...); decoder keys
    (``ar_token``, ``dec_pos_embed``, ``enc2dec.*``, ``dec_block.*``, ``norm_1..4.*``, ``ar_norm.*``,
    ``ar_pred.*``, ``mask``) are dropped; ``cls_token`` and ``norm_f.*``, absent from the source, are
    taken from ``model``'s initialisation and reported. ``pos_embed`` is resampled by
    :func:`convert_state_dict` (12×12 → target grid, zero class-token entry).
    """
    target = model.state_dict()
    suffixes = [d.suffix for d in SCAN_DIRECTIONS if d.suffix]
    out: dict[str, Tensor] = {}
    dropped: list[str] = []
    copied: set[str] = set()
    for name, tensor in state_dict.items():
        if _ARM_DECODER_KEY.match(name):
            dropped.append(name)
            continue
        out[name] = tensor
        match = _SCAN_PARAM.match(name)
        if match is None:
            continue
        for suffix in suffixes:
            param = f"A{suffix}_log" if match["name"] == "A_log" else match["name"] + suffix
            copy_name = f"{match['layer']}{param}{match['tail'] or ''}"
            if copy_name in target and copy_name not in state_dict:
                out[copy_name] = tensor.clone()
                copied.add(suffix)
    initialised = [k for k in target if _ARM_PRETRAIN_ABSENT.match(k) and k not in out]
    out.update({k: target[k].clone() for k in initialised})
    directions = "/".join(s for s in suffixes if s in copied)
    notes = [f"forward scan parameters copied to the {directions} scan directions"] if copied else []
    return ConvertedCheckpoint(out, "arm-pretrain", dropped=dropped, initialised=initialised, notes=notes)


def convert_vim(state_dict: Mapping[str, Tensor], model: VisionMamba) -> ConvertedCheckpoint:
    """hustvl Vim (docs/METHOD.md#official-checkpoint-formats): the backbone keys are kept as they are;
    the classifier ``head.*`` is dropped."""
    dropped = [k for k in state_dict if k.startswith("head.")]
    kept = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    return ConvertedCheckpoint(kept, "vim", dropped=dropped)


def convert_backbone(state_dict: Mapping[str, Tensor], model: VisionMamba) -> ConvertedCheckpoint:
    """Already this package's format (a stage export): taken as is."""
    return ConvertedCheckpoint(dict(state_dict), "backbone")


_CONVERTERS: dict[str, Callable[[Mapping[str, Tensor], VisionMamba], ConvertedCheckpoint]] = {
    "mambaxray-vl": convert_mambaxray_vl,
    "arm-pretrain": convert_arm_pretrain,
    "vim": convert_vim,
    "backbone": convert_backbone,
}
# Formats whose key sets cannot be told apart (a Vim checkpoint without its head is a Vim backbone).
_COMPATIBLE = {frozenset({"vim", "backbone"})}


def resolve_format(
    state_dict: Mapping[str, Tensor], source_format: CheckpointFormat | Literal["auto"] = "auto"
) -> CheckpointFormat:
    """The detected format for ``"auto"``; a given format must agree with the key names."""
    detected = detect_format(state_dict)
    if source_format == "auto":
        return detected
    if source_format not in _CONVERTERS:
        raise CheckpointError(
            f"unknown checkpoint format {source_format!r}; known: {', '.join(CHECKPOINT_FORMATS)}"
        )
    if detected != source_format and frozenset({detected, source_format}) not in _COMPATIBLE:
        raise CheckpointError(f"the checkpoint looks like {detected!r}, not {source_format!r}")
    return source_format


def convert_state_dict(
    state_dict: Mapping[str, Tensor],
    model: VisionMamba,
    source_format: CheckpointFormat | Literal["auto"] = "auto",
    *,
    prefix: str | None = None,
) -> ConvertedCheckpoint:
    """Filter a foreign state dict for ``model`` (timm's ``checkpoint_filter_fn`` idiom).

    ``prefix`` first keeps only the keys under it (e.g. ``"backbone."`` in a Lightning checkpoint).
    The format is detected unless given; a given format that contradicts the keys is an error.
    Finally ``pos_embed`` is resampled (bicubic) to ``model``'s patch grid when its shape differs,
    and a zero class-token entry is inserted when the source has none but the model does.
    """
    dropped: list[str] = []
    if prefix:
        extracted = extract_prefixed(state_dict, prefix)
        state_dict, dropped = extracted.state_dict, extracted.dropped
    source_format = resolve_format(state_dict, source_format)
    converted = _CONVERTERS[source_format](state_dict, model)
    converted.dropped[:0] = dropped
    _adapt_pos_embed(converted, model)
    if converted.dropped:
        log.info(
            "%s checkpoint: dropped %d key(s) not in the backbone: %s",
            source_format,
            len(converted.dropped),
            summarize_keys(converted.dropped),
        )
    if converted.initialised:
        log.warning(
            "%s checkpoint lacks %s: kept at the model's fresh initialisation (not loaded)",
            source_format,
            ", ".join(converted.initialised),
        )
    for note in converted.notes:
        log.info("%s checkpoint: %s", source_format, note)
    return converted


def _adapt_pos_embed(converted: ConvertedCheckpoint, model: VisionMamba) -> None:
    source = converted.state_dict.get("pos_embed")
    target = model.state_dict().get("pos_embed")
    if source is None or target is None or source.shape == target.shape:
        return
    if source.ndim != 3:
        return  # the strict load reports the shape mismatch
    length = source.shape[1]
    has_cls = math.isqrt(length) ** 2 != length
    side = math.isqrt(length - int(has_cls))
    if side * side != length - int(has_cls):
        raise CheckpointError(
            f"pos_embed {tuple(source.shape)} is not a square patch grid (with or without a class token); "
            f"cannot resample it to {tuple(target.shape)}"
        )
    add_cls = model.cls_token is not None and not has_cls
    converted.state_dict["pos_embed"] = resample_pos_embed(
        source, (side, side), model.grid_size, has_class_token=has_cls, add_class_token=add_cls
    )
    rows, cols = model.grid_size
    note = f"pos_embed {tuple(source.shape)} resampled bicubic {side}x{side} -> {rows}x{cols}"
    if add_cls:
        note += f", zero class-token entry inserted at index {model.cls_index}"
    converted.notes.append(note)


# Loading ---------------------------------------------------------------------------------------------------
def load_backbone_weights(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    strict: bool = True,
    ignored: Iterable[str] = (),
    initialised: Iterable[str] = (),
) -> LoadReport:
    """Load a backbone state dict, failing loudly.

    Any missing key or shape mismatch is an error naming the key (and both shapes). Keys the model
    does not have are an error when ``strict``, otherwise reported and logged. ``ignored`` (dropped
    by a converter) and ``initialised`` (taken from the model's own init) only go into the report;
    ``initialised`` keys are excluded from ``loaded`` and from the hash.
    """
    expected = model.state_dict()
    _check_keys_and_shapes(expected, state_dict, strict=strict)
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        log.warning(
            "ignoring %d key(s) the backbone does not have: %s", len(unexpected), summarize_keys(unexpected)
        )
    model.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=True)
    initialised = list(initialised)
    loaded = [k for k in expected if k not in initialised]
    report = LoadReport(
        loaded=loaded,
        unexpected=unexpected,
        ignored=list(ignored),
        initialised=initialised,
        sha256=state_dict_sha256(state_dict, loaded),
    )
    log.info("loaded %d backbone tensors (sha256 %s)", len(loaded), report.sha256)
    return report


def init_backbone_from(
    model: VisionMamba,
    source: str | Path | Mapping[str, Tensor],
    *,
    source_format: CheckpointFormat | Literal["auto"] = "auto",
    prefix: str | None = None,
    key: str | None = None,
    strict: bool = True,
) -> LoadReport:
    """Read (if a path), convert and strictly load backbone weights into ``model``: the stages'
    ``handoff.source``.

    ``source`` is a stage export, a Lightning checkpoint (give ``prefix``, e.g. ``"backbone."``) or an
    official checkpoint; ``key`` selects the wrapped state dict (``"model_ema"`` for Vim EMA weights).
    """
    if isinstance(source, Mapping):
        return _init_from_state_dict(model, source, source_format, prefix, strict)
    state_dict = read_state_dict(source, key=key)
    try:
        return _init_from_state_dict(model, state_dict, source_format, prefix, strict)
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from err


def _init_from_state_dict(
    model: VisionMamba,
    state_dict: Mapping[str, Tensor],
    source_format: CheckpointFormat | Literal["auto"],
    prefix: str | None,
    strict: bool,
) -> LoadReport:
    converted = convert_state_dict(state_dict, model, source_format, prefix=prefix)
    report = load_backbone_weights(
        model,
        converted.state_dict,
        strict=strict,
        ignored=converted.dropped,
        initialised=converted.initialised,
    )
    report.source_format = converted.source_format
    report.notes = converted.notes
    return report


def _check_keys_and_shapes(
    expected: Mapping[str, Tensor], state_dict: Mapping[str, Tensor], *, strict: bool
) -> None:
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise CheckpointError(f"missing backbone key(s): {_preview(missing)}")
    for name, tensor in expected.items():
        if state_dict[name].shape != tensor.shape:
            raise CheckpointError(
                f"shape mismatch for {name}: checkpoint {tuple(state_dict[name].shape)}, "
                f"backbone {tuple(tensor.shape)}"
            )
    unexpected = [k for k in state_dict if k not in expected]
    if strict and unexpected:
        raise CheckpointError(f"unexpected key(s) not in the backbone: {_preview(unexpected)}")


def state_dict_sha256(
    state_dict: Mapping[str, Tensor], keys: Iterable[str] | None = None, length: int = 16
) -> str:
    """Short sha256 over the sorted key names, dtypes, shapes and bytes of ``keys`` (default: all)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict if keys is None else keys):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:length]


# Export ----------------------------------------------------------------------------------------------------
def save_backbone(
    model_or_state_dict: VisionMamba | Mapping[str, Tensor],
    config: VisionMambaConfig | None,
    path: str | Path,
    *,
    metadata: Mapping[str, str] | None = None,
) -> tuple[Path, Path]:
    """Write ``path`` (safetensors, config JSON in its metadata) and the sidecar ``<stem>.json``.

    ``config`` defaults to the model's; it is required for a bare state dict, which must fit it
    exactly. ``metadata`` (str → str, e.g. provenance) goes into both files. Returns both paths.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"backbone export path must end in .safetensors, got {path}")
    if isinstance(model_or_state_dict, nn.Module):
        config = config or model_or_state_dict.config
        state_dict = model_or_state_dict.state_dict()
    else:
        if config is None:
            raise ValueError("save_backbone needs the config when given a state dict")
        state_dict = dict(model_or_state_dict)
        with torch.device("meta"):
            _check_keys_and_shapes(VisionMamba(config).state_dict(), state_dict, strict=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    config_json = json.dumps(config.to_dict(), sort_keys=True)
    header = {
        **dict(metadata or {}),
        "format": EXPORT_FORMAT,
        "config": config_json,
        "sha256": state_dict_sha256(tensors),
    }
    sidecar = path.with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)
    sidecar_data = {**header, "config": config.to_dict()}
    sidecar.write_text(json.dumps(sidecar_data, indent=2, sort_keys=True) + "\n")
    log.info("saved backbone export %s (+ %s), sha256 %s", path, sidecar.name, header["sha256"])
    return path, sidecar


def load_backbone(path: str | Path) -> VisionMamba:
    """Rebuild a :class:`VisionMamba` from an export (config from the file's metadata, else the sidecar)
    and load its weights strictly; a hash that differs from the recorded one is an error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"backbone export not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read safetensors file {path}: {err}") from err
    try:
        if "config" in header:
            config_dict = json.loads(header["config"])
        else:
            sidecar = path.with_suffix(".json")
            if not sidecar.is_file():
                raise CheckpointError(f"no backbone config in its metadata and no sidecar {sidecar.name}")
            config_dict = json.loads(sidecar.read_text())["config"]
        model = VisionMamba(VisionMambaConfig.from_dict(config_dict))
        report = load_backbone_weights(model, read_state_dict(path))
    except (ValueError, TypeError, KeyError) as err:  # CheckpointError is a ValueError
        raise CheckpointError(f"{path}: {err}") from err
    if "sha256" in header and header["sha256"] != report.sha256:
        raise CheckpointError(
            f"{path}: tensor hash {report.sha256} differs from the recorded {header['sha256']}"
        )
    return model


# Reporting helpers -----------------------------------------------------------------------------------------
def summarize_keys(keys: Iterable[str], limit: int = 8) -> str:
    """Group keys by their first component: ``"text_encoder.* (199), logit_scale"``."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(key.split(".", 1)[0], []).append(key)
    parts = [
        f"{head}.* ({len(members)})" if len(members) > 1 else members[0] for head, members in groups.items()
    ]
    more = f", ... (+{len(parts) - limit} more groups)" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more if parts else "none"


def _preview(keys: Iterable[Any], limit: int = 8) -> str:
    keys = [str(k) for k in keys]
    more = f", ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
