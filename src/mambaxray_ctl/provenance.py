"""What made a file: the package version and, when the package runs from a git checkout, its commit.

Every stage checkpoint (``checkpoint["provenance"]``) and every export (the safetensors metadata of
``backbone.safetensors`` and ``model.safetensors``, and the backbone's JSON sidecar) records
:func:`provenance`:

- ``package_version``: ``mambaxray_ctl.__version__``;
- ``git_commit``: ``git rev-parse HEAD`` of the repository holding the package's source folder, with
  ``-dirty`` appended when tracked files differ from that commit (untracked files do not count, as
  with ``git describe --dirty``). It is absent when the package is not a tracked part of a git
  checkout (an installed wheel, even one inside another repository's folder), when git is missing,
  or when git fails: finding the commit never fails a run.

git runs once per process (:func:`package_commit` is cached; the stages call :func:`provenance` in
``setup``, so a run records the tree it started from, not the one at save time).

This module imports nothing from the package but its version, and neither torch nor Lightning.
"""

from __future__ import annotations

import functools
import logging
import subprocess
from pathlib import Path

from mambaxray_ctl import __version__

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
GIT_TIMEOUT_S = 10.0


def _git(folder: Path, *args: str) -> str | None:
    """The stripped output of ``git -C folder args``; ``None`` when git is missing, fails or hangs."""
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("git %s in %s: %s", " ".join(args), folder, exc)
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit(folder: Path | None = None) -> str | None:
    """The commit of the checkout whose tracked files include ``folder``'s ``__init__.py`` (default: the
    package's source folder), ``-dirty`` appended when tracked files have changed; ``None`` outside a
    checkout."""
    folder = PACKAGE_DIR if folder is None else folder
    if not _git(folder, "ls-files", "--", "__init__.py"):  # not a tracked source folder of a checkout
        return None
    commit = _git(folder, "rev-parse", "HEAD")
    if not commit:
        return None
    changes = _git(folder, "status", "--porcelain", "--untracked-files=no")
    return f"{commit}-dirty" if changes else commit


@functools.cache
def package_commit() -> str | None:
    """:func:`git_commit` of the package's source folder, found on the first call of this process."""
    return git_commit()


def provenance() -> dict[str, str]:
    """``{"package_version": ..., "git_commit": ...}`` (a new dict); ``git_commit`` only when
    :func:`package_commit` finds one. Plain strings, as safetensors metadata requires."""
    found = {"package_version": __version__}
    commit = package_commit()
    if commit is not None:
        found["git_commit"] = commit
    return found
