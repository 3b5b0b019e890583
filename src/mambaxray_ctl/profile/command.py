"""The ``mambaxray-ctl profile`` command: options, their defaults, the profiled run and its output."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from mambaxray_ctl.callbacks.tensorboard import parameter_counts
from mambaxray_ctl.hardware import cpu_flags, machine
from mambaxray_ctl.ops import SCAN_IMPLS
from mambaxray_ctl.profile.measure import StepProfiler, describe_cpu, native_bf16_flags, uses_bf16
from mambaxray_ctl.profile.models import DATASET_LLM, LLM_CONFIGS, TEXT_ENCODER_CONFIGS, write_text_models
from mambaxray_ctl.profile.report import DATASETS, format_table, headline, project
from mambaxray_ctl.profile.stage import (
    REPORT_STAGES,
    STAGE_ALIASES,
    STAGES,
    Repeat,
    build_device,
    build_stage,
    config_files,
    module_overrides,
    per_device_batch,
    stage_config,
    synthetic_batch,
)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stage",
        default="stage3_reportgen",
        choices=[*STAGES, *STAGE_ALIASES],
        help="stage config name, or 1/2/3 (default: %(default)s)",
    )
    parser.add_argument("--dataset", default="iu_xray", choices=sorted(DATASETS), help="its stage settings")
    parser.add_argument("--backbone", help="backbone preset (default: the stage config's)")
    parser.add_argument("--llm", choices=sorted(LLM_CONFIGS), help="LM size (default: the dataset's LM)")
    parser.add_argument("--text-encoder", default="bio-clinicalbert", choices=sorted(TEXT_ENCODER_CONFIGS))
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu"])
    parser.add_argument("--devices", type=int, default=1, help="devices, one node (default: %(default)s)")
    parser.add_argument(
        "--strategy", default="auto", help="Lightning strategy, e.g. ddp (default: %(default)s)"
    )
    parser.add_argument("--precision", help="Trainer precision (default: bf16-mixed on a GPU, else 32-true)")
    parser.add_argument(
        "--llm-dtype",
        choices=["float32", "bfloat16", "float16"],
        help="frozen LM weights (default: bfloat16 on a GPU, else float32)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help="batch per device (default: the config's data.batch_size, which is global, / --devices)",
    )
    parser.add_argument(
        "--views", type=int, default=2, help="views per study, stages 2-3 (default: %(default)s)"
    )
    parser.add_argument("--steps", type=int, default=3, help="training steps, the first one is warm-up")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="stage 3: recompute backbone and LM layers"
    )
    parser.add_argument("--no-generate", action="store_true", help="stage 3: skip the generation")
    parser.add_argument(
        "--ssm-impl",
        choices=SCAN_IMPLS,
        help="selective scan (default: cuda on a GPU, as configs/trainer/gpu.yaml; else the preset's)",
    )
    parser.add_argument("--configs", default="configs", help="the configs folder (default: %(default)s)")
    parser.add_argument("--json", metavar="OUT", help="also write the result as JSON to OUT")


def resolve(args: argparse.Namespace) -> str | None:
    """Fill in the defaults that depend on the accelerator and the configs; an error message, or None.

    ``args.config`` becomes the stage's parsed config (:func:`~.stage.stage_config`),
    ``args.batch_size`` the per-device batch (by default the config's global batch divided by
    the world size) and ``args.global_batch_size`` the batch of one step over all devices.
    """
    args.stage = STAGE_ALIASES.get(args.stage, args.stage)
    if args.accelerator == "auto":
        args.accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    on_gpu = args.accelerator == "gpu"
    if on_gpu and not torch.cuda.is_available():
        return "--accelerator gpu, but torch sees no CUDA device"
    args.precision = args.precision or ("bf16-mixed" if on_gpu else "32-true")
    args.llm_dtype = args.llm_dtype or ("bfloat16" if on_gpu else "float32")
    args.ssm_impl = args.ssm_impl or ("cuda" if on_gpu else None)
    args.llm = args.llm or DATASET_LLM[args.dataset]
    if args.gradient_checkpointing and args.stage != "stage3_reportgen":
        return "--gradient-checkpointing is a stage-3 setting"
    if args.steps < 2 or (args.batch_size is not None and args.batch_size < 1) or args.views < 1:
        return "need --steps >= 2 (the first step is warm-up), --batch-size >= 1 and --views >= 1"
    if args.devices < 1:
        return "need --devices >= 1 (a count: the default batch is the config's global batch / devices)"
    missing = [
        path for path in config_files(Path(args.configs), args.stage, args.dataset) if not path.is_file()
    ]
    if missing:
        return f"no {missing[0]}: run from the repository root or pass --configs"
    args.config = stage_config(Path(args.configs), args.stage, args.dataset)
    world_size = args.devices  # one node
    if args.batch_size is None:
        try:
            args.batch_size = per_device_batch(args.config, world_size)
        except ValueError as error:
            return str(error)
    args.global_batch_size = args.batch_size * world_size
    return None


def profile(args: argparse.Namespace) -> dict[str, Any]:
    """Build the stage, train ``args.steps`` steps, and return the measurements (see the package doc).

    ``args`` must have gone through :func:`resolve`."""
    class_path, model_args = args.config.model.class_path, args.config.model.init_args.as_dict()
    with tempfile.TemporaryDirectory(prefix="mambaxray-profile-") as folder:
        text_models = write_text_models(Path(folder), args.stage, args.llm, args.text_encoder)
        with build_device(args.accelerator):
            module = build_stage(class_path, model_args, text_models, module_overrides(args, args.stage))
    counts = {name.split("/")[1]: count for name, count in parameter_counts(module).items()}
    batch = synthetic_batch(module, args.stage, args.batch_size, args.views)
    profiler = StepProfiler(generate=args.stage == "stage3_reportgen" and not args.no_generate)
    trainer = Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        precision=args.precision,
        max_steps=args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[profiler],
    )
    trainer.fit(module, DataLoader(Repeat(batch, args.steps), batch_size=None))
    seconds = sum(profiler.step_seconds[1:]) / len(profiler.step_seconds[1:])
    configs = Path(args.configs)
    epochs = {key: int(stage_config(configs, args.stage, key).trainer.max_epochs) for key in DATASETS}
    device = trainer.strategy.root_device
    return {
        "stage": args.stage,
        "dataset": args.dataset,
        "backbone": module.backbone_spec.preset,
        "ssm_impl": module.backbone.config.ssm_impl,
        "llm": args.llm if args.stage == "stage3_reportgen" else None,
        "text_encoder": args.text_encoder if args.stage == "stage2_contrastive" else None,
        "accelerator": args.accelerator,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "machine": machine(),
        "devices": trainer.world_size,
        "strategy": args.strategy,
        "precision": args.precision,
        "llm_dtype": args.llm_dtype,
        "batch_size": args.batch_size,
        "global_batch_size": args.global_batch_size,
        "views": args.views if args.stage in REPORT_STAGES else 1,
        "steps": args.steps,
        "gradient_checkpointing": args.gradient_checkpointing,
        "cpu_native_bf16": native_bf16_flags(cpu_flags()),
        "params": counts,
        "step_seconds": profiler.step_seconds,
        "seconds_per_step": seconds,
        "peak_memory_bytes": profiler.peak_memory,
        "tokens_per_step": profiler.tokens,
        "tokens_per_second": sum(profiler.tokens.values()) / seconds,
        "generation": profiler.generation,
        "projection": project(seconds, args.global_batch_size, args.stage, epochs),
        "rank_zero": trainer.is_global_zero,
    }


def run(args: argparse.Namespace) -> int:
    error = resolve(args)
    if error:
        print(f"mambaxray-ctl profile: error: {error}", file=sys.stderr)
        return 2
    flags = cpu_flags()
    print(describe_cpu(flags))
    if (
        args.accelerator == "cpu"
        and uses_bf16(args.precision, args.llm_dtype)
        and not native_bf16_flags(flags)
    ):
        print(
            "warning: bfloat16 on a CPU without AVX512-BF16 or AMX is emulated and many times slower "
            "than float32 (a 1.8B-LM step can take over 20 minutes)",
            file=sys.stderr,
        )
    result = profile(args)
    if not result.pop("rank_zero"):
        return 0
    print(headline(result))
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0
