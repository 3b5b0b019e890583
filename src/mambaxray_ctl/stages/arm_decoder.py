"""ARM's cluster-autoregressive pixel decoder (stage 1) and its cluster helpers.

Patches are grouped into ``cluster_size × cluster_size`` clusters; clusters are ordered raster over
the cluster grid and patches raster inside a cluster. The encoder reads clusters ``1..K−1`` and the
decoder predicts the pixels of clusters ``2..K`` (docs/METHOD.md#stage-1-arm-pretraining). Parameter
names follow ARM's stage-1 checkpoints (``norm_1..n``, ``enc2dec``, ``dec_block``, ``ar_token``,
``dec_pos_embed``, ``ar_norm``, ``ar_pred``), so their decoder weights load as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambaxray_ctl.backbone.layers import sincos_2d_pos_embed


def cluster_order(grid_size: tuple[int, int], cluster_size: int) -> Tensor:
    """Row-major patch indices in cluster order: ``tokens[:, order]`` walks clusters raster over the
    cluster grid and patches raster inside each cluster."""
    rows, cols = grid_size
    s = cluster_size
    if s < 1 or rows % s or cols % s:
        raise ValueError(f"patch grid {tuple(grid_size)} is not divisible into {s}x{s}-patch clusters")
    return torch.arange(rows * cols).view(rows // s, s, cols // s, s).permute(0, 2, 1, 3).reshape(-1)


def block_causal_mask(num_clusters: int, cluster_len: int) -> Tensor:
    """Boolean (n·P, n·P) attention mask, True where query cluster ``i`` may see key cluster ``j ≤ i``."""
    cluster = torch.arange(num_clusters).repeat_interleave(cluster_len)
    return cluster[:, None] >= cluster[None, :]


class CrossAttention(nn.Module):
    """Multi-head attention of queries on a separate key/value sequence (qkv biases on)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        batch, length, dim = x.shape
        head_dim = dim // self.num_heads
        q = self.q(x).view(batch, length, self.num_heads, head_dim).transpose(1, 2)
        kv = self.kv(context).view(batch, context.shape[1], 2, self.num_heads, head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class Mlp(nn.Module):
    """Linear → GELU → Linear."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DecoderBlock(nn.Module):
    """Cross-attention-only pre-LN block: ``q += attn(LN(q), LN(kv))``, then ``q += mlp(LN(q))``.

    Names as ARM's ``DecoderBlock``: ``norm2_1`` (queries), ``norm2_2`` (keys/values), ``attn2``, ``norm2``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm2_1 = nn.LayerNorm(dim)
        self.norm2_2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, queries: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        queries = queries + self.attn2(self.norm2_1(queries), self.norm2_2(context), mask)
        return queries + self.mlp(self.norm2(queries))


class ARMDecoder(nn.Module):
    """Multi-level features of clusters ``1..K−1`` → pixel predictions of clusters ``2..K``.

    Level ``k`` (an encoder layer's output) goes through ``norm_{k+1}``; the levels are concatenated
    and mapped by ``enc2dec`` to ``num_levels · dim`` channels, of which decoder block ``k`` reads the
    interleaved slice ``k, k + n, k + 2n, …`` as keys/values. Queries: the learned ``ar_token`` plus
    the fixed sin-cos ``dec_pos_embed`` of the target patches; query cluster ``j`` sees encoder
    clusters ``≤ j``. Output: ``ar_pred(ar_norm(queries))``, (B, (K−1)·P, ``out_dim``).
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        grid_size: tuple[int, int],
        cluster_size: int,
        out_dim: int,
        num_levels: int,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
    ) -> None:
        super().__init__()
        order = cluster_order(grid_size, cluster_size)
        cluster_len = cluster_size * cluster_size
        num_targets = order.numel() // cluster_len - 1
        if num_targets < 1:
            raise ValueError(f"patch grid {tuple(grid_size)} holds a single cluster: nothing to predict")
        self.num_levels = num_levels
        self.dim = dim
        for k in range(num_levels):
            self.add_module(f"norm_{k + 1}", nn.LayerNorm(embed_dim))
        self.enc2dec = nn.Linear(num_levels * embed_dim, num_levels * dim)
        self.ar_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("dec_pos_embed", sincos_2d_pos_embed(dim, grid_size)[None])
        self.register_buffer("target_index", order[cluster_len:], persistent=False)
        self.register_buffer("mask", block_causal_mask(num_targets, cluster_len), persistent=False)
        self.dec_block = nn.ModuleList(DecoderBlock(dim, num_heads, mlp_ratio) for _ in range(num_levels))
        self.ar_norm = nn.LayerNorm(dim)
        self.ar_pred = nn.Linear(dim, out_dim)
        self.init_weights()

    @property
    def num_tokens(self) -> int:
        """Encoder tokens read = queries made: (K−1)·P."""
        return self.target_index.numel()

    @property
    def feature_norms(self) -> list[nn.LayerNorm]:
        return [getattr(self, f"norm_{k + 1}") for k in range(self.num_levels)]

    @torch.no_grad()
    def init_weights(self) -> None:
        """As ARM: ``ar_token`` trunc-normal(0.02), block linears Xavier-uniform, all biases zero."""
        nn.init.trunc_normal_(self.ar_token, std=0.02)
        for module in self.dec_block.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        if len(features) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature levels, got {len(features)}")
        if features[0].shape[1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} encoder tokens, got {features[0].shape[1]}")
        x = torch.cat([norm(f) for norm, f in zip(self.feature_norms, features, strict=True)], dim=-1)
        levels = self.enc2dec(x).unflatten(-1, (self.dim, self.num_levels))
        queries = (self.ar_token + self.dec_pos_embed[:, self.target_index]).expand(x.shape[0], -1, -1)
        for k, block in enumerate(self.dec_block):
            queries = block(queries, levels[..., k], self.mask)
        return self.ar_pred(self.ar_norm(queries))
