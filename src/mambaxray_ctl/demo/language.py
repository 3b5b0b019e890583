"""The report language of the synthetic world: one sentence per present finding (several phrasings
each) and normal statements for absent ones. :func:`mambaxray_ctl.demo.labeller.extract_labels` reads
these reports back into labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mambaxray_ctl.demo.findings import Findings

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
