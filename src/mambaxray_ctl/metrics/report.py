"""Language metrics of generated reports, computed as the R2Gen family does
(docs/METHOD.md#language-metrics).

pycocoevalcap's Bleu(4), Rouge (ROUGE-L) and Cider (CIDEr-D) — and Meteor when Java is available —
are called directly on ``{study_id: [text]}`` dicts: no PTB tokenizer, no lower-casing, tokens are
what whitespace splitting gives. BLEU is corpus-level (n-gram counts pooled over the split), ROUGE-L
and CIDEr are means over studies, and CIDEr's IDF comes from the scored references themselves, so
only a whole test split gives comparable numbers.

The texts must already be R2Gen-cleaned (:func:`mambaxray_ctl.data.cleaning.clean_report`) by the
caller, hypotheses and references with the same rule.

:class:`ReportMetrics` collects ``(study id, hypothesis, reference)`` triples on every rank,
gathers them across DDP processes, drops the repeats that ``DistributedSampler`` pads with and
scores the whole corpus once.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

log = logging.getLogger(__name__)

MeteorOption = bool | Literal["auto"]
SCORE_KEYS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "CIDEr")
_END = b"\xff"  # never part of UTF-8, so it can end each string inside one flat byte tensor


# --------------------------------------------------------------------------------------- scoring


def meteor_enabled(meteor: MeteorOption) -> bool:
    """Resolve the METEOR option: ``"auto"`` = only with ``java`` on PATH, ``True`` = required."""
    if meteor == "auto":
        return shutil.which("java") is not None
    if meteor is True:
        if shutil.which("java") is None:
            raise RuntimeError(
                "METEOR needs Java to run pycocoevalcap's meteor-1.5.jar, and no 'java' is on PATH; "
                "install a JRE (e.g. apt-get install default-jre-headless) or turn METEOR off"
            )
        return True
    if meteor is False:
        return False
    raise ValueError(f"meteor must be True, False or 'auto', got {meteor!r}")


def score_reports(
    hypotheses: Mapping[str, str], references: Mapping[str, str], meteor: MeteorOption = "auto"
) -> dict[str, float]:
    """Corpus scores ``BLEU_1..4, ROUGE_L, CIDEr`` (+ ``METEOR``) of already-cleaned texts.

    Both mappings go from study id to one text and must hold the same ids; studies are scored in
    sorted id order, so the numbers do not depend on the order in which they were collected.
    """
    if not references:
        raise ValueError("cannot score an empty corpus: no references given")
    differing = sorted(set(references) ^ set(hypotheses))
    if differing:
        raise ValueError(
            f"hypotheses and references must have the same study ids; {len(differing)} appear in "
            f"only one of them, e.g. {differing[:3]}"
        )
    for name, texts in (("hypothesis", hypotheses), ("reference", references)):
        for study, text in texts.items():
            if not isinstance(text, str):
                raise TypeError(f"the {name} of study {study!r} is {type(text).__name__}, expected str")
    use_meteor = meteor_enabled(meteor)
    ids = sorted(references)
    gts = {study: [references[study]] for study in ids}
    res = {study: [hypotheses[study]] for study in ids}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"BLEU_{n}": float(value) for n, value in enumerate(bleu, start=1)}
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if use_meteor:
        scores["METEOR"] = _meteor(gts, res)
    return scores


def _meteor(gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    # The jar reads one line per study: collapse newlines (its -norm tokenizer ignores whitespace).
    def one_line(texts: dict[str, list[str]]) -> dict[str, list[str]]:
        return {study: [" ".join(text.split()) for text in value] for study, value in texts.items()}

    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(one_line(gts), one_line(res))
    except (OSError, ValueError) as exc:  # the JVM died: broken pipe or an empty answer line
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
        stderr = scorer.meteor_p.stderr.read().decode(errors="replace").strip()
        scorer.lock.release()  # compute_score left it held; Meteor.__del__ takes it again
        raise RuntimeError(f"METEOR (java -jar meteor-1.5.jar) failed: {stderr or exc}") from exc
    return float(score)


def sentence_bleu4(hypothesis: str, reference: str) -> float:
    """BLEU-4 of one pair with the coco-caption scorer (its tiny epsilons instead of smoothing)."""
    bleu, _ = Bleu(4).compute_score({0: [reference]}, {0: [hypothesis]}, verbose=0)
    return float(bleu[3])


def truncate_references(references: Mapping[str, str], tokenizer: Any, max_length: int) -> dict[str, str]:
    """References as the official code scores them: re-tokenised with the LLM tokenizer (no special
    tokens), cut to ``max_length`` tokens and decoded back (docs/METHOD.md#deviations-in-evaluation).

    ``tokenizer`` is a Hugging Face tokenizer. Decoding keeps the tokenizer's spacing
    (``clean_up_tokenization_spaces=False``), so a reference within ``max_length`` comes back
    unchanged with a lossless tokenizer. The pad tokens the official code decodes into some references
    (Qwen's ``"!"``) are not reproduced.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    truncated = {}
    for study, text in references.items():
        token_ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
        truncated[study] = tokenizer.decode(
            token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
    return truncated


# ------------------------------------------------------------------------- string states for DDP


def add_text_state(metric: Metric, name: str) -> None:
    """Register a list state holding strings as UTF-8 bytes, each ended by ``0xFF``.

    The terminator survives torchmetrics' ``"cat"`` gathering, which concatenates every rank's
    tensors into one flat tensor and so would lose the boundaries of plain byte strings.
    """
    metric.add_state(name, default=[], dist_reduce_fx="cat")


def encode_texts(texts: Sequence[str], device: torch.device | str = "cpu", name: str = "texts") -> Tensor:
    """One flat uint8 tensor holding ``texts``, each ended by ``0xFF``."""
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{index}] is {type(text).__name__}, expected str")
    blob = b"".join(text.encode("utf-8") + _END for text in texts)
    return torch.tensor(bytearray(blob), dtype=torch.uint8, device=device)


def decode_texts(state: list[Tensor] | Tensor) -> list[str]:
    """Strings of a state filled by :func:`encode_texts` (local list or gathered tensor)."""
    if isinstance(state, list) and not state:
        return []
    blob = bytes(dim_zero_cat(state).to("cpu", torch.uint8).numpy())
    return [chunk.decode("utf-8") for chunk in blob.split(_END)[:-1]]


def gather_uint8(result: Tensor, group: Any | None = None) -> list[Tensor]:
    """``gather_all_tensors`` for uint8 states (pass as the metric's ``dist_sync_fn``).

    A rank that saw no data sends torchmetrics' empty placeholder in the metric's float dtype;
    casting every state to uint8 keeps all ranks sending the same dtype.
    """
    return gather_all_tensors(result.to(torch.uint8), group)


class Deduplication(NamedTuple):
    """Rows kept (first occurrence of each id), repeats dropped, repeats whose value differed."""

    keep: list[int]
    duplicates: int
    conflicts: int


def deduplicate(ids: Sequence[str], values: Sequence[Hashable], what: str = "prediction") -> Deduplication:
    """Keep the first occurrence of each id (``DistributedSampler`` pads with repeated samples).

    A repeat whose value differs from the first occurrence is counted as a conflict and logged.
    """
    first: dict[str, int] = {}
    conflicts = []
    for index, (study, value) in enumerate(zip(ids, values, strict=True)):
        if study not in first:
            first[study] = index
        elif values[first[study]] != value:
            conflicts.append(study)
    if conflicts:
        log.warning(
            "%d repeated study ids carry another %s than their first occurrence (e.g. %r); "
            "the first one is kept",
            len(conflicts),
            what,
            conflicts[0],
        )
    keep = sorted(first.values())
    return Deduplication(keep, len(ids) - len(keep), len(conflicts))


# --------------------------------------------------------------------------------------- metric


class ReportMetrics(Metric):
    """Corpus BLEU-1..4, ROUGE-L, CIDEr (+ METEOR) over all ranks, de-duplicated by study id.

    ``update(ids, hypotheses, references)`` takes already-cleaned texts. ``compute()`` returns
    :func:`score_reports`' dict of Python floats (exact pycocoevalcap values, not float32 tensors);
    log them with ``self.log_dict`` and no ``sync_dist`` — every rank gets the same numbers. Use
    ``update``, not ``forward``, which would score each batch on its own. After ``compute()``,
    ``num_duplicates`` and ``num_conflicts`` describe the de-duplication.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, meteor: MeteorOption = "auto", **kwargs: Any) -> None:
        kwargs.setdefault("dist_sync_fn", gather_uint8)
        super().__init__(**kwargs)
        meteor_enabled(meteor)  # fail now, not after a whole test epoch
        self.meteor = meteor
        for name in ("ids", "hypotheses", "references"):
            add_text_state(self, name)
        self.num_duplicates = 0
        self.num_conflicts = 0

    def update(self, ids: Sequence[str], hypotheses: Sequence[str], references: Sequence[str]) -> None:
        if not len(ids) == len(hypotheses) == len(references):
            raise ValueError(
                f"got {len(ids)} ids, {len(hypotheses)} hypotheses and {len(references)} references"
            )
        self.ids.append(encode_texts(ids, self.device, "ids"))
        self.hypotheses.append(encode_texts(hypotheses, self.device, "hypotheses"))
        self.references.append(encode_texts(references, self.device, "references"))

    def _records(self) -> list[tuple[str, str, str]]:
        ids = decode_texts(self.ids)
        pairs = list(zip(decode_texts(self.hypotheses), decode_texts(self.references), strict=True))
        dedup = deduplicate(ids, pairs)
        self.num_duplicates, self.num_conflicts = dedup.duplicates, dedup.conflicts
        return [(ids[index], *pairs[index]) for index in dedup.keep]

    def compute(self) -> dict[str, float]:
        records = self._records()
        hypotheses = {study: hyp for study, hyp, _ in records}
        references = {study: ref for study, _, ref in records}
        return score_reports(hypotheses, references, meteor=self.meteor)

    def corpus(self) -> list[tuple[str, str, str]]:
        """The gathered, de-duplicated ``(id, hypothesis, reference)`` triples, in arrival order.

        Synchronises across ranks itself: call it outside ``compute()``.
        """
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, process_group=self.process_group):
            return self._records()
