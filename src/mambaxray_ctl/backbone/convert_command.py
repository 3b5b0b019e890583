"""``mambaxray-ctl convert-checkpoint``: official checkpoint → backbone safetensors export.

The output (``DST`` + ``<stem>.json`` sidecar) loads strictly with
:func:`mambaxray_ctl.backbone.checkpoints.load_backbone` and serves as a stage's ``handoff.source``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from mambaxray_ctl.backbone.checkpoints import (
    VL_PREFIX,
    CheckpointError,
    init_backbone_from,
    read_state_dict,
    resolve_format,
    save_backbone,
    summarize_keys,
)
from mambaxray_ctl.backbone.presets import create_backbone, get_preset_config, list_presets

SOURCE_CHOICES = ("auto", "mambaxray-vl", "arm-pretrain", "vim")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments to ``parser``."""
    parser.add_argument(
        "src", metavar="SRC", type=Path, help="checkpoint to convert (.pth/.pt/.ckpt or .safetensors)"
    )
    parser.add_argument(
        "dst",
        metavar="DST",
        type=Path,
        help="output .safetensors file; a <stem>.json sidecar is written beside it",
    )
    parser.add_argument(
        "--from",
        dest="source_format",
        choices=SOURCE_CHOICES,
        default="auto",
        help="source format (default: detected from the key names)",
    )
    parser.add_argument(
        "--preset",
        metavar="NAME",
        help="target backbone preset (default: inferred from embed_dim and depth); one of "
        + ", ".join(list_presets()),
    )
    parser.add_argument("--ema", action="store_true", help="take the 'model_ema' weights (Vim checkpoints)")
    parser.add_argument(
        "--img-size",
        type=int,
        metavar="N",
        help="target image size; pos_embed is resampled to its patch grid",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="seed of the initialisation of keys the source lacks (default: 0)",
    )


def run(args: argparse.Namespace) -> int:
    """Convert ``args.src`` into ``args.dst``; prints a summary, returns the exit status."""
    try:
        print(_convert(args))
    except (ValueError, OSError) as err:  # CheckpointError and config errors are ValueErrors
        print(f"mambaxray-ctl convert-checkpoint: error: {err}", file=sys.stderr)
        return 1
    return 0


def _convert(args: argparse.Namespace) -> str:
    if args.dst.suffix != ".safetensors":
        raise CheckpointError(f"DST must end in .safetensors, got {args.dst}")
    state_dict = read_state_dict(args.src, key="model_ema" if args.ema else None)
    source_format = resolve_format(state_dict, args.source_format)
    preset = args.preset or _infer_preset(state_dict, source_format)
    overrides = {} if args.img_size is None else {"img_size": args.img_size}
    torch.manual_seed(args.seed)
    model = create_backbone(preset, **overrides)
    report = init_backbone_from(model, state_dict, source_format=source_format)
    metadata = {
        "source": str(args.src),
        "source_format": source_format,
        "source_sha256": report.sha256,
        "preset": preset,
    }
    weights, sidecar = save_backbone(model, None, args.dst, metadata=metadata)

    config = model.config
    initialised = (
        ", ".join(report.initialised) + " (fresh init, not loaded)" if report.initialised else "none"
    )
    lines = [
        f"converted {args.src}",
        f"  source format : {source_format}" + (" (model_ema weights)" if args.ema else ""),
        f"  preset        : {preset} (img_size {config.img_size}, {config.num_tokens} tokens, "
        f"embed_dim {config.embed_dim}, depth {config.depth})",
        f"  loaded        : {len(report.loaded)} tensors, sha256 {report.sha256}",
        f"  dropped       : {f'{len(report.ignored)} key(s): ' if report.ignored else ''}"
        f"{summarize_keys(report.ignored)}",
        f"  initialised   : {initialised}",
        *(f"  note          : {note}" for note in report.notes),
        f"  wrote         : {weights}",
        f"                  {sidecar}",
    ]
    return "\n".join(lines)


def _infer_preset(state_dict: Mapping[str, Tensor], source_format: str) -> str:
    """The one stage-2/3 or Vim preset whose block style, embed_dim and depth fit the checkpoint."""
    prefix = VL_PREFIX if source_format == "mambaxray-vl" else ""
    patch = state_dict.get(f"{prefix}patch_embed.proj.weight")
    layer_key = re.compile(rf"^{re.escape(prefix)}layers\.(\d+)\.")
    layers = {int(m[1]) for k in state_dict if (m := layer_key.match(k))}
    if patch is None or not layers:
        raise CheckpointError(
            f"cannot infer the preset: no {prefix}patch_embed / {prefix}layers keys; pass --preset"
        )
    style = "vim" if f"{prefix}layers.0.norm.weight" in state_dict else "arm"
    embed_dim, depth = patch.shape[0], max(layers) + 1
    matches = []
    for name in list_presets():
        config = get_preset_config(name)
        if (config.block_style, config.embed_dim, config.depth) == (style, embed_dim, depth) and (
            config.class_token and config.scan_directions > 1
        ):
            matches.append(name)
    if len(matches) != 1:
        found = f" (candidates: {', '.join(matches)})" if matches else ""
        raise CheckpointError(
            f"cannot infer the preset of an {style!r} backbone with embed_dim {embed_dim} and depth {depth}"
            f"{found}; pass --preset"
        )
    return matches[0]
