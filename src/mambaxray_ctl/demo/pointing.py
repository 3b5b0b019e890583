"""The pointing game on the synthetic world: do the sentence heat maps point at the finding a sentence
names? (docs/METHOD.md#heat-maps)

For each study and each sentence of its generated report that names a finding
(:func:`~mambaxray_ctl.demo.labeller.extract_labels` on the sentence) which the study really has, the
sentence's heat map (:func:`~mambaxray_ctl.stages.attribution.sentence_heat_maps`) on the **frontal**
view scores a hit when its maximum cell lies in the finding's region (``regions.json``, recorded by the
renderer). Rules:

* Region → cells: a cell of the patch grid is inside when it overlaps one of the region's boxes by
  any area (a 20-mm nodule is smaller than a 16-pixel cell at 96 px; a centre-inside rule would miss
  it). A sentence naming several present findings ("bilateral effusions") targets the union of their
  regions, and counts once under each of them.
* Ties: when several cells share the maximum (within 1e-6 of it), the score is the fraction of them
  inside: the expected hit of breaking the tie at random. An all-zero map thus scores the region's
  share of the grid.
* Only the frontal view is scored: the lateral view superimposes both sides (left and right findings
  share their regions there) and shows no pneumothorax.
* A sentence naming a finding the study does not have has no region; it is counted (``unscorable``),
  not scored.

Beside the heat maps of the trained model, on the same sentences: the same model with its backbone
re-initialised as its preset builds it (trained mapper and LM: what the backbone's training adds),
a centre-of-lung prior (:func:`lung_prior`: a fixed map peaking at each lung's centre) and a seeded
random map, with the random map's expected score (the region's share of the grid).
"""

from __future__ import annotations

import copy
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from mambaxray_ctl.data.cleaning import split_sentences
from mambaxray_ctl.demo.findings import LABEL_NAMES
from mambaxray_ctl.demo.labeller import extract_labels
from mambaxray_ctl.demo.render import Box, Regions
from mambaxray_ctl.demo.world import read_regions
from mambaxray_ctl.stages.attribution import AttributedTokens, sentence_heat_maps

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from mambaxray_ctl.stages.reportgen import ReportGenModule

SCORED_VIEW = 0  # the frontal view
METHODS = ("heat map", "untrained backbone", "lung prior", "random map", "random expected")
# Lung centres in normalised (x, y): frontal, the renderer's lung ellipses at the mean patient size
# (centre 0.5 ± 0.165 × 0.97, y 0.50); lateral, its single lung field.
LUNG_CENTRES = {0: ((0.34, 0.50), (0.66, 0.50)), 1: ((0.53, 0.48),)}
PRIOR_SIGMA = 0.12  # width of each peak, as a fraction of the image
TIE_TOLERANCE = 1e-6
DEFAULT_STUDIES = 120


@dataclass(frozen=True)
class Study:
    """One study to score: its id, images ``(views, C, H, W)`` as the model takes them, view mask
    ``(views,)`` and generated report."""

    id: str
    images: Tensor
    view_mask: Tensor
    report: str


def region_cells(boxes: Sequence[Box], grid: tuple[int, int]) -> np.ndarray:
    """Cells of a ``grid`` (rows, columns) over the image that overlap any of ``boxes`` (normalised
    ``x0, y0, x1, y1``) by a positive area: a boolean ``(rows, columns)`` array."""
    rows, cols = grid
    inside = np.zeros(grid, dtype=bool)
    top, left = np.arange(rows)[:, None] / rows, np.arange(cols)[None, :] / cols
    bottom, right = top + 1 / rows, left + 1 / cols
    for x0, y0, x1, y1 in boxes:
        inside |= (left < x1) & (right > x0) & (top < y1) & (bottom > y0)
    return inside


def pointing_score(heat: np.ndarray, cells: np.ndarray) -> float:
    """The hit of ``heat``'s maximum in ``cells`` (same shape): the fraction of the maximal cells
    (within :data:`TIE_TOLERANCE` of the maximum, relative) that are inside."""
    peak = float(heat.max())
    maximal = heat >= peak - TIE_TOLERANCE * max(abs(peak), 1e-12)
    return float((maximal & cells).sum() / maximal.sum())


def lung_prior(grid: tuple[int, int], view: int = SCORED_VIEW) -> np.ndarray:
    """A fixed map peaking at each lung's centre (:data:`LUNG_CENTRES` of ``view``): at each cell
    centre, the largest Gaussian ``exp(-d² / 2σ²)``, σ = :data:`PRIOR_SIGMA`."""
    rows, cols = grid
    y, x = (np.arange(rows)[:, None] + 0.5) / rows, (np.arange(cols)[None, :] + 0.5) / cols
    peaks = [np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * PRIOR_SIGMA**2)) for cx, cy in LUNG_CENTRES[view]]
    return np.maximum.reduce(peaks)


