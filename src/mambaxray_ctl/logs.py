"""The package's log lines on the terminal: one handler on the ``mambaxray_ctl`` logger.

The modules of the package log through ``logging.getLogger(__name__)`` (``mambaxray_ctl.*``): where a
stage was initialised from (path, format, tensor count, sha256), where the backbone was exported, the
split sizes, how many predictions were written. Without a handler Python drops these INFO lines, so
the ``mambaxray-ctl`` command calls :func:`configure_logging` once, first thing. A program that
calls :func:`mambaxray_ctl.cli.main` with its own argument list keeps its own logging set-up.

- One ``StreamHandler`` on stderr, attached to the ``mambaxray_ctl`` logger only: the root logger
  and Lightning's loggers (``lightning.pytorch``, which has its own handler) are left alone. The
  package logger does not propagate, so a handler on the root logger does not print the lines twice;
  calling :func:`configure_logging` again replaces the handler rather than adding a second one.
- Format: ``[mambaxray_ctl] INFO message`` on rank 0 (or in a single process);
  ``[mambaxray_ctl rank 1] WARNING message`` on the other ranks.
- Rank zero only: the other ranks print WARNING and above. The rank is decided per line: Lightning's
  own ``rank_zero_only.rank`` once Lightning is loaded (its strategies set it to the global rank, in
  processes they start themselves too), together with the rank the launcher put in the environment
  before Lightning started (:func:`rank_from_env`): a line is a rank-0 line only when both say 0.
- Level: ``configure_logging(level)``, else the environment variable ``MAMBAXRAY_LOG_LEVEL`` (a level
  name such as ``DEBUG``, ``INFO``, ``WARNING``, ``ERROR``, or a number), default ``INFO``. For
  example ``MAMBAXRAY_LOG_LEVEL=WARNING mambaxray-ctl fit ...`` keeps only the warnings;
  ``MAMBAXRAY_LOG_LEVEL=DEBUG`` adds the debug lines (e.g. the ignored keys of a hand-off).

This module imports nothing from the package (nor Lightning), so that the command stays quick to start.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

LOGGER_NAME = "mambaxray_ctl"
LEVEL_ENV = "MAMBAXRAY_LOG_LEVEL"
DEFAULT_LEVEL = logging.INFO
_LIGHTNING_RANK_MODULE = "lightning.fabric.utilities.rank_zero"
_NODE_KEYS = ("NODE_RANK", "GROUP_RANK", "SLURM_NODEID")


class _Handler(logging.StreamHandler):
    """The package's handler (its own class, so that a second configuration finds and replaces it)."""


def rank_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The global rank a launcher gave this process, as text; ``None`` when no launcher set one.

    Read in Lightning's order (``lightning.fabric.utilities.rank_zero._get_rank``): ``RANK``
    (torchrun), then ``LOCAL_RANK`` (set by Lightning's DDP launcher in the processes it starts, and by
    torchrun; checked before ``SLURM_PROCID``, which SLURM sets to 0 in every process that Lightning
    starts itself), then ``SLURM_PROCID`` (srun starting the processes), then ``JSM_NAMESPACE_RANK``
    (LSF). Unlike Lightning's function, a ``LOCAL_RANK`` is combined with the node's rank
    (``NODE_RANK``, ``GROUP_RANK`` or ``SLURM_NODEID``): local rank 0 of the second node is not global
    rank 0. Where the number of processes per node is unknown (no ``LOCAL_WORLD_SIZE``) the answer
    reads ``"node N local L"``. A node's rank alone (the first process of a later node, before
    Lightning's launcher sets ``LOCAL_RANK``) reads ``"node N"``. Rank zero is ``None`` or ``"0"``.
    Values that are not integers are ignored.
    """
    env = os.environ if environ is None else environ

    def read(key: str) -> int | None:
        try:
            return int(env.get(key, ""))
        except ValueError:
            return None

    rank = read("RANK")
    if rank is not None:
        return str(rank)
    node = next((value for value in map(read, _NODE_KEYS) if value is not None), None)
    local = read("LOCAL_RANK")
    if local is not None:
        if not node:
            return str(local)
        per_node = read("LOCAL_WORLD_SIZE")
        return str(node * per_node + local) if per_node else f"node {node} local {local}"
    for key in ("SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if read(key) is not None:
            return str(read(key))
    if node is not None:
        return f"node {node}" if node else "0"
    return None


def current_rank() -> str | None:
    """This process's rank now: Lightning's ``rank_zero_only.rank`` where it says non-zero (Lightning
    loaded, its strategy set up), else the launcher's (:func:`rank_from_env`)."""
    module = sys.modules.get(_LIGHTNING_RANK_MODULE)  # never imported from here: only read if loaded
    lightning_rank = getattr(getattr(module, "rank_zero_only", None), "rank", 0) if module else 0
    if isinstance(lightning_rank, int) and lightning_rank:
        return str(lightning_rank)
    return rank_from_env()


def is_rank_zero(rank: str | None) -> bool:
    return rank in (None, "0")


class _RankFilter(logging.Filter):
    """Lets through every line on rank 0, only WARNING and above elsewhere; names the rank there."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = current_rank()
        record.rank_prefix = "" if is_rank_zero(rank) else f" rank {rank}"
        return is_rank_zero(rank) or record.levelno >= logging.WARNING


def resolve_level(level: int | str | None = None, environ: Mapping[str, str] | None = None) -> int:
    """``level``, else ``$MAMBAXRAY_LOG_LEVEL``, else INFO; a name (any case) or a number."""
    env = os.environ if environ is None else environ
    value = level if level is not None else (env.get(LEVEL_ENV, "").strip() or DEFAULT_LEVEL)
    if isinstance(value, int):
        return value
    if value.lstrip("-").isdigit():
        return int(value)
    resolved = logging.getLevelName(value.upper())
    if not isinstance(resolved, int):
        source = "level" if level is not None else LEVEL_ENV
        raise ValueError(
            f"{source}={value!r} is not a logging level (DEBUG, INFO, WARNING, ERROR, CRITICAL or a number)"
        )
    return resolved


def configure_logging(level: int | str | None = None, stream: TextIO | None = None) -> logging.Logger:
    """Attach the package's handler to the ``mambaxray_ctl`` logger (see the module docstring).

    Idempotent: a second call replaces the handler of the first (with the new level and stream). A bad
    ``level`` raises ``ValueError``; a bad ``$MAMBAXRAY_LOG_LEVEL`` is reported as a warning and INFO
    used. Returns the ``mambaxray_ctl`` logger.
    """
    try:
        resolved, problem = resolve_level(level), None
    except ValueError as error:
        if level is not None:
            raise
        resolved, problem = DEFAULT_LEVEL, f"{error}; logging at INFO"  # a typo must not stop a run
    logger = logging.getLogger(LOGGER_NAME)
    for old in [h for h in logger.handlers if isinstance(h, _Handler)]:
        logger.removeHandler(old)
        old.close()
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter("[mambaxray_ctl%(rank_prefix)s] %(levelname)s %(message)s"))
    handler.addFilter(_RankFilter())
    logger.addHandler(handler)
    logger.setLevel(resolved)
    logger.propagate = False
    if problem:
        logger.warning(problem)
    return logger
