"""What a study of the synthetic world shows: the label set and the sampling of findings.

The label vector of a study is :meth:`Findings.labels`, in :data:`LABEL_NAMES` order. The report text
is written in :mod:`~mambaxray_ctl.demo.language`, the pixels drawn in :mod:`~mambaxray_ctl.demo.render`
and both are put together per study in :mod:`~mambaxray_ctl.demo.world`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LOBES = ("right upper", "right middle", "right lower", "left upper", "left lower")
LABEL_NAMES = (
    "cardiomegaly",
    "pleural_effusion_left",
    "pleural_effusion_right",
    *(f"consolidation_{lobe.replace(' ', '_')}_lobe" for lobe in LOBES),
    "pneumothorax_left",
    "pneumothorax_right",
    "lung_nodule",
    "support_device",
)
DEVICES = ("endotracheal tube", "right internal jugular catheter", "left picc", "nasogastric tube")
SIDES = ("left", "right")
SIZES = ("small", "moderate", "large")


@dataclass(frozen=True)
class Findings:
    """What a study shows; effusion/pneumothorax map a side to its size word."""

    cardiomegaly: bool = False
    effusion: dict[str, str] = field(default_factory=dict)
    consolidation: tuple[str, ...] = ()
    pneumothorax: dict[str, str] = field(default_factory=dict)
    nodule: tuple[str, str, int] | None = None  # side, zone, size in mm
    device: str | None = None

    def labels(self) -> list[int]:
        """The label vector in :data:`LABEL_NAMES` order."""
        present = {"cardiomegaly"} if self.cardiomegaly else set()
        present |= {f"pleural_effusion_{side}" for side in self.effusion}
        present |= {f"consolidation_{lobe.replace(' ', '_')}_lobe" for lobe in self.consolidation}
        present |= {f"pneumothorax_{side}" for side in self.pneumothorax}
        if self.nodule:
            present.add("lung_nodule")
        if self.device:
            present.add("support_device")
        return [int(name in present) for name in LABEL_NAMES]


def sample_findings(rng: np.random.Generator) -> Findings:
    """Independent findings (about 37% of studies are normal). Prevalences are rough, with every
    label frequent enough to have about 70 or more positive training studies and 20 or more in the
    test split of the default world (per-finding F1 over a handful of cases is noise).
    """
    effusion = {side: str(rng.choice(SIZES)) for side in SIDES if rng.random() < 0.08}
    pneumothorax = {
        side: str(rng.choice(SIZES)) for side in SIDES if side not in effusion and rng.random() < 0.07
    }
    consolidation = tuple(lobe for lobe in LOBES if rng.random() < 0.045)
    nodule = None
    if rng.random() < 0.12:
        zone = str(rng.choice(("upper", "mid", "lower")))
        nodule = (str(rng.choice(SIDES)), zone, int(rng.integers(10, 31)))
    return Findings(
        cardiomegaly=bool(rng.random() < 0.14),
        effusion=effusion,
        consolidation=consolidation,
        pneumothorax=pneumothorax,
        nodule=nodule,
        device=str(rng.choice(DEVICES)) if rng.random() < 0.15 else None,
    )
