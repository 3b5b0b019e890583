"""Sentence-level heat maps of a stage-3 report: which image patches support each sentence
(docs/METHOD.md#heat-maps).

Method: **gradient × input** (Shrikumar et al., 2016, arXiv:1605.01713; Simonyan et al., 2014) of a
sentence's log-likelihood under teacher forcing, with respect to each view's **patch tokens**: the
backbone's patch embedding of the view's pixels, before the class token, the position embedding and
any scan (``tokens="patches"``, the default). Why:

* Each view gets its own map: the views are averaged token by token only after the backbone
  (``BackboneStage.encode_studies``), and each view's patch tokens reach the LM through its own scans.
  A masked view gets exactly zero.
* Patch token ``i`` *is* image patch ``i``. The backbone's output token ``i`` is not: four scan
  directions carry every patch to every position, so gradients at the output (``tokens="output"``,
  the method kept for comparison, class token dropped there) show where the LM reads, not where the
  image holds the finding. On the demo world the output-token maps point no better than a random map
  (docs/METHOD.md, "The pointing game"); the patch-token maps do.
* One forward and one backward pass for all the sentences of a report (one copy of the study per
  sentence in a batch), no change to the model, the LM frozen (nothing is stored on the parameters).
  The LM's attention over the visual positions (``attn_implementation="eager"``) would have the
  output tokens' problem and need a rule to pool heads and layers.

A cell's value is ``max(0, Σ_channels grad · token)``: the first-order estimate of how much that
token raises the sentence's log-likelihood compared with a zero token. Only the positive part is
kept (evidence for the sentence, not against it), so the maps are ≥ 0. The grid is the backbone's
patch grid for the input's size (6×6 at 96 px, 14×14 at 224 px with 16-pixel patches).

The sentence's tokens are those of the report (tokenised as the LM reads it, untruncated, EOS not
included) that overlap the sentence's characters (:func:`~mambaxray_ctl.data.cleaning.sentence_spans`,
the sentences the metrics and notebooks use); the separating periods belong to no sentence.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from mambaxray_ctl.data.cleaning import sentence_spans, split_sentences
from mambaxray_ctl.text.llm import last_logits

if TYPE_CHECKING:
    from mambaxray_ctl.stages.reportgen import ReportGenModule
    from mambaxray_ctl.text.llm import ReportLM

AttributedTokens = Literal["patches", "output"]


@dataclass(frozen=True)
class SentenceMap:
    """One sentence of a report (as :func:`~mambaxray_ctl.data.cleaning.split_sentences` gives it) and
    its heat map on each view: ``maps`` is ``(views, grid_h, grid_w)``, float, ≥ 0, on the CPU."""

    sentence: str
    maps: Tensor


def sentence_heat_maps(
    module: ReportGenModule,
    images: Tensor,
    view_mask: Tensor,
    report: str,
    tokens: AttributedTokens = "patches",
) -> list[SentenceMap]:
    """The heat map of every sentence of ``report`` on each view of ONE study.

    ``images`` is ``(views, C, H, W)`` as the module takes them, ``view_mask`` ``(views,)`` (True: a
    valid view); ``tokens``: the backbone's ``patches`` (default) or its ``output`` (module
    docstring). Runs in eval mode (the module's mode is restored) with gradients on, also when called
    under ``torch.no_grad`` or ``torch.inference_mode`` (e.g. from a validation callback); no parameter
    gradient is computed or stored.

    :raises ValueError: ``images`` and ``view_mask`` disagree, ``tokens`` is unknown, or the LM's
        tokenizer cannot give character offsets (a "fast" tokenizer is needed).
    """
    if images.dim() != 4 or view_mask.shape != images.shape[:1]:
        raise ValueError(
            f"expected images (views, C, H, W) and view_mask (views,), got {tuple(images.shape)} "
            f"and {tuple(view_mask.shape)}"
        )
    if tokens not in ("patches", "output"):
        raise ValueError(f"tokens must be 'patches' or 'output', got {tokens!r}")
    spans = sentence_spans(report)
    if not spans:
        return []
    llm = module.llm
    if not llm.tokenizer.is_fast:
        raise ValueError(
            f"heat maps need a fast tokenizer (character offsets); got {type(llm.tokenizer).__name__}"
        )
    encoded = llm.tokenizer(report, add_special_tokens=False, return_offsets_mapping=True)
    members = [
        [i for i, (start, end) in enumerate(encoded["offset_mapping"]) if start < last and end > first]
        for first, last in spans
    ]
    scored = [index for index, positions in enumerate(members) if positions]
    views = len(images)
    grid = module.backbone.patch_embed.grid_for(images)
    maps = [torch.zeros(views, *grid) for _ in spans]  # a sentence none of whose characters became a token
    if scored:
        device = next(module.parameters()).device
        target = module.backbone.patch_embed if tokens == "patches" else module.backbone
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            _eval_mode(module),
            _leaf_output(target) as leaves,
        ):
            # One copy of the study per scored sentence: row r's visual tokens, and so the gradient at
            # row r's tokens, belong to sentence scored[r] alone; one backward serves them all.
            copies = images.to(device)[None].expand(len(scored), -1, -1, -1, -1).clone()
            masks = view_mask.to(device)[None].expand(len(scored), -1).clone()
            visual = module.encode_visual(copies, masks)
            ids = torch.tensor(encoded["input_ids"], dtype=torch.long, device=device)
            log_probs = token_log_probs(llm, visual, ids)
            score = sum(log_probs[row, members[index]].sum() for row, index in enumerate(scored))
            (leaf,) = leaves  # (sentences · views, L, D)
            (grad,) = torch.autograd.grad(score, leaf)
            contributions = (grad * leaf).sum(-1).unflatten(0, (len(scored), views))
        drop_class_token = tokens == "output" and module.backbone.cls_token is not None
        for row, index in enumerate(scored):
            maps[index] = _to_grid(contributions[row], grid, drop_class_token)
    sentences = split_sentences(report)
    return [SentenceMap(sentence, heat) for sentence, heat in zip(sentences, maps, strict=True)]


def token_log_probs(llm: ReportLM, visual: Tensor, ids: Tensor) -> Tensor:
    """Teacher-forced log-probabilities (B, T), float32, of the report token ``ids`` (T,) after the
    prompt around each row of ``visual`` (B, N, H), laid out as in training
    (:meth:`ReportLM.build_inputs`) but untruncated."""
    prefix = llm._prefix(visual)
    targets = ids[None].expand(len(visual), -1)
    embeds = torch.cat([prefix, llm.input_embeddings(targets).to(prefix.dtype)], dim=1)
    # The logit at position p predicts the token at p + 1: the last len(ids) + 1 positions but the last.
    logits = last_logits(llm.model, len(ids) + 1, inputs_embeds=embeds)
    log_probs = logits[:, :-1].float().log_softmax(-1)
    return log_probs.gather(-1, targets[..., None])[..., 0]


def _to_grid(scores: Tensor, grid: tuple[int, int], drop_class_token: bool) -> Tensor:
    """Per-token scores (views, L) → their positive part on the patch grid (views, gh, gw), on the CPU;
    a class token, at ``(L - 1) // 2`` (:meth:`VisionMamba.forward_tokens`), is dropped."""
    if drop_class_token:
        middle = (scores.shape[1] - 1) // 2
        scores = torch.cat([scores[:, :middle], scores[:, middle + 1 :]], dim=1)
    return scores.detach().float().clamp_min(0.0).reshape(scores.shape[0], *grid).cpu()


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(training)


@contextmanager
def _leaf_output(target: nn.Module) -> Iterator[list[Tensor]]:
    """While open, ``target`` runs without autograd and its output is replaced by a copy that requires
    grad (collected in the yielded list): the gradient stops there, ``target`` keeps no graph and no
    parameter gradient is computed. Open it with gradients enabled."""
    collected: list[Tensor] = []

    def before(_module: nn.Module, _inputs: tuple) -> None:
        torch.set_grad_enabled(False)

    def after(_module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor:
        torch.set_grad_enabled(True)
        leaf = output.detach().requires_grad_(True)
        collected.append(leaf)
        return leaf

    handles = [target.register_forward_pre_hook(before), target.register_forward_hook(after)]
    try:
        yield collected
    finally:
        for handle in handles:
            handle.remove()
