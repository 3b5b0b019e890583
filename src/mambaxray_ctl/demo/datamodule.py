"""The DataModule of the synthetic chest X-ray world."""

from __future__ import annotations

import logging
from typing import Any

from mambaxray_ctl.data.cleaning import CleaningRule
from mambaxray_ctl.data.datamodules import ReportDataModule
from mambaxray_ctl.demo.world import generate_world

log = logging.getLogger(__name__)


class DemoDataModule(ReportDataModule):
    """The synthetic chest X-ray world (:mod:`mambaxray_ctl.demo.world`): two views, labels.

    :param annotation: the world's ``annotation.json``.
    :param image_root: folder holding ``<id>/0.png`` and ``<id>/1.png``.
    :param cleaning: report cleaning rule.
    :param num_views: images required per study.
    :param generate: in ``prepare_data``, generate the world when the annotation does not exist.
    :param num_studies: studies to generate.
    :param world_seed: seed of the generated world.
    :param kwargs: any other :class:`ReportDataModule` argument.
    """

    dataset_name = "demo"

    def __init__(
        self,
        annotation: str = "data/demo/annotation.json",
        image_root: str | None = "data/demo/images",
        cleaning: CleaningRule = "iu_xray",
        num_views: int | None = 2,
        generate: bool = True,
        num_studies: int = 2400,
        world_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            annotation=annotation, image_root=image_root, cleaning=cleaning, num_views=num_views, **kwargs
        )

    def prepare_data(self) -> None:
        """Generate the world once (rank 0) if it is missing and ``generate`` is on."""
        if self.annotation_path.exists() or not self.hparams.generate:
            return
        out = self.annotation_path.parent
        log.info("generating the demo world (%d studies) in %s", self.hparams.num_studies, out)
        generate_world(
            out, n=self.hparams.num_studies, seed=self.hparams.world_seed, size=self.hparams.image_size
        )
