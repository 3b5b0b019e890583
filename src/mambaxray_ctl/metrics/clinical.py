"""Clinical efficacy (CE): precision, recall and F1 of findings labelled in generated reports against
the same labeller run on the reference reports (R2Gen's ``compute_ce.py`` recipe,
docs/METHOD.md#clinical-efficacy).

Built in: ``chexbert`` (:class:`~mambaxray_ctl.metrics.chexbert.CheXbertLabeler`, the field's
labeller for real reports, given a checkpoint file and a BERT tokenizer folder) and ``demo``, which only
understands the reports of the synthetic demo world. Another labeller (the CheXpert labeler, say) is a
class with the :class:`Labeler` interface — a ``label_names`` attribute and
``__call__(reports) -> list[list[int]]`` with 1 for a positive finding and 0 for negative,
uncertain (-1) or unmentioned — passed as ``package.module:ClassName`` (``--labeler`` of
``mambaxray-ctl evaluate``, or stage 3's ``evaluation.labeler``); :func:`load_labeler` passes its
constructor the options it is given (none from stage 3's config).

Zero division follows scikit-learn's ``zero_division=0``: a label with no predicted positives has
precision 0, one with no reference positives has recall 0, and F1 is 0 whenever precision and
recall are both 0 — so a finding absent from both sides scores 0 and lowers the macro averages.
Macro = unweighted mean of the per-label values; micro pools the counts over labels.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from mambaxray_ctl.metrics.report import (
    add_text_state,
    decode_texts,
    deduplicate,
    encode_texts,
    gather_uint8,
)


class Labeler(Protocol):
    """Turns report texts into 0/1 finding labels, one row per report in ``label_names`` order."""

    label_names: Sequence[str]

    def __call__(self, reports: Sequence[str]) -> list[list[int]]: ...


# What a labeller that tells uncertain mentions apart counts them as (CheXbert's ``uncertain`` option,
# ``--labeler-uncertain``); here, not in metrics.chexbert, so that naming the choices imports no BERT.
UncertainAs = Literal["negative", "positive"]
UNCERTAIN_CHOICES: tuple[UncertainAs, ...] = ("negative", "positive")

BUILTIN_LABELERS = {
    "chexbert": "mambaxray_ctl.metrics.chexbert:CheXbertLabeler",
    "demo": "mambaxray_ctl.demo.labeller:DemoWorldLabeler",
}


def load_labeler(spec: str, **options: Any) -> Labeler:
    """A name in :data:`BUILTIN_LABELERS` or ``"package.module:ClassName"``, built with ``options`` as
    keyword arguments (:raises ValueError: when its constructor does not take them)."""
    spec = BUILTIN_LABELERS.get(spec, spec)
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise ValueError(f"unknown labeler {spec!r}: use 'chexbert', 'demo' or 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"labeler {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    try:
        cls = getattr(module, class_name)
    except AttributeError as exc:
        raise ValueError(f"labeler {spec!r}: module {module_name!r} has no {class_name!r}") from exc
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as exc:
        given = ", ".join(sorted(options)) or "no options"
        raise ValueError(f"labeler {spec!r} cannot be built with {given}: {exc}") from None
    except ValueError:
        pass  # no signature to check (a builtin type): calling it reports what is wrong
    labeler = cls(**options)
    if not callable(labeler) or not hasattr(labeler, "label_names"):
        raise ValueError(f"labeler {spec!r} needs a 'label_names' attribute and __call__(reports)")
    return labeler


def label_reports(labeler: Labeler, reports: Sequence[str]) -> np.ndarray:
    """Run ``labeler`` and check its answer: an ``(len(reports), len(label_names))`` 0/1 matrix."""
    labels = _binary_matrix(labeler(reports), f"labels from {type(labeler).__name__}")
    expected = (len(reports), len(labeler.label_names))
    if labels.shape != expected:
        raise ValueError(
            f"{type(labeler).__name__} returned labels of shape {labels.shape}, expected {expected}"
        )
    return labels


def _binary_matrix(labels: Any, name: str) -> np.ndarray:
    array = np.asarray(labels.detach().cpu() if isinstance(labels, Tensor) else labels)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-d (studies, labels) matrix, got shape {array.shape}")
    if array.size and not np.isin(array, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0 and 1 (map uncertain -1 and missing labels to 0 first)")
    return array.astype(bool)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros(numerator.shape), where=denominator > 0)


def clinical_scores(pred: Any, ref: Any, label_names: Sequence[str]) -> dict[str, float]:
    """Micro and macro CE precision/recall/F1 plus per-finding values of 0/1 ``(N, K)`` matrices."""
    pred, ref = _binary_matrix(pred, "pred"), _binary_matrix(ref, "ref")
    if pred.shape != ref.shape or pred.shape[1] != len(label_names):
        raise ValueError(
            f"pred {pred.shape} and ref {ref.shape} must have the same shape, with one column per "
            f"label name ({len(label_names)})"
        )
    if not len(pred):
        raise ValueError("cannot compute clinical scores of zero studies")
    tp = (pred & ref).sum(0).astype(float)
    fp = (pred & ~ref).sum(0).astype(float)
    fn = (~pred & ref).sum(0).astype(float)
    per_label = {
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "F1": _ratio(2 * tp, 2 * tp + fp + fn),
    }
    micro = {
        "precision": _ratio(tp.sum(), tp.sum() + fp.sum()),
        "recall": _ratio(tp.sum(), tp.sum() + fn.sum()),
        "F1": _ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum()),
    }
    scores = {}
    for kind in ("precision", "recall", "F1"):
        scores[f"CE_{kind}_micro"] = float(micro[kind])
        scores[f"CE_{kind}_macro"] = float(per_label[kind].mean())
    for kind in ("F1", "precision", "recall"):
        scores.update(
            {f"CE_{kind}/{name}": float(v) for name, v in zip(label_names, per_label[kind], strict=True)}
        )
    return scores


def subset_scores(
    pred: Any, ref: Any, label_names: Sequence[str], subsets: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """Micro and macro CE precision/recall/F1 (:func:`clinical_scores`) over each named subset of the
    labels, keyed ``CE{name}_{kind}_{average}`` (``CE5_F1_micro`` for the subset ``"5"``)."""
    pred, ref = _binary_matrix(pred, "pred"), _binary_matrix(ref, "ref")
    scores = {}
    for name, subset in subsets.items():
        unknown = sorted(set(subset) - set(label_names))
        if unknown:
            raise ValueError(f"label subset {name!r} names labels the labeller lacks: {', '.join(unknown)}")
        columns = [list(label_names).index(label) for label in subset]
        subset_result = clinical_scores(pred[:, columns], ref[:, columns], subset)
        scores.update(
            {
                f"CE{name}_{key.removeprefix('CE_')}": value
                for key, value in subset_result.items()
                if key.endswith(("_micro", "_macro"))
            }
        )
    return scores


class ClinicalEfficacy(Metric):
    """:func:`clinical_scores` over all ranks, de-duplicated by study id like ``ReportMetrics``.

    ``update(ids, predicted_labels, reference_labels)`` takes 0/1 ``(batch, K)`` matrices;
    ``compute()`` returns a dict of Python floats, the same on every rank.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, label_names: Sequence[str], **kwargs: Any) -> None:
        kwargs.setdefault("dist_sync_fn", gather_uint8)
        super().__init__(**kwargs)
        if not label_names:
            raise ValueError("label_names must not be empty")
        self.label_names = tuple(label_names)
        add_text_state(self, "ids")
        # labels stored flat (uint8) so that every state is 1-d and gathers like the text states
        self.add_state("predicted", default=[], dist_reduce_fx="cat")
        self.add_state("reference", default=[], dist_reduce_fx="cat")
        self.num_duplicates = 0
        self.num_conflicts = 0

    def update(self, ids: Sequence[str], predicted_labels: Any, reference_labels: Any) -> None:
        flat = {}
        for name, labels in (("predicted", predicted_labels), ("reference", reference_labels)):
            matrix = _binary_matrix(labels, f"{name}_labels")
            if matrix.shape != (len(ids), len(self.label_names)):
                raise ValueError(
                    f"{name}_labels has shape {matrix.shape}, expected ({len(ids)}, {len(self.label_names)})"
                )
            flat[name] = torch.as_tensor(matrix.reshape(-1), dtype=torch.uint8, device=self.device)
        self.ids.append(encode_texts(ids, self.device, "ids"))
        self.predicted.append(flat["predicted"])
        self.reference.append(flat["reference"])

    def _matrix(self, state: list[Tensor] | Tensor) -> np.ndarray:
        if isinstance(state, list) and not state:
            return np.zeros((0, len(self.label_names)), dtype=np.uint8)
        return dim_zero_cat(state).to("cpu", torch.uint8).numpy().reshape(-1, len(self.label_names))

    def compute(self) -> dict[str, float]:
        ids = decode_texts(self.ids)
        pred, ref = self._matrix(self.predicted), self._matrix(self.reference)
        dedup = deduplicate(ids, [row.tobytes() for row in pred], what="predicted label vector")
        self.num_duplicates, self.num_conflicts = dedup.duplicates, dedup.conflicts
        return clinical_scores(pred[dedup.keep], ref[dedup.keep], self.label_names)
