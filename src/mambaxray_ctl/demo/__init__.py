"""The synthetic chest X-ray world and the demo built on it: world sampling, report language,
labeller, renderer, the small local text models, the DataModule, the ``demo`` and ``ablation``
commands. Nothing outside this package imports it; it is a user of the core like any other.
"""
