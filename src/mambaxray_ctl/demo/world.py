"""A synthetic chest X-ray world: radiograph-like frontal and lateral views whose findings are
visible in the pixels and determine a radiology-style report.

``mambaxray-ctl make-demo-data --out data/demo --n 2400 --seed 0`` writes
``<out>/images/<id>/0.png`` (frontal, PA), ``<out>/images/<id>/1.png`` (lateral) and
``<out>/annotation.json`` (R2Gen format, 70/10/20 train/val/test, a ``labels`` list per study and
the top-level ``label_names``). Everything is a function of ``(seed, study index)``: the same seed
gives the same files whatever the number of worker processes.

Findings and how they look (frontal view; the patient's left is on the image's right):

* cardiomegaly — cardiothoracic ratio 0.58–0.68 instead of 0.40–0.47 (larger heart on both views);
* pleural effusion (left/right) — fluid filling the base with a meniscus, blunted costophrenic angle;
* consolidation (right upper/middle/lower, left upper/lower lobe) — patchy opacity in the lobe region;
* pneumothorax (left/right) — lucent rim without lung markings along apex and lateral wall, with a
  thin visceral pleural line;
* lung nodule — a small round opacity; support device — a bright line or tube (ETT, CVC, PICC, NG).

:func:`extract_labels` reads a report (raw or cleaned) back into the label vector.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger(__name__)

LOBES = ("right upper", "right middle", "right lower", "left upper", "left lower")
LABEL_NAMES = (
    "cardiomegaly",
    "pleural_effusion_left",
    "pleural_effusion_right",
    *(f"consolidation_{lobe.replace(' ', '_')}_lobe" for lobe in LOBES),
    "pneumothorax_left",
    "pneumothorax_right",
    "lung_nodule",
    "support_device",
)
DEVICES = ("endotracheal tube", "right internal jugular catheter", "left picc", "nasogastric tube")
SIDES = ("left", "right")
SIZES = ("small", "moderate", "large")
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
WORLD_VERSION = 2  # written to annotation.json; bumped whenever a seed renders different studies


# --------------------------------------------------------------------------------------------- findings


@dataclass(frozen=True)
class Findings:
    """What a study shows; effusion/pneumothorax map a side to its size word."""

    cardiomegaly: bool = False
    effusion: dict[str, str] = field(default_factory=dict)
    consolidation: tuple[str, ...] = ()
    pneumothorax: dict[str, str] = field(default_factory=dict)
    nodule: tuple[str, str, int] | None = None  # side, zone, size in mm
    device: str | None = None

    def labels(self) -> list[int]:
        """The label vector in :data:`LABEL_NAMES` order."""
        present = {"cardiomegaly"} if self.cardiomegaly else set()
        present |= {f"pleural_effusion_{side}" for side in self.effusion}
        present |= {f"consolidation_{lobe.replace(' ', '_')}_lobe" for lobe in self.consolidation}
        present |= {f"pneumothorax_{side}" for side in self.pneumothorax}
        if self.nodule:
            present.add("lung_nodule")
        if self.device:
            present.add("support_device")
        return [int(name in present) for name in LABEL_NAMES]


def sample_findings(rng: np.random.Generator) -> Findings:
    """Independent findings (about 37% of studies are normal). Prevalences are rough, with every
    label frequent enough to have about 70 or more positive training studies and 20 or more in the
    test split of the default world (per-finding F1 over a handful of cases is noise).
    """
    effusion = {side: str(rng.choice(SIZES)) for side in SIDES if rng.random() < 0.08}
    pneumothorax = {
        side: str(rng.choice(SIZES)) for side in SIDES if side not in effusion and rng.random() < 0.07
    }
    consolidation = tuple(lobe for lobe in LOBES if rng.random() < 0.045)
    nodule = None
    if rng.random() < 0.12:
        zone = str(rng.choice(("upper", "mid", "lower")))
        nodule = (str(rng.choice(SIDES)), zone, int(rng.integers(10, 31)))
    return Findings(
        cardiomegaly=bool(rng.random() < 0.14),
        effusion=effusion,
        consolidation=consolidation,
        pneumothorax=pneumothorax,
        nodule=nodule,
        device=str(rng.choice(DEVICES)) if rng.random() < 0.15 else None,
    )


# ----------------------------------------------------------------------------------------------- report

_DEVICE_SENTENCES = {
    "endotracheal tube": (
        "An endotracheal tube is in place with the tip {cm} cm above the carina.",
        "Endotracheal tube terminates approximately {cm} cm above the carina.",
        "The endotracheal tube is in satisfactory position.",
    ),
    "right internal jugular catheter": (
        "A right internal jugular central venous catheter terminates in the superior vena cava.",
        "Right IJ central line with tip in the SVC.",
        "There is a right internal jugular catheter with its tip projecting over the cavoatrial junction.",
    ),
    "left picc": (
        "A left-sided PICC line terminates in the superior vena cava.",
        "Left upper extremity PICC with tip in the lower SVC.",
        "Interval placement of a left PICC with the tip in the distal superior vena cava.",
    ),
    "nasogastric tube": (
        "A nasogastric tube courses below the diaphragm with the tip in the stomach.",
        "Enteric tube tip is in the stomach.",
        "The nasogastric tube is seen coursing into the stomach.",
    ),
}
_NO_DEVICE = (
    "No support devices are present.",
    "No lines or tubes are seen.",
    "There are no indwelling devices.",
)
_HEART_ENLARGED = (
    "The heart is enlarged.",
    "There is cardiomegaly.",
    "Moderate enlargement of the cardiac silhouette.",
    "The cardiac silhouette is enlarged.",
    "Cardiomegaly is present.",
)
_HEART_NORMAL = (
    "The heart size is normal.",
    "Heart size is within normal limits.",
    "Normal cardiac silhouette.",
    "The cardiomediastinal silhouette is unremarkable.",
    "No cardiomegaly.",
)
_CONSOLIDATION = (
    "There is focal consolidation in the {lobes}.",
    "Airspace consolidation is seen in the {lobes}.",
    "Patchy opacity in the {lobes} consistent with consolidation.",
    "{Lobes} consolidation is noted.",
)
_NO_CONSOLIDATION = (
    "No focal consolidation.",
    "There is no focal airspace consolidation.",
    "The lungs are without focal consolidation.",
)
_NODULE = (
    "A {mm} mm nodule is seen in the {side} {zone} lung.",
    "There is a {mm} mm nodular opacity in the {side} {zone} zone.",
    "Small rounded nodule projecting over the {side} {zone} lung.",
)
_NO_NODULE = (
    "No pulmonary nodules are seen.",
    "No suspicious pulmonary nodule.",
    "No focal nodular opacity.",
)
_EFFUSION_ONE = (
    "There is a {size} {side} pleural effusion.",
    "{Size} {side}-sided pleural effusion.",
    "Blunting of the {side} costophrenic angle consistent with a {size} pleural effusion.",
)
_EFFUSION_BOTH = ("{Size} bilateral pleural effusions.", "There are bilateral pleural effusions.")
_NO_EFFUSION = ("No pleural effusion.", "There is no pleural effusion.", "No pleural effusions are seen.")
_NO_EFFUSION_SIDE = ("No {side} pleural effusion.", "The {side} costophrenic angle is sharp.")
_PTX_ONE = (
    "There is a {size} {side} apical pneumothorax.",
    "{Size} {side} pneumothorax with a visible pleural edge.",
    "A {side}-sided pneumothorax is present.",
)
_PTX_BOTH = ("Bilateral pneumothoraces are present.", "There are {size} bilateral pneumothoraces.")
_NO_PTX = ("No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax.")
_NO_PLEURAL = ("No pleural effusion or pneumothorax.", "There is no pleural effusion or pneumothorax.")
_FILLER = (
    "The osseous structures are intact.",
    "No acute bony abnormality.",
    "Visualized bones are unremarkable.",
)


def _pick(rng: np.random.Generator, options: tuple[str, ...], **fields: Any) -> str:
    text = str(options[rng.integers(len(options))])
    capitalised = {k.capitalize(): str(v).capitalize() for k, v in fields.items()}
    return text.format(**fields, **capitalised)


def _join_lobes(lobes: tuple[str, ...]) -> str:
    names = [f"{lobe} lobe" for lobe in lobes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _pleural_sentences(
    rng: np.random.Generator, present: dict[str, str], one: tuple, both: tuple
) -> list[str]:
    if len(present) == 2:
        return [_pick(rng, both, size=present["left"])]
    return [_pick(rng, one, side=side, size=size) for side, size in present.items()]


def write_report(findings: Findings, rng: np.random.Generator) -> str:
    """A report with one sentence per present finding and normal statements for absent ones."""
    f = findings
    sentences = []
    if f.device:
        sentences.append(_pick(rng, _DEVICE_SENTENCES[f.device], cm=int(rng.integers(3, 7))))
    elif rng.random() < 0.5:
        sentences.append(_pick(rng, _NO_DEVICE))
    sentences.append(_pick(rng, _HEART_ENLARGED if f.cardiomegaly else _HEART_NORMAL))
    if f.consolidation:
        sentences.append(_pick(rng, _CONSOLIDATION, lobes=_join_lobes(f.consolidation)))
    else:
        sentences.append(_pick(rng, _NO_CONSOLIDATION))
    if f.nodule:
        side, zone, mm = f.nodule
        sentences.append(_pick(rng, _NODULE, side=side, zone=zone, mm=mm))
    elif rng.random() < 0.6:
        sentences.append(_pick(rng, _NO_NODULE))
    if not f.effusion and not f.pneumothorax and rng.random() < 0.5:
        sentences.append(_pick(rng, _NO_PLEURAL))
    else:
        sentences += _pleural_sentences(rng, f.effusion, _EFFUSION_ONE, _EFFUSION_BOTH)
        if not f.effusion:
            sentences.append(_pick(rng, _NO_EFFUSION))
        elif len(f.effusion) == 1 and rng.random() < 0.5:
            other = "right" if "left" in f.effusion else "left"
            sentences.append(_pick(rng, _NO_EFFUSION_SIDE, side=other))
        sentences += _pleural_sentences(rng, f.pneumothorax, _PTX_ONE, _PTX_BOTH)
        if not f.pneumothorax:
            sentences.append(_pick(rng, _NO_PTX))
    if rng.random() < 0.4:
        sentences.append(_pick(rng, _FILLER))
    return " ".join(sentences)


# ---------------------------------------------------------------------------------------------- extract

_NEGATED = re.compile(r"\b(no|not|without|negative|normal|unremarkable|clear|sharp)\b")
_SIDE = re.compile(r"\b(left|right|bilateral)\b")
_LOBE = re.compile(r"\b(right|left) (upper|middle|lower) lobe")
_HEART = re.compile(r"cardiomegaly|(heart|cardiac silhouette) is enlarged|enlargement of the cardiac")
_DEVICE = re.compile(r"\b(tube|catheter|picc)\b|central line")


def _sides(sentence: str) -> set[str]:
    found = set(_SIDE.findall(sentence))
    return {"left", "right"} if "bilateral" in found else found


def extract_labels(report: str) -> list[int]:
    """Labels (in :data:`LABEL_NAMES` order) read from report text, raw or R2Gen-cleaned.

    A sentence that carries a negation or normality cue asserts nothing; otherwise keywords mark
    findings, with sides and lobes taken from the same sentence.
    """
    present: set[str] = set()
    for sentence in re.split(r"[.\n]", report.lower()):
        if not sentence.strip() or _NEGATED.search(sentence):
            continue
        if _HEART.search(sentence):
            present.add("cardiomegaly")
        if "effusion" in sentence:
            present |= {f"pleural_effusion_{side}" for side in _sides(sentence)}
        if "pneumothora" in sentence:
            present |= {f"pneumothorax_{side}" for side in _sides(sentence)}
        if "consolidation" in sentence:
            present |= {f"consolidation_{side}_{lobe}_lobe" for side, lobe in _LOBE.findall(sentence)}
        if "nodul" in sentence:
            present.add("lung_nodule")
        if _DEVICE.search(sentence):
            present.add("support_device")
    return [int(name in present) for name in LABEL_NAMES]


# -------------------------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Patient:
    """Per-study anatomy and acquisition: size, centring, heart, diaphragm, exposure, noise."""

    size: float
    centre: float
    ctr: float  # cardiothoracic ratio
    dome_right: float
    dome_left: float
    gain: float
    gamma: float
    noise: float
    rib_phase: float


def sample_patient(rng: np.random.Generator, findings: Findings) -> Patient:
    """Anatomy and exposure of one study; only the heart size depends on the findings."""
    ctr = rng.uniform(0.58, 0.68) if findings.cardiomegaly else rng.uniform(0.40, 0.47)
    dome_right = rng.uniform(0.68, 0.73)
    return Patient(
        size=rng.uniform(0.86, 1.08),
        centre=0.5 + rng.normal(0.0, 0.012),
        ctr=ctr,
        dome_right=dome_right,
        dome_left=dome_right + rng.uniform(0.01, 0.04),
        gain=rng.uniform(0.85, 1.15),
        gamma=rng.uniform(0.8, 1.25),
        noise=rng.uniform(0.008, 0.02),
        rib_phase=rng.uniform(0.0, 1.0),
    )


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    return coords[None, :].repeat(size, 0), coords[:, None].repeat(size, 1)  # x, y


def _soft(signed: np.ndarray, edge: float) -> np.ndarray:
    """1 inside (signed < 0), 0 outside, linear ramp of width ``edge``."""
    return np.clip(0.5 - signed / edge, 0.0, 1.0)


def _ellipse(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, edge: float
) -> np.ndarray:
    radius = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)
    return _soft((radius - 1.0) * min(a, b), edge)


def _blob(x: np.ndarray, y: np.ndarray, cx: float, cy: float, sigma: float) -> np.ndarray:
    return np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2)))


def _patchy(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rng: np.random.Generator) -> np.ndarray:
    """A consolidation: a few overlapping blobs, saturated."""
    total = np.zeros_like(x)
    for _ in range(4):
        total += _blob(x, y, cx + rng.normal(0, 0.03), cy + rng.normal(0, 0.035), rng.uniform(0.03, 0.05))
    return np.clip(total * 1.3, 0.0, 1.0)


@lru_cache(maxsize=16)
def _polar(size: int, hx: float, hy: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Angle, radius and radial fade around a hilum at (hx, hy)."""
    x, y = _grid(size)
    r = np.hypot(x - hx, y - hy)
    return np.arctan2(y - hy, x - hx), r, np.exp(-r / 0.2) * np.clip(r / 0.03, 0.0, 1.0)


