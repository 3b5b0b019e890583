"""The stage-3 report decoder: a frozen causal LM fed with [BOS; prompt; visual tokens; prompt] embeddings.

Sequence layout (docs/METHOD.md#language-model-and-prompt, no chat template)::

    [BOS]  "Human: <Img>"  visual (N tokens)  "</Img> {prompt} \\nAssistant:"  report tokens  EOS  padding

BOS comes from the tokenizer and is left out when it has none (the official code forces id 0, "!", for
Qwen; docs/METHOD.md#deviations-in-stage-3); EOS is the tokenizer's EOS id rather than the literal text
``"</s>"``, padding is the tokenizer's pad id (else EOS) and is masked by position, so a genuine pad-id
token in a report is never dropped. The prefix has the same length for every sample, so only the target
part is padded (on the right).
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, GenerationConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import is_accelerate_available, is_bitsandbytes_available

from mambaxray_ctl.text.loading import RANDOM_INIT_MARKER, is_random_init, load_model, load_pretrained

DEFAULT_PROMPT = "Generate a comprehensive and detailed diagnosis report for this chest xray image."
DEFAULT_TEMPLATE = "Human: <Img><ImageHere></Img> {prompt} \nAssistant:"
IMAGE_PLACEHOLDER = "<ImageHere>"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LORA_KEYS = {"r", "alpha", "dropout", "target_modules"}
QUANTIZATIONS = ("nf4",)
IGNORE_INDEX = -100


def last_logits(model: nn.Module, keep: int, **inputs: Any) -> Tensor:
    """Vocabulary logits of a Hugging Face causal LM at the last ``keep`` positions, (B, keep, V), without
    a KV cache; the LM head runs on those positions only where the model's forward takes
    ``logits_to_keep``."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return model(**inputs, logits_to_keep=keep, use_cache=False).logits
    return model(**inputs, use_cache=False).logits[:, -keep:]


def labelled_token_loss(model: nn.Module, labels: Tensor, **inputs: Any) -> Tensor:
    """Mean next-token cross-entropy over the positions whose label is not ``IGNORE_INDEX`` (the loss of
    a Hugging Face causal LM called with ``labels=``), with the vocabulary logits computed only from the
    position before the first labelled one on (:func:`last_logits`): a prompt or visual prefix costs no
    LM-head work."""
    length = labels.shape[1]
    labelled = labels.ne(IGNORE_INDEX).any(0).nonzero()
    keep = min(length, length - int(labelled[0]) + 1) if len(labelled) else 1
    logits = last_logits(model, keep, **inputs)
    targets = labels[:, length - keep + 1 :]
    return nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX
    )


@dataclass(frozen=True)
class LMSpec:
    """The frozen report LM and how a report is put to it.

    Args:
        name: a local folder or hub name for ``AutoModelForCausalLM`` and its tokenizer.
        dtype: the LM's weights dtype.
        lora: LoRA adapter settings (``r``, ``alpha``, ``dropout``, ``target_modules``; needs peft).
        quantization: ``"nf4"`` loads the LM's linear layers in 4 bits (:func:`quantization_settings`;
            CUDA and bitsandbytes only); ``None``: the LM is loaded in ``dtype``.
        prompt: the instruction filled into ``template``'s ``{prompt}``.
        template: the text around the visual tokens; ``<ImageHere>`` marks them.
        max_target_tokens: report tokens kept for training (longer reports are truncated).
    """

    name: str = "Qwen/Qwen1.5-1.8B-Chat"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    lora: dict[str, Any] | None = None
    quantization: Literal["nf4"] | None = None
    prompt: str = DEFAULT_PROMPT
    template: str = DEFAULT_TEMPLATE
    max_target_tokens: int = 60


