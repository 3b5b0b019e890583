"""Small building blocks of the backbone: patch embedding, drop path, norms, SwiGLU, positions."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from mambaxray_ctl.backbone.config import VisionMambaConfig


def to_2tuple(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``7 -> (7, 7)``; a pair is returned as a tuple of ints."""
    if isinstance(value, int):
        return value, value
    height, width = value
    return int(height), int(width)


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval or when ``drop_prob == 0``)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * mask / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:g}"


class RMSNorm(nn.Module):
    """RMS norm with a weight and no bias; normalises in fp32 and casts back (as transformers)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        input_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps:g}"


class PatchEmbed(nn.Module):
    """Non-overlapping patches (Conv2d with kernel = stride = patch) flattened row-major to (B, N, D)."""

    def __init__(
        self,
        img_size: int | tuple[int, int],
        patch_size: int | tuple[int, int],
        in_chans: int,
        embed_dim: int,
        strict_img_size: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.in_chans = in_chans
        self.strict_img_size = strict_img_size
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def grid_for(self, images: Tensor) -> tuple[int, int]:
        """Patch grid of ``images`` (B, C, H, W); raises ``ValueError`` on a shape this module can't take."""
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise ValueError(
                f"expected images of shape (B, {self.in_chans}, H, W), got {tuple(images.shape)}"
            )
        height, width = images.shape[-2:]
        if self.strict_img_size and (height, width) != self.img_size:
            raise ValueError(
                f"input size ({height}, {width}) differs from the model's img_size {self.img_size}; "
                "resize the images or build the backbone with dynamic_img_size=True"
            )
        if height % self.patch_size[0] or width % self.patch_size[1]:
            raise ValueError(
                f"input size ({height}, {width}) is not divisible by patch_size {self.patch_size}"
            )
        return height // self.patch_size[0], width // self.patch_size[1]

    def forward(self, images: Tensor) -> Tensor:
        self.grid_for(images)
        return self.proj(images).flatten(2).transpose(1, 2)


class SwiGLU(nn.Module):
    """ARM's gated MLP: ``w3(silu(w1 x) * w2 x)``, all three linears with bias."""

    def __init__(self, config: VisionMambaConfig) -> None:
        super().__init__()
        hidden = config.resolved_mlp_hidden_dim
        if hidden is None:
            raise ValueError(f"block_style={config.block_style!r} has no MLP")
        self.w1 = nn.Linear(config.embed_dim, hidden)
        self.w2 = nn.Linear(config.embed_dim, hidden)
        self.w3 = nn.Linear(hidden, config.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


def insert_token(tokens: Tensor, token: Tensor, index: int) -> Tensor:
    """Insert ``token`` (B or 1, 1, D) into ``tokens`` (B, L, D) so that it sits at ``index``.

    Dtypes promote as in ``torch.cat`` (under autocast a fp32 class token stays fp32, as in ARM)."""
    token = token.expand(tokens.shape[0], -1, -1)
    return torch.cat([tokens[:, :index], token, tokens[:, index:]], dim=1)


def _sincos_1d(dim: int, positions: Tensor) -> Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d_pos_embed(
    embed_dim: int, grid_size: tuple[int, int], device: torch.device | None = None
) -> Tensor:
    """Fixed 2-D sin-cos table (H·W, D) in row-major patch order, fp32 (MAE/ARM convention).

    The first half of the channels encodes the column index, the second half the row index; each
    half is ``[sin(p·ω), cos(p·ω)]`` with ``ω_k = 10000^(-k / (D/4))``.
    """
    if embed_dim % 4:
        raise ValueError(f"sincos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    rows, cols = grid_size
    row = torch.arange(rows, device=device).repeat_interleave(cols)
    col = torch.arange(cols, device=device).repeat(rows)
    table = torch.cat([_sincos_1d(embed_dim // 2, col), _sincos_1d(embed_dim // 2, row)], dim=1)
    return table.float()


def resample_pos_embed(
    pos_embed: Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    *,
    has_class_token: bool,
    add_class_token: bool = False,
) -> Tensor:
    """Resize a (1, L, D) position table over the patch grid (bicubic, ``align_corners=False``).

    A middle class-token entry (index ``num_patches // 2``) is kept and moved to the middle of the
    new grid; with ``add_class_token`` a table without one gets a zero entry there (ARM's stage 1→2
    hand-over: 12×12 sin-cos → 14×14 + zero class-token position).
    """
    old_n, new_n = old_grid[0] * old_grid[1], new_grid[0] * new_grid[1]
    if pos_embed.ndim != 3 or pos_embed.shape[1] != old_n + int(has_class_token):
        raise ValueError(
            f"pos_embed of shape {tuple(pos_embed.shape)} does not fit grid {old_grid} "
            f"{'with' if has_class_token else 'without'} a class token"
        )
    cls = None
    patches = pos_embed
    if has_class_token:
        index = old_n // 2
        cls = pos_embed[:, index : index + 1]
        patches = torch.cat([pos_embed[:, :index], pos_embed[:, index + 1 :]], dim=1)
    elif add_class_token:
        cls = pos_embed.new_zeros(pos_embed.shape[0], 1, pos_embed.shape[2])
    if tuple(old_grid) != tuple(new_grid):
        grid = patches.reshape(patches.shape[0], *old_grid, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
        patches = grid.permute(0, 2, 3, 1).reshape(patches.shape[0], new_n, -1).to(pos_embed.dtype)
    return patches if cls is None else insert_token(patches, cls, new_n // 2)
