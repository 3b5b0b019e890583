"""Projected epoch and run times from a measured step, and the printed result (headline and table)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mambaxray_ctl.profile.stage import REPORT_STAGES


@dataclass(frozen=True)
class DatasetSize:
    """A training split: studies, and images per study (stage 1 trains on images)."""

    name: str
    train_studies: int
    views: int


DATASETS = {
    "iu_xray": DatasetSize("IU X-ray", 2069, 2),  # R2Gen split, two views per study
    # CXPMRG-Bench split (training reports); counted as one image per report for stage 1
    "chexpert_plus": DatasetSize("CheXpert Plus", 40463, 1),
}


def project(
    seconds_per_step: float, global_batch: int, stage: str, epochs: dict[str, int]
) -> list[dict[str, Any]]:
    """Epoch and run time of each dataset at the measured step time and the GLOBAL batch (all devices)."""
    rows = []
    for key, dataset in DATASETS.items():
        samples = dataset.train_studies * (1 if stage in REPORT_STAGES else dataset.views)
        steps = math.ceil(samples / global_batch)
        rows.append(
            {
                "dataset": key,
                "train_samples": samples,
                "epochs": epochs[key],
                "steps_per_epoch": steps,
                "epoch_seconds": steps * seconds_per_step,
                "run_seconds": steps * seconds_per_step * epochs[key],
            }
        )
    return rows


def duration(seconds: float) -> str:
    """``12.3 s``, ``4.5 min``, ``6.7 h`` or ``8.9 d``."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def gigabytes(count: int) -> str:
    return f"{count / 1e9:.2f} GB"


def format_table(result: dict[str, Any]) -> str:
    """The result as a markdown table (measured rows, then the projections)."""
    params, tokens = result["params"], result["tokens_per_step"]
    where = "GPU, torch.cuda.max_memory_allocated" if result["accelerator"] == "gpu" else "CPU, peak RSS"
    rows = [
        ("parameters: total / trainable / frozen", " / ".join(f"{params[k]:,}" for k in params)),
        (f"seconds per step (mean of steps 2-{result['steps']})", f"{result['seconds_per_step']:.2f}"),
        (f"peak memory of the training steps ({where})", gigabytes(result["peak_memory_bytes"])),
        ("image tokens / text tokens per step", f"{tokens['image']:,} / {tokens['text']:,}"),
        ("tokens per second (image + text)", f"{result['tokens_per_second']:,.0f}"),
    ]
    generation = result.get("generation")
    if generation:
        rows.append(
            (
                f"generation of one batch ({generation['num_beams']} beams): seconds, new tokens",
                f"{generation['seconds']:.1f} s, {generation['new_tokens']:,}",
            )
        )
        if generation["peak_memory_bytes"] is not None:  # a CPU's peak RSS cannot be reset
            rows.append(("peak memory of the generation", gigabytes(generation["peak_memory_bytes"])))
    for row in result["projection"]:
        name = DATASETS[row["dataset"]].name
        rows.append(
            (
                f"projected: {name}, {row['train_samples']:,} samples × {row['epochs']} epochs "
                f"({row['steps_per_epoch']:,} steps/epoch at global batch {result['global_batch_size']:,})",
                f"{duration(row['epoch_seconds'])} per epoch, {duration(row['run_seconds'])} in all",
            )
        )
    lines = ["| quantity | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def headline(result: dict[str, Any]) -> str:
    parts = [
        result["stage"],
        f"backbone {result['backbone']}",
        f"LM {result['llm']} ({result['llm_dtype']})" if result["llm"] else "",
        f"text encoder {result['text_encoder']}" if result["text_encoder"] else "",
        f"{result['device_name']} × {result['devices']}",
        result["precision"],
        f"batch {result['batch_size']} per device ({result['global_batch_size']} global)",
        f"gradient checkpointing {'on' if result['gradient_checkpointing'] else 'off'}",
    ]
    return "profile: " + ", ".join(part for part in parts if part) + " (random weights)"
