"""The renderer of the synthetic world: radiograph-like frontal (PA) and lateral views in which the
findings are visible (the patient's left is on the frontal image's right), over each study's own
anatomy and exposure (:class:`Patient`).

* cardiomegaly — cardiothoracic ratio 0.58–0.68 instead of 0.40–0.47 (larger heart on both views);
* pleural effusion (left/right) — fluid filling the base with a meniscus, blunted costophrenic angle;
* consolidation (right upper/middle/lower, left upper/lower lobe) — patchy opacity in the lobe region;
* pneumothorax (left/right) — lucent rim without lung markings along apex and lateral wall, with a
  thin visceral pleural line;
* lung nodule — a small round opacity; support device — a bright line or tube (ETT, CVC, PICC, NG).

Given a ``regions`` dict, each renderer also records where it drew each finding (:data:`Regions`): the
bounding box of the finding's own mask (fluid, consolidation, pneumothorax rim, nodule, the heart for
cardiomegaly) where it exceeds :data:`REGION_THRESHOLD`, and one box per segment of a device's path
(widened by the tube's width and one pixel). Recording draws no random number and changes no pixel.
The lateral view shows no pneumothorax, so it records none; its effusion and consolidation boxes are
shared by both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mambaxray_ctl.demo.findings import Findings

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in [0, 1]: x to the image's right, y down
Regions = dict[str, list[Box]]  # label name (findings.LABEL_NAMES) -> boxes whose union it is drawn in
REGION_THRESHOLD = 0.25  # a finding's mask above this changes the image by more than ~20 grey levels


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


def _mask_boxes(mask: np.ndarray) -> list[Box]:
    """The bounding box of ``mask > REGION_THRESHOLD`` in normalised coordinates (pixel edges); none if
    empty."""
    inside = mask > REGION_THRESHOLD
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    if not len(rows):
        return []
    height, width = mask.shape
    return [(cols[0] / width, rows[0] / height, (cols[-1] + 1) / width, (rows[-1] + 1) / height)]


def _path_boxes(points: list[tuple[float, float]], width: float, size: int) -> list[Box]:
    """One box per segment of a polyline drawn ``width`` wide by :func:`_lines` on a ``size``-pixel
    image (whole pixels, blurred by one more), clipped to the image."""
    half = (max(1, round(width * size)) / 2 + 1) / size
    boxes = []
    for (ax, ay), (bx, by) in pairwise(points):
        box = (min(ax, bx) - half, min(ay, by) - half, max(ax, bx) + half, max(ay, by) + half)
        boxes.append(tuple(float(np.clip(value, 0.0, 1.0)) for value in box))
    return boxes


def _record(regions: Regions | None, label: str, boxes: list[Box]) -> None:
    if regions is not None:
        regions.setdefault(label, []).extend(tuple(round(float(v), 4) for v in box) for box in boxes)


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


def render_frontal(
    findings: Findings, patient: Patient, size: int, rng: np.random.Generator, regions: Regions | None = None
) -> np.ndarray:
    """PA view as uint8 (size, size); patient's right on the image's left. ``regions``: filled with
    where each finding is drawn (module docstring)."""
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
    if findings.cardiomegaly:
        _record(regions, "cardiomegaly", _mask_boxes(heart))
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
            fluid = _soft(top - y, 0.02)
            air *= 1.0 - 0.95 * fluid
            _record(regions, f"pleural_effusion_{side}", _mask_boxes(lung * fluid))
        if side in findings.pneumothorax:
            scale = _SIZE_SCALE[findings.pneumothorax[side]]
            w = 0.18 + 0.14 * scale
            rho = np.sqrt(u**2 + v**2)
            region = (np.clip((u + 0.2) / 0.3, 0, 1) * np.clip((0.45 - v) / 0.3, 0, 1)) > 0.5
            rim = lung * region * (rho > 1.0 - w)
            _record(regions, f"pneumothorax_{side}", _mask_boxes(rim))
            collapse = 0.2 + 0.15 * scale  # the deflated lung is denser
            air = np.where(rim > 0, 1.3 * lung, air * (1.0 - collapse))
            bones = bones + 0.2 * lung * region * (np.abs(rho - (1.0 - w)) * a < 1.2 / size)
        for lobe in findings.consolidation:
            lobe_side, level = lobe.split()
            if lobe_side == side:
                lu, lv = _LOBE_FRONTAL[level]
                patch = _patchy(x, y, lc + sign * lu * a, 0.50 + lv * b, lesions)
                air *= 1.0 - 0.85 * patch
                _record(regions, f"consolidation_{side}_{level}_lobe", _mask_boxes(lung * patch))
        if findings.nodule and findings.nodule[0] == side:
            radius = 0.0017 * findings.nodule[2]
            nx, ny = lc + sign * lesions.uniform(-0.3, 0.45) * a, 0.50 + _ZONE_V[findings.nodule[1]] * b
            nodule = _ellipse(x, y, nx, ny, radius, radius, 2 * edge)
            air *= 1.0 - 0.9 * nodule
            _record(regions, "lung_nodule", _mask_boxes(nodule))
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
        _record(regions, "support_device", _path_boxes(path, _DEVICE_WIDTH[findings.device], size))
    return _to_uint8(density, patient, rng)


def render_lateral(
    findings: Findings, patient: Patient, size: int, rng: np.random.Generator, regions: Regions | None = None
) -> np.ndarray:
    """Lateral view as uint8 (size, size); anterior on the image's left. ``regions``: filled with
    where each finding is drawn (module docstring)."""
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
    if findings.cardiomegaly:
        _record(regions, "cardiomegaly", _mask_boxes(heart))
    air *= 1.0 - 0.8 * heart
    if findings.effusion:
        largest = max(_SIZE_SCALE[s] for s in findings.effusion.values())
        h = 0.06 + 0.12 * largest + 0.04 * (len(findings.effusion) - 1)
        top = dome - h * (0.7 + 0.8 * np.clip((x - 0.5) / 0.25, 0.0, 1.0))
        fluid = _soft(top - y, 0.02)
        air *= 1.0 - 0.95 * fluid
        for side in findings.effusion:
            _record(regions, f"pleural_effusion_{side}", _mask_boxes(lung * fluid))
    for level in sorted({lobe.split()[1] for lobe in findings.consolidation}):
        patch = _patchy(x, y, *_LOBE_LATERAL[level], lesions)
        air *= 1.0 - 0.75 * patch
        for lobe in findings.consolidation:
            if lobe.split()[1] == level:
                _record(regions, f"consolidation_{lobe.replace(' ', '_')}_lobe", _mask_boxes(lung * patch))
    if findings.nodule:
        radius = 0.0017 * findings.nodule[2]
        ny = 0.48 + _ZONE_V[findings.nodule[1]] * 0.33
        nodule = _ellipse(x, y, lesions.uniform(0.38, 0.68), ny, radius, radius, 2 * edge)
        air *= 1.0 - 0.9 * nodule
        _record(regions, "lung_nodule", _mask_boxes(nodule))
    spine_x = 0.5 + 0.3 * p.size
    vertebrae = (np.abs(x - spine_x) < 0.05) * (0.6 + 0.4 * (np.cos(2 * np.pi * y / 0.065) > -0.6))
    sternum = _lines(size, [[(0.5 - 0.33 * p.size, 0.2), (0.5 - 0.35 * p.size, 0.6)]], 0.012)
    trachea = _lines(size, [[(0.48, 0.0), (0.52, 0.33)]], 0.02)
    density = 0.06 + 0.52 * body - 0.34 * air - 0.12 * trachea + 0.1 * vertebrae * body + 0.08 * sternum
    if findings.device:
        path = _DEVICE_PATHS_LATERAL[findings.device]
        density = density + 0.4 * _lines(size, [path], _DEVICE_WIDTH[findings.device])
        _record(regions, "support_device", _path_boxes(path, _DEVICE_WIDTH[findings.device], size))
    return _to_uint8(density, patient, rng)
