"""Configuration of the Vision Mamba backbone (ARM and Vim block styles)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

from mambaxray_ctl.backbone.layers import to_2tuple
from mambaxray_ctl.ops import ScanImpl

BlockStyle = Literal["arm", "vim"]
PosEmbedType = Literal["learned", "sincos"]
WeightInit = Literal["official", "trunc_normal"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_size(value: object) -> bool:
    if _is_int(value):
        return value > 0
    return isinstance(value, tuple) and len(value) == 2 and all(_is_int(v) and v > 0 for v in value)


@dataclass
class VisionMambaConfig:
    """Every size of the backbone. Defaults are ARM-Large at 224 px (the backbone of stages 2–3).

    ``dt_rank="auto"`` means ``ceil(embed_dim / 16)``; ``mlp_hidden_dim=None`` means
    ``embed_dim * 4 * 2 // 3`` for ARM blocks and "no MLP" for Vim blocks. ``divide_out`` only
    matters with two scan directions (Vim v2); four directions (ARM v3) always average.
    ``dynamic_img_size`` allows inputs whose size differs from ``img_size`` (the position
    embedding is then resampled); otherwise a wrong input size is an error. ``weight_init`` is the
    from-scratch initialisation (:meth:`VisionMamba.init_weights`).
    """

    img_size: int | tuple[int, int] = 224
    patch_size: int | tuple[int, int] = 16
    in_chans: int = 3
    embed_dim: int = 1024
    depth: int = 24
    d_state: int = 16
    d_conv: int = 4
    expand: int = 1
    dt_rank: int | Literal["auto"] = "auto"
    block_style: BlockStyle = "arm"
    scan_directions: int = 4
    mlp_hidden_dim: int | None = None
    class_token: bool = True
    pos_embed: PosEmbedType = "learned"
    dynamic_img_size: bool = False
    drop_path_rate: float = 0.1
    divide_out: bool = True
    norm_eps: float = 1e-5
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    weight_init: WeightInit = "official"
    ssm_impl: ScanImpl = "auto"

    def __post_init__(self) -> None:
        # JSON gives lists for pairs.
        if isinstance(self.img_size, list):
            self.img_size = tuple(self.img_size)
        if isinstance(self.patch_size, list):
            self.patch_size = tuple(self.patch_size)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        for name in ("img_size", "patch_size"):
            if not _is_size(getattr(self, name)):
                raise ValueError(
                    f"{name} must be a positive int or a pair (H, W), got {getattr(self, name)!r}"
                )
        for name in ("in_chans", "embed_dim", "depth", "d_state", "d_conv", "expand"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        (img_h, img_w), (patch_h, patch_w) = self.img_hw, self.patch_hw
        if img_h % patch_h or img_w % patch_w:
            raise ValueError(f"img_size {self.img_hw} is not divisible by patch_size {self.patch_hw}")
        if self.dt_rank != "auto" and (not _is_int(self.dt_rank) or self.dt_rank <= 0):
            raise ValueError(f"dt_rank must be 'auto' or a positive int, got {self.dt_rank!r}")
        if self.block_style not in get_args(BlockStyle):
            raise ValueError(f"block_style must be one of {get_args(BlockStyle)}, got {self.block_style!r}")
        if self.scan_directions not in (1, 2, 4):
            raise ValueError(f"scan_directions must be 1, 2 or 4, got {self.scan_directions!r}")
        if self.scan_directions == 4 and not self.divide_out:
            raise ValueError(
                "divide_out=False is only supported with scan_directions=2 (4 directions always average)"
            )
        if self.mlp_hidden_dim is not None:
            if self.block_style == "vim":
                raise ValueError("vim blocks have no MLP: leave mlp_hidden_dim unset (None)")
            if not _is_int(self.mlp_hidden_dim) or self.mlp_hidden_dim <= 0:
                raise ValueError(
                    f"mlp_hidden_dim must be a positive int or None, got {self.mlp_hidden_dim!r}"
                )
        if self.pos_embed not in get_args(PosEmbedType):
            raise ValueError(f"pos_embed must be one of {get_args(PosEmbedType)}, got {self.pos_embed!r}")
        if self.pos_embed == "sincos" and self.embed_dim % 4:
            raise ValueError(
                f"sincos position embedding needs embed_dim divisible by 4, got {self.embed_dim}"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate!r}")
        if self.weight_init not in get_args(WeightInit):
            raise ValueError(f"weight_init must be one of {get_args(WeightInit)}, got {self.weight_init!r}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps!r}")
        if not 0 < self.dt_min <= self.dt_max or self.dt_init_floor <= 0:
            raise ValueError(
                f"need 0 < dt_min <= dt_max and dt_init_floor > 0, got "
                f"dt_min={self.dt_min}, dt_max={self.dt_max}, dt_init_floor={self.dt_init_floor}"
            )
        if self.ssm_impl not in get_args(ScanImpl):
            raise ValueError(f"ssm_impl must be one of {get_args(ScanImpl)}, got {self.ssm_impl!r}")

    # Derived sizes
    @property
    def img_hw(self) -> tuple[int, int]:
        return to_2tuple(self.img_size)

    @property
    def patch_hw(self) -> tuple[int, int]:
        return to_2tuple(self.patch_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns) at ``img_size``."""
        return self.img_hw[0] // self.patch_hw[0], self.img_hw[1] // self.patch_hw[1]

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_tokens(self) -> int:
        """Sequence length at ``img_size``: patches plus the class token if any."""
        return self.num_patches + int(self.class_token)

    @property
    def cls_index(self) -> int | None:
        """Index of the middle class token at ``img_size`` (``None`` without one)."""
        return self.num_patches // 2 if self.class_token else None

    @property
    def d_inner(self) -> int:
        return self.expand * self.embed_dim

    @property
    def resolved_dt_rank(self) -> int:
        return math.ceil(self.embed_dim / 16) if self.dt_rank == "auto" else self.dt_rank

    @property
    def resolved_mlp_hidden_dim(self) -> int | None:
        """SwiGLU hidden size (ARM), ``None`` for Vim blocks."""
        if self.block_style == "vim":
            return None
        return self.mlp_hidden_dim if self.mlp_hidden_dim is not None else self.embed_dim * 4 * 2 // 3

    def drop_path_rates(self) -> list[float]:
        """Per-layer rates as ARM/Vim: ``[0] + linspace(0, rate, depth)[:-1]``."""
        if self.depth == 1:
            return [0.0]
        return [0.0] + [self.drop_path_rate * i / (self.depth - 1) for i in range(self.depth - 1)]

    # Serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionMambaConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown VisionMambaConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)