def _markings(size: int, hx: float, hy: float, rng: np.random.Generator) -> np.ndarray:
    """Vessel-like streaks radiating from a hilum, broken up and fading towards the periphery."""
    theta, r, fade = _polar(size, hx, hy)
    warp = 2.0 * np.sin(3 * theta + rng.uniform(0, 6.3)) + 1.5 * _texture(size, rng, 6)
    wave = 0.5 + 0.5 * np.cos(rng.uniform(26, 38) * theta + warp + 8.0 * r)
    wave = np.square(np.square(np.square(wave)))  # ** 8, thin streaks
    return wave * np.clip(0.6 + _texture(size, rng, 14), 0.0, 1.0) * fade


def _lines(size: int, polylines: list[list[tuple[float, float]]], width: float) -> np.ndarray:
    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    for points in polylines:
        draw.line([(px * size, py * size) for px, py in points], fill=255, width=max(1, round(width * size)))
    return np.asarray(layer, dtype=np.float32) / 255.0


def _texture(size: int, rng: np.random.Generator, cells: int = 8) -> np.ndarray:
    """Smooth low-frequency noise in [-1, 1]."""
    coarse = Image.fromarray(rng.uniform(-1, 1, (cells, cells)).astype(np.float32), mode="F")
    return np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)


def _to_uint8(density: np.ndarray, patient: Patient, rng: np.random.Generator) -> np.ndarray:
    size = density.shape[0]
    noise = rng.standard_normal(density.shape, dtype=np.float32) * patient.noise
    image = density + 0.025 * _texture(size, rng) + noise
    gamma_lut = (np.linspace(0.0, 1.0, 256) ** patient.gamma * 255.0 + 0.5).astype(np.uint8)
    pil = Image.fromarray(
        gamma_lut[(np.clip(image * patient.gain, 0.0, 1.0) * 255.0).astype(np.uint8)], mode="L"
    )
    return np.asarray(pil.filter(ImageFilter.GaussianBlur(radius=0.35 * size / 224)))


