"""Evaluation commands: ``evaluate`` (score a predictions file with the paper's protocol, in
:mod:`~mambaxray_ctl.evaluation.evaluate`), ``generate`` (the report of one study,
:mod:`~mambaxray_ctl.evaluation.generate`) and the qualitative-inspection helpers the notebooks call
(:mod:`~mambaxray_ctl.evaluation.qualitative`)."""
