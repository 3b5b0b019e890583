"""CheXbert, the clinical labeller report-generation papers score CE with (Smit et al., EMNLP 2020),
loading the authors' checkpoint file (``chexbert.pth``) and a local BERT-base-uncased folder; nothing is
downloaded.

The model, from the official code (stanfordmlgroup/CheXbert):

- ``src/models/bert_labeler.py``: ``self.bert`` a ``BertModel`` (pooler included, though unused) and
  ``self.linear_heads``, 13 ``Linear(hidden, 4)`` then one ``Linear(hidden, 2)`` for "No Finding",
  applied to the last layer's hidden state of the first token ([CLS]) after a dropout of 0.1 (the
  identity at inference, so not built here).
- ``src/constants.py``: the 14 observations in head order (:data:`CHEXBERT_CONDITIONS`) and the classes
  ``0 blank, 1 positive, 2 negative, 3 uncertain``; the "No Finding" head has blank (0) and positive (1).
- ``src/label.py``: the class of each head is the argmax of its logits; the checkpoint is a ``torch.save``
  dict whose ``model_state_dict`` is the state dict of ``nn.DataParallel(bert_labeler())``, so every key
  starts with ``module.`` (``module.bert.…``, ``module.linear_heads.{i}.weight/bias``).
- ``src/bert_tokenizer.py``: a report's whitespace runs become single spaces, it is tokenised by
  ``BertTokenizer('bert-base-uncased')`` into ``[CLS] … [SEP]``, cut to 512 tokens (the final ``[SEP]``
  kept); an empty report is ``[CLS] [SEP]``. Padding is masked out.

The BERT configuration comes from ``config.json`` in the tokenizer folder — the bert-base-uncased folder
holds it, and the official code built its encoder from exactly that configuration — and the checkpoint's
keys and shapes must match the model it describes, strictly (:func:`read_checkpoint`). The official file
(saved with transformers 3.0.2) has no ``embeddings.position_ids`` buffer; a re-saved file that has one
(transformers 3.1–4.30 saved it) is accepted when it holds the positions ``0 … max_position - 1``.

Positive vs not (:class:`CheXbertLabeler`): blank (not mentioned) and negative count as 0, positive as 1;
uncertain counts as 0 by default, as in R2Gen's ``compute_ce.py`` recipe (docs/METHOD.md#clinical-efficacy),
or as 1 with ``uncertain="positive"``, as f1chexbert's ``rrg`` mode does.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoTokenizer, BertConfig, BertModel

from mambaxray_ctl.metrics.clinical import UNCERTAIN_CHOICES, UncertainAs

# The 14 CheXpert observations in the order of the heads (CheXbert ``src/constants.py`` CONDITIONS).
CHEXBERT_CONDITIONS = (
    "enlarged_cardiomediastinum",
    "cardiomegaly",
    "lung_opacity",
    "lung_lesion",
    "edema",
    "consolidation",
    "pneumonia",
    "atelectasis",
    "pneumothorax",
    "pleural_effusion",
    "pleural_other",
    "fracture",
    "support_devices",
    "no_finding",
)
# The five observations most papers also report CE over (the CheXpert competition tasks).
CHEXBERT_5 = ("atelectasis", "cardiomegaly", "consolidation", "edema", "pleural_effusion")
# Classes of a head (CheXbert ``src/constants.py`` CLASS_MAPPING); "No Finding" has only the first two.
BLANK, POSITIVE, NEGATIVE, UNCERTAIN = 0, 1, 2, 3
# DataParallel's prefix on every key of the official ``model_state_dict``.
PREFIX = "module."
# A buffer of positions, not a weight: only some transformers versions save it.
POSITION_IDS = f"{PREFIX}bert.embeddings.position_ids"
MAX_TOKENS = 512  # the official truncation length (``src/bert_tokenizer.py``)
SHOWN_KEYS = 8  # keys listed per kind of mismatch in an error


class CheXbert(nn.Module):
    """BERT and one linear head per observation on the [CLS] state (``bert_labeler``, without dropout)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.bert = BertModel(config)
        hidden = config.hidden_size
        heads = [nn.Linear(hidden, 4) for _ in CHEXBERT_CONDITIONS[:-1]] + [nn.Linear(hidden, 2)]
        self.linear_heads = nn.ModuleList(heads)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> list[Tensor]:
        """Logits of every head: 13 ``(batch, 4)`` tensors, then ``(batch, 2)`` for "No Finding"."""
        cls = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        return [head(cls) for head in self.linear_heads]


def expected_shapes(config: BertConfig) -> dict[str, torch.Size]:
    """Key -> shape of the official checkpoint's ``model_state_dict`` for ``config`` (built on the meta
    device: nothing is allocated)."""
    with torch.device("meta"):
        model = CheXbert(config)
    return {f"{PREFIX}{key}": value.shape for key, value in model.state_dict().items()}


def _listed(keys: Sequence[str]) -> str:
    more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