def named_findings(sentence: str) -> list[str]:
    """The findings (label names) a sentence asserts, by the demo labeller."""
    return [name for name, value in zip(LABEL_NAMES, extract_labels(sentence), strict=True) if value]


def scored_findings(sentence: str, present: Regions) -> list[str]:
    """The findings ``sentence`` names that have a region in ``present`` (one view's regions)."""
    return [name for name in named_findings(sentence) if name in present]


def untrained_backbone(module: ReportGenModule, seed: int = 0) -> ReportGenModule:
    """A copy of ``module`` whose backbone is re-initialised as its preset builds it (seeded); the
    mapper and LM keep their weights."""
    untrained = copy.deepcopy(module)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = module.build_backbone()
    untrained.backbone.load_state_dict(fresh.state_dict())
    return untrained.eval()


def pointing_game(
    module: ReportGenModule,
    studies: Iterable[Study],
    regions: Mapping[str, Sequence[Regions]],
    seed: int = 0,
    tokens: AttributedTokens = "patches",
) -> dict[str, Any]:
    """Hit rates per finding and overall of :data:`METHODS` on the sentences of ``studies`` that name a
    finding the study has (module docstring). ``regions`` maps a study id to its regions per view;
    ``tokens``: where the heat maps are taken (:func:`sentence_heat_maps`)."""
    untrained = untrained_backbone(module, seed)
    rng = np.random.default_rng(seed)
    hits: dict[str, dict[str, list[float]]] = {}
    counts = {"studies": 0, "sentences": 0, "naming_a_finding": 0, "unscorable": 0}
    for study in studies:
        if study.id not in regions:
            raise KeyError(f"study {study.id!r} has no regions in the world's regions file")
        present = regions[study.id][SCORED_VIEW]
        trained_maps = sentence_heat_maps(module, study.images, study.view_mask, study.report, tokens)
        untrained_maps = sentence_heat_maps(untrained, study.images, study.view_mask, study.report, tokens)
        counts["studies"] += 1
        counts["sentences"] += len(trained_maps)
        for trained, baseline in zip(trained_maps, untrained_maps, strict=True):
            named = named_findings(trained.sentence)
            counts["naming_a_finding"] += bool(named)
            targets = scored_findings(trained.sentence, present)
            if not targets:
                counts["unscorable"] += bool(named)
                continue
            grid = tuple(trained.maps.shape[1:])
            cells = region_cells([box for name in targets for box in present[name]], grid)
            scores = {
                "heat map": pointing_score(trained.maps[SCORED_VIEW].numpy(), cells),
                "untrained backbone": pointing_score(baseline.maps[SCORED_VIEW].numpy(), cells),
                "lung prior": pointing_score(lung_prior(grid), cells),
                "random map": pointing_score(rng.random(grid), cells),
                "random expected": float(cells.mean()),
            }
            for name in targets:
                for method, score in scores.items():
                    hits.setdefault(name, {m: [] for m in METHODS})[method].append(score)
    return {**summarize(hits, counts), "tokens": tokens}


def summarize(hits: Mapping[str, Mapping[str, list[float]]], counts: Mapping[str, int]) -> dict[str, Any]:
    """Mean hit per finding (label order) and over every scored (sentence, finding) pair (``None``
    when there is none)."""
    per_finding = {
        name: {"n": len(hits[name]["heat map"]), **{m: float(np.mean(hits[name][m])) for m in METHODS}}
        for name in LABEL_NAMES
        if name in hits
    }
    pooled = {m: [score for name in hits for score in hits[name][m]] for m in METHODS}
    overall = {
        "n": len(pooled["heat map"]),
        **{m: float(np.mean(v)) if v else None for m, v in pooled.items()},
    }
    return {
        "per_finding": per_finding,
        "overall": overall,
        "counts": dict(counts),
        "rules": {
            "view": "frontal",
            "hit": "the map's maximum cell inside the region (ties: the fraction of maximal cells inside)",
            "cells": "a cell is inside when it overlaps a region box by any area",
            "untrained backbone": "trained mapper and LM, backbone re-initialised as its preset builds it",
        },
    }


def format_pointing_table(result: Mapping[str, Any]) -> str:
    """The pointing-game table: one row per finding and the overall row, one column per method."""
    header = f"{'finding':<34} {'n':>4} " + " ".join(f"{m:>18}" for m in METHODS)
    rows = [*result["per_finding"].items(), ("overall", result["overall"])]
    lines = [header]
    for name, row in rows:
        values = (f"{row[m]:>18.3f}" if row[m] is not None else f"{'-':>18}" for m in METHODS)
        lines.append(f"{name:<34} {row['n']:>4} " + " ".join(values))
    counts = result["counts"]
    lines.append(
        f"{counts['studies']} studies, {counts['sentences']} sentences, {counts['naming_a_finding']} "
        f"naming a finding, {counts['unscorable']} of them naming one the study does not have (not scored)"
    )
    return "\n".join(lines)


