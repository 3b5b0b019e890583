"""The training pipeline, defined once: stage 1 → stage 2 → stage 3 → predict → evaluate.

Used by ``make stage1|stage2|stage3|predict|evaluate`` (through ``mambaxray-ctl pipeline``), by
``mambaxray-ctl demo`` and by ``mambaxray-ctl ablation``.

- **Stages** (:class:`Stage`): stage 1 (``arm``, ``mae`` or ``simclr``: ``configs/stage1_<method>.yaml``),
  stage 2 (``configs/stage2_contrastive.yaml``), stage 3 (``configs/stage3_reportgen.yaml``). Each
  writes its runs to ``<run root>/<stage>/version_*/`` (run root: ``outputs/<data>``).
- **Config composition** (:meth:`Pipeline.config_files`): ``configs/data/<data>.yaml``,
  ``configs/<stage config>.yaml``, ``configs/<data>/<stage config>.yaml`` when present, the recipe's
  ``configs/<recipe>/<data>/<stage config>.yaml`` when a recipe is chosen and has that file (e.g.
  ``configs/paper/iu_xray/stage2_contrastive.yaml``: it wins over the dataset overlay), then
  ``configs/trainer/<trainer>.yaml`` (trainer preset: ``cpu`` for the demo data, ``gpu`` otherwise; it
  comes last so that it sets the devices and strategy the recipe runs on).
  The run root and the run name (:attr:`Stage.name`) are set as arguments, so that the configs' logger
  ``save_dir`` / ``name`` (what a plain ``mambaxray-ctl fit -c ...`` uses) cannot send a step elsewhere.
  Overrides are nested config dicts (``{"trainer": {"max_epochs": 1}}``) applied after these files;
  extra command-line arguments come last.
- **Hand-off** (:func:`resolve_handoff`): stage N+1 initialises its backbone from the newest (by
  modification time) ``backbone.safetensors`` exported by stage N under its run root, or from an
  explicit file, or from nothing (``none``).
- **Which checkpoint to predict from** (:func:`choose_checkpoint`): the best checkpoint by
  ``val/score`` that stage 3's ``ModelCheckpoint`` keeps when validation ran, else ``last.ckpt``;
  a log line says which one and why.
- **The paper** (:func:`run_paper`, ``make paper``): stage 2 with the ``paper`` recipe from a given
  pretraining file (the paper does not retrain stage 1) → stage 3 from that stage-2 run's export →
  predict with its best checkpoint → evaluate; returns the metrics.
- **Predict** (:func:`predict`) writes ``predictions.jsonl`` for the test split into a new stage-3 run
  directory, from a checkpoint or a stage-3 model export (``model.safetensors``); **evaluate**
  (:func:`evaluate`) scores it with the paper's protocol, as ``mambaxray-ctl evaluate`` does
  (:func:`mambaxray_ctl.evaluation.evaluate.evaluate_file`), and writes the scores into the model card
  of the run that made the predictions.

Each step runs the LightningCLI in this process (:class:`~mambaxray_ctl.lightning_cli.MambaXrayCLI`);
its argument list is built in one place (:func:`_cli_args`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# A stage's backbone export in its run directory (``mambaxray_ctl.stages.base.EXPORT_NAME``; not imported
# from there, so that this module, and a step's errors, need neither torch nor Lightning).
EXPORT_NAME = "backbone.safetensors"
# The argument that sets the hand-off (the stage's first backbone weights), dotted. It is passed as a
# config (``{"model": {"init_args": {"handoff": {"source": ...}}}}``): on the command line
# ``--model.init_args.handoff.source=null`` would be read as the text "None", not as no hand-off.
HANDOFF_ARG = "model.init_args.handoff.source"
# The metric whose best checkpoint predict uses (stage 3's ModelCheckpoint monitors it).
PREDICT_MONITOR = "val/score"
LAST_CHECKPOINT = "last.ckpt"
# ``init`` of :func:`resolve_handoff` / :func:`fit_stage`: the newest export of the previous stage.
NEWEST = "newest"
DEMO_DATA = "demo"
# The paper's recipe (configs/paper/<data>/) and the trainer preset it runs on by default: 8 GPUs with DDP
# (configs/trainer/ddp8.yaml), the demo data on the CPU.
PAPER_RECIPE = "paper"
PAPER_TRAINER = "ddp8"

STAGE1_METHODS: dict[str, str] = {"arm": "stage1_arm", "mae": "stage1_mae", "simclr": "stage1_simclr"}

# A nested config dict, as in a config file: {"trainer": {"max_epochs": 1}}.
Overrides = Mapping[str, Any]


def predictions_name() -> str:
    """The predictions file of a predict run (``PredictionWriter``'s; imported here only when needed:
    its module imports Lightning, which ``mambaxray-ctl pipeline --help`` does not need)."""
    from mambaxray_ctl.callbacks.predictions import PREDICTIONS_NAME

    return PREDICTIONS_NAME


class PipelineError(Exception):
    """A pipeline step cannot start: a missing config, export or checkpoint; the message says what to do."""


@dataclass(frozen=True)
class Stage:
    """One training stage.

    Args:
        name: its run folder under the run root (``stage1``, ``stage2``, ``stage3``).
        config: its config name (``configs/<config>.yaml``, ``configs/<data>/<config>.yaml``).
        previous: the stage whose export it starts from (``None``: none).
    """

    name: str
    config: str
    previous: str | None = None


def stage1(method: str = "arm") -> Stage:
    """Stage 1 with a pretraining method: ``arm`` (the paper's), ``mae`` or ``simclr`` (Table II)."""
    if method not in STAGE1_METHODS:
        raise PipelineError(f"unknown stage-1 method {method!r}; choose one of {sorted(STAGE1_METHODS)}")
    return Stage("stage1", STAGE1_METHODS[method])


STAGE2 = Stage("stage2", "stage2_contrastive", previous="stage1")
STAGE3 = Stage("stage3", "stage3_reportgen", previous="stage2")
PREDICT_STAGE = STAGE3


def get_stage(name: str, method: str = "arm") -> Stage:
    """The stage called ``name`` (``stage1`` with ``method``, ``stage2``, ``stage3``)."""
    stages = {"stage1": stage1(method), "stage2": STAGE2, "stage3": STAGE3}
    if name not in stages:
        raise PipelineError(f"unknown stage {name!r}; choose one of {sorted(stages)}")
    return stages[name]


def default_trainer(data: str) -> str:
    """The trainer preset used when none is given: ``cpu`` for the demo data, ``gpu`` otherwise."""
    return "cpu" if data == DEMO_DATA else "gpu"


@dataclass(frozen=True)
class Pipeline:
    """Where and how the stages run.

    Args:
        data: the dataset config, ``configs/data/<data>.yaml`` (``demo``, ``iu_xray``, ...).
        trainer: the trainer preset, ``configs/trainer/<trainer>.yaml``; ``None``: :func:`default_trainer`.
        configs: the config folder.
        out: the run root (each stage in ``<out>/<stage>/version_*/``); ``None``: ``outputs/<data>``.
        overrides: nested config dicts applied to every stage and to predict (e.g. another data folder).
        recipe: a recipe folder, ``configs/<recipe>/`` (e.g. ``paper``): its ``<data>/<stage config>.yaml``
            is added after the dataset overlay and before the trainer preset; ``None``: none.
    """

    data: str = DEMO_DATA
    trainer: str | None = None
    configs: Path = Path("configs")
    out: Path | None = None
    overrides: tuple[Overrides, ...] = ()
    recipe: str | None = None

    @property
    def trainer_preset(self) -> str:
        return self.trainer or default_trainer(self.data)

    @property
    def runs_root(self) -> Path:
        return Path(self.out) if self.out is not None else Path("outputs") / self.data

    def stage_dir(self, stage: Stage | str) -> Path:
        """The folder of a stage's runs (``<run root>/<stage>``)."""
        return self.runs_root / (stage.name if isinstance(stage, Stage) else stage)

    def config_files(self, stage: Stage) -> list[Path]:
        """The config files of ``stage``, in order; raises :class:`PipelineError` for a missing one."""
        configs = Path(self.configs)
        data = _required(configs / "data" / f"{self.data}.yaml", "dataset", configs / "data")
        files = [data, _required(configs / f"{stage.config}.yaml", "stage config", configs)]
        specific = configs / self.data / f"{stage.config}.yaml"
        if specific.is_file():
            files.append(specific)
        if self.recipe is not None:
            recipe = configs / self.recipe / self.data
            if not recipe.is_dir():
                known = sorted(p.name for p in (configs / self.recipe).glob("*/") if p.is_dir())
                raise PipelineError(
                    f"recipe {self.recipe!r} has no settings for the dataset {self.data!r}: no {recipe}/; "
                    f"known: {', '.join(known) or 'none'}"
                )
            if (recipe / f"{stage.config}.yaml").is_file():
                files.append(recipe / f"{stage.config}.yaml")
        trainer = configs / "trainer" / f"{self.trainer_preset}.yaml"
        files.append(_required(trainer, "trainer preset", configs / "trainer"))
        return files


def _required(path: Path, what: str, folder: Path) -> Path:
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise PipelineError(f"unknown {what} {path.stem!r}: no {path}; known: {', '.join(known) or 'none'}")
    return path


# Runs on disk ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageRun:
    """One run of a stage: its directory, its backbone export and its checkpoints.

    ``best`` is the best checkpoint kept by the run's ``ModelCheckpoint`` by ``monitor`` (``None`` when
    it monitors nothing or the metric was never logged, e.g. no validation ran).
    """

    run_dir: Path
    export: Path | None = None
    last: Path | None = None
    best: Path | None = None
    best_score: float | None = None
    monitor: str | None = None

    @classmethod
    def from_dir(cls, run_dir: str | Path) -> StageRun:
        """The run in ``run_dir``; the best checkpoint is read from ``last.ckpt``'s ModelCheckpoint state."""
        run_dir = Path(run_dir)
        export = run_dir / EXPORT_NAME
        last = run_dir / "checkpoints" / LAST_CHECKPOINT
        best, score, monitor = _best_from_last(last) if last.exists() else (None, None, None)
        if best is not None and not best.exists():
            local = run_dir / "checkpoints" / best.name  # the run folder may have moved since
            best = local if local.exists() else best
        return cls(
            run_dir=run_dir,
            export=export if export.is_file() else None,
            last=last if last.exists() else None,
            best=best,
            best_score=score,
            monitor=monitor,
        )

    @classmethod
    def from_trainer(cls, trainer: Any) -> StageRun:
        """The run a Trainer has just finished (``best``/``last`` from its first ModelCheckpoint)."""
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        export = run_dir / EXPORT_NAME
        callback = trainer.checkpoint_callback
        last = best = score = monitor = None
        if callback is not None:
            last = Path(callback.last_model_path) if callback.last_model_path else None
            monitor = callback.monitor
            if monitor and callback.best_model_path:
                best = Path(callback.best_model_path)
                score = None if callback.best_model_score is None else float(callback.best_model_score)
        return cls(run_dir, export if export.is_file() else None, last, best, score, monitor)


def _best_from_last(last: Path) -> tuple[Path | None, float | None, str | None]:
    """(best path, its score, monitor) of the ModelCheckpoint monitoring :data:`PREDICT_MONITOR`, as
    recorded in a ``last.ckpt`` (a file, or DeepSpeed's folder); Nones when none is recorded."""
    import torch

    source = last / "checkpoint" / "mp_rank_00_model_states.pt" if last.is_dir() else last
    try:  # mmap: only the small pickled part is read, not the tensors
        checkpoint = torch.load(source, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # unreadable: predict falls back to last.ckpt and says why
        log.warning("%s: could not read its ModelCheckpoint state (%s)", source, exc)
        return None, None, None
    states = checkpoint.get("callbacks", {}) if isinstance(checkpoint, dict) else {}
    for state in states.values():
        if isinstance(state, dict) and state.get("monitor") == PREDICT_MONITOR:
            path, score = state.get("best_model_path"), state.get("best_model_score")
            return (Path(path) if path else None), (None if score is None else float(score)), PREDICT_MONITOR
    return None, None, None


def _newest(paths: Sequence[Path]) -> Path | None:
    return max(paths, key=lambda p: (p.stat().st_mtime, str(p)), default=None)


def newest_export(pipeline: Pipeline, stage: str) -> Path | None:
    """The newest ``backbone.safetensors`` under ``<run root>/<stage>/*/``."""
    return _newest(sorted(pipeline.stage_dir(stage).glob(f"*/{EXPORT_NAME}")))


def newest_run(pipeline: Pipeline, stage: str) -> StageRun | None:
    """The run of ``stage`` with the newest ``last.ckpt`` (predict runs, without checkpoints, are skipped)."""
    last = _newest(sorted(pipeline.stage_dir(stage).glob(f"*/checkpoints/{LAST_CHECKPOINT}")))
    return None if last is None else StageRun.from_dir(last.parent.parent)


# The rules ------------------------------------------------------------------------------------------------
def resolve_handoff(pipeline: Pipeline, stage: Stage, init: str | Path | None = NEWEST) -> Path | None:
    """The file ``stage`` starts its backbone from.

    ``init``: :data:`NEWEST` (the newest export of the previous stage; none for stage 1), a path, or
    ``None`` / ``"none"`` (no hand-off).
    """
    if init is None or str(init) == "none":
        return None
    if str(init) == NEWEST:
        if stage.previous is None:
            return None
        export = newest_export(pipeline, stage.previous)
        if export is None:
            prev, data = stage.previous, pipeline.data
            raise PipelineError(
                f"no {prev} export under {pipeline.stage_dir(prev)}/*/{EXPORT_NAME}: run `make {prev} "
                f"DATA={data}` (mambaxray-ctl pipeline {prev} --data {data}) first, or pass INIT=path "
                f"(--init PATH) to start {stage.name} from another file, or INIT=none (--init none) to "
                "start it with no hand-off"
            )
        log.info("%s: hand-off from the newest %s export %s", stage.name, stage.previous, export)
        return export
    path = Path(init)
    if not path.exists():
        raise PipelineError(f"{stage.name}: the hand-off file {path} does not exist")
    return path


@dataclass(frozen=True)
class CheckpointChoice:
    """The checkpoint to predict from, and why it was chosen."""

    path: Path
    reason: str


def choose_checkpoint(run: StageRun) -> CheckpointChoice:
    """The checkpoint of a stage-3 run to predict from: the best by ``val/score`` that its
    ModelCheckpoint kept when validation ran, else ``last.ckpt``. Logs the choice and its reason."""
    tracked = run.monitor == PREDICT_MONITOR
    if tracked and run.best is not None and run.best.exists():
        score = "" if run.best_score is None else f" {run.best_score:.4f}"
        choice = CheckpointChoice(run.best, f"the best {PREDICT_MONITOR}{score} of the run's validations")
    elif run.last is not None:
        if tracked and run.best is not None:
            why = f"the best {PREDICT_MONITOR} checkpoint it records, {run.best}, is missing"
        elif tracked or run.monitor is None:
            why = f"no {PREDICT_MONITOR} was recorded (no validation ran)"
        else:
            why = f"its ModelCheckpoint monitors {run.monitor}, not {PREDICT_MONITOR}"
        choice = CheckpointChoice(run.last, f"{LAST_CHECKPOINT}: {why}")
    else:
        raise PipelineError(f"{run.run_dir}: no checkpoint (checkpoints/{LAST_CHECKPOINT}) in this run")
    log.info("predict: from %s (%s)", choice.path, choice.reason)
    return choice


def predict_checkpoint(pipeline: Pipeline, ckpt: str | Path | StageRun | None = None) -> CheckpointChoice:
    """The checkpoint :func:`predict` uses: ``ckpt`` (a checkpoint, or a stage-3 run: its rule), else the
    newest stage-3 run's by :func:`choose_checkpoint`."""
    if isinstance(ckpt, StageRun):
        return choose_checkpoint(ckpt)
    if ckpt is not None:
        path = Path(ckpt)
        if (path / "checkpoints").is_dir():
            return choose_checkpoint(StageRun.from_dir(path))
        if not path.exists():
            raise PipelineError(f"predict: the checkpoint {path} does not exist")
        choice = CheckpointChoice(path, "given explicitly")
        log.info("predict: from %s (%s)", choice.path, choice.reason)
        return choice
    run = newest_run(pipeline, PREDICT_STAGE.name)
    if run is None:
        stage, data = PREDICT_STAGE.name, pipeline.data
        raise PipelineError(
            f"no {stage} checkpoint under {pipeline.stage_dir(stage)}/*/checkpoints/: run `make {stage} "
            f"DATA={data}` (mambaxray-ctl pipeline {stage} --data {data}) first, or pass CKPT=path "
            "(--ckpt PATH)"
        )
    return choose_checkpoint(run)


# Running the LightningCLI ---------------------------------------------------------------------------------
_UNSET: Any = object()


def nested(dotted: str, value: Any) -> dict[str, Any]:
    """``"a.b.c", v`` → ``{"a": {"b": {"c": v}}}`` (a dotted argument as a config)."""
    head, _, rest = dotted.partition(".")
    return {head: nested(rest, value) if rest else value}


def _cli_args(
    pipeline: Pipeline,
    command: str,
    stage: Stage,
    overrides: Sequence[Overrides] = (),
    args: Sequence[str] = (),
    handoff: Path | None = _UNSET,
    ckpt: Path | None = None,
) -> list[str]:
    """The LightningCLI argument list of one step: config files, run root and run name (the stage's
    folder under it), overrides and the hand-off (each a config given as a JSON string), the checkpoint,
    then ``args``."""
    argv = [command]
    for path in pipeline.config_files(stage):
        argv += ["-c", str(path)]
    argv.append(f"--trainer.logger.init_args.save_dir={pipeline.runs_root}")
    argv.append(f"--trainer.logger.init_args.name={stage.name}")
    configs = [*pipeline.overrides, *overrides]
    if handoff is not _UNSET:
        configs.append(nested(HANDOFF_ARG, None if handoff is None else str(handoff)))
    for config in configs:
        argv += ["-c", json.dumps(config, default=str)]
    if ckpt is not None:
        argv.append(f"--ckpt_path={ckpt}")
    return [*argv, *args]


def _run_cli(argv: list[str]) -> Any:
    """Run the LightningCLI on ``argv`` in this process (``sys.argv`` is kept: Lightning's DDP launcher
    starts the other ranks with it; MambaXrayCLI does not warn about ``args`` beside it)."""
    from mambaxray_ctl.lightning_cli import MambaXrayCLI

    log.debug("LightningCLI %s", argv)
    return MambaXrayCLI(args=argv)


# The steps ------------------------------------------------------------------------------------------------
def fit_stage(
    pipeline: Pipeline,
    stage: Stage,
    init: str | Path | None = NEWEST,
    overrides: Sequence[Overrides] = (),
    args: Sequence[str] = (),
) -> StageRun:
    """Train ``stage`` (``fit``) from the hand-off :func:`resolve_handoff` gives for ``init``.

    ``overrides``: nested config dicts after the config files; ``args``: extra CLI arguments, last.
    """
    pipeline.config_files(stage)  # a missing config is reported before a missing hand-off
    handoff = resolve_handoff(pipeline, stage, init)
    # stage 1 by default: no hand-off argument at all (its config's); otherwise the resolved file or null
    given = {} if handoff is None and str(init) == NEWEST else {"handoff": handoff}
    cli = _run_cli(_cli_args(pipeline, "fit", stage, overrides, args, **given))
    run = StageRun.from_trainer(cli.trainer)
    log.info("%s: run %s, export %s", stage.name, run.run_dir, run.export or "none")
    return run


def fit_chain(
    pipeline: Pipeline,
    stages: Sequence[Stage],
    overrides: Mapping[str, Sequence[Overrides]] | None = None,
    args: Mapping[str, Sequence[str]] | None = None,
    runner: Callable[[Stage, Callable[[], StageRun]], StageRun] | None = None,
) -> dict[str, StageRun]:
    """Train ``stages`` in order, each from the export of the one before (the first with no hand-off).

    ``overrides`` / ``args`` map a stage name to its overrides / extra CLI arguments; ``runner(stage,
    step)`` runs each step (e.g. to time it). Returns the runs by stage name.
    """
    overrides, args = overrides or {}, args or {}
    runs: dict[str, StageRun] = {}
    previous: StageRun | None = None
    for stage in stages:
        if previous is not None and previous.export is None:
            raise PipelineError(f"{stage.name}: the previous run {previous.run_dir} exported no backbone")
        init = previous.export if previous is not None else None

        def step(stage: Stage = stage, init: Path | None = init) -> StageRun:
            extra_overrides, extra_args = overrides.get(stage.name, ()), args.get(stage.name, ())
            return fit_stage(pipeline, stage, init, extra_overrides, extra_args)

        previous = runs[stage.name] = runner(stage, step) if runner else step()
    return runs


def predict(
    pipeline: Pipeline,
    ckpt: str | Path | StageRun | CheckpointChoice | None = None,
    overrides: Sequence[Overrides] = (),
    args: Sequence[str] = (),
) -> Path:
    """Write ``predictions.jsonl`` for the test split with a stage-3 checkpoint (see
    :func:`predict_checkpoint`); returns its path."""
    pipeline.config_files(PREDICT_STAGE)  # a missing config is reported before a missing checkpoint
    choice = ckpt if isinstance(ckpt, CheckpointChoice) else predict_checkpoint(pipeline, ckpt)
    cli = _run_cli(_cli_args(pipeline, "predict", PREDICT_STAGE, overrides, args, ckpt=choice.path))
    return Path(cli.trainer.log_dir) / predictions_name()


def newest_predictions(pipeline: Pipeline) -> Path | None:
    """The newest ``predictions.jsonl`` under the stage-3 runs."""
    return _newest(sorted(pipeline.stage_dir(PREDICT_STAGE).glob(f"*/{predictions_name()}")))


def evaluate(
    predictions: str | Path, data: str, labeler: str | None = "auto", out: str | Path | None = None
) -> dict[str, Any]:
    """The paper's metrics of a predictions file of dataset ``data``, as ``mambaxray-ctl evaluate``
    computes them (:func:`~mambaxray_ctl.evaluation.evaluate.evaluate_file`); also written to ``out``
    if given.

    ``labeler``: ``auto`` (that command's default: the demo labeller for the demo data, none
    otherwise), a labeller spec, or ``None`` / ``none`` (no clinical scores).

    The scores also go into the metrics section of the ``MODEL_CARD.md`` of the stage-3 run whose
    checkpoint or model export made the predictions, when it has one (:func:`record_in_model_card`).
    """
    from mambaxray_ctl.evaluation.evaluate import evaluate_file

    metrics = evaluate_file(predictions, data, labeler=labeler, out=out)
    record_in_model_card(metrics, out)
    return metrics


def record_in_model_card(metrics: Mapping[str, Any], out: str | Path | None = None) -> Path | None:
    """Rewrite the metrics section of the model card of the run that wrote ``metrics["checkpoint"]``
    (``<run>/MODEL_CARD.md``, written with its ``model.safetensors``); returns the card, or ``None``
    when there is none. A card without its metrics section is left alone, with a warning.

    The section names the file that made the predictions and whether it is the card's own export
    (:func:`~mambaxray_ctl.stages.export.scored_file`), then the table ``mambaxray-ctl evaluate``
    prints, with the labeller's micro, macro and subset CE rows when it has subsets (CheXbert's).
    """
    from mambaxray_ctl.evaluation.evaluate import format_clinical, format_table
    from mambaxray_ctl.stages.export import ModelExportError, model_card_of, scored_file, write_card_metrics

    card = model_card_of(metrics.get("checkpoint"))
    if card is None:
        return None
    predictions = Path(metrics["predictions"])
    where = f"; every score in `{out}`" if out is not None else ""
    table = format_table(dict(metrics), metrics["dataset"], predictions.name)
    if metrics.get("clinical_subsets"):
        table += f"\n{format_clinical(dict(metrics))}"
    text = (
        f"**Scored: {scored_file(card, metrics['checkpoint'])}.**\n\n"
        f"Scores of `{predictions}` ({metrics['num_studies']} studies of predict's split, test unless "
        f"changed; {metrics['reference_source']} references), written by the pipeline's evaluate "
        f"step{where}:\n\n```text\n{table}\n```"
    )
    try:
        write_card_metrics(card, text)
    except ModelExportError as exc:
        log.warning("%s", exc)
        return None
    log.info("model card %s: metrics updated", card)
    return card


# The paper ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PaperRun:
    """What :func:`run_paper` did: the two stage runs, the checkpoint predicted from, the predictions and
    their metrics (``None`` on DDP ranks other than 0, which do not score)."""

    stage2: StageRun
    stage3: StageRun
    checkpoint: CheckpointChoice
    predictions: Path
    metrics: dict[str, Any] | None


def paper_pretraining(pipeline: Pipeline, init: str | Path | None = None) -> Path:
    """The file the paper's stage 2 starts from: ``init``; else, for the demo data only (or with ``init``
    :data:`NEWEST`), the newest stage-1 export. The paper does not retrain stage 1: on real data the
    official ARM pretraining weights are passed (MambaXray-VL's ``Pretrain-L.pth``)."""
    if init is not None and str(init) != NEWEST:
        path = Path(init)
        if not path.is_file():
            raise PipelineError(f"paper: the pretraining file {path} (PRETRAIN, --init) does not exist")
        return path
    data = pipeline.data
    if init is None and data != DEMO_DATA:
        raise PipelineError(
            f"paper: no pretraining file: pass PRETRAIN=path/to/official_pretrain.pth (--init PATH), e.g. "
            "MambaXray-VL's Pretrain-L.pth; the paper starts stage 2 from those ARM pretraining weights and "
            f"does not retrain stage 1 (or run `make stage1 DATA={data}` and pass PRETRAIN=newest)"
        )
    export = newest_export(pipeline, "stage1")
    if export is None:
        raise PipelineError(
            f"paper: no stage-1 export under {pipeline.stage_dir('stage1')}/*/{EXPORT_NAME}: run make "
            f"stage1 DATA={data} first or pass PRETRAIN=path (--init PATH)"
        )
    log.info("paper: stage 2 from the newest stage-1 export %s", export)
    return export


def _is_rank_zero() -> bool:
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def run_paper(
    pipeline: Pipeline,
    init: str | Path | None = None,
    init_format: str = "auto",
    overrides: Mapping[str, Sequence[Overrides]] | None = None,
    args: Mapping[str, Sequence[str]] | None = None,
    labeler: str | None = "auto",
) -> PaperRun:
    """The paper's method with its recipe (``pipeline.recipe``, default :data:`PAPER_RECIPE`): stage 2
    from the pretraining file (:func:`paper_pretraining`; ``init_format``: ``auto`` detects it, or one of
    ``handoff.format``'s, e.g. ``arm-pretrain``) → stage 3 from that stage-2 run's export → predict with
    the stage-3 run's checkpoint (:func:`choose_checkpoint`: the best ``val/score``) → evaluate
    (:func:`evaluate`, written beside the predictions).

    ``overrides`` / ``args`` map a step (``stage2``, ``stage3``, ``predict``) to its overrides / extra CLI
    arguments. Under DDP every rank runs this (Lightning starts the other ranks with the same command);
    only rank 0 scores.
    """
    from mambaxray_ctl.evaluation.evaluate import metrics_path

    if pipeline.recipe is None:
        pipeline = replace(pipeline, recipe=PAPER_RECIPE)
    overrides, args = overrides or {}, args or {}
    for stage in (STAGE2, STAGE3):  # a missing config is reported before anything trains
        pipeline.config_files(stage)
    pretraining = paper_pretraining(pipeline, init)
    given_format = [] if init_format == "auto" else [nested("model.init_args.handoff.format", init_format)]
    log.info("paper: stage 2 from %s (format %s), recipe %s", pretraining, init_format, pipeline.recipe)
    stage2 = fit_stage(
        pipeline, STAGE2, pretraining, [*given_format, *overrides.get("stage2", ())], args.get("stage2", ())
    )
    if stage2.export is None:
        raise PipelineError(f"paper: the stage-2 run {stage2.run_dir} exported no backbone")
    stage3 = fit_stage(pipeline, STAGE3, stage2.export, overrides.get("stage3", ()), args.get("stage3", ()))
    choice = choose_checkpoint(stage3)
    predictions = predict(pipeline, choice, overrides.get("predict", ()), args.get("predict", ()))
    metrics = None
    if _is_rank_zero():
        metrics = evaluate(predictions, pipeline.data, labeler=labeler, out=metrics_path(predictions))
    return PaperRun(stage2, stage3, choice, predictions, metrics)


# ``mambaxray-ctl pipeline`` ------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Arguments after `--` go to the LightningCLI, e.g. "
        "`mambaxray-ctl pipeline stage2 --data iu_xray -- --trainer.max_epochs=2`."
    )
    steps = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    helps = {
        "stage1": "stage 1 (pretraining; --method arm|mae|simclr)",
        "stage2": "stage 2 (contrastive) from the newest stage-1 export (or --init PATH|none)",
        "stage3": "stage 3 (report generation) from the newest stage-2 export (or --init PATH|none)",
        "predict": "predictions.jsonl for the test split (default checkpoint: the newest stage-3 run's "
        "best by val/score when validation ran, else its last.ckpt)",
        "evaluate": "score a predictions.jsonl (default: the newest one of the stage-3 runs)",
        "paper": "the paper's recipe (configs/paper/DATA/): stage 2 from a pretraining file (--init PATH; "
        "the demo data: the newest stage-1 export) -> stage 3 from that run -> predict -> evaluate",
    }
    for name, help_ in helps.items():
        step = steps.add_parser(name, help=help_, description=help_)
        step.add_argument("--data", default=DEMO_DATA, help="dataset: configs/data/DATA.yaml (default: demo)")
        if name == "evaluate":
            step.add_argument("--predictions", type=Path, default=None, help="predictions file")
            step.add_argument("--out", type=Path, default=None, help="run root (default: outputs/DATA)")
            continue
        step.add_argument(
            "--trainer",
            default=None,
            help="trainer preset: configs/trainer/TRAINER.yaml (default: cpu for the demo data, "
            + (f"{PAPER_TRAINER} otherwise: 8 GPUs)" if name == "paper" else "gpu otherwise)"),
        )
        step.add_argument("--configs", type=Path, default=Path("configs"), help="config folder")
        step.add_argument("--out", type=Path, default=None, help="run root (default: outputs/DATA)")
        step.add_argument(
            "--recipe",
            default=PAPER_RECIPE if name == "paper" else None,
            help="recipe: adds configs/RECIPE/DATA/<stage config>.yaml where present, before the trainer "
            f"preset (default: {PAPER_RECIPE if name == 'paper' else 'none'})",
        )
        if name == "paper":
            step.add_argument(
                "--init",
                default=None,
                help="the pretraining file stage 2 starts from (the official ARM weights, e.g. "
                "Pretrain-L.pth), or newest (the newest stage-1 export; the default for the demo data)",
            )
            step.add_argument(
                "--init-format",
                default="auto",
                help="its format: auto (detected), arm-pretrain, mambaxray-vl, vim or backbone",
            )
            step.add_argument(
                "args", nargs="*", metavar="-- ARGS", help="extra LightningCLI arguments (each step)"
            )
            continue
        if name == "stage1":
            step.add_argument("--method", choices=sorted(STAGE1_METHODS), default="arm", help="default: arm")
        if name == "predict":
            step.add_argument(
                "--ckpt",
                default=None,
                help="a checkpoint, a model export (model.safetensors) or a stage-3 run folder",
            )
        else:
            step.add_argument(
                "--init",
                default=NEWEST,
                help="hand-off: PATH, none, or newest (default: the previous stage's newest export; none for "
                "stage 1)",
            )
        step.add_argument("args", nargs="*", metavar="-- ARGS", help="extra LightningCLI arguments")


def run(args: argparse.Namespace) -> int:
    try:
        return _run_step(args)
    except PipelineError as exc:
        print(f"mambaxray-ctl pipeline {args.step}: error: {exc}", file=sys.stderr)
        return 2


def _run_step(args: argparse.Namespace) -> int:
    if args.step == "evaluate":
        pipeline = Pipeline(data=args.data, out=args.out)
        predictions = args.predictions or newest_predictions(pipeline)
        if predictions is None:
            raise PipelineError(
                f"no {predictions_name()} under {pipeline.stage_dir(PREDICT_STAGE)}/*/: run `make "
                f"predict DATA={args.data}` first, or pass PRED=path (--predictions PATH)"
            )
        return _evaluate_step(Path(predictions), args.data)
    if args.step == "paper":
        return _paper_step(args)
    pipeline = Pipeline(
        data=args.data, trainer=args.trainer, configs=args.configs, out=args.out, recipe=args.recipe
    )
    # no prints here: under DDP every rank runs this command (the log lines are rank 0's)
    if args.step == "predict":
        log.info("predictions: %s", predict(pipeline, args.ckpt, args=args.args))
        return 0
    fit_stage(pipeline, get_stage(args.step, getattr(args, "method", "arm")), args.init, args=args.args)
    return 0


def _paper_step(args: argparse.Namespace) -> int:
    """``mambaxray-ctl pipeline paper``: :func:`run_paper`; rank 0 prints the metrics table."""
    from mambaxray_ctl.evaluation.evaluate import metrics_path, print_report

    trainer = args.trainer or ("cpu" if args.data == DEMO_DATA else PAPER_TRAINER)
    pipeline = Pipeline(
        data=args.data, trainer=trainer, configs=args.configs, out=args.out, recipe=args.recipe
    )
    steps = {step: args.args for step in ("stage2", "stage3", "predict")}
    done = run_paper(pipeline, args.init, args.init_format, args=steps)
    if done.metrics is not None:
        print_report(done.metrics, done.predictions.name, metrics_path(done.predictions))
    return 0


def _evaluate_step(predictions: Path, data: str) -> int:
    """``mambaxray-ctl evaluate PREDICTIONS --dataset DATA``: the same scores, file and report."""
    from mambaxray_ctl.evaluation.evaluate import metrics_path, print_report

    out = metrics_path(predictions)
    try:
        metrics = evaluate(predictions, data, out=out)
    except (OSError, ValueError, RuntimeError) as exc:
        raise PipelineError(str(exc)) from exc
    print_report(metrics, predictions.name, out)
    return 0
