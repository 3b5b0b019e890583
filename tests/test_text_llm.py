"""The frozen report LM: sequence layout, labels, target embedding, freezing and generation."""

from __future__ import annotations

import re
import shutil
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, Qwen2Config

from mambaxray_ctl.demo.text_models import train_causal_lm
from mambaxray_ctl.text import llm
from mambaxray_ctl.text.llm import DEFAULT_PROMPT, LMSpec, ReportLM
from mambaxray_ctl.text.loading import RANDOM_INIT_MARKER, save_random_init

REPORTS = [
    "the lungs are clear .",
    "no pleural effusion . no pneumothorax .",
    "the cardiac silhouette is enlarged . the lungs are clear .",
    "there is focal consolidation in the right lower lobe .",
]
TARGET_TOKENS = 12
VISUAL_TOKENS = 3


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = REPORTS * 4  # train_causal_lm adds the prompt to the tokenizer corpus itself
    out = tmp_path_factory.mktemp("text") / "lm"
    sizes = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_length": 32}
    return train_causal_lm(
        texts, out, vocab_size=400, steps=60, batch_size=4, lr=1e-2, progress=False, **sizes
    )


@pytest.fixture(scope="module")
def lm(lm_dir: Path) -> ReportLM:
    return ReportLM(str(lm_dir), max_target_tokens=TARGET_TOKENS)


@pytest.fixture(scope="module")
def bare_lm(lm_dir: Path) -> ReportLM:
    """No prompt text, so that the visual tokens steer the tiny LM and samples differ."""
    return ReportLM(str(lm_dir), template="<ImageHere>", prompt="", max_target_tokens=TARGET_TOKENS)


def _visual(lm: ReportLM, batch: int, seed: int = 0, scale: float = 0.1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, VISUAL_TOKENS, lm.hidden_size, generator=generator) * scale


def test_special_tokens_come_from_the_tokenizer(lm: ReportLM) -> None:
    tokenizer = lm.tokenizer
    assert lm.bos_id == tokenizer.convert_tokens_to_ids("<s>")
    assert lm.eos_id == tokenizer.convert_tokens_to_ids("</s>")
    assert lm.pad_id == tokenizer.convert_tokens_to_ids("<pad>")
    assert tokenizer.decode(lm.before_ids) == "Human: <Img>"
    assert tokenizer.decode(lm.after_ids) == f"</Img> {DEFAULT_PROMPT} \nAssistant:"


def test_build_inputs_layout_and_labels(lm: ReportLM) -> None:
    long_report = " ".join(REPORTS)
    reports = [REPORTS[0], long_report]
    visual = _visual(lm, 2)
    batch = lm.build_inputs(visual, reports)
    prefix = lm.prefix_length + VISUAL_TOKENS
    tokens = [lm.tokenizer(r, add_special_tokens=False)["input_ids"] for r in reports]
    assert len(tokens[0]) + 1 < TARGET_TOKENS < len(tokens[1])

    expected_ids = torch.full((2, TARGET_TOKENS), lm.pad_id)
    expected_ids[0, : len(tokens[0]) + 1] = torch.tensor([*tokens[0], lm.eos_id])
    expected_ids[1] = torch.tensor(tokens[1][:TARGET_TOKENS])  # truncated: the EOS is lost
    torch.testing.assert_close(batch["target_ids"], expected_ids)
    torch.testing.assert_close(batch["target_mask"], expected_ids != lm.pad_id)
    assert batch["target_mask"].dtype == torch.bool

    length = TARGET_TOKENS  # the longest target fills max_target_tokens
    assert batch["inputs_embeds"].shape == (2, prefix + length, lm.hidden_size)
    labels = batch["labels"]
    assert (labels[:, :prefix] == -100).all()
    target_labels = expected_ids.masked_fill(~batch["target_mask"], -100)
    torch.testing.assert_close(labels[:, prefix:], target_labels)
    assert (labels[0] == lm.eos_id).sum() == 1
    torch.testing.assert_close(batch["attention_mask"][:, :prefix], torch.ones(2, prefix, dtype=torch.long))
    torch.testing.assert_close(batch["attention_mask"][:, prefix:], batch["target_mask"].long())

    embed = lm.input_embeddings.weight
    embeds = batch["inputs_embeds"]
    torch.testing.assert_close(embeds[:, 0], embed[lm.bos_id].expand(2, -1))
    before = 1 + len(lm.before_ids)
    torch.testing.assert_close(embeds[:, before : before + VISUAL_TOKENS], visual)
    torch.testing.assert_close(embeds[:, prefix:], embed[expected_ids])


