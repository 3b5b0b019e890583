"""``mambaxray-ctl generate``: write the report of one study from its image files with a stage-3 checkpoint
or model export.

``mambaxray-ctl generate --ckpt runs/stage3/version_0/checkpoints/last.ckpt front.png lateral.png``
treats every IMAGE as one view of the same study. Each file is decoded with
:func:`~mambaxray_ctl.data.images.load_image` (PNG, JPEG, 16-bit PNG, DICOM with pydicom), then
resized and normalised by the DataModule's own :class:`~mambaxray_ctl.data.images.EvalTransform`:
at the image size and with the mean/std the checkpoint's DataModule was trained with (recorded by
Lightning in the checkpoint), else at the backbone's ``config.img_size`` with the ImageNet
statistics. The report goes to stdout; notes go to stderr. ``--explain OUT_DIR`` also writes a heat map
per sentence and view there (:mod:`mambaxray_ctl.evaluation.explain`).

``--ckpt`` takes a Lightning ``.ckpt`` of a stage-3 run or its model export, ``model.safetensors``
(:mod:`mambaxray_ctl.stages.export`), whose metadata holds the same hyper-parameters. Both leave out
the frozen LM, which is loaded again from the folder recorded in the hyper-parameters (``lm.name``);
``--llm PATH`` replaces that folder when it has moved. A model trained with a 4-bit LM
(``lm.quantization: nf4``) loads it the same way, which needs ``--device cuda``, a CUDA GPU and bitsandbytes.
Decoding is the checkpoint's (beam search, deterministic) unless ``--num-beams`` etc. change it.
Checkpoints written before the stage arguments were grouped are read with their names upgraded.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mambaxray_ctl.compat import upgrade_stage3_hparams
from mambaxray_ctl.data.cleaning import split_sentences
from mambaxray_ctl.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    ImageDecodeError,
    Normalize,
    load_image,
)

if TYPE_CHECKING:
    from mambaxray_ctl.stages.reportgen import ReportGenModule
    from mambaxray_ctl.text.llm import Decoding

STAGE3_CLASS = "mambaxray_ctl.stages.ReportGenModule"
STAGE3_PREFIXES = ("backbone.", "mapper.", "text_proj.")  # trainable parts every stage-3 checkpoint holds


class GenerateError(Exception):
    """A user-facing problem: missing/unreadable input, or a checkpoint that is not a stage-3 one."""


@dataclass
class CheckpointInfo:
    """What :func:`inspect_checkpoint` reads from a stage-3 checkpoint without building the model."""

    path: Path
    hparams: dict[str, Any]
    datamodule_hparams: dict[str, Any]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "images", nargs="+", type=Path, metavar="IMAGE", help="image files, one per view of ONE study"
    )
    parser.add_argument(
        "--ckpt",
        required=True,
        type=Path,
        help="stage-3 Lightning checkpoint (.ckpt) or model export (model.safetensors)",
    )
    parser.add_argument(
        "--llm",
        default=None,
        help="report LM folder to use instead of the one recorded in the checkpoint (for moved files)",
    )
    parser.add_argument("--num-beams", type=_positive_int, default=None, help="default: the checkpoint's")
    parser.add_argument(
        "--max-new-tokens", type=_positive_int, default=None, help="default: the checkpoint's"
    )
    parser.add_argument(
        "--min-new-tokens", type=_non_negative_int, default=None, help="default: the checkpoint's"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu")
    parser.add_argument(
        "--explain",
        type=Path,
        default=None,
        metavar="OUT_DIR",
        help="also write one heat map per sentence and view into OUT_DIR (PNG overlays, index.html)",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


# Checkpoint ----------------------------------------------------------------------------------------------
def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
    return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) serialisation


def _read_checkpoint(path: Path) -> Any:
    """A ``.ckpt`` (:func:`_torch_load`), or a model export as the same dict.

    :raises GenerateError: a ``.safetensors`` file that is not a readable model export.
    """
    from mambaxray_ctl.stages.export import ModelExportError, is_model_export_path, read_model_export

    if not is_model_export_path(path):
        return _torch_load(path)
    try:
        return read_model_export(path)
    except ModelExportError as exc:
        raise GenerateError(str(exc)) from exc


def _is_stage3_class(class_path: str) -> bool:
    """True for ReportGenModule or an already imported subclass of it (nothing is imported here)."""
    from mambaxray_ctl.stages.reportgen import ReportGenModule

    module_name, _, name = class_path.rpartition(".")
    cls = getattr(sys.modules.get(module_name), name, None)
    return isinstance(cls, type) and issubclass(cls, ReportGenModule)


def _prefixes(keys: Sequence[str]) -> list[str]:
    return sorted({key.split(".", 1)[0] for key in keys})


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Read ``path`` (a ``.ckpt`` memory-mapped with ``weights_only``, or a model export) and check that a
    stage-3 module wrote it.

    :raises GenerateError: the file is missing, not a Lightning checkpoint nor a model export, or
        written by another class.
    """
    path = Path(path)
    if not path.is_file():
        raise GenerateError(f"checkpoint not found: {path}")
    try:
        checkpoint = _read_checkpoint(path)
    except GenerateError:
        raise
    except Exception as exc:  # pickle, zip and weights_only errors come in many types
        raise GenerateError(
            f"cannot read checkpoint {path} as a Lightning .ckpt ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise GenerateError(
            f"{path} is not a Lightning checkpoint (no 'state_dict'); generate needs a stage-3 run's "
            "checkpoints/*.ckpt or its model.safetensors, not a backbone export"
        )
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    hparams = upgrade_stage3_hparams(hparams)
    state_keys = list(checkpoint["state_dict"])
    class_path = hparams.get("_class_path")
    if class_path is not None and not _is_stage3_class(str(class_path)):
        raise GenerateError(
            f"{path} was written by {class_path}, not by the stage-3 {STAGE3_CLASS}: "
            "generate needs a stage-3 (report generation) checkpoint"
        )
    missing = [
        prefix + "*" for prefix in STAGE3_PREFIXES if not any(k.startswith(prefix) for k in state_keys)
    ]
    if not isinstance(hparams.get("lm"), dict) or "name" not in hparams["lm"]:
        missing.append("hyper-parameter 'lm.name'")
    if missing:
        writer = class_path or "an unknown class (no _class_path in its hyper-parameters)"
        raise GenerateError(
            f"{path} is not a stage-3 {STAGE3_CLASS} checkpoint: written by {writer}, it lacks "
            f"{', '.join(missing)} (its weights are under: {', '.join(_prefixes(state_keys)) or 'nothing'})"
        )
    datamodule = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    return CheckpointInfo(path=path, hparams=hparams, datamodule_hparams=datamodule)


