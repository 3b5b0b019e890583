"""Stage 3: report generation with a frozen causal LM plus the CTL-FT contrastive term (METHOD-ANCHORS §4)."""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mambaxray_ctl.metrics.clinical import ClinicalEfficacy, label_reports, load_labeler
from mambaxray_ctl.metrics.report import ReportMetrics, truncate_references
from mambaxray_ctl.ops import ScanImpl
from mambaxray_ctl.stages.base import BackboneStage
from mambaxray_ctl.stages.contrastive import encode_studies
from mambaxray_ctl.stages.losses import clip_loss
from mambaxray_ctl.text.llm import DEFAULT_PROMPT, DEFAULT_TEMPLATE, ReportLM

log = logging.getLogger(__name__)

SCORE_WEIGHTS = {"BLEU_4": 0.8, "CIDEr": 0.2}  # the anchors' checkpoint-selection score


class ReportGenModule(BackboneStage):
    """Backbone → ``mapper`` (Linear + LayerNorm) → visual tokens in a frozen LM's prompt.

    Loss ``L_SFT + ctl_weight · L_CTL-FT``: the LM's cross-entropy on the report tokens, plus a
    symmetric InfoNCE at fixed temperature between the mean visual token and ``text_proj`` of the
    mean frozen input embedding of the target tokens (padding excluded unless
    ``ctl_include_padding``, which restores the anchors' behaviour). ``ctl_weight=0`` turns CTL-FT off.

    Validation generates reports for the validation split and logs corpus BLEU-1..4, ROUGE-L,
    CIDEr (and METEOR with Java) on the gathered, de-duplicated corpus, plus
    ``val/score = 0.8·BLEU-4 + 0.2·CIDEr`` for checkpoint selection, and clinical P/R/F1 when a
    ``labeler`` is set (``"demo"`` for the synthetic world, or ``"module:Class"``).
    References are the cleaned reports; ``reference_source="truncated"`` scores against the
    anchors' LM-re-decoded references truncated to ``max_target_tokens`` instead.

    The LM learns the R2Gen-cleaned reports, so its outputs are scored as generated (re-cleaning is
    not idempotent) against the cleaned references, as the anchors do.

    ``gradient_checkpointing`` recomputes the backbone blocks and the LM layers during backward (see
    the README for the memory it saves with the 1.8B LM).

    Checkpoints leave out the frozen LM weights (they come from ``llm`` at load time).
    """

    stage_name = "stage3-reportgen"

    def __init__(
        self,
        backbone: str = "arm_large_pz16",
        backbone_overrides: dict[str, Any] | None = None,
        ssm_impl: ScanImpl | None = None,
        freeze_backbone: bool = False,
        gradient_checkpointing: bool = False,
        llm: str = "Qwen/Qwen1.5-1.8B-Chat",
        llm_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        lora: dict[str, Any] | None = None,
        prompt: str = DEFAULT_PROMPT,
        template: str = DEFAULT_TEMPLATE,
        max_target_tokens: int = 60,
        ctl_weight: float = 0.4,
        ctl_temperature: float = 0.07,
        ctl_include_padding: bool = False,
        ctl_gather: bool = True,
        mapper_init_scale: float | Literal["embedding_rms"] = 1.0,
        num_beams: int = 5,
        min_new_tokens: int = 40,
        max_new_tokens: int = 100,
        repetition_penalty: float = 2.0,
        length_penalty: float = 2.0,
        do_sample: bool = False,
        temperature: float = 1.0,
        no_repeat_ngram_size: int = 0,
        reference_source: Literal["cleaned", "truncated"] = "cleaned",
        labeler: str | None = None,
        meteor: str = "auto",
        init_from: str | None = None,
        init_format: str = "auto",
        init_prefix: str | None = None,
        export: bool = True,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        betas: list[float] | None = None,
        warmup_steps: float = 0.0,
        min_lr_ratio: float = 0.01,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.hparams.betas = list(betas or [0.9, 0.999])
        self.backbone = self.build_backbone()
        self.backbone.requires_grad_(not freeze_backbone)
        self.llm = ReportLM(
            llm,
            dtype=llm_dtype,
            prompt=prompt,
            template=template,
            max_target_tokens=max_target_tokens,
            lora=lora,
        )
        if gradient_checkpointing:  # recompute backbone blocks and LM layers in backward: memory for time
            self.backbone.set_grad_checkpointing(True)
            self.llm.set_gradient_checkpointing(True)
        hidden = self.llm.hidden_size
        self.mapper = nn.Sequential(nn.Linear(self.backbone.config.embed_dim, hidden), nn.LayerNorm(hidden))
        nn.init.constant_(self.mapper[1].weight, self._mapper_scale(mapper_init_scale))
        self.text_proj = nn.Linear(hidden, hidden)
        # Without CTL-FT nothing trains text_proj (embed() still uses it): frozen, so that DDP sees no
        # trainable parameter without a gradient.
        self.text_proj.requires_grad_(ctl_weight > 0)
        self.labeler = load_labeler(labeler) if labeler else None
        self.val_metrics = self._make_metrics()
        self.test_metrics = self._make_metrics()
        self.strict_loading = False  # frozen LM weights are not in our checkpoints; checked on load

    def _make_metrics(self) -> nn.ModuleDict:
        metrics = nn.ModuleDict({"report": ReportMetrics(meteor=self.hparams.meteor)})
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
        return self.mapper(encode_studies(self.backbone, images, view_mask))

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        visual = self.encode_visual(batch["images"], batch.get("view_mask"))
        sft, inputs = self.llm(visual, batch["reports"])
        out = {"sft": sft, "loss": sft}
        if self.hparams.ctl_weight > 0:
            image, text = self._ctl_embeddings(visual, inputs)
            ctl = clip_loss(image, text, 1.0 / self.hparams.ctl_temperature, gather=self.hparams.ctl_gather)
            out["ctl"] = ctl
            out["loss"] = sft + self.hparams.ctl_weight * ctl
        return out

    def _ctl_embeddings(self, visual: Tensor, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """CTL-FT's two sides: the mean visual token, and ``text_proj`` of the mean target embedding."""
        text = self.llm.target_embedding(
            inputs["target_ids"], inputs["target_mask"], include_padding=self.hparams.ctl_include_padding
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
    def generate(self, images: Tensor, view_mask: Tensor | None = None, **overrides: Any) -> list[str]:
        """Reports for a batch of studies with the configured decoding (``overrides`` change it)."""
        settings = {**self.decoding(), **overrides}
        return self.llm.generate(self.encode_visual(images, view_mask), **settings)

    def decoding(self) -> dict[str, Any]:
        """The decoding parameters, as passed to :meth:`ReportLM.generate`."""
        keys = (
            "num_beams",
            "min_new_tokens",
            "max_new_tokens",
            "repetition_penalty",
            "length_penalty",
            "do_sample",
            "temperature",
            "no_repeat_ngram_size",
        )
        return {key: self.hparams[key] for key in keys}

    # Steps --------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        out = self(batch)
        size = len(batch["ids"])
        for name, value in out.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=size)
        return out["loss"]

    def _generate_and_update(self, batch: dict[str, Any], metrics: nn.ModuleDict) -> list[dict[str, str]]:
        generated = self.generate(batch["images"], batch.get("view_mask"))
        references = list(batch["reports"])
        if self.hparams.reference_source == "truncated":
            truncated = truncate_references(
                dict(zip(batch["ids"], references, strict=True)),
                self.llm.tokenizer,
                self.hparams.max_target_tokens,
            )
            references = [truncated[i] for i in batch["ids"]]
        metrics["report"].update(batch["ids"], generated, references)
        if "clinical" in metrics:
            metrics["clinical"].update(
                batch["ids"],
                label_reports(self.labeler, generated),
                label_reports(self.labeler, references),
            )
        return [
            {"id": i, "generated": g, "reference": r}
            for i, g, r in zip(batch["ids"], generated, references, strict=True)
        ]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        out = self(batch)
        self.log("val/loss", out["loss"], sync_dist=True, batch_size=len(batch["ids"]))
        return self._generate_and_update(batch, self.val_metrics)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        return self._generate_and_update(batch, self.test_metrics)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        generated = self.generate(batch["images"], batch.get("view_mask"))
        references = batch.get("reports") or [""] * len(generated)
        return [
            {"id": i, "generated": g, "reference": r}
            for i, g, r in zip(batch["ids"], generated, references, strict=True)
        ]

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

    # Checkpoints without the frozen LM ----------------------------------------------------------------------
    def _frozen_llm_keys(self) -> set[str]:
        return {f"llm.{name}" for name, p in self.llm.named_parameters() if not p.requires_grad} | {
            f"llm.{name}" for name, _ in self.llm.named_buffers()
        }

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