_DEVICE_PATHS_FRONTAL = {
    "endotracheal tube": [(0.0, 0.0), (0.0, 0.29)],
    "right internal jugular catheter": [(-0.08, 0.02), (-0.07, 0.14), (-0.045, 0.26), (-0.035, 0.40)],
    "left picc": [(0.5, 0.30), (0.30, 0.24), (0.12, 0.25), (0.02, 0.32), (-0.02, 0.41)],
    "nasogastric tube": [(0.0, 0.0), (0.005, 0.45), (0.05, 0.70), (0.15, 0.80)],
}
_DEVICE_PATHS_LATERAL = {
    "endotracheal tube": [(0.49, 0.0), (0.51, 0.27)],
    "right internal jugular catheter": [(0.42, 0.03), (0.44, 0.20), (0.45, 0.38)],
    "left picc": [(0.50, 0.15), (0.46, 0.25), (0.45, 0.39)],
    "nasogastric tube": [(0.52, 0.0), (0.58, 0.40), (0.56, 0.66), (0.42, 0.80)],
}
# tube/catheter widths as a fraction of the image width (~30 cm): ETT ~9 mm, NG tube 16 Fr (~5 mm),
# central line 7 Fr (~2.3 mm), PICC 6 Fr (~2 mm)
_DEVICE_WIDTH = {
    "endotracheal tube": 0.03,
    "right internal jugular catheter": 0.008,
    "left picc": 0.007,
    "nasogastric tube": 0.018,
}
# lobe centres: frontal in lung-normalised (lateral u, vertical v) coordinates, lateral in image coordinates
_LOBE_FRONTAL = {"upper": (0.1, -0.45), "middle": (-0.45, 0.3), "lower": (0.35, 0.5)}
_LOBE_LATERAL = {"upper": (0.46, 0.32), "middle": (0.33, 0.53), "lower": (0.66, 0.62)}
_ZONE_V = {"upper": -0.45, "mid": 0.0, "lower": 0.4}
_SIZE_SCALE = {"small": 0.0, "moderate": 0.5, "large": 1.0}


