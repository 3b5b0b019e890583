"""The stage-2 report encoder: a trainable Hugging Face encoder (Bio_ClinicalBERT in the paper) with pooling.

The official code pools the hidden state of the last non-padding token (``attention_mask.sum(1) - 1``,
i.e. ``[SEP]`` for BERT), not ``[CLS]`` (docs/METHOD.md#stage-2-image-report-contrastive-learning);
``cls`` and masked ``mean`` are the alternatives.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer, BatchEncoding

from mambaxray_ctl.text.loading import load_model, load_pretrained

Pooling = Literal["last_nonpad", "cls", "mean"]
Padding = Literal["longest", "max_length"]


def pool_hidden_states(hidden: Tensor, attention_mask: Tensor, pooling: Pooling) -> Tensor:
    """(B, T, H) hidden states and a right-padded (B, T) mask → (B, H)."""
    if pooling == "last_nonpad":
        last = attention_mask.sum(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {get_args(Pooling)}")


class TextEncoder(nn.Module):
    """Tokenizer + ``AutoModel`` encoder, fully trainable, returning one pooled vector per report.

    ``padding="longest"`` pads to the longest report of the batch; ``"max_length"`` pads every batch to
    ``max_length`` as the official code does (same pooled values, more compute;
    docs/METHOD.md#deviations-in-stage-2). Reports are truncated at
    ``max_length`` tokens either way.
    """

    def __init__(
        self,
        name_or_path: str,
        pooling: Pooling = "last_nonpad",
        max_length: int = 128,
        local_files_only: bool | None = None,
        padding: Padding = "longest",
    ) -> None:
        super().__init__()
        if pooling not in get_args(Pooling):
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {get_args(Pooling)}")
        if padding not in get_args(Padding):
            raise ValueError(f"unknown padding {padding!r}; choose one of {get_args(Padding)}")
        self.pooling: Pooling = pooling
        self.padding: Padding = padding
        self.max_length = max_length
        self.tokenizer = load_pretrained(
            AutoTokenizer.from_pretrained,
            name_or_path,
            what="text encoder",
            local_files_only=local_files_only,
        )
        self.model = load_model(
            AutoModel, name_or_path, what="text encoder", local_files_only=local_files_only
        )
        self.model.train()  # from_pretrained returns eval mode; this encoder is trained (dropout on)
        if getattr(self.model, "pooler", None) is not None:
            # BERT's pooler ([CLS] dense + tanh) never reaches our pooled features: trainable parameters
            # without a gradient stop DDP (find_unused_parameters=False) at its second step.
            self.model.pooler = None
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"the tokenizer in {name_or_path} has no pad token")
        self.tokenizer.padding_side = "right"  # last_nonpad pooling relies on right padding
        max_positions = getattr(self.model.config, "max_position_embeddings", None)
        if max_positions is not None and max_length > max_positions:
            raise ValueError(
                f"max_length {max_length} exceeds the {max_positions} positions of {name_or_path}"
            )

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, reports: list[str], device: torch.device | str | None = None) -> BatchEncoding:
        """Right-padded, truncated token ids and attention mask, on ``device`` if given."""
        encoding = self.tokenizer(
            list(reports),
            padding=self.padding,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return encoding if device is None else encoding.to(device)

    def forward(self, reports: list[str]) -> Tensor:
        """Pooled report features, (B, hidden_size)."""
        encoding = self.tokenize(reports, self.model.device)
        hidden = self.model(
            input_ids=encoding["input_ids"], attention_mask=encoding["attention_mask"]
        ).last_hidden_state
        return pool_hidden_states(hidden, encoding["attention_mask"], self.pooling)
