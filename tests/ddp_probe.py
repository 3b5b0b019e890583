"""A callback the multi-process tests add to real CLI runs (``--trainer.callbacks+=ddp_probe.Probe``):
it records, per rank, what must be checked across processes. Importable from the spawned ranks
because the tests put this folder on ``PYTHONPATH``."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class Probe(Callback):
    """Writes ``<out_dir>/rank<r>.pt`` with the weights each rank built before DDP's broadcast
    (``setup``), each rank's seed after the stage reseeded it (``on_fit_start``) and the averaged
    gradients of the first optimiser step."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.record: dict[str, object] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self.record["initial_weights"] = _trainable(pl_module, lambda p: p.detach().clone())

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record["seed"] = torch.initial_seed()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if trainer.global_step == 0:
            self.record["gradients"] = _trainable(pl_module, lambda p: p.grad.detach().clone())
            self.out_dir.mkdir(parents=True, exist_ok=True)
            torch.save(self.record, self.out_dir / f"rank{trainer.global_rank}.pt")


def _trainable(module: torch.nn.Module, value) -> dict[str, torch.Tensor]:
    return {name: value(p) for name, p in module.named_parameters() if p.requires_grad}
