"""The Vision Mamba backbone shared by all three stages."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mambaxray_ctl.backbone.blocks import ARMBlock, VimBlock
from mambaxray_ctl.backbone.config import VisionMambaConfig
from mambaxray_ctl.backbone.layers import (
    DropPath,
    PatchEmbed,
    RMSNorm,
    insert_token,
    resample_pos_embed,
    sincos_2d_pos_embed,
)


class VisionMamba(nn.Module):
    """Patch embedding, middle class token, position embedding, Mamba blocks, final norm.

    ``forward(images)`` returns all tokens after ``norm_f``: (B, num_patches [+1], D), the class
    token (if any) at index ``num_patches // 2``. There is no classification head.

    Position embedding: ``"learned"`` is a parameter (1, L, D); ``"sincos"`` is a fixed,
    non-trainable buffer that IS saved in the state dict, because ARM's stage-1 checkpoints carry
    ``pos_embed`` (and loading them must not report it as unexpected).

    Init from scratch (``config.weight_init``), both with Mamba's own init of ``dt_proj``, ``A_log``
    and ``D`` (``MambaMixer.reset_ssm_parameters``), norms ones/zeros, ``cls_token`` and a learned
    ``pos_embed`` trunc-normal(0.02), convs 1-D PyTorch's default, and every ``mixer.out_proj``
    weight divided by ``sqrt(depth)`` (the pre-norm residual rescale, one residual per layer):

    * ``"official"`` (default), as the official code (Vim ``vim/models_mamba.py`` ``_init_weights`` and
      ``segm_init_weights``; CTL ``arm/Finetuning/models_mamba.py``): every linear keeps PyTorch's
      default weight (Kaiming-uniform, bound ``1/sqrt(fan_in)``) with a zero bias; ``out_proj``
      re-drawn the same way before the rescale; the patch embedding LeCun-normal with a zero bias.
    * ``"trunc_normal"``: linears trunc-normal(0.02) with zero bias; the patch embedding PyTorch's
      default (this package's scheme before it followed the official one).
    """

    def __init__(self, config: VisionMambaConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_embed = PatchEmbed(
            config.img_size,
            config.patch_size,
            config.in_chans,
            dim,
            strict_img_size=not config.dynamic_img_size,
        )
        if config.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        else:
            self.register_parameter("cls_token", None)
        if config.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, dim))
        else:
            self.register_buffer("pos_embed", self._sincos_pos_embed(config.grid_size))

        self._vim = config.block_style == "vim"
        block = VimBlock if self._vim else ARMBlock
        self.layers = nn.ModuleList(block(config, rate) for rate in config.drop_path_rates())
        if self._vim:
            self.drop_path = DropPath(config.drop_path_rate)  # on the last block's output (Vim)
            self.norm_f: nn.Module = RMSNorm(dim, eps=config.norm_eps)
        else:
            self.norm_f = nn.LayerNorm(dim, eps=config.norm_eps)
        self.grad_checkpointing = False
        self.init_weights()

    # Sizes
    @property
    def num_patches(self) -> int:
        return self.config.num_patches

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.config.grid_size

    @property
    def cls_index(self) -> int | None:
        return self.config.cls_index

    # Init / optimiser helpers
    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re-)initialise every parameter and the sin-cos buffer as described in the class docstring.

        Complete on its own, so a model built on the meta device can be ``to_empty``-ed and then
        initialised with this.
        """
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.config.pos_embed == "learned":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.pos_embed.copy_(self._sincos_pos_embed(self.grid_size))
        self.apply(_official_init if self.config.weight_init == "official" else _trunc_normal_init)
        for layer in self.layers:
            layer.mixer.reset_ssm_parameters()
            layer.mixer.out_proj.weight.div_(math.sqrt(self.config.depth))

    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay: pos_embed, cls_token, A*_log, D*."""
        names = {name for name, _ in self.named_parameters(recurse=False)}  # cls_token, learned pos_embed
        for i, layer in enumerate(self.layers):
            names.update(f"layers.{i}.mixer.{name}" for name in layer.mixer.no_weight_decay_names)
        return names

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (training only) to save activation memory."""
        self.grad_checkpointing = enable

    # Forward
    def embed(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) -> tokens (B, L, D): patches, middle class token, position embedding."""
        return self._embed(images)[0]

    def forward_tokens(
        self,
        tokens: Tensor,
        grid_size: tuple[int, int] | None = None,
        return_layers: Sequence[int] | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """Run the blocks and ``norm_f`` on ``tokens`` (B, L, D).

        ``grid_size`` is the patch grid of a row-major sequence; only column scans need it (a
        single-direction model accepts any token order, e.g. stage 1's cluster order). With a class
        token the sequence must hold it at ``(L - 1) // 2``. Returns the normed final tokens and
        the un-normed residual stream after each layer in ``return_layers`` (0-based, negative
        allowed), in the order asked.
        """
        indices = self._layer_indices(return_layers)
        cls_index = (tokens.shape[1] - 1) // 2 if self.cls_token is not None else None
        captured: dict[int, Tensor] = {}
        hidden, residual = tokens, None
        for i, layer in enumerate(self.layers):
            if self._vim:
                hidden, residual = self._run(layer, hidden, residual, grid_size, cls_index)
                if i in indices:
                    captured[i] = residual + hidden
            else:
                hidden = self._run(layer, hidden, grid_size, cls_index)
                if i in indices:
                    captured[i] = hidden
        if self._vim:
            hidden = self.drop_path(hidden) + residual
        return self.norm_f(hidden), [captured[i] for i in indices]

    def forward_features(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) -> all tokens after ``norm_f`` (B, L, D)."""
        tokens, grid = self._embed(images)
        return self.forward_tokens(tokens, grid)[0]

    forward = forward_features

    # Internals
    def _embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        grid = self.patch_embed.grid_for(images)
        tokens = self.patch_embed(images)
        if self.cls_token is not None:
            tokens = insert_token(tokens, self.cls_token, tokens.shape[1] // 2)
        return tokens + self._pos_embed_for(grid), grid

    def _pos_embed_for(self, grid: tuple[int, int]) -> Tensor:
        if grid == self.grid_size:
            return self.pos_embed
        if self.config.pos_embed == "sincos":
            return self._sincos_pos_embed(grid).to(self.pos_embed)
        return resample_pos_embed(
            self.pos_embed, self.grid_size, grid, has_class_token=self.cls_token is not None
        )

    def _sincos_pos_embed(self, grid: tuple[int, int]) -> Tensor:
        table = sincos_2d_pos_embed(self.config.embed_dim, grid)[None]
        if self.config.class_token:
            table = insert_token(table, table.new_zeros(1, 1, table.shape[-1]), table.shape[1] // 2)
        return table

    def _layer_indices(self, return_layers: Sequence[int] | None) -> list[int]:
        depth = self.config.depth
        indices = []
        for index in return_layers or ():
            if not -depth <= index < depth:
                raise ValueError(f"return_layers index {index} out of range for depth {depth}")
            indices.append(index % depth)
        return indices

    def _run(self, layer: nn.Module, *args: object) -> object:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)


# The standard deviation of a unit normal truncated to [-2, 2].
_TRUNCATED_STD_AT_2 = 0.87962566103423978


def lecun_normal_(weight: Tensor) -> Tensor:
    """LeCun-normal init: a normal truncated at two of its standard deviations, scaled so that the
    drawn values have variance ``1 / fan_in`` (as the official code's patch embedding)."""
    fan_in = weight[0].numel()
    std = math.sqrt(1.0 / fan_in) / _TRUNCATED_STD_AT_2
    return nn.init.trunc_normal_(weight, std=std, a=-2.0 * std, b=2.0 * std)


@torch.no_grad()
def _official_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear | nn.Conv1d):
        module.reset_parameters()
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        lecun_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    else:
        _init_norm(module)


@torch.no_grad()
def _trunc_normal_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv1d | nn.Conv2d):
        module.reset_parameters()
    else:
        _init_norm(module)


def _init_norm(module: nn.Module) -> None:
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, RMSNorm):
        nn.init.ones_(module.weight)
