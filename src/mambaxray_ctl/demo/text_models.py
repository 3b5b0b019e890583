"""Small local stand-ins for the paper's text models, built from the demo reports without any download.

* ``<out>/lm`` — a Qwen2-architecture causal LM (the architecture of Qwen1.5, the IU X-ray decoder),
  pre-trained here on the reports so that, frozen, it can write report-style text in stage 3.
  A chat LLM such as Qwen writes what its context names; this small LM learns that habit here: it
  is trained on each report inside stage 3's prompt, with an image slot as long as stage 3's visual
  token sequence that holds :data:`IMAGE_TOKEN` plus a few :data:`FINDING_TOKENS` (one per finding of
  the world, read from the report's text). Stage 3 then has to learn, from pixels, visual tokens
  that the frozen LM reads as those findings.
* ``<out>/text_encoder`` — a small BERT (stand-in for Bio_ClinicalBERT), pre-trained here as a masked LM
  on the reports (``--mlm-steps``; none: randomly initialised) and trained further in stage 2.

Both tokenizers are byte-level BPE with Qwen2's pre-tokenisation (words split at whitespace and
punctuation with the leading space kept, digits one by one, NFC), so any text round-trips exactly and
no character is ever unknown. transformers 5 loads the tokenizer of any ``qwen2`` model folder as
``Qwen2Tokenizer``, which rebuilds it from the vocabulary and merges with exactly these rules and adds
an unknown token ``<|endoftext|>``; that token is therefore part of the trained vocabulary, and the LM is
trained on the ids of the tokenizer as loaded back. A tiny corpus yields fewer tokens than asked, so
model vocabularies are sized from ``len(tokenizer)``.

``mambaxray-ctl build-demo-text-models --annotation data/demo/annotation.json --out data/demo/text``
builds both from the cleaned train reports of an R2Gen annotation.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from torch import Tensor
from tqdm import tqdm
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertModel,
    DataCollatorForLanguageModeling,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE_REGEX

from mambaxray_ctl.data.cleaning import CleaningRule, clean_report
from mambaxray_ctl.demo.findings import LABEL_NAMES
from mambaxray_ctl.demo.labeller import extract_labels
from mambaxray_ctl.text.llm import DEFAULT_PROMPT, DEFAULT_TEMPLATE, labelled_token_loss, split_template

log = logging.getLogger(__name__)

TokenizerKind = Literal["lm", "encoder"]
SPECIAL_TOKENS: dict[str, dict[str, str]] = {
    "lm": {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<|endoftext|>"},
    "encoder": {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "mask_token": "[MASK]"},
}
MAX_POSITIONS = 512  # room for the stage-3 prefix (prompt + 197 visual tokens) plus the report
TRAINING_LOG = "training.json"
BUILD_LOG = "build.json"  # in the tool's output folder: the recipe and the world the models were built on
RECIPE = 2  # bumped whenever the tool trains the text models differently
# The demo LM's image-slot vocabulary: one token per finding of the world, and a token for "nothing here".
FINDING_TOKENS = tuple(f"<|{name}|>" for name in LABEL_NAMES)
IMAGE_TOKEN = "<|image|>"


def train_tokenizer(
    texts: list[str], vocab_size: int = 1000, *, kind: TokenizerKind = "lm", extra_tokens: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``, with ``extra_tokens`` as special tokens.

    ``kind="lm"``: ``<s>``/``</s>``/``<pad>`` as BOS/EOS/pad, ``<|endoftext|>`` as the (never produced)
    unknown token, nothing added by itself. ``kind="encoder"``: ``[CLS]``/``[SEP]``/``[PAD]``, every text
    wrapped as ``[CLS] ... [SEP]``.
    """
    specials = SPECIAL_TOKENS[kind]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*specials.values(), *extra_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    if kind == "encoder":
        cls, sep = specials["cls_token"], specials["sep_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}",
            pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, tokenizer.token_to_id(cls)), (sep, tokenizer.token_to_id(sep))],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_input_names=["input_ids", "attention_mask"], **specials
    )


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[Tensor]:
    """[BOS] text EOS as id tensors (BOS only if the tokenizer has one)."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [torch.tensor([*bos, *ids, tokenizer.eos_token_id]) for ids in encoded]


def _encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    slots: list[list[str]],
    chat: float,
    seed: int,
) -> tuple[list[Tensor], list[Tensor]]:
    """Like :func:`_encode`, but a ``chat`` fraction of the reports comes inside stage 3's prompt:
    ``[BOS] Human: <Img> slot </Img> prompt \nAssistant: report EOS``, tokenised piece by piece as
    :class:`ReportLM` does, with the tokens ``slots[i]`` in the image slot.

    Returns the id sequences and their labels: the ids, with -100 on the prompt and image slot as
    stage 3's loss has them.
    """
    before, after = split_template(DEFAULT_TEMPLATE, DEFAULT_PROMPT)
    plain = _encode(tokenizer, texts)
    generator = torch.Generator().manual_seed(seed)
    head = tokenizer(before, add_special_tokens=False)["input_ids"]
    tail = tokenizer(after, add_special_tokens=False)["input_ids"]
    sequences, labels = [], []
    for sequence, slot in zip(plain, slots, strict=True):
        if torch.rand((), generator=generator) >= chat:
            sequences.append(sequence)
            labels.append(sequence)
            continue
        start = 0 if tokenizer.bos_token_id is None else 1
        prefix = torch.tensor([*head, *tokenizer.convert_tokens_to_ids(slot), *tail], dtype=sequence.dtype)
        sequences.append(torch.cat([sequence[:start], prefix, sequence[start:]]))
        labels.append(torch.cat([torch.full((start + len(prefix),), -100), sequence[start:]]))
    return sequences, labels


def image_slot(report: str, length: int, generator: torch.Generator) -> list[str]:
    """The image slot of a report as the demo LM learns it: ``length`` tokens, :data:`IMAGE_TOKEN`
    everywhere except one to three random positions per finding of the report (its
    :data:`FINDING_TOKENS`), as visual tokens would carry a finding where it is seen.
    """
    slot = [IMAGE_TOKEN] * length
    free = torch.randperm(length, generator=generator).tolist()
    for token, flag in zip(FINDING_TOKENS, extract_labels(report), strict=True):
        copies = int(torch.randint(1, 4, (), generator=generator))
        for _ in range(copies * flag):
            if free:
                slot[free.pop()] = token
    return slot


def _collate(
    sequences: list[Tensor], pad_id: int, labels: list[Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded input ids, attention mask and labels (``labels`` or the ids; -100 on padding)."""
    ids = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=pad_id)
    targets = torch.nn.utils.rnn.pad_sequence(labels or sequences, batch_first=True, padding_value=-100)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        mask[row, : len(sequence)] = 1
    return ids, mask, targets.masked_fill(mask == 0, -100)


