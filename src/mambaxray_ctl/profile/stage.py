"""The stage to profile: its config, its module at the chosen sizes, and one synthetic batch.

The config is parsed by ``fit``'s parser (:class:`~mambaxray_ctl.lightning_cli.MambaXrayCLI`) from the
files ``fit`` is given: ``configs/data/<dataset>.yaml``, ``configs/<stage>.yaml``, then
``configs/<dataset>/<stage>.yaml`` when there is one. Nothing of it is instantiated there: the module is
built here from the parsed ``model`` (its class and ``init_args``, with profile's overrides on top), and
only ``data.init_args.batch_size`` and ``trainer.max_epochs`` are read besides.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningModule

from mambaxray_ctl.compat import import_class
from mambaxray_ctl.data.datamodules import per_device_batch_size
from mambaxray_ctl.lightning_cli import MambaXrayCLI
from mambaxray_ctl.profile.models import synthetic_reports

STAGES = ("stage1_arm", "stage1_mae", "stage1_simclr", "stage2_contrastive", "stage3_reportgen")
STAGE_ALIASES = {"1": "stage1_arm", "2": "stage2_contrastive", "3": "stage3_reportgen"}
REPORT_STAGES = ("stage2_contrastive", "stage3_reportgen")


# The config -------------------------------------------------------------------------------------------------
class _ParseOnly(MambaXrayCLI):
    """``fit``'s parser and config files, with nothing instantiated (no trainer, module or data)."""

    def parse_arguments(self, parser: Any, args: Any) -> None:
        with warnings.catch_warnings():  # args given while sys.argv holds `profile ...`: meant here
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().parse_arguments(parser, args)

    def instantiate_classes(self) -> None:
        pass


def config_files(configs: Path, stage: str, dataset: str) -> list[Path]:
    """The ``-c`` files of ``fit`` for ``stage`` on ``dataset`` (the dataset's stage file when present)."""
    files = [configs / "data" / f"{dataset}.yaml", configs / f"{stage}.yaml"]
    return [*files, *[path for path in [configs / dataset / f"{stage}.yaml"] if path.is_file()]]


def stage_config(configs: Path, stage: str, dataset: str) -> Namespace:
    """The config ``fit`` would run with (parsed and validated, not instantiated)."""
    args = [arg for path in config_files(configs, stage, dataset) for arg in ("-c", str(path))]
    return _ParseOnly(args=[*args, "--seed_everything=false"], run=False).config  # nothing to seed


def per_device_batch(config: Namespace, world_size: int) -> int:
    """The config's ``data.batch_size`` (GLOBAL: the DataModule splits it across ranks) per device."""
    try:
        return per_device_batch_size(int(config.data.init_args.batch_size), "data.batch_size", world_size)
    except ValueError as err:
        raise ValueError(f"{err}; or pass --batch-size (per device)") from None


# The module -------------------------------------------------------------------------------------------------
def build_stage(class_path: str, init_args: dict[str, Any], *overrides: dict[str, Any]) -> LightningModule:
    """The stage module ``class_path`` (``package.module.Class``) built with ``init_args`` and then
    ``overrides`` (a group's fields are replaced one by one, e.g. ``{"lm": {"dtype": ...}}``)."""
    merged = dict(init_args)
    for update in overrides:
        for name, value in update.items():
            old = merged.get(name)
            merged[name] = {**old, **value} if isinstance(old, dict) and isinstance(value, dict) else value
    return import_class(class_path)(**merged)


def build_device(accelerator: str) -> torch.device:
    """Where the module is built: directly on the GPU there (random init of a 7B LM on a CPU takes
    minutes), each DDP rank on its own; else on the CPU."""
    if accelerator == "gpu":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def module_overrides(args: argparse.Namespace, stage: str) -> dict[str, Any]:
    """The init_args profile sets on top of the config: no hand-off, no export, the chosen sizes."""
    backbone = {"preset": args.backbone, "ssm_impl": args.ssm_impl}
    overrides: dict[str, Any] = {
        "handoff": {"source": None},
        "export": False,
        "backbone": {name: value for name, value in backbone.items() if value},
    }
    if stage == "stage3_reportgen":
        overrides["lm"] = {"dtype": args.llm_dtype}
        overrides["gradient_checkpointing"] = args.gradient_checkpointing
    return overrides


# The batch --------------------------------------------------------------------------------------------------
def synthetic_batch(module: LightningModule, stage: str, batch_size: int, views: int) -> dict[str, Any]:
    """One batch in the DataModule's format: random images at the backbone's size, long reports."""
    height, width = module.backbone.config.img_hw
    generator = torch.Generator().manual_seed(0)
    ids = [f"profile-{index}" for index in range(batch_size)]
    if stage not in REPORT_STAGES:
        return {"ids": ids, "images": torch.randn(batch_size, 3, height, width, generator=generator)}
    reports = synthetic_reports(batch_size * 8)
    return {
        "ids": ids,
        "images": torch.randn(batch_size, views, 3, height, width, generator=generator),
        "view_mask": torch.ones(batch_size, views, dtype=torch.bool),
        "reports": [" ".join(reports[index * 8 : (index + 1) * 8]) for index in range(batch_size)],
    }


class Repeat(torch.utils.data.Dataset):
    """The same batch ``length`` times (a DataLoader with ``batch_size=None`` yields it as is)."""

    def __init__(self, batch: dict[str, Any], length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.batch