def demo_studies(
    checkpoint: str | Path, predictions: str | Path, world: str | Path, count: int
) -> list[Study]:
    """The first ``count`` test studies of ``world`` as the checkpoint's DataModule loads them, each
    with its generated report from ``predictions``."""
    from mambaxray_ctl.evaluation.qualitative import load_predictions, study_loader

    world = Path(world)
    generated = {row["id"]: row["generated"] for row in load_predictions(predictions)}
    loader = study_loader(checkpoint, "test", world / "annotation.json", world / "images", batch_size=16)
    studies: list[Study] = []
    for batch in loader:
        for index, sid in enumerate(batch["ids"]):
            if len(studies) == count:
                return studies
            if sid not in generated:
                raise KeyError(f"{predictions}: no prediction for test study {sid!r}")
            studies.append(Study(sid, batch["images"][index], batch["view_mask"][index], generated[sid]))
    return studies


def study_figure(module: ReportGenModule, study: Study, world: str | Path) -> Figure:
    """The heat map of every sentence of ``study``'s report on each of its views (rows: sentences,
    columns: views), over the images of ``world``; on the frontal view, the regions of the present
    findings the sentence names (white boxes) and the map's maximum (a cross)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from mambaxray_ctl.callbacks.images import overlay
    from mambaxray_ctl.evaluation.explain import grey_view
    from mambaxray_ctl.evaluation.qualitative import study_image_paths

    world = Path(world)
    greys = [grey_view(p) for p in study_image_paths(study.id, world / "images", world / "annotation.json")]
    present = read_regions(world)[study.id][SCORED_VIEW]
    maps = sentence_heat_maps(module, study.images, study.view_mask, study.report)
    fig = Figure(figsize=(2.6 * len(greys) + 0.4, 2.9 * max(1, len(maps))), layout="constrained")
    axes = fig.subplots(max(1, len(maps)), len(greys), squeeze=False)
    for row, item in zip(axes, maps, strict=False):
        heat = item.maps.numpy()
        targets = scored_findings(item.sentence, present)
        for view, (ax, grey) in enumerate(zip(row, greys, strict=True)):
            ax.imshow(overlay(grey, heat[view], float(heat.max())))
            ax.set_xticks([])
            ax.set_yticks([])
            if view != SCORED_VIEW:
                continue
            height, width = grey.shape
            for x0, y0, x1, y1 in (box for name in targets for box in present[name]):
                corner, size = (x0 * width, y0 * height), ((x1 - x0) * width, (y1 - y0) * height)
                ax.add_patch(Rectangle(corner, *size, fill=False, edgecolor="white", linewidth=1.2))
            peak_row, peak_col = np.unravel_index(int(heat[view].argmax()), heat[view].shape)
            cell_h, cell_w = height / heat.shape[1], width / heat.shape[2]
            ax.plot((peak_col + 0.5) * cell_w, (peak_row + 0.5) * cell_h, "w+", markersize=10)
        row[0].set_title(textwrap.fill(item.sentence, 40), fontsize=8, loc="left")
    fig.suptitle(f"study {study.id}", fontsize=10)
    return fig


def first_naming_a_finding(studies: Sequence[Study], regions: Mapping[str, Sequence[Regions]]) -> Study:
    """The first study whose report has a sentence naming a finding the study has.

    :raises ValueError: none has.
    """
    for study in studies:
        if any(scored_findings(s, regions[study.id][SCORED_VIEW]) for s in split_sentences(study.report)):
            return study
    raise ValueError(f"none of the {len(studies)} studies has a sentence naming a finding it has")


def run_pointing_game(
    checkpoint: str | Path,
    predictions: str | Path,
    world: str | Path,
    studies: int = DEFAULT_STUDIES,
    seed: int = 0,
    llm: str | None = None,
    tokens: AttributedTokens = "patches",
) -> dict[str, Any]:
    """The pointing game of a stage-3 ``checkpoint`` on the first ``studies`` test studies of
    ``world``, with the reports it generated in ``predictions``.

    :raises FileNotFoundError: the world has no ``regions.json`` (an older world; the message says
        how to add it).
    """
    from mambaxray_ctl.evaluation.qualitative import load_stage3

    regions = read_regions(world)
    module = load_stage3(checkpoint, llm)
    threads = torch.get_num_threads()
    # One thread: the demo model's operations are tiny, and two threads per operation on a shared
    # 2-core machine measured 9x to 40x slower (0.17 s per study with one).
    torch.set_num_threads(1)
    try:
        studied = demo_studies(checkpoint, predictions, world, studies)
        result = pointing_game(module, studied, regions, seed, tokens)
    finally:
        torch.set_num_threads(threads)
    result["checkpoint"] = str(checkpoint)
    result["seed"] = seed
    return result
