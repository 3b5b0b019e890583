"""Clinical efficacy: hand-computed scores, de-duplication, labeller loading."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from mambaxray_ctl.demo.findings import LABEL_NAMES
from mambaxray_ctl.demo.labeller import DemoWorldLabeler
from mambaxray_ctl.metrics.clinical import (
    ClinicalEfficacy,
    clinical_scores,
    label_reports,
    load_labeler,
)

NAMES = ("a", "b", "c")
PRED = [[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0], [1, 0, 1]]
REF = [[1, 0, 0], [0, 1, 0], [0, 1, 1], [0, 0, 0], [1, 0, 0]]
# a: tp 2 fp 1 fn 0 -> P 2/3, R 1, F1 4/5;  b: tp 2 -> 1, 1, 1;  c: tp 0 fp 1 fn 1 -> 0, 0, 0
# micro: tp 4 fp 2 fn 1 -> P 4/6, R 4/5, F1 8/11
EXPECTED = {
    "CE_precision_micro": 4 / 6,
    "CE_recall_micro": 4 / 5,
    "CE_F1_micro": 8 / 11,
    "CE_precision_macro": (2 / 3 + 1 + 0) / 3,
    "CE_recall_macro": (1 + 1 + 0) / 3,
    "CE_F1_macro": (4 / 5 + 1 + 0) / 3,
    "CE_precision/a": 2 / 3,
    "CE_recall/a": 1.0,
    "CE_F1/a": 4 / 5,
    "CE_precision/b": 1.0,
    "CE_recall/b": 1.0,
    "CE_F1/b": 1.0,
    "CE_precision/c": 0.0,
    "CE_recall/c": 0.0,
    "CE_F1/c": 0.0,
}


class KeywordLabeler:
    """A user labeller as ``load_labeler`` imports it (``module:ClassName``)."""

    label_names = ("effusion",)

    def __call__(self, reports: Sequence[str]) -> list[list[int]]:
        return [[int("effusion" in report)] for report in reports]


def test_hand_computed_example() -> None:
    scores = clinical_scores(np.array(PRED), torch.tensor(REF), NAMES)
    assert set(scores) == set(EXPECTED)
    assert scores == pytest.approx(EXPECTED, abs=1e-15)


def test_matches_sklearn_zero_division_0() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    pred, ref = rng.integers(0, 2, (40, 5)), rng.integers(0, 2, (40, 5))
    ref[:, 4] = 0  # a finding absent from the references: recall and F1 fall back to 0
    pred[:, 3] = 0  # never predicted: precision falls back to 0
    scores = clinical_scores(pred, ref, list("vwxyz"))
    for average in ("micro", "macro"):
        p, r, f, _ = metrics.precision_recall_fscore_support(ref, pred, average=average, zero_division=0)
        assert [scores[f"CE_{k}_{average}"] for k in ("precision", "recall", "F1")] == pytest.approx(
            [p, r, f]
        )


def test_zero_division_is_zero() -> None:
    scores = clinical_scores([[0, 1], [0, 1]], [[0, 0], [0, 0]], ("none", "fp_only"))
    assert scores["CE_precision/none"] == scores["CE_recall/none"] == scores["CE_F1/none"] == 0.0
    assert scores["CE_precision/fp_only"] == scores["CE_recall/fp_only"] == 0.0
    assert scores["CE_F1_micro"] == 0.0


def test_clinical_scores_validates_inputs() -> None:
    with pytest.raises(ValueError, match="only 0 and 1"):
        clinical_scores([[-1, 0]], [[0, 0]], ("x", "y"))
    with pytest.raises(ValueError, match="same shape"):
        clinical_scores([[1, 0]], [[1, 0, 0]], ("x", "y"))
    with pytest.raises(ValueError, match="2-d"):
        clinical_scores([1, 0], [1, 0], ("x", "y"))
    with pytest.raises(ValueError, match="zero studies"):
        clinical_scores(np.zeros((0, 2)), np.zeros((0, 2)), ("x", "y"))


def test_metric_deduplicates_by_id() -> None:
    metric = ClinicalEfficacy(NAMES)
    ids = [f"s{i}" for i in range(5)]
    metric.update(ids[:3], PRED[:3], REF[:3])
    metric.update([*ids[3:], "s0"], [*PRED[3:], PRED[0]], [*REF[3:], REF[0]])  # padding repeat
    assert metric.compute() == pytest.approx(EXPECTED, abs=1e-15)
    assert (metric.num_duplicates, metric.num_conflicts) == (1, 0)

    metric.reset()
    metric.update([*ids, "s2"], torch.tensor([*PRED, [1, 1, 1]]), [*REF, REF[2]])
    assert metric.compute() == pytest.approx(EXPECTED, abs=1e-15)
    assert (metric.num_duplicates, metric.num_conflicts) == (1, 1)


def test_metric_update_checks_shapes() -> None:
    metric = ClinicalEfficacy(NAMES)
    with pytest.raises(ValueError, match=r"predicted_labels has shape \(1, 3\), expected \(2, 3\)"):
        metric.update(["x", "y"], [[1, 0, 0]], [[1, 0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="label_names"):
        ClinicalEfficacy([])


def test_demo_labeler() -> None:
    labeler = load_labeler("demo")
    assert isinstance(labeler, DemoWorldLabeler)
    assert tuple(labeler.label_names) == LABEL_NAMES
    labels = label_reports(
        labeler, ["small left pleural effusion . no pneumothorax .", "the lungs are clear ."]
    )
    assert labels.shape == (2, len(LABEL_NAMES))
    assert labels[0, LABEL_NAMES.index("pleural_effusion_left")]
    assert not labels[0, LABEL_NAMES.index("pneumothorax_left")]
    assert not labels[1].any()


def test_load_labeler_imports_user_class() -> None:
    labeler = load_labeler(f"{__name__}:KeywordLabeler")
    assert isinstance(labeler, KeywordLabeler)
    assert label_reports(labeler, ["effusion .", "clear ."]).tolist() == [[True], [False]]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("chexpert", "use 'chexbert', 'demo' or 'package.module:ClassName'"),
        ("no_such_module_xyz:Labeler", "cannot import module 'no_such_module_xyz'"),
        ("json:NoSuchClass", "has no 'NoSuchClass'"),
        ("collections:OrderedDict", "needs a 'label_names' attribute"),
    ],
)
def test_load_labeler_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_labeler(spec)


def test_label_reports_checks_the_answer() -> None:
    class Broken(KeywordLabeler):
        def __call__(self, reports: Sequence[str]) -> list[list[int]]:
            return [[1, 0]] * len(reports)

    with pytest.raises(ValueError, match=r"Broken returned labels of shape \(1, 2\), expected \(1, 1\)"):
        label_reports(Broken(), ["x"])