def render_frontal(findings: Findings, patient: Patient, size: int, rng: np.random.Generator) -> np.ndarray:
    """PA view as uint8 (size, size); patient's right on the image's left."""
    x, y = _grid(size)
    edge = 1.5 / size
    p, cx = patient, patient.centre
    lesions = np.random.default_rng(rng.integers(2**63))  # anatomy draws do not depend on the findings
    tx, ty = np.abs((x - cx) / (0.45 * p.size)), np.abs((y - 0.64) / 0.6)
    trunk = np.cbrt(tx * tx * tx + ty * ty * ty)  # superellipse of power 3: square shoulders
    neck = (np.abs(x - cx) < 0.09) * (y < 0.3)
    body = np.maximum(_soft((trunk - 1.0) * 0.45, 4 * edge), neck)
    density = 0.06 + 0.52 * body
    bones = 0.05 * (np.abs(x - cx) < 0.035)  # spine
    heart_hw = p.ctr * 0.30 * p.size
    heart = _ellipse(x, y, cx + heart_hw / 3, 0.62, heart_hw, 0.6 * heart_hw + 0.03, 3 * edge)
    heart = np.maximum(heart, _ellipse(x, y, cx + 0.055, 0.33, 0.035, 0.03, 3 * edge))  # aortic knob
    lungs = {}
    for side, sign, dome in (("right", -1.0, p.dome_right), ("left", 1.0, p.dome_left)):
        lc, a, b = cx + sign * 0.165 * p.size, 0.135 * p.size, 0.36
        u, v = sign * (x - lc) / a, (y - 0.50) / b  # lateral-positive, top = -1
        diaphragm = dome + 0.07 * u**2
        lung = _ellipse(x, y, lc, 0.50, a, b, edge) * _soft(y - diaphragm, 2 * edge)
        lung *= np.abs(x - cx) > 0.045
        vessels = _markings(size, 0.5 + sign * 0.09, 0.47, rng)
        air = lung * (1.0 - 0.55 * vessels)
        if side in findings.effusion:
            h = 0.09 + 0.17 * _SIZE_SCALE[findings.effusion[side]]
            top = dome - h * (0.6 + 0.6 * np.clip(u, -0.5, 1.0))
            air *= 1.0 - 0.95 * _soft(top - y, 0.02)
        if side in findings.pneumothorax:
            scale = _SIZE_SCALE[findings.pneumothorax[side]]
            w = 0.18 + 0.14 * scale
            rho = np.sqrt(u**2 + v**2)
            region = (np.clip((u + 0.2) / 0.3, 0, 1) * np.clip((0.45 - v) / 0.3, 0, 1)) > 0.5
            rim = lung * region * (rho > 1.0 - w)
            collapse = 0.2 + 0.15 * scale  # the deflated lung is denser
            air = np.where(rim > 0, 1.3 * lung, air * (1.0 - collapse))
            bones = bones + 0.2 * lung * region * (np.abs(rho - (1.0 - w)) * a < 1.2 / size)
        for lobe in findings.consolidation:
            lobe_side, level = lobe.split()
            if lobe_side == side:
                lu, lv = _LOBE_FRONTAL[level]
                air *= 1.0 - 0.85 * _patchy(x, y, lc + sign * lu * a, 0.50 + lv * b, lesions)
        if findings.nodule and findings.nodule[0] == side:
            radius = 0.0017 * findings.nodule[2]
            nx, ny = lc + sign * lesions.uniform(-0.3, 0.45) * a, 0.50 + _ZONE_V[findings.nodule[1]] * b
            air *= 1.0 - 0.9 * _ellipse(x, y, nx, ny, radius, radius, 2 * edge)
        lungs[side] = air
        # ribs: bands curving down laterally, and a clavicle
        phase = (y + 0.35 * np.abs(x - cx) - 1.1 * (x - cx) ** 2) / 0.065 + p.rib_phase
        rib_cage = _ellipse(x, y, lc, 0.48, a * 1.15, b * 1.05, 4 * edge) * (y < diaphragm)
        rib = np.square(0.5 + 0.5 * np.cos(2 * np.pi * phase))
        bones = bones + 0.07 * rib_cage * (1.0 - 0.6 * heart) * rib * rib * rib
        clavicle = _lines(size, [[(cx + sign * 0.05, 0.17), (cx + sign * 0.33 * p.size, 0.11)]], 0.022)
        bones = bones + 0.1 * clavicle
    aeration = (lungs["right"] + lungs["left"]) * (1.0 - heart)
    stomach = _ellipse(x, y, cx + 0.15, p.dome_left + 0.06, 0.04, 0.022, 2 * edge)
    trachea = _ellipse(x, y, cx, 0.12, 0.014, 0.2, edge)
    density = density - 0.36 * aeration - 0.22 * (stomach + trachea) + bones
    if findings.device:
        path = [(cx + px, py) for px, py in _DEVICE_PATHS_FRONTAL[findings.device]]
        density = density + 0.4 * _lines(size, [path], _DEVICE_WIDTH[findings.device])
    return _to_uint8(density, patient, rng)