def _batches(
    sequences: list[Tensor],
    labels: list[Tensor] | None,
    *,
    max_length: int,
    batch_size: int,
    pad_id: int,
    generator: torch.Generator,
) -> Iterator[tuple[Tensor, Tensor | None, Tensor]]:
    """Endless training batches (ids, attention mask, labels) over shuffled passes of the sequences.

    Without ``labels`` the sequences are concatenated and cut into ``batch_size`` blocks of
    ``max_length`` tokens (packing: no padding, no mask). With ``labels`` each row is one sequence,
    padded, as stage 3 feeds them: packing would put a report in a block without its image slot, or
    after the slot of another study, and teach the LM that the slot cannot be trusted.
    """

    def shuffled() -> list[int]:
        return torch.randperm(len(sequences), generator=generator).tolist()

    need = batch_size * max_length
    stream, order = torch.empty(0, dtype=torch.long), []
    while True:
        if labels is None:
            while len(stream) < need:
                stream = torch.cat([stream, *(sequences[i] for i in shuffled())])
            batch, stream = stream[:need].view(batch_size, max_length), stream[need:]
            yield batch, None, batch
        else:
            if len(order) < batch_size:
                order += shuffled()
            rows, order = order[:batch_size], order[batch_size:]
            yield _collate([sequences[i] for i in rows], pad_id, [labels[i] for i in rows])


