"""Stage 3's portable model export, ``model.safetensors``, and its ``MODEL_CARD.md``.

At the end of stage 3's ``fit``, beside ``backbone.safetensors`` and under the same rules (not under
``fast_dev_run`` nor with ``export: false``; float32; gathered whole under FSDP and DeepSpeed on every
rank, :meth:`~mambaxray_ctl.stages.base.BackboneStage.export_state`, before rank 0 writes both),
:func:`export_model` writes:

- ``model.safetensors``: exactly the tensors a stage-3 checkpoint holds, i.e. everything but the frozen
  LM: the backbone, the mapper, the CTL-FT projection and, with ``lm.lora``, the LoRA adapters. Its
  metadata (strings) holds what rebuilds the module: ``hyper_parameters`` and
  ``datamodule_hyper_parameters`` (JSON, as a ``.ckpt`` stores them), the LM's name or path, prompt,
  template and LoRA settings, the decoding settings (JSON), the metadata of every export (stage, step,
  hand-off source, package version and git commit: ``BackboneStage.export_metadata``) and a sha256
  of the tensors.
- ``MODEL_CARD.md``: the model, its training data and split (from the DataModule), intended use,
  limitations and how to load it. Its metrics section says "not evaluated yet" until the pipeline's
  evaluate step (``make evaluate``, ``make paper``, the demo) scores predictions made with this run's
  checkpoint or export and rewrites it (:func:`write_card_metrics`), naming the file scored and
  whether it is this export (:func:`scored_file`).

:func:`read_model_export` reads an export back as the dict a Lightning checkpoint would be, so that
``generate --ckpt`` and ``--ckpt_path`` of validate/test/predict (through :class:`ModelExportIO`)
take it in place of a ``.ckpt`` (``ReportGenModule.setup`` installs the reader under the single-device
and DDP strategies); the module's ``on_load_checkpoint`` then checks its keys. Where an export cannot
stand for a ``.ckpt`` it is refused with :class:`ModelExportError` (:func:`refuse_model_export`):
resuming ``fit`` (no optimiser or loop state), and any ``ckpt_path`` under FSDP and DeepSpeed (the
stage strategies of :mod:`~mambaxray_ctl.stages.sharding` check).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, Strategy
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from mambaxray_ctl.backbone.checkpoints import EXPORT_FORMAT as BACKBONE_FORMAT
from mambaxray_ctl.backbone.checkpoints import state_dict_sha256
from mambaxray_ctl.data.datamodules import ReportDataModule

if TYPE_CHECKING:
    from lightning.pytorch import LightningDataModule

    from mambaxray_ctl.stages.reportgen import ReportGenModule

log = logging.getLogger(__name__)

MODEL_EXPORT_NAME = "model.safetensors"
MODEL_CARD_NAME = "MODEL_CARD.md"
MODEL_FORMAT = "mambaxray-ctl-model"
METRICS_START = "<!-- metrics: start -->"
METRICS_END = "<!-- metrics: end -->"
SPLITS = ("train", "val", "test")
# Why a model export cannot be a ckpt_path (README, "Sharing a trained model"):
FIT_CKPT_PATH = (
    "resuming fit needs the run's checkpoint (checkpoints/last.ckpt), which holds the optimiser and loop "
    "state an export lacks; to train anew from its weights, hand off from the run's backbone.safetensors "
    "(--model.init_args.handoff.source, INIT= with make)"
)
SHARDED_CKPT_PATH = (
    "under FSDP and DeepSpeed, ckpt_path takes the run's checkpoint (checkpoints/*.ckpt), not a model "
    "export: predict from that checkpoint, or from the export under the single-device or DDP strategy"
)


class ModelExportError(ValueError):
    """A file that is not a readable stage-3 model export; the message names it."""


def is_model_export_path(path: str | Path) -> bool:
    """Whether ``path`` is to be read as a model export (a ``.safetensors`` file) rather than a ``.ckpt``."""
    return Path(path).suffix == ".safetensors"


def refuse_model_export(path: Any, why: str) -> None:
    """Raise :class:`ModelExportError` (``why``, naming ``path``) when ``path`` is a model export."""
    if path is not None and is_model_export_path(path):
        raise ModelExportError(f"{path} is a model export ({MODEL_EXPORT_NAME}), not a checkpoint: {why}")


# Writing --------------------------------------------------------------------------------------------------
def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def model_metadata(module: ReportGenModule, state: dict[str, Tensor]) -> dict[str, str]:
    """The export's safetensors metadata (all strings) for ``module`` and its exported ``state``: every
    export's (:meth:`~mambaxray_ctl.stages.base.BackboneStage.export_metadata`) and what rebuilds the
    module."""
    datamodule = getattr(module.trainer, "datamodule", None)
    lm = module.lm_spec
    return module.export_metadata() | {
        "format": MODEL_FORMAT,
        "class_path": f"{type(module).__module__}.{type(module).__qualname__}",
        "hyper_parameters": _json(dict(module.hparams)),
        "datamodule_hyper_parameters": _json(dict(getattr(datamodule, "hparams", {}) or {})),
        "lm_name": lm.name,
        "lm_dtype": lm.dtype,
        "lora": _json(lm.lora),
        "prompt": lm.prompt,
        "template": lm.template,
        "decoding": _json(asdict(module.decoding)),
        "lightning_version": lightning.__version__,
        "sha256": state_dict_sha256(state),
    }


def export_model(module: ReportGenModule, run_dir: Path, state: dict[str, Tensor]) -> Path:
    """Write ``model.safetensors`` (``state``: the module's :meth:`export_state`, all but the frozen LM)
    and ``MODEL_CARD.md`` into ``run_dir``; rank 0 only, after the gathering. Returns the export."""
    metadata = model_metadata(module, state)
    path = run_dir / MODEL_EXPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    card = run_dir / MODEL_CARD_NAME
    data = training_data(getattr(module.trainer, "datamodule", None))
    card.write_text(model_card(path, metadata, data, state), encoding="utf-8")
    log.info("%s: exported the model to %s (%d tensors), card %s", module.stage_name, path, len(state), card)
    return path


# Reading --------------------------------------------------------------------------------------------------
def _not_a_model_export(path: Path, metadata: dict[str, str]) -> ModelExportError:
    found = metadata.get("format")
    if found == BACKBONE_FORMAT:
        what = f"it is the backbone export of a {metadata.get('stage', 'unknown')} run"
    else:
        what = f"its metadata format is {found!r}, not {MODEL_FORMAT!r}"
    return ModelExportError(
        f"{path} is not a Lightning checkpoint nor a stage-3 model export ({MODEL_EXPORT_NAME}): {what}; "
        f"give a stage-3 run's checkpoints/*.ckpt or its {MODEL_EXPORT_NAME}"
    )


def read_model_export(path: str | Path) -> dict[str, Any]:
    """A model export as a Lightning checkpoint dict: ``state_dict``, ``hyper_parameters``,
    ``datamodule_hyper_parameters``, ``epoch``, ``global_step``, ``pytorch-lightning_version`` and
    ``provenance``.

    :raises ModelExportError: naming the file: missing, not safetensors, or not a model export.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelExportError(f"model export not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            if metadata.get("format") != MODEL_FORMAT:
                raise _not_a_model_export(path, metadata)
            names = f.keys()
            state = {key: f.get_tensor(key) for key in names}
    except (SafetensorError, OSError) as exc:
        raise ModelExportError(f"cannot read {path} as a safetensors model export: {exc}") from exc
    try:
        hparams = json.loads(metadata["hyper_parameters"])
        datamodule = json.loads(metadata["datamodule_hyper_parameters"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ModelExportError(f"{path}: its metadata lacks readable hyper-parameters ({exc})") from exc
    return {
        "state_dict": state,
        "hyper_parameters": hparams,
        "datamodule_hyper_parameters": datamodule,
        "epoch": int(metadata.get("epoch", 0)),
        "global_step": int(metadata.get("global_step", 0)),
        "pytorch-lightning_version": metadata.get("lightning_version", lightning.__version__),
        "provenance": {key: metadata[key] for key in ("package_version", "git_commit") if key in metadata},
    }


class ModelExportIO(CheckpointIO):
    """Lightning's checkpoint reader, with model exports read by :func:`read_model_export`; every other
    file, and all writing, go to ``base``. With ``refusal`` set (``fit``), a model export is refused
    with that reason (:func:`refuse_model_export`)."""

    def __init__(self, base: CheckpointIO, refusal: str | None = None) -> None:
        self.base = base
        self.refusal = refusal

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.base.save_checkpoint(checkpoint, path, storage_options)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if self.refusal is not None:
            refuse_model_export(path, self.refusal)
        if is_model_export_path(path):
            return read_model_export(path)
        if map_location is None:  # Strategy.load_checkpoint passes none: keep base's default (the CPU)
            return self.base.load_checkpoint(path, weights_only=weights_only)
        return self.base.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        self.base.remove_checkpoint(path)

    def teardown(self) -> None:
        self.base.teardown()


def accept_model_exports(strategy: Strategy, stage: str) -> None:
    """Let ``strategy`` take a model export as ``ckpt_path`` in ``stage`` (validate, test, predict) and
    refuse it, saying why, in ``fit`` (:class:`ModelExportIO` around its reader).

    Not under FSDP and DeepSpeed, whose checkpoint loading is their own: the stage strategies refuse
    an export there (:data:`SHARDED_CKPT_PATH`).
    """
    if isinstance(strategy, FSDPStrategy | DeepSpeedStrategy):
        return
    if not isinstance(strategy.checkpoint_io, ModelExportIO):
        strategy.checkpoint_io = ModelExportIO(strategy.checkpoint_io)
    strategy.checkpoint_io.refusal = FIT_CKPT_PATH if stage == "fit" else None


# The model card -------------------------------------------------------------------------------------------
def training_data(datamodule: LightningDataModule | None) -> dict[str, Any]:
    """What the card says of the training data: dataset name, DataModule class, its settings and the
    studies per split (as loaded, after validation)."""
    if datamodule is None:
        return {}
    sizes = {}
    for split in SPLITS:
        try:
            sizes[split] = len(datamodule.dataset(split))
        except (AttributeError, RuntimeError, TypeError):  # another DataModule, or a split it lacks
            continue
    return {
        "dataset": getattr(datamodule, "dataset_name", None),
        "class": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
        "hparams": dict(getattr(datamodule, "hparams", {}) or {}),
        "splits": sizes,
    }


def _parameters(state: dict[str, Tensor], prefix: str) -> int:
    return sum(value.numel() for key, value in state.items() if key.startswith(prefix))


def model_card(path: Path, metadata: dict[str, str], data: dict[str, Any], state: dict[str, Tensor]) -> str:
    """``MODEL_CARD.md`` of the export ``path``: its ``metadata`` and ``state``, and the
    :func:`training_data`."""
    hparams = json.loads(metadata["hyper_parameters"])
    backbone = hparams.get("backbone", {})
    ctl_ft = hparams.get("ctl_ft", {})
    decoding = json.loads(metadata["decoding"])
    lora = json.loads(metadata["lora"])
    dataset = data.get("dataset") or ReportDataModule.dataset_name
    named = dataset != ReportDataModule.dataset_name  # a dataset the pipeline's make targets may name
    settings = data.get("hparams", {})
    splits = ", ".join(f"{split} {count}" for split, count in data.get("splits", {}).items()) or "unknown"
    commit = metadata.get("git_commit", "none recorded (not run from a git checkout)")
    parts = {
        "backbone": "backbone",
        "mapper": "mapper",
        "text_proj": "CTL-FT projection",
        "llm": "LoRA adapters",
    }
    sizes = {name: _parameters(state, f"{prefix}.") for prefix, name in parts.items()}
    counts = ", ".join(f"{name} {size:,}" for name, size in sizes.items() if size)
    synthetic = (
        "\n- **Synthetic data.** The demo world is drawn by a program: this model has never seen a real "
        "radiograph, and its reports say nothing about real patients."
        if dataset == "demo"
        else ""
    )
    run_dir = path.parent
    config = run_dir / "config.yaml"
    predict = f"mambaxray-ctl predict -c {config} --ckpt_path {path}"
    if named:
        not_evaluated = (
            f"Not evaluated yet. `make predict DATA={dataset} CKPT={path}` then `make evaluate "
            f"DATA={dataset}`\n(`mambaxray-ctl pipeline predict|evaluate`) score the test split and write "
            "the scores here."
        )
        make = f"make predict DATA={dataset} CKPT={path}  # predictions.jsonl of the test split"
        commands = f"{make}\n{predict}"
    else:
        not_evaluated = (
            f"Not evaluated yet. `{predict}` writes the test split's predictions; the\npipeline's "
            "evaluate step, which writes the scores here, takes only the datasets of `configs/data/`."
        )
        commands = f"{predict}  # predictions.jsonl of the test split"
    return f"""# Model card: MambaXray-CTL report generator ({run_dir})

A chest X-ray report generator trained with MambaXray-CTL's stage 3: a Mamba vision backbone and a
mapper turn the views of one study into visual tokens in the prompt of a frozen causal language model,
which writes the report. Written at the end of training by mambaxray-ctl {metadata["package_version"]},
git commit {commit}.

## Files

- `{path.name}`: the weights at the end of training (floating point in float32), {len(state)}
  tensors ({counts} parameters), sha256 `{metadata["sha256"]}`. Its metadata holds the LM,
  prompt, template, decoding settings, the hyper-parameters that rebuild the module, the package
  version and the commit.
- The language model is **not** included: `{metadata["lm_name"]}` ({metadata["lm_dtype"]}), loaded from that
  folder or hub name (another LM, or other weights under that name, write other reports).
- `backbone.safetensors`: the backbone alone, the format a next stage hands off from.

## Model

| part | setting |
|---|---|
| backbone | `{backbone.get("preset")}`, overrides `{json.dumps(backbone.get("overrides") or {})}` |
| language model | `{metadata["lm_name"]}`, {metadata["lm_dtype"]}, LoRA `{json.dumps(lora)}` |
| prompt | `{metadata["prompt"]}` |
| template | `{json.dumps(metadata["template"])}` |
| decoding | `{json.dumps(decoding)}` |
| CTL-FT | weight {ctl_ft.get("weight")}, temperature {ctl_ft.get("temperature")} |

## Training data and split

- Dataset `{dataset}` (`{data.get("class", "unknown DataModule")}`), annotation
  `{settings.get("annotation")}`, images `{settings.get("image_root") or "beside the annotation"}`,
  report cleaning `{settings.get("cleaning")}`, images resized to {settings.get("image_size")} px.
- Studies per split, as loaded after validation: {splits}. The model was trained on the train split;
  `{path.name}` holds the weights at the end of training (the val split, when validation ran, scored
  the checkpoints kept in `checkpoints/`; the pipeline predicts from the best of them by val/score).
- {metadata["global_step"]} optimiser steps; the backbone was handed off from
  `{metadata["init_from"] or "nothing (random initialisation)"}`.

## Metrics (test split)

{METRICS_START}
{not_evaluated}
{METRICS_END}

## Intended use

Research on automatic radiology report generation: reproducing and comparing methods, studying what
such models learn. **Not for clinical decisions**, nor for any use on patients: the model has not been
validated clinically and has no regulatory clearance.

## Limitations

- Trained on one dataset (above); its behaviour on other hospitals, scanners, populations or
  projections is unknown.
- A report can be fluent and wrong: it may state findings the images do not show and miss findings
  they do show, and it tends to repeat the frequent phrasing of the training reports.
- BLEU, ROUGE-L, METEOR and CIDEr measure word overlap with one reference report, not clinical
  correctness; clinical efficacy scores depend on the labeller that reads the reports.
- One study at a time, its views averaged token by token: no prior studies, no clinical history.{synthetic}

## How to load

```bash
mambaxray-ctl generate --ckpt {path} frontal.png lateral.png   # one study's report
mambaxray-ctl generate --ckpt {path} --llm /path/to/LM IMAGE    # when the LM folder has moved
{commands}
```

```python
from mambaxray_ctl.evaluation.generate import inspect_checkpoint, load_module
module = load_module(inspect_checkpoint("{path}"))  # ReportGenModule; llm="..." for a moved LM
reports = module.generate(images, view_mask)  # images (B, V, 3, H, W), view_mask (B, V)
```
"""


def model_card_of(checkpoint: str | Path | None) -> Path | None:
    """The ``MODEL_CARD.md`` of the stage-3 run that wrote ``checkpoint`` (``<run>/checkpoints/*.ckpt``
    or ``<run>/model.safetensors``), when there is one."""
    if not checkpoint:
        return None
    path = Path(checkpoint)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    card = run_dir / MODEL_CARD_NAME
    return card if card.is_file() else None


def _sha256_of(path: Path) -> str | None:
    """The tensors' sha256 a model export records; ``None`` when unreadable."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return (f.metadata() or {}).get("sha256")
    except (SafetensorError, OSError):
        return None


def scored_file(card: Path, checkpoint: str | Path) -> str:
    """Markdown naming the file whose predictions were scored (``checkpoint``) and saying whether it is
    the export of ``card`` (a model export with the same tensors' sha256) or not."""
    export = card.parent / MODEL_EXPORT_NAME
    if not is_model_export_path(checkpoint):
        return (
            f"the checkpoint `{checkpoint}`, **not** this card's `{export.name}`, which holds the weights "
            "at the end of training (as `checkpoints/last.ckpt` does)"
        )
    ours, theirs = _sha256_of(export), _sha256_of(Path(checkpoint))
    if ours is not None and ours == theirs:
        return f"this card's `{export.name}` (`{checkpoint}`, sha256 `{ours}`)"
    return (
        f"the model export `{checkpoint}`, **not** this card's `{export.name}`: sha256 "
        f"`{theirs or 'unreadable'}`, this card's `{ours or 'missing'}`"
    )


def write_card_metrics(card: Path, text: str) -> None:
    """Replace the metrics section of ``card`` with ``text`` (markdown).

    :raises ModelExportError: the card has no metrics section (edited by hand?).
    """
    content = card.read_text(encoding="utf-8")
    head, start, rest = content.partition(METRICS_START)
    _, end, tail = rest.partition(METRICS_END)
    if not start or not end:
        raise ModelExportError(f"{card}: no metrics section ({METRICS_START} ... {METRICS_END})")
    card.write_text(f"{head}{METRICS_START}\n{text.strip()}\n{METRICS_END}{tail}", encoding="utf-8")
