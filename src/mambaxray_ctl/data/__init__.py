"""Data: R2Gen-format annotations, report cleaning, image loading, DataModules, dataset preparation
(the synthetic world's DataModule lives in :mod:`mambaxray_ctl.demo`).

The DataModules are imported lazily (``from mambaxray_ctl.data import IUXrayDataModule`` works),
so that the tool commands (``prepare``) start without importing Lightning.
"""

from __future__ import annotations

from typing import Any

_DATAMODULES = (
    "ReportDataModule",
    "IUXrayDataModule",
    "CheXpertPlusDataModule",
    "MIMICCXRDataModule",
)
__all__ = list(_DATAMODULES)


def __getattr__(name: str) -> Any:
    if name in _DATAMODULES:
        from mambaxray_ctl.data import datamodules

        return getattr(datamodules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
