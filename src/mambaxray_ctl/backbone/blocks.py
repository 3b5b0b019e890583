"""Residual blocks: ARM (LayerNorm + mixer, LayerNorm + SwiGLU) and Vim (add -> RMSNorm -> mixer)."""

from __future__ import annotations

from torch import Tensor, nn

from mambaxray_ctl.backbone.config import VisionMambaConfig
from mambaxray_ctl.backbone.layers import DropPath, RMSNorm, SwiGLU
from mambaxray_ctl.backbone.mixer import MambaMixer


class ARMBlock(nn.Module):
    """Pre-norm block: ``x + dp(mixer(norm1(x)))`` then ``x + dp(mlp(norm2(x)))``."""

    def __init__(self, config: VisionMambaConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)
        self.mixer = MambaMixer(config)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)
        self.mlp = SwiGLU(config)
        self.drop_path = DropPath(drop_path)

    def forward(
        self, x: Tensor, grid_size: tuple[int, int] | None = None, cls_index: int | None = None
    ) -> Tensor:
        x = x + self.drop_path(self.mixer(self.norm1(x), grid_size, cls_index))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VimBlock(nn.Module):
    """Vim's add -> norm -> mixer block, carrying the residual stream separately.

    ``residual = residual + dp(hidden)`` (or ``hidden`` for the first block), then
    ``hidden = mixer(norm(residual))``; the model adds the last ``hidden`` and applies ``norm_f``.
    """

    def __init__(self, config: VisionMambaConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm = RMSNorm(config.embed_dim, eps=config.norm_eps)
        self.mixer = MambaMixer(config)
        self.drop_path = DropPath(drop_path)

    def forward(
        self,
        hidden: Tensor,
        residual: Tensor | None = None,
        grid_size: tuple[int, int] | None = None,
        cls_index: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        return self.mixer(self.norm(residual), grid_size, cls_index), residual
