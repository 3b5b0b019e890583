"""Backbone forward speed: Vim-Tiny (our backbone) vs a plain PyTorch ViT-Tiny, side by side in one run.

Batch 1, inference mode, 2 CPU threads, medians. Also multiply-accumulate counts of both by formula.
Run: ``python bench/bench_backbone.py [--sizes 224 384 512 768] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambaxray_ctl.backbone import create_backbone, get_preset_config
from mambaxray_ctl.hardware import describe_machine, machine
from mambaxray_ctl.ops.selective_scan import resolve_impl

RESULTS = Path(__file__).parent / "results" / "backbone.json"


class ViTBlock(nn.Module):
    """Pre-norm transformer block: attention and a GELU MLP of ratio 4."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(attn)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """ViT-Tiny-like baseline: patch 16, class token, learned positions, no head."""

    def __init__(
        self, img_size: int, dim: int = 192, depth: int = 12, heads: int = 3, patch: int = 16
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList(ViTBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def vit_macs(img_size: int, dim: int = 192, depth: int = 12, patch: int = 16) -> int:
    """Attention + MLP + patch embedding multiply-accumulates of :class:`ViT`."""
    patches = (img_size // patch) ** 2
    length = patches + 1
    return depth * (12 * length * dim**2 + 2 * length**2 * dim) + patches * 3 * patch**2 * dim


def vim_macs(img_size: int, preset: str = "vim_tiny_patch16") -> int:
    """in/out projections, per direction conv + x_proj + dt_proj + scan, and the patch embedding."""
    cfg = get_preset_config(preset, img_size=img_size)
    patches = (img_size // cfg.patch_size) ** 2
    length, d = patches + 1, cfg.embed_dim
    e, n = cfg.expand * d, cfg.d_state
    r = cfg.dt_rank if isinstance(cfg.dt_rank, int) else -(-d // 16)
    per_direction = cfg.d_conv * length * e + length * e * (r + 2 * n) + length * r * e + 3 * length * e * n
    per_layer = length * d * 2 * e + length * e * d + cfg.scan_directions * per_direction
    return cfg.depth * per_layer + patches * 3 * cfg.patch_size**2 * d


def median_ms(model: nn.Module, images: Tensor, repeats: int) -> float:
    with torch.inference_mode():
        model(images)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 384, 512, 768])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    impl = resolve_impl("auto", torch.device("cpu"))

    rows = []
    for size in args.sizes:
        images = torch.randn(1, 3, size, size)
        vim = create_backbone("vim_tiny_patch16", img_size=size).eval()
        vit = ViT(size).eval()
        vim_ms, vit_ms = median_ms(vim, images, args.repeats), median_ms(vit, images, args.repeats)
        rows.append(
            {
                "img_size": size,
                "tokens": (size // 16) ** 2 + 1,
                "vim_tiny_ms": round(vim_ms, 1),
                "vit_tiny_ms": round(vit_ms, 1),
                "time_ratio_vim_over_vit": round(vim_ms / vit_ms, 2),
                "vim_gmac": round(vim_macs(size) / 1e9, 2),
                "vit_gmac": round(vit_macs(size) / 1e9, 2),
                "mac_ratio_vim_over_vit": round(vim_macs(size) / vit_macs(size), 2),
            }
        )

    info = machine()
    print(f"backbone forward, batch 1, inference mode, scan impl {impl}, on {describe_machine(info)}")
    print("| px | tokens | Vim-Tiny ms | ViT-Tiny ms | Vim/ViT time | Vim GMAC | ViT GMAC | Vim/ViT MAC |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['img_size']} | {r['tokens']} | {r['vim_tiny_ms']} | {r['vit_tiny_ms']} | "
            f"{r['time_ratio_vim_over_vit']} | {r['vim_gmac']} | {r['vit_gmac']} | "
            f"{r['mac_ratio_vim_over_vit']} |"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "scan_impl": impl, "rows": rows}
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
