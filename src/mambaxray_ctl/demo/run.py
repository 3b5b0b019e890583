"""``mambaxray-ctl demo`` (``make demo``): the whole method on the synthetic world, on a CPU.

Steps: generate the world (``data/demo``) → train its small tokenizer and causal LM on the
training reports (text only: each report inside stage 3's prompt, its findings named by tokens in
the image slot; the LM plays Qwen's role and stage 3 loads it frozen with ``from_pretrained``) and
pre-train the small text encoder of stage 2 (masked LM on the same reports) → stage 1 (ARM) → stage 2
(contrastive, from the stage-1 export) → stage 3 (report generation, from the stage-2 export) →
``predict`` on the test split → the paper's metrics plus clinical precision/recall/F1 per finding,
beside an image-blind baseline scored the same way (the most frequent training report, given
to every test study). Each step is a :mod:`mambaxray_ctl.pipeline` step, the one that ``make stageN
DATA=demo`` / ``make predict DATA=demo`` performs, with the same config files; predict uses the
pipeline's checkpoint rule (stage 3's best ``val/score`` checkpoint).

Writes ``<out>/metrics.json`` and prints the table. The learning target: macro clinical F1
≥ 0.70 and at least 0.25 above the baseline. Then the pointing game of the sentence heat maps on the
first ``--pointing-studies`` test studies (:mod:`mambaxray_ctl.demo.pointing`), beside its baselines,
under ``"pointing_game"`` in ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mambaxray_ctl.demo.pointing import DEFAULT_STUDIES, format_pointing_table, run_pointing_game
from mambaxray_ctl.hardware import describe_machine, machine
from mambaxray_ctl.pipeline import (
    STAGE2,
    STAGE3,
    Overrides,
    Pipeline,
    Stage,
    StageRun,
    evaluate,
    fit_chain,
    predict,
    stage1,
)

log = logging.getLogger(__name__)

TARGET_F1 = 0.70
TARGET_MARGIN = 0.25
FULL_METHOD = (stage1("arm"), STAGE2, STAGE3)


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
        "--pointing-studies",
        type=int,
        default=DEFAULT_STUDIES,
        help="test studies of the heat-map pointing game (default: %(default)s; 0: skip it)",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="CONFIG:ARG",
        help="extra CLI argument for one stage, e.g. stage3_reportgen:--trainer.max_epochs=2 (repeatable)",
    )


def demo_pipeline(configs: Path, data: Path, out: Path) -> Pipeline:
    """The demo data (``configs/data/demo.yaml``, CPU trainer) with the world in ``data``, runs in ``out``."""
    world = {"annotation": str(data / "annotation.json"), "image_root": str(data / "images")}
    return Pipeline(
        data="demo", trainer="cpu", configs=configs, out=out, overrides=({"data": {"init_args": world}},)
    )


def prepare_demo_data(data: Path, studies: int, seed: int, timings: dict[str, float]) -> bool:
    """Generate the world and build its text models unless current; False on failure."""
    from mambaxray_ctl.demo.text_models import build_text_models
    from mambaxray_ctl.demo.world import (
        REGIONS_FILE,
        WORLD_VERSION,
        add_regions,
        describe_world,
        generate_world,
    )

    annotation = data / "annotation.json"
    rebuild_text = False
    try:
        if _world_version(annotation) != WORLD_VERSION:
            if annotation.is_file():
                print(f"{data}: a synthetic world of an older version, regenerating it", file=sys.stderr)
            _timed("synthetic world", timings, lambda: generate_world(data, n=studies, seed=seed))
            print(describe_world(annotation))
            rebuild_text = True
        elif not (data / REGIONS_FILE).is_file():
            print(
                f"{data}: no {REGIONS_FILE} (a world made before regions were recorded), adding it",
                file=sys.stderr,
            )
            _timed("regions of the findings", timings, lambda: add_regions(data, seed))
        if rebuild_text or not _text_models_current(data / "text", WORLD_VERSION):
            _timed("text models", timings, lambda: build_text_models(annotation, data / "text"))
    except (OSError, ValueError) as exc:
        print(f"mambaxray-ctl demo: error: {exc}", file=sys.stderr)
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
    pipeline: Pipeline,
    stages: Sequence[Stage],
    timings: dict[str, float],
    overrides: Mapping[str, Sequence[Overrides]] | None = None,
    args: Mapping[str, Sequence[str]] | None = None,
) -> tuple[Path, dict[str, StageRun]]:
    """Train ``stages`` in order (each from the previous one's export), then predict the test split
    with the pipeline's checkpoint rule. Returns the predictions file and the runs by stage name.

    ``overrides`` / ``args`` map a stage name (``args`` also ``"predict"``) to its overrides / extra
    CLI arguments; each step's wall time goes into ``timings`` under its config name.
    """
    args = args or {}
    runs = fit_chain(
        pipeline, stages, overrides, args, runner=lambda stage, step: _timed(stage.config, timings, step)
    )
    last = runs[stages[-1].name]
    predictions = _timed(
        "predict (test split)", timings, lambda: predict(pipeline, last, args=args.get("predict", ()))
    )
    return predictions, runs


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


def _timed(name: str, timings: dict[str, float], fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    print(f"\n=== demo: {name} ===", flush=True)
    result = fn()
    timings[name] = round(time.perf_counter() - start, 1)
    print(f"=== demo: {name} done in {timings[name]:.0f} s ===", flush=True)
    return result


def _overrides(items: list[str], stages: Sequence[Stage]) -> dict[str, list[str]]:
    """``--override`` items (``CONFIG:ARG``: a stage config, a stage name or ``predict``) by stage name."""
    names = {stage.config: stage.name for stage in stages}
    extra: dict[str, list[str]] = {}
    for item in items:
        stage, _, value = item.partition(":")
        extra.setdefault(names.get(stage, stage), []).append(value)
    return extra


def run(args: argparse.Namespace) -> int:
    from mambaxray_ctl.evaluation.evaluate import format_table

    start = time.perf_counter()
    data, out, configs = Path(args.data), Path(args.out), Path(args.configs)
    timings: dict[str, float] = {}
    if not prepare_demo_data(data, args.studies, args.seed, timings):
        return 1
    if args.data_only:
        print(f"{data}: the synthetic world and its text models are current")
        return 0
    pipeline = demo_pipeline(configs, data, out)
    extra = _overrides(args.override, FULL_METHOD)
    predictions, runs = run_pipeline(pipeline, FULL_METHOD, timings, args=extra)

    annotation = json.loads((data / "annotation.json").read_text())
    baseline = write_baseline(
        predictions, most_frequent_report(annotation, "iu_xray"), out / "baseline_predictions.jsonl"
    )
    ours = evaluate(predictions, "demo", labeler="demo")
    blind = evaluate(baseline, "demo", labeler="demo")
    timings["total"] = round(time.perf_counter() - start, 1)

    margin = ours["CE_F1_macro"] - blind["CE_F1_macro"]
    met = ours["CE_F1_macro"] >= TARGET_F1 and margin >= TARGET_MARGIN
    summary = {
        "ours": ours,
        "image_blind_baseline": blind,
        "target": {"macro_F1": TARGET_F1, "margin": TARGET_MARGIN, "met": met},
        "runs": {stage.config: str(runs[stage.name].run_dir) for stage in FULL_METHOD},
        "predictions": str(predictions),
        "wall_time_s": timings,
        "machine": machine(),
        "command": " ".join(["mambaxray-ctl", "demo", *sys.argv[2:]]),
    }
    if args.pointing_studies > 0:
        summary["pointing_game"] = _timed(
            "pointing game",
            timings,
            lambda: _pointing_game(predictions, data, args.pointing_studies, args.seed),
        )
        timings["total"] = round(time.perf_counter() - start, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")

    print(format_table(ours, "demo", "MambaXray-CTL (demo)"))
    print(format_table(blind, "demo", "image-blind baseline (most frequent training report)"))
    print(per_finding_table(ours, blind))
    pointing = summary.get("pointing_game", {})
    if "error" in pointing:
        print(f"\npointing game not measured: {pointing['error']}")
    elif pointing:
        print(f"\npointing game of the sentence heat maps (hit rate; {pointing['checkpoint']}):")
        print(format_pointing_table(pointing))
    verdict = "MET" if met else "MISSED"
    print(
        f"\nmacro clinical F1 {ours['CE_F1_macro']:.3f} vs baseline {blind['CE_F1_macro']:.3f} "
        f"(+{margin:.3f}): learning target {verdict} (≥ {TARGET_F1}, ≥ +{TARGET_MARGIN})"
    )
    steps = ", ".join(f"{name} {seconds:.0f}" for name, seconds in timings.items() if name != "total")
    print(f"wall time {timings['total']:.0f} s ({steps}) on {describe_machine(summary['machine'])}")
    print(f"written: {out / 'metrics.json'}")
    return 0


def _pointing_game(predictions: Path, data: Path, studies: int, seed: int) -> dict[str, Any]:
    """The pointing game of the checkpoint the predictions were made with (their rows record it), or
    ``{"error": ...}`` saying why it could not be measured (the rest of the demo stands)."""
    from mambaxray_ctl.evaluation.evaluate import read_prediction_rows

    try:
        checkpoint = read_prediction_rows(predictions)[0].get("checkpoint")
        if not checkpoint:
            raise ValueError(f"{predictions}: its rows do not record the checkpoint they were made with")
        return run_pointing_game(checkpoint, predictions, data, studies, seed)
    except (OSError, KeyError, ValueError) as exc:
        print(f"mambaxray-ctl demo: pointing game: error: {exc}", file=sys.stderr)
        return {"error": str(exc)}


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
