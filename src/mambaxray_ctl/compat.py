"""Names that changed, so that what users wrote before still works (with a warning).

Class paths moved between packages, and the stages' flat arguments grouped into typed specs: runs,
checkpoints and command lines written before the change are read through :func:`upgrade_class_path`,
:func:`upgrade_model_args` and :func:`upgrade_argv`.
"""

from __future__ import annotations

import importlib
import warnings

MOVED_CLASS_PATHS = {
    "mambaxray_ctl.data.DemoDataModule": "mambaxray_ctl.demo.datamodule.DemoDataModule",
    "mambaxray_ctl.data.datamodules.DemoDataModule": "mambaxray_ctl.demo.datamodule.DemoDataModule",
}


def upgrade_class_path(path: str) -> str:
    """``path``, or where its class lives now (warns)."""
    new = MOVED_CLASS_PATHS.get(path)
    if new is None:
        return path
    warnings.warn(f"{path} moved to {new}", FutureWarning, stacklevel=2)
    return new


def import_class(path: str) -> type:
    """The class at ``package.module.Name`` (a moved path is followed)."""
    module_name, _, name = upgrade_class_path(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import class {path!r}: {exc}") from exc


__all__ = ["MOVED_CLASS_PATHS", "import_class", "upgrade_class_path"]
