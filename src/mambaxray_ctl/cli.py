"""The ``mambaxray-ctl`` command.

``fit``, ``validate``, ``test`` and ``predict`` run the LightningCLI of
:mod:`mambaxray_ctl.lightning_cli` (``mambaxray-ctl fit -c configs/... --help``). Tool commands
(checkpoint conversion, dataset preparation, demo data, evaluation) are small argparse programs,
each living in the module that owns the feature and exposing ``configure_parser(parser)`` and
``run(args) -> int``. They are imported only when chosen, so ``mambaxray-ctl --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from mambaxray_ctl.logs import configure_logging

# command name -> (module, one-line help)
TOOL_COMMANDS: dict[str, tuple[str, str]] = {
    "pipeline": (
        "mambaxray_ctl.pipeline",
        "run a step of the training pipeline (stage1|stage2|stage3|predict|evaluate|paper), as `make` does",
    ),
    "convert-checkpoint": (
        "mambaxray_ctl.backbone.convert_command",
        "convert an official MambaXray-VL/CTL, ARM-pretrain or Vim checkpoint to a backbone safetensors file",
    ),
    "prepare": (
        "mambaxray_ctl.data.prepare",
        "prepare datasets: build a CheXpert Plus annotation, or resize images once into a cache",
    ),
    "evaluate": (
        "mambaxray_ctl.evaluation.evaluate",
        "score a predictions.jsonl with the paper's protocol and print the table; writes metrics.json",
    ),
    "build-demo-text-models": (
        "mambaxray_ctl.demo.text_models",
        "train the demo's small tokenizer and causal LM (Qwen's stand-in) and build its small text encoder",
    ),
    "generate": (
        "mambaxray_ctl.evaluation.generate",
        "write the report of one study (one image file per view) with a stage-3 checkpoint",
    ),
    "ablation": (
        "mambaxray_ctl.demo.ablation",
        "run the rows of the paper's Table II on the demo world and print the table (`make ablation`)",
    ),
    "demo": (
        "mambaxray_ctl.demo.run",
        "run the whole pipeline on the synthetic world on a CPU and print the metrics table (`make demo`)",
    ),
    "make-demo-data": (
        "mambaxray_ctl.demo.world",
        "generate the synthetic chest X-ray world used by the demo and the tests",
    ),
    "profile": (
        "mambaxray_ctl.profile.command",
        "time a few training steps of a stage at the paper's sizes, random weights: memory, speed, run time",
    ),
}


LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "train a stage (-c configs/data/<dataset>.yaml -c configs/stage<N>_*.yaml ...)",
    "validate": "run the validation loop of a stage (--ckpt_path ...)",
    "test": "score a stage on the test split (--ckpt_path ...)",
    "predict": "write predictions.jsonl for a split with a stage-3 checkpoint (--ckpt_path ...)",
}


def _usage() -> str:
    lines = ["usage: mambaxray-ctl COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<20} {help_}" for name, help_ in LIGHTNING_COMMANDS.items()]
    lines += [f"  {name:<20} {help_}" for name, (_, help_) in TOOL_COMMANDS.items()]
    lines += ["", "Run 'mambaxray-ctl COMMAND --help' for the options of one command."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a tool command; returns the process exit status."""
    from_command_line = argv is None
    if from_command_line:  # the command's log lines on stderr (a caller passing argv keeps its own logging)
        configure_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name in LIGHTNING_COMMANDS:
        from mambaxray_ctl.lightning_cli import run_lightning_cli

        return run_lightning_cli(None if from_command_line else argv)
    if name not in TOOL_COMMANDS:
        print(f"mambaxray-ctl: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(TOOL_COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"mambaxray-ctl {name}", description=TOOL_COMMANDS[name][1])
    module.configure_parser(parser)
    return int(module.run(parser.parse_args(rest)) or 0)