def render_lateral(findings: Findings, patient: Patient, size: int, rng: np.random.Generator) -> np.ndarray:
    """Lateral view as uint8 (size, size); anterior on the image's left."""
    x, y = _grid(size)
    edge = 1.5 / size
    p = patient
    lesions = np.random.default_rng(rng.integers(2**63))
    body = _ellipse(x, y, 0.5, 0.64, 0.38 * p.size, 0.72, 4 * edge)
    dome = (p.dome_right + p.dome_left) / 2 - 0.02 + 0.06 * ((x - 0.40) / 0.25) ** 2
    lung = _ellipse(x, y, 0.53, 0.48, 0.27 * p.size, 0.33, edge) * _soft(y - dome, 2 * edge)
    air = lung * (1.0 - 0.5 * _markings(size, 0.5, 0.45, rng))
    heart_a = 0.11 * p.ctr / 0.44
    heart = _ellipse(x, y, 0.36, 0.60, heart_a, 0.13, 3 * edge)
    air *= 1.0 - 0.8 * heart
    if findings.effusion:
        largest = max(_SIZE_SCALE[s] for s in findings.effusion.values())
        h = 0.06 + 0.12 * largest + 0.04 * (len(findings.effusion) - 1)
        top = dome - h * (0.7 + 0.8 * np.clip((x - 0.5) / 0.25, 0.0, 1.0))
        air *= 1.0 - 0.95 * _soft(top - y, 0.02)
    for level in sorted({lobe.split()[1] for lobe in findings.consolidation}):
        air *= 1.0 - 0.75 * _patchy(x, y, *_LOBE_LATERAL[level], lesions)
    if findings.nodule:
        radius = 0.0017 * findings.nodule[2]
        ny = 0.48 + _ZONE_V[findings.nodule[1]] * 0.33
        air *= 1.0 - 0.9 * _ellipse(x, y, lesions.uniform(0.38, 0.68), ny, radius, radius, 2 * edge)
    spine_x = 0.5 + 0.3 * p.size
    vertebrae = (np.abs(x - spine_x) < 0.05) * (0.6 + 0.4 * (np.cos(2 * np.pi * y / 0.065) > -0.6))
    sternum = _lines(size, [[(0.5 - 0.33 * p.size, 0.2), (0.5 - 0.35 * p.size, 0.6)]], 0.012)
    trachea = _lines(size, [[(0.48, 0.0), (0.52, 0.33)]], 0.02)
    density = 0.06 + 0.52 * body - 0.34 * air - 0.12 * trachea + 0.1 * vertebrae * body + 0.08 * sternum
    if findings.device:
        path = _DEVICE_PATHS_LATERAL[findings.device]
        density = density + 0.4 * _lines(size, [path], _DEVICE_WIDTH[findings.device])
    return _to_uint8(density, patient, rng)


