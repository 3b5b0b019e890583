"""The training stages as LightningModules, sharing one backbone class.

Stage 1: :class:`ARMModule` (and the Table II alternatives :class:`MAEModule`, :class:`SimCLRModule`);
stage 2: :class:`ContrastiveModule`; stage 3: :class:`ReportGenModule`.
"""

from mambaxray_ctl.stages.arm import ARMModule
from mambaxray_ctl.stages.base import BackboneStage
from mambaxray_ctl.stages.contrastive import ContrastiveModule
from mambaxray_ctl.stages.mae import MAEModule
from mambaxray_ctl.stages.reportgen import ReportGenModule
from mambaxray_ctl.stages.simclr import SimCLRModule

__all__ = ["ARMModule", "BackboneStage", "ContrastiveModule", "MAEModule", "ReportGenModule", "SimCLRModule"]
