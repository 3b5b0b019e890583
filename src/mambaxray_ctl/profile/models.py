"""Paper-size text models as random-init folders: transformers configs and tokenizers trained here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import BertConfig, LlamaConfig, PretrainedConfig, Qwen2Config

from mambaxray_ctl.data.cleaning import clean_report
from mambaxray_ctl.demo.text_models import train_tokenizer
from mambaxray_ctl.demo.world import sample_study
from mambaxray_ctl.text.llm import DEFAULT_PROMPT, DEFAULT_TEMPLATE, split_template
from mambaxray_ctl.text.loading import save_random_init

# The paper's decoder for each dataset, when --llm is not given.
DATASET_LLM = {"iu_xray": "qwen1.5-1.8b", "chexpert_plus": "llama2-7b"}


def _qwen(vocab_size: int, hidden: int, layers: int, heads: int, intermediate: int) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
    )


LLM_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "qwen1.5-1.8b": lambda: _qwen(151936, 2048, 24, 16, 5504),
    "llama2-7b": lambda: LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
    "tiny": lambda: _qwen(4096, 64, 2, 4, 128),  # for tests and smoke runs
}
TEXT_ENCODER_CONFIGS: dict[str, Callable[[], BertConfig]] = {
    "bio-clinicalbert": lambda: BertConfig(
        vocab_size=28996,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
    ),
    "tiny": lambda: BertConfig(
        vocab_size=2048, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ),
}


def synthetic_reports(count: int, seed: int = 0) -> list[str]:
    """Cleaned report texts of the synthetic world (no images are rendered)."""
    return [clean_report(sample_study(seed, index)[1], "iu_xray") for index in range(count)]


def write_text_models(out: Path, stage: str, llm: str, text_encoder: str) -> dict[str, Any]:
    """Random-init folders of the stage's text model under ``out``; the module arguments naming them."""
    reports = synthetic_reports(200)
    if stage == "stage3_reportgen":
        tokenizer = train_tokenizer([*reports, *split_template(DEFAULT_TEMPLATE, DEFAULT_PROMPT)], kind="lm")
        config = LLM_CONFIGS[llm]()
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        return {"lm": {"name": str(save_random_init(out / "lm", config, tokenizer))}}
    if stage == "stage2_contrastive":
        tokenizer = train_tokenizer(reports, kind="encoder")
        config = TEXT_ENCODER_CONFIGS[text_encoder]()
        tokenizer.model_max_length = config.max_position_embeddings
        config.pad_token_id = tokenizer.pad_token_id
        return {"text_encoder": str(save_random_init(out / "text_encoder", config, tokenizer))}
    return {}
