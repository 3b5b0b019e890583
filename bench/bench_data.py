"""Data pipeline speed: demo-world generation and the image cache (``prepare images``) with 1 and 2
processes, on generated large 16-bit PNGs (CheXpert-like sizes). Prints a table, writes JSON.

Run: ``python bench/bench_data.py [--studies 2400] [--images 128] [--source-size 1024]``.
Throughput includes the start of the worker processes, as a user of the command sees it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mambaxray_ctl.data.prepare import build_cache
from mambaxray_ctl.demo.world import generate_world
from mambaxray_ctl.hardware import describe_machine, machine

RESULTS = Path(__file__).parent / "results" / "data.json"


def write_large_pngs(root: Path, count: int, size: int) -> float:
    """``count`` 16-bit PNGs (8 distinct ones, copied): smooth 12-bit-range content with noise.

    Returns the mean file size in MB.
    """
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    body = np.exp(-(((xx - 0.5) / 0.35) ** 2 + ((yy - 0.55) / 0.45) ** 2))
    distinct = []
    for i in range(min(count, 8)):
        image = 4095 * (0.2 + 0.6 * body) + rng.normal(0, 40, (size, size))
        distinct.append(root / "p0" / f"{i}.png")
        distinct[-1].parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(image, 0, 65535).astype(np.uint16)).save(distinct[-1])
    for i in range(len(distinct), count):
        path = root / f"p{i // 8}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(distinct[i % len(distinct)], path)
    return sum(p.stat().st_size for p in root.rglob("*.png")) / count / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=2400, help="demo studies (default 2400)")
    parser.add_argument("--images", type=int, default=128, help="large images for the cache (default 128)")
    parser.add_argument(
        "--source-size", type=int, default=1024, help="side of the large images (default 1024)"
    )
    parser.add_argument("--size", type=int, default=224, help="cache size (default 224)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        start = time.perf_counter()
        generate_world(tmp_path / "demo", n=args.studies, seed=0, size=224, workers=2)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "task": f"make-demo-data {args.studies} studies, 224 px, 2 processes",
                "seconds": round(seconds, 1),
                "rate": round(args.studies / seconds, 1),
                "unit": "studies/s",
            }
        )
        mb = write_large_pngs(tmp_path / "large", args.images, args.source_size)
        for workers in (1, 2):
            manifest = build_cache(
                tmp_path / "large",
                tmp_path / f"cache{workers}",
                size=args.size,
                workers=workers,
                progress=False,
            )
            rows.append(
                {
                    "task": (
                        f"prepare images {args.images} x {args.source_size}px 16-bit PNG ({mb:.1f} MB) "
                        f"-> {args.size}px, {workers} process(es)"
                    ),
                    "seconds": manifest["seconds"],
                    "rate": manifest["images_per_second"],
                    "unit": "images/s",
                }
            )
    info = machine()
    print(f"data pipeline on {describe_machine(info)}, {info['cpus']} CPUs")
    print("| task | seconds | rate |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['seconds']} | {r['rate']} {r['unit']} |")
    speedup = rows[2]["rate"] / rows[1]["rate"]
    print(f"image cache speed-up 2 vs 1 process: {speedup:.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "rows": rows, "cache_speedup_2_vs_1": round(speedup, 2)}
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