# ------------------------------------------------------------------------------------------- the world


def split_of(index: int, n: int) -> str:
    """70/10/20 train/val/test by position (studies are i.i.d., so position is a fair split)."""
    train, val = round(n * SPLIT_FRACTIONS[0]), round(n * (SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]))
    return "train" if index < train else "val" if index < val else "test"


def study_id(index: int) -> str:
    return f"demo_{index:05d}"


def sample_study(seed: int, index: int) -> tuple[Findings, str]:
    """Findings and report of study ``index`` (no pixels): cheap, for label/extractor checks."""
    rng = np.random.default_rng([seed, index, 0])
    findings = sample_findings(rng)
    return findings, write_report(findings, rng)


def make_study(seed: int, index: int, n: int, out: Path, size: int) -> dict[str, Any]:
    """Render and write one study; returns its annotation entry."""
    findings, report = sample_study(seed, index)
    rng = np.random.default_rng([seed, index, 1])
    patient = sample_patient(rng, findings)
    sid = study_id(index)
    folder = out / "images" / sid
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(render_frontal(findings, patient, size, rng)).save(folder / "0.png", compress_level=1)
    Image.fromarray(render_lateral(findings, patient, size, rng)).save(folder / "1.png", compress_level=1)
    return {
        "id": sid,
        "report": report,
        "image_path": [f"{sid}/0.png", f"{sid}/1.png"],
        "split": split_of(index, n),
        "labels": findings.labels(),
    }


