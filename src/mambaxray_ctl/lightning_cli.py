"""``mambaxray-ctl fit|validate|test|predict``: the LightningCLI that runs every stage.

One entry point for the three stages (subclass mode: ``model.class_path`` picks ARMModule,
ContrastiveModule or ReportGenModule; ``data.class_path`` the dataset), the omegaconf parser mode
(``${...}`` interpolation inside one YAML file), several ``-c`` files merged in order, and
``--print_config``. Every run directory (the TensorBoard logger's ``log_dir``) receives
``config.yaml``; the config also goes to TensorBoard as text.

``--ckpt_path`` means "resume or evaluate this same stage": the hand-off ``init_from`` is then not
loaded, and the module's arguments come from the config files and the command line, not from the
checkpoint's stored hyper-parameters (so decoding settings can be changed at ``predict`` time; a
checkpoint that does not fit the configured module fails on load, naming the keys).
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger

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
            args=list(args) if args is not None else None,
            run=run,
        )

    def _parse_ckpt_path(self) -> None:
        """Keep the config's model arguments; ``--ckpt_path`` only restores weights and state."""

    def before_fit(self) -> None:
        if self.config.fit.get("ckpt_path") and isinstance(self.model, BackboneStage):
            self.model.skip_init_from()


def run_lightning_cli(args: Sequence[str] | None) -> int:
    """Run one Lightning subcommand (``None``: from ``sys.argv``); returns the exit status."""
    MambaXrayCLI(args=args)
    return 0