@dataclass(frozen=True)
class Decoding:
    """How reports are generated (defaults: the official code's beam search).

    Args:
        num_beams: beams of the search (1: greedy or sampling).
        min_new_tokens: tokens before EOS is allowed.
        max_new_tokens: the longest report, in tokens.
        repetition_penalty: > 1 discourages tokens already generated.
        length_penalty: beam scores divided by length ** length_penalty (beam search only).
        do_sample: sample instead of searching.
        temperature: sampling temperature (``do_sample`` only).
        top_p: nucleus sampling threshold (``do_sample`` only); ``None``: off.
        no_repeat_ngram_size: forbid repeating n-grams of this size (0: off).
    """

    num_beams: int = 5
    min_new_tokens: int = 40
    max_new_tokens: int = 100
    repetition_penalty: float = 2.0
    length_penalty: float = 2.0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float | None = None
    no_repeat_ngram_size: int = 0

    def generation_config(self, bos_id: int | None, eos_id: int, pad_id: int) -> GenerationConfig:
        """These settings only: every other option is transformers' global default, never a model's
        shipped generation config (length penalty with beams, temperature/top-p when sampling)."""
        settings: dict[str, Any] = {}
        if self.do_sample:
            settings |= {"temperature": self.temperature, "top_p": self.top_p}
        if self.num_beams > 1:
            settings["length_penalty"] = self.length_penalty
        return GenerationConfig(
            num_beams=self.num_beams,
            do_sample=self.do_sample,
            min_new_tokens=self.min_new_tokens,
            max_new_tokens=self.max_new_tokens,
            repetition_penalty=self.repetition_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            use_cache=True,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            **{key: value for key, value in settings.items() if value is not None},
        )


def split_template(template: str, prompt: str) -> tuple[str, str]:
    """The text before and after the single ``<ImageHere>``, with ``{prompt}`` filled in."""
    count = template.count(IMAGE_PLACEHOLDER)
    if count != 1:
        raise ValueError(
            f"the template must contain {IMAGE_PLACEHOLDER} exactly once, found {count}: {template!r}"
        )
    before, after = template.replace("{prompt}", prompt).split(IMAGE_PLACEHOLDER)
    return before, after


