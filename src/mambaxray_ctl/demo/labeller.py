"""The demo world's labeller: its rule-based report reader behind the core's ``Labeler`` interface."""

from __future__ import annotations

from collections.abc import Sequence

from mambaxray_ctl.demo.world import LABEL_NAMES, extract_labels


class DemoWorldLabeler:
    """Reads the findings of a demo-world report (:func:`mambaxray_ctl.demo.world.extract_labels`).

    Selected with ``labeler: demo`` (see :data:`mambaxray_ctl.metrics.clinical.BUILTIN_LABELERS`).
    """

    label_names: Sequence[str] = LABEL_NAMES

    def __call__(self, reports: Sequence[str]) -> list[list[int]]:
        return [extract_labels(report) for report in reports]