def test_targets_are_trimmed_to_the_longest_report(lm: ReportLM) -> None:
    batch = lm.build_inputs(_visual(lm, 2), REPORTS[:2])
    longest = int(batch["target_mask"].sum(1).max())
    assert longest < TARGET_TOKENS
    assert batch["inputs_embeds"].shape[1] == lm.prefix_length + VISUAL_TOKENS + longest
    assert batch["target_ids"].shape == (2, TARGET_TOKENS)


def test_target_embedding_padding_switch(lm: ReportLM) -> None:
    batch = lm.build_inputs(_visual(lm, 2), REPORTS[:2])
    ids, mask = batch["target_ids"], batch["target_mask"]
    embed = lm.input_embeddings.weight
    without = lm.target_embedding(ids, mask)
    with_padding = lm.target_embedding(ids, mask, include_padding=True)
    for row in range(2):
        torch.testing.assert_close(without[row], embed[ids[row][mask[row]]].mean(0))
        torch.testing.assert_close(with_padding[row], embed[ids[row]].mean(0))
    assert without.dtype == torch.float32 and not torch.allclose(without, with_padding)


def test_loss_is_mean_cross_entropy_over_report_tokens(lm: ReportLM) -> None:
    loss, batch = lm(_visual(lm, 3), REPORTS[:3])
    logits = lm.model(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100
    )
    torch.testing.assert_close(loss, expected)


class _NoLogitsToKeep(nn.Module):
    """A causal LM whose forward has no ``logits_to_keep``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: object) -> object:
        return self.model(**inputs)


def test_labelled_token_loss_equals_the_lms_own_loss(lm: ReportLM) -> None:
    """Logits from the last prompt position only (or all, for a model without ``logits_to_keep``) give
    the model's ``labels=`` loss and its gradient; a fully labelled sequence too."""
    batch = lm.build_inputs(_visual(lm, 3).requires_grad_(), REPORTS[:3])
    inputs = {"inputs_embeds": batch["inputs_embeds"], "attention_mask": batch["attention_mask"]}
    want = lm.model(**inputs, labels=batch["labels"]).loss
    for model in (lm.model, _NoLogitsToKeep(lm.model)):
        got = llm.labelled_token_loss(model, batch["labels"], **inputs)
        torch.testing.assert_close(got, want)
        embeds = batch["inputs_embeds"]
        grad, want_grad = (torch.autograd.grad(x, embeds, retain_graph=True)[0] for x in (got, want))
        torch.testing.assert_close(grad, want_grad)
    ids = batch["target_ids"]
    full = llm.labelled_token_loss(lm.model, ids, input_ids=ids)
    torch.testing.assert_close(full, lm.model(input_ids=ids, labels=ids).loss)


def test_lm_frozen_in_eval_mode_and_visual_gets_gradients(lm: ReportLM) -> None:
    lm.train()
    assert lm.training and not any(module.training for module in lm.model.modules())
    assert not any(p.requires_grad for p in lm.parameters())
    visual = _visual(lm, 2).requires_grad_()
    loss, _ = lm(visual, REPORTS[:2])
    loss.backward()
    assert visual.grad is not None and visual.grad.abs().sum() > 0
    lm.eval()


def test_half_precision_lm_takes_float32_visual(lm_dir: Path) -> None:
    lm = ReportLM(str(lm_dir), dtype="bfloat16", max_target_tokens=TARGET_TOKENS)
    assert lm.dtype == torch.bfloat16
    visual = _visual(lm, 2).requires_grad_()
    loss, batch = lm(visual, REPORTS[:2])
    assert batch["inputs_embeds"].dtype == torch.bfloat16 and torch.isfinite(loss)
    loss.backward()
    assert visual.grad is not None and visual.grad.dtype == torch.float32