def _fit(
    model: Qwen2ForCausalLM,
    batches: Iterator[tuple[Tensor, Tensor | None, Tensor]],
    *,
    steps: int,
    lr: float,
    progress: bool,
) -> list[float]:
    """AdamW with linear warm-up and cosine decay over ``steps`` of ``batches``; returns the step losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc="report LM", unit="step", disable=not progress)
    for _, (ids, mask, labels) in zip(bar, batches, strict=False):
        loss = labelled_token_loss(model, labels, input_ids=ids, attention_mask=mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return losses


@torch.no_grad()
def _corpus_loss(
    model: Qwen2ForCausalLM,
    sequences: list[Tensor],
    labels: list[Tensor] | None,
    pad_id: int,
    batch_size: int,
) -> float:
    """Mean next-token cross-entropy over the labelled tokens (all tokens without ``labels``)."""
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        rows = slice(start, start + batch_size)
        ids, mask, targets_all = _collate(sequences[rows], pad_id, labels[rows] if labels else None)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        targets = targets_all[:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
        ).item()
        count += int((targets != -100).sum())
    return total / count


def train_causal_lm(
    texts: list[str],
    out_dir: str | Path,
    *,
    vocab_size: int = 1000,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 256,
    max_length: int = 128,
    slots: list[list[str]] | None = None,
    chat: float = 1.0,
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Train a small Qwen2 causal LM on ``texts`` (each as [BOS] text EOS, packed into sequences of
    ``max_length`` tokens) and save model, tokenizer and ``training.json`` to ``out_dir``.

    The tokenizer is trained on ``texts`` plus the stage-3 prompt (so the prompt takes a few tokens, as in a
    real LM's vocabulary) and holds :data:`FINDING_TOKENS` and :data:`IMAGE_TOKEN` as special tokens.
    With ``slots``, a ``chat`` fraction of the texts is wrapped in stage 3's prompt with the tokens
    ``slots[i]`` (from :data:`FINDING_TOKENS` and :data:`IMAGE_TOKEN`) in the image slot (see
    :func:`_encode_chat`); then each batch row is one padded sequence and the loss covers the report
    tokens only, exactly as stage 3 (see :func:`_batches`; ``max_length`` only applies to packing).

    ``training.json`` holds the first/last step losses, the mean per-token loss (over the labelled
    tokens) and perplexity of the trained model on the texts one by one, and the seconds taken.
    """
    if not texts or steps < 1:
        raise ValueError(f"train_causal_lm needs texts and steps >= 1, got {len(texts)} texts, {steps} steps")
    start = time.perf_counter()
    torch.manual_seed(seed)
    out = Path(out_dir)
    prompt = split_template(DEFAULT_TEMPLATE, DEFAULT_PROMPT)  # a real LM's vocabulary covers the prompt too
    trained = train_tokenizer(
        [*texts, *prompt], vocab_size, kind="lm", extra_tokens=(*FINDING_TOKENS, IMAGE_TOKEN)
    )
    config = Qwen2Config(
        vocab_size=len(trained),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=trained.bos_token_id,
        eos_token_id=trained.eos_token_id,
        pad_token_id=trained.pad_token_id,
    )
    config.save_pretrained(out)
    trained.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)  # the class and rules every later user gets
    if len(tokenizer) != config.vocab_size:
        raise RuntimeError(
            f"{out}: the reloaded tokenizer has {len(tokenizer)} tokens, the LM {config.vocab_size}"
        )
    model = Qwen2ForCausalLM(config)
    labels = None
    if slots is None:
        sequences = _encode(tokenizer, texts)
    else:
        sequences, labels = _encode_chat(tokenizer, texts, slots, chat, seed)
    generator = torch.Generator().manual_seed(seed)
    batches = _batches(
        sequences,
        labels,
        max_length=max_length,
        batch_size=batch_size,
        pad_id=tokenizer.pad_token_id,
        generator=generator,
    )
    losses = _fit(model, batches, steps=steps, lr=lr, progress=progress)
    corpus_loss = _corpus_loss(model, sequences, labels, tokenizer.pad_token_id, batch_size=64)
    stats = {
        "texts": len(sequences),
        "tokens_per_text": sum(map(len, sequences)) / len(sequences),
        "vocab_size": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "batch_size": batch_size,
        "max_length": max_length if labels is None else None,  # packing only
        "image_slot_tokens": len(slots[0]) if slots else None,
        "first_step_loss": losses[0],
        "last_step_loss": losses[-1],
        "corpus_loss": corpus_loss,
        "corpus_perplexity": math.exp(corpus_loss),
        "seconds": time.perf_counter() - start,
    }
    model.save_pretrained(out)
    (out / TRAINING_LOG).write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    log.info("report LM: %s", json.dumps(stats))
    return out