def _make_study_star(args: tuple[int, int, int, Path, int]) -> dict[str, Any]:
    return make_study(*args)


def generate_world(out: str | Path, n: int = 2400, seed: int = 0, size: int = 224, workers: int = 0) -> Path:
    """Write the world to ``out`` and return the annotation path (``workers`` 0 = one per CPU)."""
    if n < 10:
        raise ValueError(f"n must be at least 10 (got {n}) so that every split has studies")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    jobs = [(seed, i, n, out, size) for i in range(n)]
    if workers == 1:
        entries = [make_study(*job) for job in jobs]
    else:
        with get_context("spawn").Pool(workers) as pool:
            entries = pool.map(_make_study_star, jobs, chunksize=max(1, n // (workers * 8)))
    annotation: dict[str, Any] = {
        "world_version": WORLD_VERSION,
        "label_names": list(LABEL_NAMES),
        "train": [],
        "val": [],
        "test": [],
    }
    for entry in entries:
        annotation[entry["split"]].append(entry)
    path = out / "annotation.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(annotation, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="data/demo", help="output folder (default: data/demo)")
    parser.add_argument("--n", type=int, default=2400, help="number of studies (default: 2400)")
    parser.add_argument("--seed", type=int, default=0, help="world seed (default: 0)")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (default: 224)")
    parser.add_argument("--workers", type=int, default=0, help="processes (default: one per CPU)")


def run(args: argparse.Namespace) -> int:
    if args.n < 10 or args.size < 32 or args.workers < 0:
        print(
            "mambaxray-ctl make-demo-data: error: need --n >= 10, --size >= 32, --workers >= 0",
            file=sys.stderr,
        )
        return 1
    start = time.perf_counter()
    try:
        path = generate_world(args.out, n=args.n, seed=args.seed, size=args.size, workers=args.workers)
    except OSError as exc:
        print(f"mambaxray-ctl make-demo-data: error: {exc}", file=sys.stderr)
        return 1
    with open(path, encoding="utf-8") as f:
        annotation = json.load(f)
    counts = {split: len(annotation[split]) for split in ("train", "val", "test")}
    positives = np.sum([e["labels"] for split in counts for e in annotation[split]], axis=0)
    normal = sum(not any(e["labels"]) for split in counts for e in annotation[split])
    splits = ", ".join(f"{k} {v}" for k, v in counts.items())
    print(f"wrote {path} in {time.perf_counter() - start:.1f}s: {splits}")
    print(f"normal studies: {normal}/{args.n}; positives per label:")
    for name, count in zip(LABEL_NAMES, positives, strict=True):
        print(f"  {name:<36} {int(count)}")
    return 0
