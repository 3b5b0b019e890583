"""Selective-scan speed on CPU: fused C++ kernel vs the reference loop vs naive per-step indexing.

Shapes: ARM-Base (B=2, D=768, L=197, N=16) and Vim-Base (B=2, D=1536, L=197, N=16); realistic Mamba
inputs (A = -(1..16), delta_bias = softplus^-1(dt), dt ~ logU[1e-3, 0.1], softplus, z and D present),
float32, 2 threads. "fwd" runs under ``torch.no_grad``; "fwd+bwd" backpropagates a fixed random
output gradient into all eight inputs. Medians after one warm-up; the three run side by side.
Run: ``python bench/bench_scan.py [--repeats 20] [--naive-repeats 2]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from mambaxray_ctl.hardware import describe_machine, machine
from mambaxray_ctl.ops.cpu_fused import cpu_fused_available, selective_scan_cpu_fused
from mambaxray_ctl.ops.reference import selective_scan_reference

RESULTS = Path(__file__).parent / "results" / "scan.json"
SHAPES = {"ARM-Base": (2, 768, 197, 16), "Vim-Base": (2, 1536, 197, 16)}
TARGETS = {"reference": 10.0, "naive": 200.0}  # fused fwd+bwd speed-up wanted at ARM-Base


def naive_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    z: Tensor,
    delta_bias: Tensor,
    delta_softplus: bool = True,
) -> Tensor:
    """mamba-ssm's selective_scan_ref semantics with its layout: full (B, D, L, N) tensors indexed per step.

    Indexing ``[:, :, i]`` inside the loop makes autograd materialise a (B, D, L, N) gradient at each of
    the L steps, so the backward is quadratic in L.
    """
    dtype = u.dtype
    u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))
    delta = delta + delta_bias[:, None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    delta_a = torch.exp(delta[..., None] * A[:, None, :])  # (B, D, L, N)
    delta_b_u = delta[..., None] * B.transpose(1, 2)[:, None] * u[..., None]  # (B, D, L, N)
    x = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for i in range(u.shape[2]):
        x = delta_a[:, :, i] * x + delta_b_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    out = torch.stack(ys, dim=2) + u * D[:, None]
    return (out * F.silu(z.float())).to(dtype)


def make_inputs(batch: int, dim: int, length: int, d_state: int, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(dim, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return [
        torch.randn(batch, dim, length, generator=g),  # u
        0.5 * torch.randn(batch, dim, length, generator=g),  # delta (before bias and softplus)
        -torch.arange(1, d_state + 1, dtype=torch.float32).repeat(dim, 1),  # A, S4D-real
        torch.randn(batch, d_state, length, generator=g),  # B
        torch.randn(batch, d_state, length, generator=g),  # C
        torch.ones(dim),  # D
        torch.randn(batch, dim, length, generator=g),  # z
        dt + torch.log(-torch.expm1(-dt)),  # delta_bias
    ]


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(scan: Callable[..., Tensor], inputs: list[Tensor], repeats: int) -> dict[str, float]:
    leaves = [t.clone().requires_grad_() for t in inputs]
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1))

    def forward() -> None:
        with torch.no_grad():
            scan(*inputs, delta_softplus=True)

    def forward_backward() -> None:
        scan(*leaves, delta_softplus=True).backward(grad_out)
        for t in leaves:
            t.grad = None

    return {"fwd_ms": median_ms(forward, repeats), "fwd_bwd_ms": median_ms(forward_backward, repeats)}


def max_error(scan: Callable[..., Tensor], inputs: list[Tensor]) -> float:
    """Max |out - out_float64_reference| of one float32 forward."""
    want = selective_scan_reference(*(t.double() for t in inputs), delta_softplus=True)
    return (scan(*inputs, delta_softplus=True).double() - want).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs of the fused kernel")
    parser.add_argument("--reference-repeats", type=int, default=5)
    parser.add_argument("--naive-repeats", type=int, default=2, help="its backward takes seconds")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu_fused_available():
        raise SystemExit("the fused CPU extension could not be built (see the warning above)")

    impls = {
        "fused": (selective_scan_cpu_fused, args.repeats),
        "reference": (selective_scan_reference, args.reference_repeats),
        "naive": (naive_scan, args.naive_repeats),
    }
    rows = []
    for shape_name, shape in SHAPES.items():
        inputs = make_inputs(*shape)
        for name, (scan, repeats) in impls.items():
            timing = measure(scan, inputs, repeats)
            rows.append({"shape": shape_name, "BDLN": shape, "impl": name, **timing})
            rows[-1]["max_err_vs_f64"] = max_error(scan, inputs)
            print(f"  {shape_name} {name}: {timing}", flush=True)

    info = machine()
    print(f"\nselective scan, float32, on {describe_machine(info)}")
    print("| shape | impl | fwd ms | fwd+bwd ms | fwd ×fused | fwd+bwd ×fused | max err (f32 vs f64) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        fused = next(r for r in rows if r["shape"] == row["shape"] and r["impl"] == "fused")
        row["fwd_ratio"] = row["fwd_ms"] / fused["fwd_ms"]
        row["fwd_bwd_ratio"] = row["fwd_bwd_ms"] / fused["fwd_bwd_ms"]
        print(
            f"| {row['shape']} {row['BDLN']} | {row['impl']} | {row['fwd_ms']:.2f} | {row['fwd_bwd_ms']:.2f} "
            f"| {row['fwd_ratio']:.1f} | {row['fwd_bwd_ratio']:.1f} | {row['max_err_vs_f64']:.1e} |"
        )
    arm = {r["impl"]: r["fwd_bwd_ratio"] for r in rows if r["shape"] == "ARM-Base"}
    checks = {}
    for name, want in TARGETS.items():
        checks[f"fused fwd+bwd >= {want:g}x {name} at ARM-Base"] = ok = arm[name] >= want
        verdict = "PASS" if ok else "MISS"
        print(f"{verdict}: fused fwd+bwd {arm[name]:.1f}x faster than {name} at ARM-Base (target {want:g}x)")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": info,
        "dtype": "float32",
        "repeats": {name: repeats for name, (_, repeats) in impls.items()},
    }
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows, "targets": checks}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