def _pretrain_mlm(
    model: BertForMaskedLM,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    progress: bool,
) -> list[float]:
    """Masked-language-model pre-training (15% of the tokens, BERT's 80/10/10 rule); returns the losses."""
    encoded = tokenizer(texts, truncation=True)["input_ids"]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    losses: list[float] = []
    model.train()
    for _ in tqdm(range(steps), desc="text encoder (MLM)", unit="step", disable=not progress):
        rows = torch.randint(len(encoded), (batch_size,)).tolist()
        batch = collator([{"input_ids": encoded[row]} for row in rows])
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def build_text_encoder(
    texts: list[str],
    out_dir: str | Path,
    *,
    vocab_size: int = 1000,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_length: int = 128,
    mlm_steps: int = 0,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Save a small BERT and a tokenizer trained on ``texts`` to ``out_dir``: pre-trained with
    ``mlm_steps`` masked-language-model steps on ``texts`` as Bio_ClinicalBERT was on clinical notes
    (``mlm_steps=0``: randomly initialised). ``training.json`` holds the first/last MLM losses.
    """
    if not texts:
        raise ValueError("build_text_encoder needs at least one text")
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(texts, vocab_size, kind="encoder")
    tokenizer.model_max_length = max_length
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_length,
        pad_token_id=tokenizer.pad_token_id,
    )
    encoder = BertModel(config)
    out = Path(out_dir)
    if mlm_steps > 0:
        mlm = BertForMaskedLM(config)
        losses = _pretrain_mlm(
            mlm, tokenizer, texts, steps=mlm_steps, batch_size=batch_size, lr=lr, progress=progress
        )
        encoder.load_state_dict(mlm.bert.state_dict(), strict=False)  # all but the unused pooler
        stats = {"mlm_steps": mlm_steps, "first_step_loss": losses[0], "last_step_loss": losses[-1]}
        out.mkdir(parents=True, exist_ok=True)
        (out / TRAINING_LOG).write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    encoder.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@dataclass(frozen=True)
class TextModelSettings:
    """How the demo's text models are built (the ``build-demo-text-models`` options)."""

    steps: int = 2000  # LM training steps
    cleaning: CleaningRule = "iu_xray"  # report cleaning rule, as the DataModule's
    chat: float = 1.0  # fraction of reports trained inside the stage-3 prompt
    image_tokens: int = 37  # length of the image slot: stage 3's visual tokens (the demo backbone's)
    mlm_steps: int = 1000  # masked-LM pre-training steps of the text encoder
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.image_tokens < 1 or self.mlm_steps < 0:
            raise ValueError("need steps >= 1, image_tokens >= 1 and mlm_steps >= 0")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    defaults = TextModelSettings()
    parser.add_argument(
        "--annotation", default="data/demo/annotation.json", help="R2Gen annotation (default: %(default)s)"
    )
    parser.add_argument("--out", default="data/demo/text", help="output folder (default: %(default)s)")
    parser.add_argument(
        "--steps", type=int, default=defaults.steps, help="LM training steps (default: %(default)s)"
    )
    parser.add_argument(
        "--cleaning",
        default=defaults.cleaning,
        help="report cleaning rule, as the DataModule's (default: %(default)s)",
    )
    parser.add_argument(
        "--chat",
        type=float,
        default=defaults.chat,
        help="fraction of reports trained inside the stage-3 prompt (default: %(default)s)",
    )
    parser.add_argument(
        "--image-tokens",
        type=int,
        default=defaults.image_tokens,
        help="length of the image slot: stage 3's visual tokens (default: %(default)s, the demo backbone's)",
    )
    parser.add_argument(
        "--mlm-steps",
        type=int,
        default=defaults.mlm_steps,
        help="masked-LM pre-training steps of the text encoder (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed (default: %(default)s)")


def _train_reports(path: Path, cleaning: CleaningRule) -> tuple[list[str], Any]:
    """The cleaned training reports of an annotation file, and its ``world_version`` (if any)."""
    with path.open(encoding="utf-8") as f:
        annotation = json.load(f)
    entries = annotation.get("train") if isinstance(annotation, dict) else None
    if not isinstance(entries, list):
        raise ValueError("no 'train' list")
    reports = [clean_report(entry["report"], cleaning) for entry in entries if entry["report"]]
    if not reports:
        raise ValueError("no train reports")
    return reports, annotation.get("world_version")


def build_text_models(annotation: Path, out: Path, settings: TextModelSettings = TextModelSettings()) -> None:
    """Train the causal LM and build the text encoder on the cleaned train reports of ``annotation``:
    ``out/lm``, ``out/text_encoder`` and the build log that marks them current.

    :raises ValueError: the annotation's train reports cannot be read (naming the file).
    """
    try:
        reports, world_version = _train_reports(annotation, settings.cleaning)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read train reports from {annotation}: {exc}") from exc
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(settings.seed)
    slots = [image_slot(report, settings.image_tokens, generator) for report in reports]
    lm = train_causal_lm(
        reports, out / "lm", slots=slots, chat=settings.chat, steps=settings.steps, seed=settings.seed
    )
    stats = json.loads((lm / TRAINING_LOG).read_text(encoding="utf-8"))
    print(
        f"wrote {lm} in {time.perf_counter() - start:.1f}s: {stats['parameters']:,} parameters, "
        f"vocabulary {stats['vocab_size']}, {stats['steps']} steps on {stats['texts']} reports, "
        f"loss {stats['corpus_loss']:.3f} per token (perplexity {stats['corpus_perplexity']:.2f})"
    )
    start = time.perf_counter()
    encoder = build_text_encoder(
        reports, out / "text_encoder", mlm_steps=settings.mlm_steps, seed=settings.seed
    )
    print(f"wrote {encoder} in {time.perf_counter() - start:.1f}s")
    build = {"recipe": RECIPE, "annotation": str(annotation), "world_version": world_version}
    (out / BUILD_LOG).write_text(json.dumps(build, indent=2) + "\n", encoding="utf-8")


def run(args: argparse.Namespace) -> int:
    name = "mambaxray-ctl build-demo-text-models"
    try:
        fields = ("steps", "cleaning", "chat", "image_tokens", "mlm_steps", "seed")
        settings = TextModelSettings(**{field: getattr(args, field) for field in fields})
        build_text_models(Path(args.annotation), Path(args.out), settings)
    except ValueError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 1
    return 0
