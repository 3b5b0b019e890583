"""Stage 3: report generation with a frozen causal LM plus the CTL-FT contrastive term (docs/METHOD.md,
Stage 3)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mambaxray_ctl.metrics.clinical import ClinicalEfficacy, label_reports, load_labeler
from mambaxray_ctl.metrics.report import MeteorOption, ReportMetrics, truncate_references
from mambaxray_ctl.stages.base import BackboneStage
from mambaxray_ctl.stages.export import accept_model_exports, export_model
from mambaxray_ctl.stages.losses import ContrastiveLoss
from mambaxray_ctl.stages.sharding import float32_state_dict
from mambaxray_ctl.text.llm import Decoding, LMSpec, ReportLM

log = logging.getLogger(__name__)

SCORE_WEIGHTS = {"BLEU_4": 0.8, "CIDEr": 0.2}  # the official code's checkpoint-selection score


@dataclass(frozen=True)
class CTLFTSpec:
    """CTL-FT, the contrastive term of stage 3.

    Args:
        weight: λ in ``L_SFT + λ·L_CTL-FT``; 0 turns CTL-FT off.
        temperature: the fixed InfoNCE temperature.
        include_padding: average the target embedding over padding too (the official code's way).
        gather: negatives from every rank (the official code keeps them per GPU: false).
    """

    weight: float = 0.4
    temperature: float = 0.07
    include_padding: bool = False
    gather: bool = True


@dataclass(frozen=True)
class EvaluationSpec:
    """How validation and test score the generated reports.

    Args:
        reference_source: ``cleaned`` reports, or the official code's LM-re-decoded references
            truncated to ``lm.max_target_tokens`` (``truncated``).
        labeler: a findings labeller for clinical P/R/F1 (``demo`` or ``package.module:Class``).
        meteor: METEOR (needs Java): ``auto`` when Java is found, ``true`` (Java required) or ``false``.
    """

    reference_source: Literal["cleaned", "truncated"] = "cleaned"
    labeler: str | None = None
    meteor: MeteorOption = "auto"


@dataclass(frozen=True)
class ReportGenOutput:
    """One step's losses: ``loss`` (optimised) = ``sft`` + λ·``ctl`` (``None`` with CTL-FT off)."""

    loss: Tensor
    sft: Tensor
    ctl: Tensor | None = None

    def logged(self) -> dict[str, Tensor]:
        """The losses to log, by name."""
        values = {"loss": self.loss, "sft": self.sft, "ctl": self.ctl}
        return {name: value.detach() for name, value in values.items() if value is not None}


class ReportGenModule(BackboneStage):
    """Backbone → ``mapper`` (Linear + LayerNorm) → visual tokens in a frozen LM's prompt.

    Loss ``L_SFT + λ·L_CTL-FT`` (:class:`ReportGenOutput`): the LM's cross-entropy on the report
    tokens, plus a symmetric InfoNCE at fixed temperature between the mean visual token and
    ``text_proj`` of the mean frozen input embedding of the target tokens (padding excluded unless
    ``ctl_ft.include_padding``, the official code's way). ``ctl_ft.weight = 0`` turns CTL-FT off.

    Settings come in groups: ``lm`` (:class:`~mambaxray_ctl.text.llm.LMSpec`), ``ctl_ft``
    (:class:`CTLFTSpec`), ``decoding`` (:class:`~mambaxray_ctl.text.llm.Decoding`), ``evaluation``
    (:class:`EvaluationSpec`), and those of :class:`~mambaxray_ctl.stages.base.BackboneStage`.

    Validation generates reports for the validation split and logs corpus BLEU-1..4, ROUGE-L,
    CIDEr (and METEOR with Java) on the gathered, de-duplicated corpus, plus
    ``val/score = 0.8·BLEU-4 + 0.2·CIDEr`` for checkpoint selection, and clinical P/R/F1 when
    ``evaluation.labeler`` is set. The LM learns the R2Gen-cleaned reports, so its outputs are scored
    as generated (re-cleaning is not idempotent) against the cleaned references, as the official
    code does.

    ``gradient_checkpointing`` recomputes the backbone blocks and the LM layers during backward.
    Checkpoints leave out the frozen LM weights (they come from ``lm.name`` at load time); so does the
    model export written at the end of ``fit`` (``model.safetensors`` + ``MODEL_CARD.md``,
    :mod:`mambaxray_ctl.stages.export`).
    """

    stage_name = "stage3-reportgen"

    def __init__(
        self,
        lm: LMSpec = LMSpec(),
        ctl_ft: CTLFTSpec = CTLFTSpec(),
        decoding: Decoding = Decoding(),
        evaluation: EvaluationSpec = EvaluationSpec(),
        freeze_backbone: bool = False,
        gradient_checkpointing: bool = False,
        mapper_init_scale: float | Literal["embedding_rms"] = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.lm_spec = self.resolve_spec("lm", LMSpec, lm)
        self.ctl_ft = self.resolve_spec("ctl_ft", CTLFTSpec, ctl_ft)
        self.decoding = self.resolve_spec("decoding", Decoding, decoding)
        self.evaluation = self.resolve_spec("evaluation", EvaluationSpec, evaluation)
        self.backbone = self.build_backbone()
        self.backbone.requires_grad_(not freeze_backbone)
        self.llm = ReportLM.from_spec(self.lm_spec)
        if gradient_checkpointing:  # recompute backbone blocks and LM layers in backward: memory for time
            self.backbone.set_grad_checkpointing(True)
            self.llm.set_gradient_checkpointing(True)
        hidden = self.llm.hidden_size
        self.mapper = nn.Sequential(nn.Linear(self.backbone.config.embed_dim, hidden), nn.LayerNorm(hidden))
        nn.init.constant_(self.mapper[1].weight, self._mapper_scale(mapper_init_scale))
        self.text_proj = nn.Linear(hidden, hidden)
        # Without CTL-FT nothing trains text_proj (embed() still uses it): frozen, so that DDP sees no
        # trainable parameter without a gradient.
        self.text_proj.requires_grad_(self.ctl_ft.weight > 0)
        self.ctl_loss = ContrastiveLoss(gather=self.ctl_ft.gather)
        labeler = self.evaluation.labeler
        self.labeler = load_labeler(labeler) if labeler else None
        self.val_metrics = self._make_metrics()
        self.test_metrics = self._make_metrics()
        self.strict_loading = False  # frozen LM weights are not in our checkpoints; checked on load

    def _make_metrics(self) -> nn.ModuleDict:
        metrics = nn.ModuleDict({"report": ReportMetrics(meteor=self.evaluation.meteor)})
        if self.labeler is not None:
            metrics["clinical"] = ClinicalEfficacy(self.labeler.label_names)
        return metrics

    def _mapper_scale(self, scale: float | str) -> float:
        """The mapper LayerNorm's initial gain: a number, or the RMS of the LM's input embeddings."""
        if scale == "embedding_rms":
            weight = self.llm.model.get_input_embeddings().weight
            return float(weight.detach().float().pow(2).mean().sqrt())
        if isinstance(scale, str) or scale <= 0:
            raise ValueError(f"mapper_init_scale must be a positive number or 'embedding_rms', got {scale!r}")
        return float(scale)

    # Model --------------------------------------------------------------------------------------------------
    def encode_visual(self, images: Tensor, view_mask: Tensor | None = None) -> Tensor:
        """Studies (B, V, 3, H, W) → visual tokens (B, L, H) in the LM's embedding space."""
        return self.mapper(self.encode_studies(images, view_mask))

    def forward(self, batch: dict[str, Any]) -> ReportGenOutput:
        """The stage-3 loss of a batch: the LM's report cross-entropy, plus λ·CTL-FT when λ > 0."""
        visual = self.encode_visual(batch["images"], batch.get("view_mask"))
        sft, inputs = self.llm(visual, batch["reports"])
        if self.ctl_ft.weight <= 0:
            return ReportGenOutput(loss=sft, sft=sft)
        image, text = self._ctl_embeddings(visual, inputs)
        ctl = self.ctl_loss(image, text, 1.0 / self.ctl_ft.temperature)
        return ReportGenOutput(loss=sft + self.ctl_ft.weight * ctl, sft=sft, ctl=ctl)

    def _ctl_embeddings(self, visual: Tensor, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """CTL-FT's two sides: the mean visual token, and ``text_proj`` of the mean target embedding."""
        text = self.llm.target_embedding(
            inputs["target_ids"], inputs["target_mask"], include_padding=self.ctl_ft.include_padding
        )
        image = visual.mean(dim=1)
        return image, self.text_proj(text.to(image.dtype))

    @torch.no_grad()
    def embed(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """L2-normalised CTL-FT (image, text) embeddings of a batch (projector, notebooks)."""
        visual = self.encode_visual(batch["images"], batch.get("view_mask"))
        image, text = self._ctl_embeddings(visual, self.llm.build_inputs(visual, batch["reports"]))
        return nn.functional.normalize(image, dim=-1), nn.functional.normalize(text, dim=-1)

    @torch.no_grad()
    def generate(
        self,
        images: Tensor,
        view_mask: Tensor | None = None,
        decoding: Decoding | None = None,
        **overrides: Any,
    ) -> list[str]:
        """Reports for a batch of studies with ``decoding`` (default: the configured one), ``overrides``
        (its fields) applied."""
        decoding = replace(decoding or self.decoding, **overrides)
        return self.llm.generate(self.encode_visual(images, view_mask), decoding)

    # Steps --------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        out = self(batch)
        for name, value in out.logged().items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=len(batch["ids"]))
        return out.loss

    def references(self, batch: dict[str, Any]) -> list[str]:
        """The references a batch is scored against: its cleaned reports, or with
        ``evaluation.reference_source="truncated"`` the official code's LM-re-decoded reports truncated
        to ``lm.max_target_tokens`` (empty strings for a batch without reports)."""
        references = list(batch.get("reports") or [""] * len(batch["ids"]))
        if self.evaluation.reference_source != "truncated":
            return references
        by_id = dict(zip(batch["ids"], references, strict=True))
        truncated = truncate_references(by_id, self.llm.tokenizer, self.lm_spec.max_target_tokens)
        return [truncated[i] for i in batch["ids"]]

    def _generate(self, batch: dict[str, Any]) -> tuple[list[str], list[str], list[dict[str, str]]]:
        """Generated reports, references, and the rows the prediction writer and sample logger take."""
        generated = self.generate(batch["images"], batch.get("view_mask"))
        references = self.references(batch)
        rows = [
            {"id": i, "generated": g, "reference": r}
            for i, g, r in zip(batch["ids"], generated, references, strict=True)
        ]
        return generated, references, rows

    def _generate_and_update(self, batch: dict[str, Any], metrics: nn.ModuleDict) -> list[dict[str, str]]:
        generated, references, rows = self._generate(batch)
        metrics["report"].update(batch["ids"], generated, references)
        if "clinical" in metrics:
            metrics["clinical"].update(
                batch["ids"],
                label_reports(self.labeler, generated),
                label_reports(self.labeler, references),
            )
        return rows

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        self.log("val/loss", self(batch).loss, sync_dist=True, batch_size=len(batch["ids"]))
        return self._generate_and_update(batch, self.val_metrics)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        return self._generate_and_update(batch, self.test_metrics)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        return self._generate(batch)[2]

    def on_validation_epoch_end(self) -> None:
        self._log_corpus_metrics("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_corpus_metrics("test", self.test_metrics)

    def _log_corpus_metrics(self, split: str, metrics: nn.ModuleDict) -> dict[str, float]:
        scores: dict[str, float] = {}
        for metric in metrics.values():
            scores |= {k: float(v) for k, v in metric.compute().items()}
            metric.reset()
        scores["score"] = sum(weight * scores[name] for name, weight in SCORE_WEIGHTS.items())
        for name, value in scores.items():  # identical on every rank: sync_dist averages equal values
            self.log(f"{split}/{name}", value, prog_bar=name in {"BLEU_4", "score"}, sync_dist=True)
        return scores

    # Checkpoints and the model export without the frozen LM -------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        # --ckpt_path may name a model export in validate/test/predict; fit refuses it, saying why
        accept_model_exports(self.trainer.strategy, stage)

    def export_state(self) -> dict[str, Tensor]:
        """All that a checkpoint holds (the frozen LM left out before any copy), the backbone export's
        part included: one gathering for both exports."""
        return float32_state_dict(self, exclude=self._frozen_llm_keys())

    def export_more(self, run_dir: Path, state: dict[str, Tensor]) -> None:
        """``model.safetensors`` and ``MODEL_CARD.md`` beside the backbone export
        (:func:`~mambaxray_ctl.stages.export.export_model`)."""
        export_model(self, run_dir, state)

    def _frozen_llm_keys(self) -> set[str]:
        """The state-dict keys of the frozen LM: what checkpoints and the model export leave out. Every
        entry of the LM's state dict but its trainable parameters (LoRA adapters): tied weights under
        each of their names, buffers, and what a layer adds to its state dict (bitsandbytes' 4-bit
        layers: ``weight.absmax``, ``weight.quant_map``, ``weight.quant_state.*``, ...)."""
        parameters = self.llm.named_parameters(remove_duplicate=False)
        trainable = {f"llm.{name}" for name, p in parameters if p.requires_grad}
        return {f"llm.{key}" for key in self.llm.state_dict(keep_vars=True)} - trainable

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop the frozen LM from the state dict (under DeepSpeed, ``exclude_frozen_parameters`` keeps it
        out of the engine's own file)."""
        super().on_save_checkpoint(checkpoint)
        frozen = self._frozen_llm_keys()
        state = checkpoint["state_dict"]
        for key in [k for k in state if k in frozen]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the state dict's keys; FSDP (which has loaded and removed it by now) and DeepSpeed (whose
        engine loads its own file) have none here."""
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("state_dict")
        if state is None:
            return
        expected = set(self.state_dict()) - self._frozen_llm_keys()
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - set(self.state_dict()))
        if missing or unexpected:
            raise RuntimeError(
                f"checkpoint does not fit {type(self).__name__}: missing {missing[:8]}, "
                f"unexpected {unexpected[:8]} (was it written by another stage or backbone?)"
            )
