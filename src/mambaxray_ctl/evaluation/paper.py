"""The MambaXray-CTL paper's published numbers, to print beside ours.

Where they come from: the MambaXray-CTL paper's

- **Table I** (comparison with other methods): IU X-ray (R2Gen split) and CheXpert Plus (CXPMRG-Bench
  split), :data:`TABLE_I`;
- **Table II** (ablation, on IU X-ray with the Large model): seven rows of stage-1 method, stage 2 (the
  paper's "CTL" column: image–report contrastive learning) and CTL-FT (the contrastive term in stage 3),
  every row with stage-3 supervised fine-tuning, :data:`TABLE_II`.

The paper's metrics are pycocoevalcap's BLEU-1..4, ROUGE-L and CIDEr on the test split; they are keyed
here as :func:`mambaxray_ctl.metrics.report.score_reports` names ours (``BLEU_1``, ``ROUGE_L``, ...). A
metric the paper does not report for a row is absent from its mapping (printed ``-``).

They are printed beside ours, and only that: ``mambaxray-ctl evaluate`` prints the Table I rows of
``iu_xray`` and ``chexpert_plus`` (:func:`table_i`), ``mambaxray-ctl ablation`` the Table II row of each
ablation row (``paper_row:`` in ``configs/ablation/``). Nothing reads them to choose a setting: they are
never used for tuning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Metric key -> the paper's column title.
TITLES: dict[str, str] = {
    "BLEU_1": "BLEU-1",
    "BLEU_2": "BLEU-2",
    "BLEU_3": "BLEU-3",
    "BLEU_4": "BLEU-4",
    "ROUGE_L": "ROUGE-L",
    "CIDEr": "CIDEr",
}
TABLE_I_METRICS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "CIDEr")
TABLE_II_METRICS = ("BLEU_1", "BLEU_4", "ROUGE_L", "CIDEr")
# Printed for a metric the paper does not report.
NOT_REPORTED = "-"

# Dataset (the ``--dataset`` of ``mambaxray-ctl evaluate``) -> how the paper names it and its split.
DATASET_NAMES: dict[str, str] = {
    "iu_xray": "IU X-ray, R2Gen split",
    "chexpert_plus": "CheXpert Plus, CXPMRG-Bench split",
}
TABLE_II_DATASET = "iu_xray"
TABLE_II_MODEL = "MambaXray-CTL-Large"
# What Table II was measured on, as the paper says it.
TABLE_II_SETTING = "IU X-ray, the Large model"


@dataclass(frozen=True)
class PaperRow:
    """One row of the paper's tables.

    Args:
        dataset: the dataset it was measured on (``iu_xray``, ``chexpert_plus``).
        name: the row's name (a method for Table I; ``#N`` and its switches for Table II).
        metrics: metric key (``BLEU_4``, ``CIDEr``, ...) -> the paper's number; only those it reports.
    """

    dataset: str
    name: str
    metrics: Mapping[str, float]

    def cell(self, key: str) -> str:
        """The number of ``key`` as the paper prints it (3 decimals), or :data:`NOT_REPORTED`."""
        return f"{self.metrics[key]:.3f}" if key in self.metrics else NOT_REPORTED


@dataclass(frozen=True, kw_only=True)
class AblationRow(PaperRow):
    """One row of the paper's Table II: what it trained, and its numbers (on :data:`TABLE_II_DATASET`).

    Args:
        index: its number in Table II (1..7).
        stage1: the stage-1 pretraining (``arm``, ``mae``, ``simclr``) or ``None``.
        stage2: whether stage 2 (image–report contrastive learning, the paper's "CTL") ran.
        ctl_ft: whether stage 3 trained with CTL-FT (λ = 0.4).
    """

    index: int
    stage1: str | None
    stage2: bool
    ctl_ft: bool


def _row(dataset: str, name: str, *values: float | None, keys: tuple[str, ...] = TABLE_I_METRICS) -> PaperRow:
    return PaperRow(dataset, name, {k: v for k, v in zip(keys, values, strict=True) if v is not None})


# The paper's Table I, per dataset, in the paper's order (None: "-", not reported).
TABLE_I: dict[str, tuple[PaperRow, ...]] = {
    "iu_xray": (
        _row("iu_xray", "R2Gen", 0.470, 0.304, 0.219, 0.165, 0.371, None),
        _row("iu_xray", "R2GenGPT", 0.465, 0.299, 0.214, 0.161, 0.376, 0.542),
        _row("iu_xray", "MambaXray-VL", 0.491, 0.330, 0.241, 0.185, 0.371, 0.524),
        _row("iu_xray", "MambaXray-CTL-Base", 0.478, 0.323, 0.240, 0.185, 0.364, 0.501),
        _row("iu_xray", "MambaXray-CTL-Large", 0.491, 0.334, 0.252, 0.199, 0.374, 0.544),
    ),
    "chexpert_plus": (
        _row("chexpert_plus", "R2Gen", 0.301, 0.179, 0.118, 0.081, 0.246, 0.077),
        _row("chexpert_plus", "R2GenGPT", 0.361, 0.224, 0.149, 0.101, 0.266, 0.123),
        _row("chexpert_plus", "MambaXray-VL", None, None, None, 0.112, 0.276, 0.139),
        _row("chexpert_plus", "MambaXray-CTL-Base", 0.376, 0.232, 0.153, 0.104, 0.272, 0.227),
        _row("chexpert_plus", "MambaXray-CTL-Large", 0.381, 0.240, 0.162, 0.114, 0.283, 0.242),
    ),
}


def _ablation(
    index: int, name: str, stage1: str | None, stage2: bool, ctl_ft: bool, *values: float
) -> AblationRow:
    metrics = dict(zip(TABLE_II_METRICS, values, strict=True))
    return AblationRow(
        TABLE_II_DATASET, name, metrics, index=index, stage1=stage1, stage2=stage2, ctl_ft=ctl_ft
    )


# The paper's Table II (IU X-ray, Large model): index, name, stage 1, stage 2 ("CTL"), CTL-FT, then
# BLEU-1, BLEU-4, ROUGE-L, CIDEr. Every row ends with stage-3 supervised fine-tuning (SFT).
TABLE_II: tuple[AblationRow, ...] = (
    _ablation(1, "SimCLR + CTL + CTL-FT", "simclr", True, True, 0.488, 0.175, 0.365, 0.456),
    _ablation(2, "MAE + CTL + CTL-FT", "mae", True, True, 0.471, 0.177, 0.358, 0.431),
    _ablation(3, "ARM + CTL + CTL-FT", "arm", True, True, 0.479, 0.193, 0.375, 0.607),
    _ablation(4, "ARM + CTL-FT (no stage 2)", "arm", False, True, 0.463, 0.185, 0.364, 0.451),
    _ablation(5, "CTL-FT only (no stage 1, no stage 2)", None, False, True, 0.444, 0.175, 0.358, 0.352),
    _ablation(6, "ARM + CTL (no CTL-FT)", "arm", True, False, 0.482, 0.178, 0.362, 0.461),
    _ablation(7, "ARM only (no stage 2, no CTL-FT)", "arm", False, False, 0.457, 0.174, 0.353, 0.467),
)


def table_i(dataset: str) -> tuple[PaperRow, ...]:
    """The paper's Table I rows for ``dataset`` (none for a dataset the paper does not report, e.g. demo)."""
    return TABLE_I.get(dataset, ())


def table_ii_row(index: int) -> AblationRow:
    """Row ``#index`` of the paper's Table II; :class:`ValueError` for an index it does not have."""
    for row in TABLE_II:
        if row.index == index:
            return row
    raise ValueError(f"the paper's Table II has no row {index!r}; it has {[row.index for row in TABLE_II]}")