def read_checkpoint(path: str | Path, config: BertConfig) -> dict[str, Tensor]:
    """The state dict of an official CheXbert checkpoint for :class:`CheXbert` (``module.`` removed),
    read with ``torch.load(weights_only=True)``.

    :raises ValueError: naming ``path`` and the keys, when the file is no such checkpoint or its state dict
        has missing, unexpected or mis-shaped keys.
    """
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise ValueError(f"{path}: not a checkpoint torch.load(weights_only=True) can read ({exc})") from None
    if not isinstance(saved, Mapping) or not isinstance(saved.get("model_state_dict"), Mapping):
        raise ValueError(f"{path}: expected a dict with a 'model_state_dict' (the official chexbert.pth)")
    state = dict(saved["model_state_dict"])
    expected = expected_shapes(config)
    if POSITION_IDS in state:
        positions = state.pop(POSITION_IDS)
        if not torch.equal(positions.flatten(), torch.arange(config.max_position_embeddings)):
            raise ValueError(f"{path}: {POSITION_IDS} does not hold 0 … {config.max_position_embeddings - 1}")
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = [
        f"{key} {tuple(state[key].shape) if isinstance(state[key], Tensor) else type(state[key]).__name__} "
        f"(expected {tuple(shape)})"
        for key, shape in expected.items()
        if key in state and (not isinstance(state[key], Tensor) or state[key].shape != shape)
    ]
    kinds = {"missing keys": missing, "unexpected keys": unexpected, "wrong shapes": wrong}
    problems = [f"{kind}: {_listed(keys)}" for kind, keys in kinds.items() if keys]
    if problems:
        raise ValueError(
            f"{path}: not a CheXbert state dict for this BERT configuration (hidden {config.hidden_size}, "
            f"{config.num_hidden_layers} layers, vocabulary {config.vocab_size}): " + "; ".join(problems)
        )
    return {key.removeprefix(PREFIX): value for key, value in state.items()}


def load_chexbert(weights: str | Path, config: BertConfig) -> CheXbert:
    """:class:`CheXbert` with an official checkpoint's weights (:func:`read_checkpoint`), in eval mode."""
    state = read_checkpoint(weights, config)
    model = CheXbert(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def clean_text(report: str) -> str:
    """Whitespace runs (newlines included) as single spaces, ends stripped (``src/bert_tokenizer.py``)."""
    return " ".join(report.split())


class CheXbertLabeler:
    """The built-in ``chexbert`` labeller: the 14 observations of :data:`CHEXBERT_CONDITIONS`, 1 for a
    positive finding (and for an uncertain one when ``uncertain="positive"``), else 0.

    Args:
        weights: the CheXbert checkpoint file (``chexbert.pth`` of the CheXbert authors' release).
        tokenizer: a local bert-base-uncased folder: its tokenizer files and ``config.json``.
        uncertain: what an uncertain mention counts as (default ``negative``; see the module docstring).
        batch_size: reports per forward pass.
        device: ``cpu`` or ``cuda`` (default: ``cuda`` when available).
    """

    label_names: Sequence[str] = CHEXBERT_CONDITIONS
    # Subsets that :func:`mambaxray_ctl.metrics.clinical.subset_scores` also scores.
    label_subsets: Mapping[str, Sequence[str]] = {"5": CHEXBERT_5}

    def __init__(
        self,
        weights: str | Path,
        tokenizer: str | Path,
        uncertain: UncertainAs = "negative",
        batch_size: int = 16,
        device: str | None = None,
    ) -> None:
        if uncertain not in UNCERTAIN_CHOICES:
            raise ValueError(f"uncertain must be one of {UNCERTAIN_CHOICES}, got {uncertain!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        weights, folder = Path(weights), Path(tokenizer)
        if not weights.is_file():
            raise ValueError(f"CheXbert checkpoint {weights}: no such file")
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"BERT tokenizer folder {folder}: no config.json (a bert-base-uncased folder holds its "
                "tokenizer files and config.json)"
            )
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        if not isinstance(config, BertConfig):
            raise ValueError(f"{folder}/config.json: a {type(config).__name__}, expected a BERT config")
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if self.tokenizer.cls_token_id is None or self.tokenizer.sep_token_id is None:
            raise ValueError(f"BERT tokenizer folder {folder}: the tokenizer has no [CLS] or [SEP] token")
        if len(self.tokenizer) > config.vocab_size:
            raise ValueError(
                f"BERT tokenizer folder {folder}: {len(self.tokenizer)} tokens, more than the model's "
                f"vocabulary of {config.vocab_size}"
            )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_chexbert(weights, config).to(self.device)
        self.max_tokens = min(MAX_TOKENS, config.max_position_embeddings)
        self.uncertain = uncertain
        self.batch_size = batch_size
        self.settings = {"weights": str(weights), "tokenizer": str(folder), "uncertain": uncertain}

    @torch.inference_mode()
    def classes(self, reports: Sequence[str]) -> np.ndarray:
        """``(len(reports), 14)`` classes: 0 blank, 1 positive, 2 negative, 3 uncertain."""
        rows = []
        for start in range(0, len(reports), self.batch_size):
            texts = [clean_text(report) for report in reports[start : start + self.batch_size]]
            batch = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
            )
            logits = self.model(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
            rows.append(torch.stack([head.argmax(dim=1) for head in logits], dim=1).cpu())
        return torch.cat(rows).numpy() if rows else np.zeros((0, len(CHEXBERT_CONDITIONS)), dtype=np.int64)

    def __call__(self, reports: Sequence[str]) -> list[list[int]]:
        classes = self.classes(reports)
        positive = classes == POSITIVE
        if self.uncertain == "positive":
            positive |= classes == UNCERTAIN
        return positive.astype(int).tolist()
