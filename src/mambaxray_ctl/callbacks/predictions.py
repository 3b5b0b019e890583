"""``predict`` → one ``predictions.jsonl`` merged across ranks and de-duplicated by study id."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from mambaxray_ctl.distributed import all_gather_objects

log = logging.getLogger(__name__)

# The file a predict run writes in its run directory (the pipeline looks for it there).
PREDICTIONS_NAME = "predictions.jsonl"


class PredictionWriter(BasePredictionWriter):
    """Writes ``{id, generated, reference, dataset, checkpoint, decoding, reference_source}`` per study,
    one JSON per line.

    Ids travel inside the batches (``predict_step`` returns them), so DistributedSampler's padding
    duplicates are removed by id, keeping the first. ``output`` defaults to
    ``<run dir>/predictions.jsonl``.
    """

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output = output
        self.written: Path | None = None

    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        rows = [row for batch in _flatten(predictions) for row in batch]
        rows = [row for part in all_gather_objects(rows) for row in part]
        path = self._output_path(trainer)  # on every rank: trainer.log_dir is a collective
        if trainer.is_global_zero:
            self.written = self._write(trainer, pl_module, rows, path)

    def _output_path(self, trainer: Trainer) -> Path:
        path = Path(self.output) if self.output else Path(trainer.log_dir or trainer.default_root_dir)
        return path / PREDICTIONS_NAME if path.suffix != ".jsonl" else path

    def _write(self, trainer: Trainer, pl_module: LightningModule, rows: list[dict], path: Path) -> Path:
        unique: dict[str, dict] = {}
        for row in rows:
            unique.setdefault(row["id"], row)
        datamodule = trainer.datamodule
        decoding = getattr(pl_module, "decoding", None)
        evaluation = getattr(pl_module, "evaluation", None)
        common = {
            "dataset": getattr(datamodule, "dataset_name", type(datamodule).__name__),
            "checkpoint": str(trainer.ckpt_path or ""),
            "decoding": asdict(decoding) if is_dataclass(decoding) else {},
            "reference_source": getattr(evaluation, "reference_source", "cleaned"),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for row in unique.values():
                f.write(json.dumps({**row, **common}) + "\n")
        log.info(
            "wrote %d predictions to %s (%d duplicate(s) from sampler padding removed)",
            len(unique),
            path,
            len(rows) - len(unique),
        )
        return path


def _flatten(predictions: Any) -> list:
    """Lightning gives a list per dataloader when there are several; we use one."""
    if (
        predictions
        and isinstance(predictions[0], list)
        and predictions[0]
        and isinstance(predictions[0][0], list)
    ):
        return [batch for loader in predictions for batch in loader]
    return list(predictions)
