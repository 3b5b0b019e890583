"""``mambaxray-ctl profile``: time and size a stage at the paper's model sizes, with random weights.

The stage is the real LightningModule of the config ``fit`` parses (``configs/data/<dataset>.yaml``,
``configs/<stage>.yaml``, then ``configs/<dataset>/<stage>.yaml`` when present; see :mod:`.stage`),
trained for a few steps by a minimal Lightning Trainer on one synthetic batch, so what is measured is
what trains. Nothing is downloaded: the text models are
random-init folders (:func:`~mambaxray_ctl.text.loading.save_random_init`) holding a transformers config
of the paper's model (Bio_ClinicalBERT, Qwen1.5-1.8B, LLaMA-2-7B sizes, their real vocabularies) and a
tokenizer trained here on synthetic reports. Reports are long enough to fill the token limits
(``lm.max_target_tokens``, ``text_max_length``), so text lengths are the worst case.

Printed (and written with ``--json``): parameter counts, seconds per step after the first (warm-up)
step, peak memory (CUDA max allocated, or the process's peak RSS on a CPU), image and text tokens per
second, one beam-search generation for stage 3, and the epoch and run time projected from the measured
step for each dataset's training set and the configs' epochs, at the global batch (per-device batch ×
devices).

Modules: :mod:`.models` (paper-size text models), :mod:`.stage` (configs, the module, the synthetic
batch), :mod:`.measure` (the step profiler, peak memory, the CPU's precisions), :mod:`.report`
(projections and the table) and :mod:`.command` (the CLI command).
"""
