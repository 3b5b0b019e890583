"""Typed settings every stage shares: which backbone, where its first weights come from (the hand-off),
and how it is optimised. The CLI and YAML fill them as groups (``model.init_args.optimizer.lr``);
``--print_config`` shows them as such.

Checkpoints store them as plain dicts (loadable with ``weights_only=True``); :func:`as_spec` turns
either form into the spec.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from typing import Any, Literal, TypeVar

from torch import nn
from torch.optim import AdamW

from mambaxray_ctl.backbone import VisionMamba, create_backbone
from mambaxray_ctl.backbone.checkpoints import CheckpointFormat
from mambaxray_ctl.ops import ScanImpl
from mambaxray_ctl.stages.optim import decay_groups, warmup_cosine

Spec = TypeVar("Spec")


def as_spec(cls: type[Spec], value: Spec | Mapping[str, Any], default: Spec | None = None) -> Spec:
    """``value`` as a ``cls`` instance: itself, or ``default`` (else ``cls()``) with the fields of a
    mapping replaced (checkpoints store specs as dicts; a partial dict keeps the other defaults).

    :raises TypeError: naming the unknown fields of a mapping.
    """
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a {cls.__name__} or a mapping of its fields, got {type(value).__name__}")
    unknown = set(value) - {field.name for field in fields(cls)}
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    return replace(default if default is not None else cls(), **value)


def plain(value: Any) -> Any:
    """A spec as a dict of plain values (tuples as lists, as YAML and the CLI write them)."""
    if is_dataclass(value) and not isinstance(value, type):
        return {key: list(item) if isinstance(item, tuple) else item for key, item in asdict(value).items()}
    return value


@dataclass(frozen=True)
class BackboneSpec:
    """The vision backbone.

    Args:
        preset: a preset name of :mod:`mambaxray_ctl.backbone.presets`.
        overrides: ``VisionMambaConfig`` fields replacing the preset's (a dict replaces, not merges,
            the one of an earlier config file).
        ssm_impl: the selective-scan implementation (``cuda`` in the GPU trainer configs); ``None``
            keeps the preset's.
    """

    preset: str = "arm_large_pz16"
    overrides: dict[str, Any] | None = None
    ssm_impl: ScanImpl | None = None

    def build(self, **forced: Any) -> VisionMamba:
        """The preset with ``overrides``, ``ssm_impl`` and then ``forced`` applied."""
        overrides = dict(self.overrides or {})
        if self.ssm_impl is not None:
            overrides["ssm_impl"] = self.ssm_impl
        return create_backbone(self.preset, **{**overrides, **forced})


@dataclass(frozen=True)
class HandOff:
    """Where the backbone's first weights come from, loaded in ``setup("fit")`` only (never when a run
    resumes from its own ``--ckpt_path``, nor for validate/test/predict).

    Args:
        source: a previous stage's ``backbone.safetensors``, a Lightning ``.ckpt`` or an official
            checkpoint; ``None`` starts from the initialisation.
        format: the source's key layout; ``auto`` detects it.
        prefix: the key prefix of the backbone in ``source`` (``backbone.`` is assumed for ``.ckpt``).
    """

    source: str | None = None
    format: CheckpointFormat | Literal["auto"] = "auto"
    prefix: str | None = None


@dataclass(frozen=True)
class OptimizerSpec:
    """AdamW with a per-step linear warm-up then cosine decay.

    Args:
        lr: peak learning rate (absolute, for the global batch).
        weight_decay: on matrices; 1-D tensors, ``*_log`` and the stage's ``no_weight_decay`` get none.
        betas: AdamW's betas.
        warmup_steps: linear warm-up steps; below 1, a fraction of the run's steps.
        min_lr_ratio: the cosine's floor, as a fraction of ``lr``.
    """

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: float = 0.0
    min_lr_ratio: float = 0.01

    def configure(
        self, named_parameters: Iterable[tuple[str, nn.Parameter]], no_decay: Iterable[str], total_steps: int
    ) -> dict[str, Any]:
        """Lightning's ``configure_optimizers`` answer for the trainable parameters."""
        groups = decay_groups(named_parameters, self.weight_decay, no_decay)
        optimizer = AdamW(groups, lr=self.lr, betas=tuple(self.betas))
        scheduler = warmup_cosine(optimizer, max(1, total_steps), self.warmup_steps, self.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
