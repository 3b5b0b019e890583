"""The ``mambaxray-ctl`` command.

Tool commands (checkpoint conversion, dataset preparation, demo data) are small argparse programs,
each living in the module that owns the feature and exposing ``configure_parser(parser)`` and
``run(args) -> int``. They are imported only when chosen, so ``mambaxray-ctl --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# command name -> (module, one-line help)
TOOL_COMMANDS: dict[str, tuple[str, str]] = {
    "convert-checkpoint": (
        "mambaxray_ctl.backbone.convert_command",
        "convert an official MambaXray-VL/CTL, ARM-pretrain or Vim checkpoint to a backbone safetensors file",
    ),
    "prepare": (
        "mambaxray_ctl.data.prepare",
        "prepare datasets: build a CheXpert Plus annotation, or resize images once into a cache",
    ),
    "make-demo-data": (
        "mambaxray_ctl.data.demo_world",
        "generate the synthetic chest X-ray world used by the demo and the tests",
    ),
}


def _usage() -> str:
    lines = ["usage: mambaxray-ctl COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<20} {help_}" for name, (_, help_) in TOOL_COMMANDS.items()]
    lines += ["", "Run 'mambaxray-ctl COMMAND --help' for the options of one command."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a tool command; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in TOOL_COMMANDS:
        print(f"mambaxray-ctl: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(TOOL_COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"mambaxray-ctl {name}", description=TOOL_COMMANDS[name][1])
    module.configure_parser(parser)
    return int(module.run(parser.parse_args(rest)) or 0)