def load_module(info: CheckpointInfo, llm: str | None = None, device: str = "cpu") -> ReportGenModule:
    """The stage-3 module of a checked checkpoint, in eval mode on ``device``; ``llm`` replaces the LM
    folder recorded in it.

    :raises GenerateError: the LM folder is missing, the LM cannot be built here (a 4-bit LM,
        ``lm.quantization``, needs ``device="cuda"``, a CUDA GPU and bitsandbytes), or the weights do not
        fit the module.
    """
    from mambaxray_ctl.stages.reportgen import ReportGenModule

    if device == "cuda" and not torch.cuda.is_available():
        raise GenerateError("--device cuda: no CUDA device is available (this torch build or machine)")
    hparams = {name: value for name, value in info.hparams.items() if not name.startswith("_")}
    if llm is not None:
        hparams["lm"] = {**hparams["lm"], "name": str(llm)}
    quantization = hparams["lm"].get("quantization")
    if quantization is not None and device != "cuda":
        raise GenerateError(
            f"checkpoint {info.path} has a 4-bit report LM (lm.quantization={quantization!r}), which runs on "
            "CUDA only: pass --device cuda on a machine with a CUDA GPU and bitsandbytes "
            "(pip install 'mambaxray-ctl[quant]')"
        )
    try:
        module = ReportGenModule(**hparams)
    except (FileNotFoundError, OSError) as exc:
        hint = "" if llm else " (pass --llm PATH if the LM folder has moved)"
        raise GenerateError(f"cannot load the report LM {hparams['lm']['name']!r}: {exc}{hint}") from exc
    except (TypeError, ValueError) as exc:
        raise GenerateError(
            f"checkpoint {info.path}: its hyper-parameters do not build ReportGenModule: {exc}"
        ) from exc
    except (RuntimeError, ImportError) as exc:  # what this machine lacks: CUDA, bitsandbytes, peft
        raise GenerateError(f"checkpoint {info.path}: cannot build its model here: {exc}") from exc
    checkpoint = _read_checkpoint(info.path)
    try:
        module.on_load_checkpoint(checkpoint)  # checks that only the frozen LM is missing
        module.load_state_dict(checkpoint["state_dict"], strict=False)
    except RuntimeError as exc:
        raise GenerateError(f"checkpoint {info.path} does not load into ReportGenModule: {exc}") from exc
    return module.eval().to(device)


