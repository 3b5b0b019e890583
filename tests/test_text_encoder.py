"""The stage-2 report encoder: pooling positions, tokenisation, trainability and loading errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mambaxray_ctl.demo.text_models import build_text_encoder
from mambaxray_ctl.text.encoder import TextEncoder

REPORTS = [
    "the lungs are clear .",
    "no pleural effusion . the cardiac silhouette is enlarged . no pneumothorax .",
    "there is focal consolidation in the right lower lobe .",
]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("text") / "text_encoder"
    sizes = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_length": 32}
    return build_text_encoder(REPORTS * 3, out, vocab_size=300, **sizes)


@pytest.mark.parametrize("pooling", ["last_nonpad", "cls", "mean"])
def test_pooling_takes_the_right_positions(encoder_dir: Path, pooling: str) -> None:
    encoder = TextEncoder(str(encoder_dir), pooling=pooling, max_length=32).eval()
    tokenizer = encoder.tokenizer
    with torch.no_grad():
        pooled = encoder(REPORTS)
        encoding = encoder.tokenize(REPORTS)
        hidden = encoder.model(**encoding).last_hidden_state
    lengths = encoding["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == len(REPORTS)  # really padded
    for row, length in enumerate(lengths.tolist()):
        ids = encoding["input_ids"][row]
        assert ids[0] == tokenizer.cls_token_id and ids[length - 1] == tokenizer.sep_token_id
        expected = {
            "last_nonpad": hidden[row, length - 1],
            "cls": hidden[row, 0],
            "mean": hidden[row, :length].mean(0),
        }[pooling]
        torch.testing.assert_close(pooled[row], expected)
    assert pooled.shape == (len(REPORTS), encoder.hidden_size) == (3, 32)


def test_padding_and_truncation(encoder_dir: Path) -> None:
    longest = TextEncoder(str(encoder_dir), max_length=16).eval()
    padded = TextEncoder(str(encoder_dir), max_length=16, padding="max_length").eval()
    reports = ["the lungs are clear .", " ".join(REPORTS * 4)]
    encoding = longest.tokenize(reports)
    assert encoding["input_ids"].shape[1] == 16  # the long report is truncated
    assert encoding["input_ids"][1, -1] == longest.tokenizer.sep_token_id
    assert padded.tokenize(reports[:1])["input_ids"].shape == (1, 16)
    with torch.no_grad():
        torch.testing.assert_close(longest(reports[:1]), padded(reports[:1]), atol=1e-5, rtol=1e-5)


def test_encoder_is_trainable(encoder_dir: Path) -> None:
    encoder = TextEncoder(str(encoder_dir), max_length=32).train()
    assert all(p.requires_grad for p in encoder.parameters())
    encoder(REPORTS).sum().backward()
    assert encoder.model.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_invalid_options(encoder_dir: Path) -> None:
    with pytest.raises(ValueError, match="pooling"):
        TextEncoder(str(encoder_dir), pooling="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="32 positions"):
        TextEncoder(str(encoder_dir), max_length=64)


def test_missing_folder_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "encoder"
    with pytest.raises(FileNotFoundError, match=str(missing)) as info:
        TextEncoder(str(missing))
    assert "HF_HUB_OFFLINE" in str(info.value)


def test_unknown_hub_name_offline_names_it() -> None:
    with pytest.raises(OSError, match="no-such-org/no-such-model") as info:
        TextEncoder("no-such-org/no-such-model", local_files_only=True)
    assert "network" in str(info.value)
