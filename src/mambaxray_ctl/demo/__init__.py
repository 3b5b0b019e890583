"""The synthetic chest X-ray world and the demo built on it.

* :mod:`~.findings` — the label set and the sampling of a study's findings;
* :mod:`~.language` — the report text written from the findings;
* :mod:`~.labeller` — report → labels, and the ``demo`` labeller behind the core's ``Labeler`` interface;
* :mod:`~.render` — the frontal and lateral views drawn from the findings;
* :mod:`~.world` — whole studies, the world on disk and the ``make-demo-data`` command;
* :mod:`~.text_models` — the small local text models (``build-demo-text-models``);
* :mod:`~.datamodule` — the world's DataModule;
* :mod:`~.run`, :mod:`~.ablation` — the ``demo`` and ``ablation`` commands.

The demo is a user of the core like any other: no module of the core imports it (the ``profile`` tool,
a layer above, trains its tokenizers on the world's reports).
"""