def eval_transform(module: ReportGenModule, info: CheckpointInfo) -> EvalTransform:
    """The DataModule's evaluation transform with the checkpoint's image size and statistics."""
    datamodule = info.datamodule_hparams
    size = datamodule.get("image_size") or module.backbone.config.img_size
    mean = datamodule.get("mean") or IMAGENET_MEAN
    std = datamodule.get("std") or IMAGENET_STD
    return EvalTransform(size, Normalize(mean, std))


# Images --------------------------------------------------------------------------------------------------
def check_image_files(paths: Sequence[str | Path]) -> None:
    """:raises GenerateError: no path given, or naming every path that is missing or not a file."""
    if not paths:
        raise GenerateError("no image given")
    missing = [str(path) for path in paths if not Path(path).exists()]
    if missing:
        raise GenerateError(f"image not found: {', '.join(missing)}")
    not_files = [str(path) for path in paths if not Path(path).is_file()]
    if not_files:
        raise GenerateError(f"image is not a file: {', '.join(not_files)}")


def load_study(paths: Sequence[str | Path], transform: EvalTransform) -> tuple[Tensor, Tensor]:
    """``(1, V, 3, H, W)`` images and the ``(1, V)`` view mask of one study, one view per file.

    :raises GenerateError: naming the first missing or undecodable file.
    """
    check_image_files(paths)
    views = []
    for path in paths:
        try:
            views.append(transform(load_image(path)))
        except ImageDecodeError as exc:
            raise GenerateError(f"cannot read image {exc}") from exc
    images = torch.stack(views)[None]
    return images, torch.ones(1, len(views), dtype=torch.bool)


def generate_report(module: ReportGenModule, images: Tensor, view_mask: Tensor, decoding: Decoding) -> str:
    """The report of one study with ``decoding``."""
    device = next(module.parameters()).device
    return module.generate(images.to(device), view_mask.to(device), decoding)[0]


def run(args: argparse.Namespace) -> int:
    try:
        check_image_files(args.images)  # before the (slow) model load
        info = inspect_checkpoint(args.ckpt)
        module = load_module(info, args.llm, args.device)
        transform = eval_transform(module, info)
        images, view_mask = load_study(args.images, transform)
        given = {
            "num_beams": args.num_beams,
            "max_new_tokens": args.max_new_tokens,
            "min_new_tokens": args.min_new_tokens,
        }
        decoding = replace(module.decoding, **{k: v for k, v in given.items() if v is not None})
        if decoding.min_new_tokens > decoding.max_new_tokens:
            raise GenerateError(
                f"min_new_tokens={decoding.min_new_tokens} exceeds max_new_tokens={decoding.max_new_tokens}"
            )
        report = generate_report(module, images, view_mask, decoding)
        if args.explain is not None:
            from mambaxray_ctl.evaluation.explain import explain_study

            try:
                page = explain_study(module, images[0], view_mask[0], report, args.images, args.explain)
            except (OSError, ValueError) as exc:
                raise GenerateError(f"cannot write the heat maps to {args.explain}: {exc}") from exc
    except GenerateError as exc:
        print(f"mambaxray-ctl generate: error: {exc}", file=sys.stderr)
        return 1
    size = tuple(images.shape[-2:])
    print(
        f"{len(args.images)} view(s) at {size[0]}x{size[1]}, LM {module.lm_spec.name}, "
        f"{decoding.num_beams} beam(s), {decoding.min_new_tokens}-{decoding.max_new_tokens} new tokens",
        file=sys.stderr,
    )
    if args.explain is not None:
        print(f"heat maps of {len(split_sentences(report))} sentence(s): {page}", file=sys.stderr)
    print(report)
    return 0
