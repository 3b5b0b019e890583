"""``python tests/ddp_paper.py WORLD OUT PRETRAIN``: the paper recipe (:func:`pipeline.run_paper`: stage 2,
stage 3, predict, evaluate in one process) on the tiny world with 2 CPU ranks of the DDP trainer preset.

Lightning's launcher starts rank 1 with this same command, so both ranks run every step, as a user's
``make paper`` does on GPUs. Each rank writes ``OUT/rank<r>.json`` with the runs it saw."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from mambaxray_ctl import pipeline as pl
from test_pipeline import _tiny_args

DDP_ON_CPU = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=2",
    "--trainer.precision=32-true",
    "--model.init_args.backbone.ssm_impl=null",
    "--data.init_args.micro_batch_size=2",
]
VALIDATED = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.check_val_every_n_epoch=1",
]


def main(world: Path, out: Path, pretraining: Path) -> None:
    paths = {"annotation": str(world / "annotation.json"), "image_root": str(world / "images")}
    overrides = ({"data": {"init_args": paths}},)
    pipeline = pl.Pipeline(data="demo", trainer="ddp", configs=Path("configs"), out=out, overrides=overrides)
    done = pl.run_paper(
        pipeline,
        pretraining,
        args={
            "stage2": _tiny_args(world, out, "stage2", *DDP_ON_CPU, "--trainer.max_steps=2"),
            "stage3": _tiny_args(world, out, "stage3", *DDP_ON_CPU, *VALIDATED),
            "predict": _tiny_args(world, out, "stage3", *DDP_ON_CPU),
        },
    )
    seen = {
        "stage2": str(done.stage2.run_dir),
        "stage2_export": str(done.stage2.export),
        "stage3": str(done.stage3.run_dir),
        "checkpoint": str(done.checkpoint.path),
        "predictions": str(done.predictions),
        "scored": done.metrics is not None,
    }
    (out / f"rank{os.environ.get('LOCAL_RANK', '0')}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(*(Path(arg) for arg in sys.argv[1:4]))
