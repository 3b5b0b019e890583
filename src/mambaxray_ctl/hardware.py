"""The machine a measurement ran on: CPU model, feature flags, the vector ISA torch uses, threads.

Benchmarks, ``make profile`` and the demo record :func:`machine` beside their timings, so that figures
from different machines are never compared blindly.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo(cpuinfo: str | Path) -> str:
    try:
        return Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def cpu_flags(cpuinfo: str | Path = CPUINFO) -> set[str]:
    """The CPU's feature flags (empty where ``/proc/cpuinfo`` cannot be read)."""
    return {
        flag
        for line in _cpuinfo(cpuinfo).splitlines()
        if line.startswith("flags")
        for flag in line.split(":", 1)[1].split()
    }


def cpu_model(cpuinfo: str | Path = CPUINFO) -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere what ``platform`` knows)."""
    for line in _cpuinfo(cpuinfo).splitlines():
        if line.startswith("model name"):
            return " ".join(line.split(":", 1)[1].split())
    return platform.processor() or platform.machine() or "unknown"


def machine() -> dict[str, Any]:
    """CPU model, the vector ISA torch dispatches to (``ATEN_CPU_CAPABILITY`` can lower it), logical
    CPUs, torch's intra-op threads and torch's version."""
    return {
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def describe_machine(info: dict[str, Any] | None = None) -> str:
    """One line for a table's caption: ``<CPU model>, <ISA>, <threads> threads, torch <version>``."""
    info = machine() if info is None else info
    return f"{info['cpu_model']}, {info['cpu_capability']}, {info['threads']} threads, torch {info['torch']}"