def _wrap_lora(model: nn.Module, lora: dict[str, Any]) -> nn.Module:
    """``peft`` LoRA adapters around ``model``; the adapters stay trainable, the LM stays frozen."""
    unknown = set(lora) - LORA_KEYS
    if unknown:
        raise ValueError(f"unknown LoRA settings {sorted(unknown)}; allowed: {sorted(LORA_KEYS)}")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ImportError(
            "LoRA on the report LM (lm.lora) needs the peft package: pip install 'mambaxray-ctl[lora]'"
        ) from exc
    config = LoraConfig(
        r=lora.get("r", 16),
        lora_alpha=lora.get("alpha", 16),
        lora_dropout=lora.get("dropout", 0.1),
        target_modules=list(lora.get("target_modules", ["q_proj", "v_proj"])),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def quantization_settings(quantization: str | None, name_or_path: str) -> dict[str, Any]:
    """The extra ``from_pretrained`` arguments of a quantized LM load (none for ``None``).

    ``"nf4"``: QLoRA's 4-bit NormalFloat with double quantization of the block constants and bfloat16
    compute (Dettmers et al., 2023, arXiv:2305.14314; transformers' ``BitsAndBytesConfig``), the whole
    model placed on this process's GPU (``LOCAL_RANK``, as torchrun and Lightning's launcher set it; 0
    when unset), where the Trainer finds it. The placement does not follow ``trainer.devices=[k]``: to
    train on GPU k alone, make it the only visible one (``CUDA_VISIBLE_DEVICES=k``). Memory and caveats:
    README.md#llama-2-7b-on-a-24-gb-card.

    :raises ValueError: an unknown method, or a random-init folder (no pretrained weights to quantize).
    :raises RuntimeError: torch sees no CUDA device (bitsandbytes' 4-bit kernels need one).
    :raises ImportError: bitsandbytes or accelerate is missing.
    """
    if quantization is None:
        return {}
    setting = f"lm.quantization={quantization!r}"
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown {setting}; choose one of {list(QUANTIZATIONS)} or null")
    if is_random_init(name_or_path):
        raise ValueError(
            f"{setting} quantizes pretrained weights, but {name_or_path} is a random-init folder "
            f"({RANDOM_INIT_MARKER}); leave lm.quantization unset (null)"
        )
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{setting} loads the LM in 4 bits with bitsandbytes, which needs a CUDA GPU, and torch sees "
            "none here; run on a CUDA machine, or leave lm.quantization unset (null) to load it in lm.dtype"
        )
    if not (is_bitsandbytes_available() and is_accelerate_available()):
        raise ImportError(f"{setting} needs bitsandbytes and accelerate: pip install 'mambaxray-ctl[quant]'")
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    return {"quantization_config": config, "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))}}


class ReportLM(nn.Module):
    """A frozen ``AutoModelForCausalLM`` (optionally with trainable LoRA adapters) that writes reports.

    The LM's modules stay in eval mode (dropout off), whatever mode the wrapper is put in; only LoRA
    dropout follows the wrapper's mode. With :meth:`set_gradient_checkpointing`, the decoder layers'
    own ``training`` flags follow it too (not their children's, so dropout stays off): transformers
    recomputes a layer in backward only when that flag is set.
    """

    def __init__(
        self,
        name_or_path: str,
        dtype: str = LMSpec.dtype,
        prompt: str = LMSpec.prompt,
        template: str = LMSpec.template,
        max_target_tokens: int = LMSpec.max_target_tokens,
        lora: dict[str, Any] | None = None,
        local_files_only: bool | None = None,
        quantization: str | None = None,
    ) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        if max_target_tokens < 1:
            raise ValueError(f"max_target_tokens must be >= 1, got {max_target_tokens}")
        before, after = split_template(template, prompt)
        quantized = quantization_settings(quantization, name_or_path)
        if quantized and dtype != "bfloat16":
            warnings.warn(
                f"lm.quantization={quantization!r} with lm.dtype={dtype!r}: the parts left unquantized "
                f"(embeddings, lm_head, norms) stay in {dtype} while the 4-bit layers compute in bfloat16; "
                "set lm.dtype: bfloat16",
                UserWarning,
                stacklevel=2,
            )
        self.max_target_tokens = max_target_tokens
        self.tokenizer = load_pretrained(
            AutoTokenizer.from_pretrained, name_or_path, what="report LM", local_files_only=local_files_only
        )
        model = load_model(
            AutoModelForCausalLM,
            name_or_path,
            what="report LM",
            local_files_only=local_files_only,
            dtype=DTYPES[dtype],
            **quantized,
        )
        self.bos_id: int | None = self.tokenizer.bos_token_id
        self.eos_id: int = self.tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError(f"the tokenizer in {name_or_path} has no EOS token")
        pad_id = self.tokenizer.pad_token_id
        self.pad_id: int = self.eos_id if pad_id is None else pad_id
        # Replace the shipped generation config so its sampling defaults (top_p, top_k, ...) never apply.
        model.generation_config = GenerationConfig(
            bos_token_id=self.bos_id, eos_token_id=self.eos_id, pad_token_id=self.pad_id
        )
        model.requires_grad_(False)
        self.model = model if lora is None else _wrap_lora(model, lora)
        self.model.eval()
        self._checkpointed_layers: list[nn.Module] = []
        self.register_buffer("before_ids", self._token_ids(before), persistent=False)
        self.register_buffer("after_ids", self._token_ids(after), persistent=False)
        bos = [] if self.bos_id is None else [self.bos_id]
        self.register_buffer("bos_ids", torch.tensor(bos, dtype=torch.long), persistent=False)

    @classmethod
    def from_spec(cls, spec: LMSpec, local_files_only: bool | None = None) -> ReportLM:
        """The LM an :class:`LMSpec` names, with its prompt, template, target length, LoRA and
        quantization."""
        return cls(
            spec.name,
            dtype=spec.dtype,
            prompt=spec.prompt,
            template=spec.template,
            max_target_tokens=spec.max_target_tokens,
            lora=spec.lora,
            local_files_only=local_files_only,
            quantization=spec.quantization,
        )

    def _token_ids(self, text: str) -> Tensor:
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    def train(self, mode: bool = True) -> ReportLM:
        super().train(mode)
        self.model.eval()
        for name, module in self.model.named_modules():
            if name.rsplit(".", 1)[-1] == "lora_dropout":
                module.train(mode)
        for layer in self._checkpointed_layers:
            layer.training = mode  # the layer's own flag only: its dropout and attention stay in eval
        return self

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        """Recompute the LM's decoder layers in backward (training mode only), keeping dropout off.

        Only each layer's input is kept from the forward pass: activation memory traded for a second
        forward pass of the layers; the loss and gradients are unchanged.
        """
        if enable:
            switch_on = getattr(self.model, "activation_checkpointing_enable", None)
            (switch_on or self.model.gradient_checkpointing_enable)({"use_reentrant": False})
            layers = [m for m in self.model.modules() if isinstance(m, GradientCheckpointingLayer)]
            if not layers:
                name = type(self.model).__name__
                raise ValueError(f"{name} has no decoder layers that transformers can checkpoint")
        else:
            switch_off = getattr(self.model, "activation_checkpointing_disable", None)
            (switch_off or self.model.gradient_checkpointing_disable)()
            layers = []
        for layer in self._checkpointed_layers:
            layer.training = False
        self._checkpointed_layers = layers
        self.train(self.training)

    @property
    def gradient_checkpointing(self) -> bool:
        return bool(self._checkpointed_layers)

    @contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """Eval mode for the duration (no LoRA dropout, no recomputation, KV cache on), then restored."""
        mode = self.training
        self.train(False)
        try:
            yield
        finally:
            self.train(mode)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.input_embeddings.weight.dtype

    @property
    def input_embeddings(self) -> nn.Embedding:
        """The LM's (frozen) input embedding table."""
        return self.model.get_input_embeddings()

    @property
    def prefix_length(self) -> int:
        """Sequence length in front of the report, without the visual tokens."""
        return len(self.bos_ids) + len(self.before_ids) + len(self.after_ids)

    def _prefix(self, visual: Tensor) -> Tensor:
        """[BOS; before; visual; after] embeddings, (B, prefix_length + N, H), in the LM's dtype."""
        if visual.dim() != 3 or visual.shape[-1] != self.hidden_size:
            raise ValueError(f"visual must be (B, N, {self.hidden_size}), got {tuple(visual.shape)}")
        batch = visual.shape[0]
        embed = self.input_embeddings
        before = embed(torch.cat([self.bos_ids, self.before_ids])).expand(batch, -1, -1)
        after = embed(self.after_ids).expand(batch, -1, -1)
        return torch.cat([before, visual.to(self.dtype), after], dim=1)

    def _targets(self, reports: list[str]) -> tuple[Tensor, Tensor]:
        """Report ids + EOS, truncated to ``max_target_tokens`` (a long report loses its EOS, as in the
        official code; docs/METHOD.md#sft-loss) and right-padded to it with the pad id; and the mask of
        the real tokens."""
        encoded = self.tokenizer(list(reports), add_special_tokens=False)["input_ids"]
        ids = torch.full((len(encoded), self.max_target_tokens), self.pad_id, dtype=torch.long)
        mask = torch.zeros(ids.shape, dtype=torch.bool)
        for row, tokens in enumerate(encoded):
            tokens = [*tokens, self.eos_id][: self.max_target_tokens]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = True
        device = self.before_ids.device
        return ids.to(device), mask.to(device)

    def build_inputs(self, visual: Tensor, reports: list[str]) -> dict[str, Tensor]:
        """Teacher-forcing inputs for a batch of (B, N, H) visual tokens and B reports.

        ``inputs_embeds``/``attention_mask``/``labels`` span the prefix plus the longest target of the
        batch (later positions are padding everywhere and cannot change a causal LM's loss);
        ``target_ids``/``target_mask`` are (B, max_target_tokens). Labels are -100 on BOS, prompt,
        visual and padding positions.
        """
        if len(reports) != visual.shape[0]:
            raise ValueError(f"got {visual.shape[0]} visual sequences but {len(reports)} reports")
        prefix = self._prefix(visual)
        target_ids, target_mask = self._targets(reports)
        length = int(target_mask.sum(1).max())
        ids, mask = target_ids[:, :length], target_mask[:, :length]
        batch, prefix_len = prefix.shape[:2]
        prefix_mask = torch.ones(batch, prefix_len, dtype=torch.long, device=prefix.device)
        prefix_labels = torch.full((batch, prefix_len), IGNORE_INDEX, dtype=torch.long, device=prefix.device)
        return {
            "inputs_embeds": torch.cat([prefix, self.input_embeddings(ids)], dim=1),
            "attention_mask": torch.cat([prefix_mask, mask.long()], dim=1),
            "labels": torch.cat([prefix_labels, ids.masked_fill(~mask, IGNORE_INDEX)], dim=1),
            "target_ids": target_ids,
            "target_mask": target_mask,
        }

    def forward(self, visual: Tensor, reports: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean next-token cross-entropy over the report tokens, and the :meth:`build_inputs` dict."""
        batch = self.build_inputs(visual, reports)
        # Teacher forcing needs no KV cache (and checkpointing refuses one); the visual and prompt
        # positions get no vocabulary logits.
        loss = labelled_token_loss(
            self.model,
            batch["labels"],
            inputs_embeds=batch["inputs_embeds"],
            attention_mask=batch["attention_mask"],
        )
        return loss, batch

    def target_embedding(
        self, target_ids: Tensor, target_mask: Tensor, include_padding: bool = False
    ) -> Tensor:
        """Mean frozen input embedding of the target tokens, (B, H) in float32
        (docs/METHOD.md#ctl-ft-loss).

        Padding is left out unless ``include_padding`` (the official code averages over all positions;
        docs/METHOD.md#deviations-in-stage-3).
        """
        embeddings = self.input_embeddings(target_ids).float()
        if include_padding:
            return embeddings.mean(1)
        mask = target_mask.unsqueeze(-1).float()
        return (embeddings * mask).sum(1) / mask.sum(1).clamp(min=1)

    @torch.no_grad()
    def generate_ids(self, visual: Tensor, decoding: Decoding | None = None, **overrides: Any) -> Tensor:
        """New token ids, (B, <= max_new_tokens); finished rows continue with padding after EOS.

        ``decoding`` (default: :class:`Decoding`'s) with ``overrides`` (its field names) applied. Runs
        in eval mode whatever the wrapper's mode (no LoRA dropout, KV cache on), so beam search is
        deterministic.
        """
        decoding = replace(decoding or Decoding(), **overrides)
        config = decoding.generation_config(self.bos_id, self.eos_id, self.pad_id)
        prefix = self._prefix(visual)
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        # With inputs_embeds alone, transformers 5 returns only the new tokens, and the repetition penalty
        # sees only them (as in the official code; docs/METHOD.md#decoding); it warns about the latter on
        # every call.
        with warnings.catch_warnings(), self._eval_mode():
            warnings.filterwarnings(
                "ignore", message=".*repetition_penalty.*inputs_embeds", category=UserWarning
            )
            return self.model.generate(inputs_embeds=prefix, attention_mask=mask, generation_config=config)

    def decode(self, ids: Tensor) -> list[str]:
        """Text up to the first EOS of each row, special tokens skipped, stripped."""
        texts = []
        for row in ids.tolist():
            if self.eos_id in row:
                row = row[: row.index(self.eos_id)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts

    def generate(self, visual: Tensor, decoding: Decoding | None = None, **overrides: Any) -> list[str]:
        """Reports for (B, N, H) visual tokens: :meth:`generate_ids` then :meth:`decode` (beam search,
        deterministic unless ``do_sample``)."""
        return self.decode(self.generate_ids(visual, decoding, **overrides))
