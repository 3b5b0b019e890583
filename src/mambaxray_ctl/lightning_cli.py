"""``mambaxray-ctl fit|validate|test|predict``: the LightningCLI that runs every stage.

One entry point for the three stages (subclass mode: ``model.class_path`` picks ARMModule,
ContrastiveModule or ReportGenModule; ``data.class_path`` the dataset), the omegaconf parser mode
(``${...}`` interpolation inside one YAML file), several ``-c`` files merged in order, and
``--print_config``. Older spellings of the stage arguments (before their typed groups) are
rewritten with a warning (:func:`mambaxray_ctl.compat.upgrade_argv`). Every run directory (the
TensorBoard logger's ``log_dir``) receives
``config.yaml``; the config also goes to TensorBoard as text.

``--ckpt_path`` means "resume or evaluate this same stage": the hand-off (``handoff.source``) is then not
loaded, and the module's arguments come from the config files and the command line, not from the
checkpoint's stored hyper-parameters (so decoding settings can be changed at ``predict`` time; a
checkpoint that does not fit the configured module fails on load, naming the keys).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger

from mambaxray_ctl.compat import upgrade_argv
from mambaxray_ctl.stages.base import BackboneStage

SUBCOMMANDS = ("fit", "validate", "test", "predict")


class ConfigSaver(SaveConfigCallback):
    """Writes ``config.yaml`` into the run directory and shows it in TensorBoard's text tab."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if isinstance(trainer.logger, TensorBoardLogger):
            text = self.parser.dump(self.config, skip_none=False)
            trainer.logger.experiment.add_text("config", f"```yaml\n{text}\n```", global_step=0)


class MambaXrayCLI(LightningCLI):
    """LightningCLI with this project's defaults (see the module docstring)."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        mode = {"parser_mode": "omegaconf"}
        super().__init__(
            model_class=BackboneStage,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=ConfigSaver,
            parser_kwargs={**mode, **{name: dict(mode) for name in SUBCOMMANDS}},
            auto_configure_optimizers=False,
            args=_upgraded(args),
            run=run,
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Lightning's parsing, without its warning against ``args`` beside a command line: here the
        ``args`` are that command line upgraded, or a pipeline step's (``mambaxray-ctl pipeline``)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Keep the config's model arguments; ``--ckpt_path`` only restores weights and state."""

    def before_fit(self) -> None:
        if self.config.fit.get("ckpt_path") and isinstance(self.model, BackboneStage):
            self.model.skip_handoff()


def _upgraded(args: Sequence[str] | None) -> list[str] | None:
    """``args`` (``None``: the command line) with old names upgraded (:func:`upgrade_argv`); ``None``
    when the command line needs no change (LightningCLI then reads it itself)."""
    given = sys.argv[1:] if args is None else list(args)
    upgraded = upgrade_argv(given)
    return None if args is None and upgraded == given else upgraded


def run_lightning_cli(args: Sequence[str] | None) -> int:
    """Run one Lightning subcommand (``None``: from ``sys.argv``); returns the exit status."""
    MambaXrayCLI(args=args)
    return 0
