"""``mambaxray-ctl demo`` (``make demo``): the whole method on the synthetic world, on a CPU.

Steps: generate the world (``data/demo``) → train its small tokenizer and causal LM on the
training reports (text only: each report inside stage 3's prompt, its findings named by tokens in
the image slot; the LM plays Qwen's role and stage 3 loads it frozen with ``from_pretrained``) and
pre-train the small text encoder of stage 2 (masked LM on the same reports) → stage 1 (ARM) → stage 2
(contrastive, from the stage-1 export) → stage 3 (report generation, from the stage-2 export) →
``predict`` on the test split → the paper's metrics plus clinical precision/recall/F1 per finding,
beside an image-blind baseline scored the same way (the most frequent training report, given
to every test study). Each stage is the same ``mambaxray-ctl fit`` run that ``make stageN
DATA=demo`` performs, with the same config files.

Writes ``<out>/metrics.json`` and prints the table. The learning target: macro clinical F1
≥ 0.70 and at least 0.25 above the baseline.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TARGET_F1 = 0.70
TARGET_MARGIN = 0.25
FULL_METHOD = ("stage1_arm", "stage2_contrastive", "stage3_reportgen")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="data/demo", help="world folder (default: data/demo)")
    parser.add_argument("--out", default="outputs/demo", help="run root (default: outputs/demo)")
    parser.add_argument("--configs", default="configs", help="config folder (default: configs)")
    parser.add_argument("--studies", type=int, default=2400, help="studies in the world (default: 2400)")
    parser.add_argument("--seed", type=int, default=0, help="world seed (default: 0)")
    parser.add_argument(
        "--data-only",
        action="store_true",
        help="only generate the world and its text models, or rebuild those of an older version",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="CONFIG:ARG",
        help="extra CLI argument for one stage, e.g. stage3_reportgen:--trainer.max_epochs=2 (repeatable)",
    )


def stage_args(configs: Path, data: Path, out: Path, config: str) -> list[str]:
    """The CLI arguments of one demo stage: the same files as ``make <stage> DATA=demo``."""
    files = [
        configs / "data" / "demo.yaml",
        configs / f"{config}.yaml",
        configs / "demo" / f"{config}.yaml",
        configs / "trainer" / "cpu.yaml",
    ]
    args = [arg for path in files for arg in ("-c", str(path))]
    return [
        *args,
        f"--data.init_args.annotation={data / 'annotation.json'}",
        f"--data.init_args.image_root={data / 'images'}",
        f"--trainer.logger.init_args.save_dir={out}",
    ]


def prepare_demo_data(data: Path, studies: int, seed: int, timings: dict[str, float]) -> bool:
    """Generate the world and build its text models unless current; False on failure."""
    from mambaxray_ctl.cli import main
    from mambaxray_ctl.demo.world import WORLD_VERSION

    annotation = data / "annotation.json"
    rebuild_text = False
    if _world_version(annotation) != WORLD_VERSION:
        if annotation.is_file():
            print(f"{data}: a synthetic world of an older version, regenerating it", file=sys.stderr)
        world = ["make-demo-data", "--out", str(data), "--n", str(studies), "--seed", str(seed)]
        if _timed("synthetic world", timings, lambda: main(world)) != 0:
            return False
        rebuild_text = True
    if rebuild_text or not _text_models_current(data / "text", WORLD_VERSION):
        text = ["build-demo-text-models", "--annotation", str(annotation), "--out", str(data / "text")]
        if _timed("text models", timings, lambda: main(text)) != 0:
            return False
    return True


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; empty when the file is absent, unreadable or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _world_version(annotation: Path) -> int | None:
    """The ``world_version`` of a demo annotation file (None when absent or unreadable)."""
    return _json_object(annotation).get("world_version")


def _text_models_current(folder: Path, world_version: int) -> bool:
    """Whether ``folder`` holds text models of the current recipe built on this world version; others
    are rebuilt, with a notice."""
    from mambaxray_ctl.demo.text_models import BUILD_LOG, RECIPE

    if not (folder / "lm" / "config.json").is_file():
        return False
    build = _json_object(folder / BUILD_LOG)
    current = build.get("recipe") == RECIPE and build.get("world_version") == world_version
    if not current:
        print(f"{folder}: text models from an older recipe or world, rebuilding them", file=sys.stderr)
    return current


def run_pipeline(
    configs: Path,
    data: Path,
    out: Path,
    stages: Sequence[str],
    extra: dict[str, list[str]],
    timings: dict[str, float],
) -> tuple[Path, dict[str, Path]]:
    """``fit`` each stage config in ``stages`` (each from the previous one's export), then ``predict``
    the test split with the last stage-3 checkpoint. Returns the predictions file and the run dirs.

    ``extra`` maps a stage config name (or ``"predict"``) to extra CLI arguments.
    """
    init_from: str | None = None
    run_dirs: dict[str, Path] = {}
    stage3_ckpt = ""
    for config in stages:
        fit_args = ["fit", *stage_args(configs, data, out, config), *extra.get(config, [])]
        if init_from:
            fit_args.append(f"--model.init_args.init_from={init_from}")
        cli = _timed(config, timings, lambda a=fit_args: _run_cli(a))
        run_dirs[config] = Path(cli.trainer.log_dir)
        init_from = str(run_dirs[config] / "backbone.safetensors")
        checkpoint = cli.trainer.checkpoint_callback
        stage3_ckpt = checkpoint.best_model_path or checkpoint.last_model_path
    predict_args = ["predict", *stage_args(configs, data, out, stages[-1]), f"--ckpt_path={stage3_ckpt}"]
    cli = _timed(
        "predict (test split)", timings, lambda: _run_cli([*predict_args, *extra.get("predict", [])])
    )
    return Path(cli.trainer.log_dir) / "predictions.jsonl", run_dirs


def most_frequent_report(annotation: dict[str, Any], cleaning: str) -> str:
    """The most frequent cleaned training report (ties: the first seen)."""
    from mambaxray_ctl.data.cleaning import clean_report

    counts = Counter(clean_report(entry["report"], cleaning) for entry in annotation["train"])
    return counts.most_common(1)[0][0]


def write_baseline(predictions: Path, report: str, path: Path) -> Path:
    """The image-blind baseline: ``report`` for every study of ``predictions``."""
    with predictions.open() as src, path.open("w") as dst:
        for line in src:
            row = json.loads(line)
            dst.write(json.dumps({**row, "generated": report, "checkpoint": "baseline"}) + "\n")
    return path


@contextmanager
def _program_name_only() -> Iterator[None]:
    """LightningCLI warns when given ``args`` while ``sys.argv`` holds options (here: the demo's own)."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def _run_cli(args: list[str]) -> Any:
    from mambaxray_ctl.lightning_cli import MambaXrayCLI

    with _program_name_only():
        return MambaXrayCLI(args=args)


def _timed(name: str, timings: dict[str, float], fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    print(f"\n=== demo: {name} ===", flush=True)
    result = fn()
    timings[name] = round(time.perf_counter() - start, 1)
    print(f"=== demo: {name} done in {timings[name]:.0f} s ===", flush=True)
    return result


def _overrides(items: list[str]) -> dict[str, list[str]]:
    extra: dict[str, list[str]] = {}
    for item in items:
        stage, _, value = item.partition(":")
        extra.setdefault(stage, []).append(value)
    return extra


def run(args: argparse.Namespace) -> int:
    from mambaxray_ctl.evaluation.evaluate import evaluate_predictions, format_table

    start = time.perf_counter()
    data, out, configs = Path(args.data), Path(args.out), Path(args.configs)
    timings: dict[str, float] = {}
    if not prepare_demo_data(data, args.studies, args.seed, timings):
        return 1
    if args.data_only:
        print(f"{data}: the synthetic world and its text models are current")
        return 0
    predictions, run_dirs = run_pipeline(configs, data, out, FULL_METHOD, _overrides(args.override), timings)

    annotation = json.loads((data / "annotation.json").read_text())
    baseline = write_baseline(
        predictions, most_frequent_report(annotation, "iu_xray"), out / "baseline_predictions.jsonl"
    )
    ours = evaluate_predictions(predictions, "demo", labeler="demo")
    blind = evaluate_predictions(baseline, "demo", labeler="demo")
    timings["total"] = round(time.perf_counter() - start, 1)

    margin = ours["CE_F1_macro"] - blind["CE_F1_macro"]
    met = ours["CE_F1_macro"] >= TARGET_F1 and margin >= TARGET_MARGIN
    summary = {
        "ours": ours,
        "image_blind_baseline": blind,
        "target": {"macro_F1": TARGET_F1, "margin": TARGET_MARGIN, "met": met},
        "runs": {stage: str(path) for stage, path in run_dirs.items()},
        "predictions": str(predictions),
        "wall_time_s": timings,
        "command": " ".join(["mambaxray-ctl", "demo", *sys.argv[2:]]),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")

    print(format_table(ours, "demo", "MambaXray-CTL (demo)"))
    print(format_table(blind, "demo", "image-blind baseline (most frequent training report)"))
    print(per_finding_table(ours, blind))
    verdict = "MET" if met else "MISSED"
    print(
        f"\nmacro clinical F1 {ours['CE_F1_macro']:.3f} vs baseline {blind['CE_F1_macro']:.3f} "
        f"(+{margin:.3f}): learning target {verdict} (≥ {TARGET_F1}, ≥ +{TARGET_MARGIN})"
    )
    print(f"wall time {timings['total']:.0f} s; written: {out / 'metrics.json'}")
    return 0


def per_finding_table(ours: dict[str, float], blind: dict[str, float]) -> str:
    """Precision / recall / F1 per finding, ours beside the baseline's F1."""
    names = [key.split("/", 1)[1] for key in ours if key.startswith("CE_F1/")]
    lines = [f"{'finding':<34} {'P':>6} {'R':>6} {'F1':>6} {'blind F1':>9}"]
    for name in names:
        lines.append(
            f"{name:<34} {ours[f'CE_precision/{name}']:>6.3f} {ours[f'CE_recall/{name}']:>6.3f} "
            f"{ours[f'CE_F1/{name}']:>6.3f} {blind[f'CE_F1/{name}']:>9.3f}"
        )
    return "\n".join(lines)