def test_tokenizer_without_bos_or_pad(lm_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "lm"
    shutil.copytree(lm_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.bos_token = None
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    lm = ReportLM(str(folder), max_target_tokens=TARGET_TOKENS)
    assert lm.bos_id is None and lm.pad_id == lm.eos_id
    assert lm.prefix_length == len(lm.before_ids) + len(lm.after_ids)
    batch = lm.build_inputs(_visual(lm, 2), REPORTS[:2])
    embed = lm.input_embeddings.weight
    torch.testing.assert_close(batch["inputs_embeds"][:, 0], embed[lm.before_ids[0]].expand(2, -1))
    # padding uses the EOS id but is masked by position, so each real EOS keeps its label
    assert ((batch["labels"] == lm.eos_id).sum(1) == 1).all()


@pytest.mark.parametrize("template", ["Human: {prompt}", "<ImageHere> <ImageHere> {prompt}"])
def test_template_needs_one_placeholder(lm_dir: Path, template: str) -> None:
    with pytest.raises(ValueError, match="exactly once"):
        ReportLM(str(lm_dir), template=template)


def test_lora_needs_peft(lm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` fails, installed or not
    with pytest.raises(ImportError, match=re.escape("pip install 'mambaxray-ctl[lora]'")):
        ReportLM(str(lm_dir), lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj"]})
    with pytest.raises(ValueError, match="rank"):
        ReportLM(str(lm_dir), lora={"rank": 4})


# 4-bit loading -------------------------------------------------------------------------------------------
@pytest.fixture
def captured_load(lm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """``from_pretrained`` of the LM replaced: it records its keyword arguments and returns the tiny LM
    loaded as usual; CUDA, bitsandbytes and accelerate reported present."""
    model = AutoModelForCausalLM.from_pretrained(lm_dir)
    calls: list[dict] = []

    def from_pretrained(name: str, **kwargs: object) -> nn.Module:
        calls.append(kwargs)
        return model

    monkeypatch.setattr(llm.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(llm.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(llm, "is_bitsandbytes_available", lambda: True)
    monkeypatch.setattr(llm, "is_accelerate_available", lambda: True)
    return calls


def test_nf4_passes_the_qlora_config_to_from_pretrained(
    lm_dir: Path, captured_load: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")
    spec = LMSpec(name=str(lm_dir), dtype="bfloat16", quantization="nf4", max_target_tokens=TARGET_TOKENS)
    ReportLM.from_spec(spec)
    ReportLM.from_spec(replace(spec, quantization=None))
    quantized, plain = captured_load
    config = quantized["quantization_config"]
    assert isinstance(config, BitsAndBytesConfig)
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4" and config.quantization_method() == "nf4"
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert config.bnb_4bit_use_double_quant is True
    assert quantized["device_map"] == {"": 1}  # this process's GPU
    assert quantized["dtype"] == plain["dtype"] == torch.bfloat16  # the parts left unquantized
    assert "quantization_config" not in plain and "device_map" not in plain


def test_nf4_errors_name_the_fix(
    lm_dir: Path, tmp_path: Path, captured_load: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(llm, "is_bitsandbytes_available", lambda: False)
    with pytest.raises(ImportError, match=re.escape("pip install 'mambaxray-ctl[quant]'")):
        ReportLM(str(lm_dir), quantization="nf4")
    monkeypatch.setattr(llm.torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"needs a CUDA GPU.*leave lm\.quantization unset"):
        ReportLM(str(lm_dir), quantization="nf4")
    with pytest.raises(ValueError, match=re.escape("unknown lm.quantization='int8'")):
        ReportLM(str(lm_dir), quantization="int8")
    random_init = _random_init_dir(lm_dir, tmp_path / "lm", vocab_size=500)
    with pytest.raises(ValueError, match="random-init folder"):
        ReportLM(str(random_init), quantization="nf4")
    assert captured_load == []  # every error comes before the load


def test_nf4_warns_unless_the_lm_dtype_is_bfloat16(lm_dir: Path, captured_load: list[dict]) -> None:
    with pytest.warns(UserWarning, match=r"lm\.dtype='float32'.*set lm\.dtype: bfloat16"):
        ReportLM(str(lm_dir), quantization="nf4")  # the default dtype, float32
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="lm.quantization")
        ReportLM(str(lm_dir), dtype="bfloat16", quantization="nf4")
        ReportLM(str(lm_dir))  # float32 without quantization


def test_generate_turns_a_4bit_checkpoints_load_errors_into_messages(
    lm_dir: Path, tmp_path: Path, captured_load: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``generate`` (default ``--device cpu``) on an nf4 checkpoint: a one-line error, no traceback."""
    from mambaxray_ctl.evaluation.generate import CheckpointInfo, GenerateError, load_module

    lm = {"name": str(lm_dir), "dtype": "bfloat16", "quantization": "nf4"}
    info = CheckpointInfo(
        tmp_path / "model.safetensors", {"backbone": {"preset": "test_arm_tiny"}, "lm": lm}, {}
    )
    with pytest.raises(GenerateError, match=r"4-bit report LM \(lm\.quantization='nf4'\).*--device cuda"):
        load_module(info, device="cpu")
    assert captured_load == []  # refused before any load
    monkeypatch.setattr(llm, "is_bitsandbytes_available", lambda: False)  # CUDA reported present
    with pytest.raises(
        GenerateError, match=re.escape("cannot build its model here: lm.quantization='nf4' needs")
    ):
        load_module(info, device="cuda")

    def no_gpu(quantization: str | None, name: str) -> dict:
        raise RuntimeError("lm.quantization='nf4' ... needs a CUDA GPU")

    monkeypatch.setattr(llm, "quantization_settings", no_gpu)
    with pytest.raises(
        GenerateError, match=r"model\.safetensors: cannot build its model here: .* needs a CUDA GPU"
    ):
        load_module(info, device="cuda")


def test_missing_folder_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "models" / "lm"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        ReportLM(str(missing))
    with pytest.raises(ValueError, match="dtype"):
        ReportLM(str(missing), dtype="int8")


def _first_eos(ids: torch.Tensor, eos: int) -> list[int]:
    return [row.index(eos) if eos in row else len(row) for row in ids.tolist()]


def test_generate_is_deterministic_and_batch_independent(bare_lm: ReportLM) -> None:
    visual = _visual(bare_lm, 3, seed=1, scale=1.0)
    options = {"num_beams": 3, "min_new_tokens": 2, "max_new_tokens": 12}
    texts = bare_lm.generate(visual, **options)
    assert len(set(texts)) > 1  # the samples differ, so a mix-up between rows would show
    assert texts == bare_lm.generate(visual, **options)
    assert texts == [bare_lm.generate(visual[i : i + 1], **options)[0] for i in range(3)]
    assert all(isinstance(text, str) and text == text.strip() for text in texts)


def test_generate_with_the_prompt(lm: ReportLM) -> None:
    texts = lm.generate(_visual(lm, 2), num_beams=2, min_new_tokens=1, max_new_tokens=12)
    assert len(texts) == 2 and all(texts)


def test_generate_respects_min_and_max_new_tokens(bare_lm: ReportLM) -> None:
    visual = _visual(bare_lm, 3, seed=1)
    free = bare_lm.generate_ids(visual, num_beams=2, min_new_tokens=0, max_new_tokens=30)
    natural = _first_eos(free, bare_lm.eos_id)
    assert max(natural) < 28  # the trained LM ends its reports by itself
    floor = max(natural) + 2
    forced = bare_lm.generate_ids(visual, num_beams=2, min_new_tokens=floor, max_new_tokens=30)
    assert forced.shape[1] <= 30 and min(_first_eos(forced, bare_lm.eos_id)) >= floor
    exact = bare_lm.generate_ids(visual, num_beams=2, min_new_tokens=5, max_new_tokens=5)
    assert exact.shape == (3, 5) and all(bare_lm.eos_id not in row for row in exact.tolist())


def test_decode_cuts_at_the_first_eos(lm: ReportLM) -> None:
    tokens = lm.tokenizer("the lungs are clear .", add_special_tokens=False)["input_ids"]
    other = lm.tokenizer(" no pneumothorax .", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[*tokens, lm.eos_id, *other], [*tokens, *other, lm.pad_id]])
    assert lm.decode(ids) == ["the lungs are clear .", "the lungs are clear . no pneumothorax ."]


# Gradient checkpointing and random-init folders ------------------------------------------------------------
def _random_init_dir(lm_dir: Path, out: Path, vocab_size: int, attention_dropout: float = 0.0) -> Path:
    """A random-init folder: lm_dir's tokenizer and a 2-layer Qwen2 config of ``vocab_size``."""
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attention_dropout=attention_dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return save_random_init(out, config, tokenizer)


@pytest.fixture(scope="module")
def dropout_lm(lm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ReportLM:
    """Two decoder layers with attention dropout 0.5 in the config, so dropout would show in the loss."""
    folder = _random_init_dir(lm_dir, tmp_path_factory.mktemp("random") / "lm", 500, attention_dropout=0.5)
    torch.manual_seed(0)
    return ReportLM(str(folder), max_target_tokens=TARGET_TOKENS)


def _count_layer_calls(lm: ReportLM) -> tuple[list[list[int]], list[torch.utils.hooks.RemovableHandle]]:
    """Per decoder layer, the sequence length of every pass through it, recomputes included (hooks on its
    input norm, the first thing a layer runs: torch's recompute stops once the tensors it needs are back)."""
    calls: list[list[int]] = []
    handles = []
    for layer in lm.model.model.layers:
        seen: list[int] = []
        calls.append(seen)
        handles.append(
            layer.input_layernorm.register_forward_hook(
                lambda m, args, out, seen=seen: seen.append(args[0].shape[1])
            )
        )
    return calls, handles


def _loss_and_grad(lm: ReportLM) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One training step's loss, the gradient of the visual tokens and the forward passes per layer."""
    calls, handles = _count_layer_calls(lm)
    visual = _visual(lm, 2, scale=1.0).requires_grad_()
    loss, _ = lm(visual, REPORTS[:2])
    loss.backward()
    for handle in handles:
        handle.remove()
    return loss.detach(), visual.grad, [len(seen) for seen in calls]


def test_gradient_checkpointing_recomputes_each_layer_with_equal_gradients(dropout_lm: ReportLM) -> None:
    lm = dropout_lm
    lm.train()
    loss, grad, passes = _loss_and_grad(lm)
    assert passes == [1, 1]
    lm.set_gradient_checkpointing(True)
    try:
        assert lm.gradient_checkpointing
        layers = list(lm.model.model.layers)
        assert all(layer.training for layer in layers)
        children = [m for layer in layers for m in layer.modules() if m is not layer]
        assert not any(m.training for m in children)  # attention dropout (0.5 in the config) stays off
        checkpointed_loss, checkpointed_grad, passes = _loss_and_grad(lm)
        assert passes == [2, 2]  # forward, then the recompute in backward
        torch.testing.assert_close(checkpointed_loss, loss, rtol=0, atol=0)
        torch.testing.assert_close(checkpointed_grad, grad)
        lm.eval()
        assert not any(layer.training for layer in layers)
        assert _loss_and_grad(lm)[2] == [1, 1]  # eval mode: nothing to recompute
    finally:
        lm.set_gradient_checkpointing(False)
    lm.train()
    assert not lm.gradient_checkpointing and _loss_and_grad(lm)[2] == [1, 1]
    assert not any(m.training for m in lm.model.modules())
    lm.eval()


def test_generate_in_training_mode_with_checkpointing_uses_the_kv_cache(dropout_lm: ReportLM) -> None:
    lm = dropout_lm
    visual = _visual(lm, 2, seed=3, scale=1.0)
    options = {"num_beams": 2, "min_new_tokens": 6, "max_new_tokens": 6}
    expected = lm.generate_ids(visual, **options)
    lm.set_gradient_checkpointing(True)
    lm.train()
    try:
        calls, handles = _count_layer_calls(lm)
        ids = lm.generate_ids(visual, **options)
        for handle in handles:
            handle.remove()
        assert lm.training and all(layer.training for layer in lm.model.model.layers)  # mode restored
    finally:
        lm.set_gradient_checkpointing(False)
        lm.eval()
    torch.testing.assert_close(ids, expected)
    prefix = lm.prefix_length + VISUAL_TOKENS
    for seen in calls:  # the prompt once, then one new position per step: the cache is used
        assert seen == [prefix] + [1] * (options["max_new_tokens"] - 1)


def test_random_init_folder_builds_the_config_without_weights(lm_dir: Path, tmp_path: Path) -> None:
    folder = _random_init_dir(lm_dir, tmp_path / "lm", vocab_size=3000)
    assert (folder / RANDOM_INIT_MARKER).is_file() and not list(folder.glob("*.safetensors"))
    lm = ReportLM(str(folder), dtype="bfloat16", max_target_tokens=TARGET_TOKENS)
    assert lm.input_embeddings.num_embeddings == 3000 > len(lm.tokenizer)  # the config's vocabulary
    assert lm.dtype == torch.bfloat16 and not any(p.requires_grad for p in lm.parameters())
    assert isinstance(lm.model, nn.Module) and not lm.model.training
    (folder / RANDOM_INIT_MARKER).unlink()  # without the marker, the real from_pretrained path needs weights
    with pytest.raises(OSError):
        ReportLM(str(folder))
