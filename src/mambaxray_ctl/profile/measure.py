"""What is measured: step times, tokens, peak memory, one generation; and the CPU's native precisions."""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from transformers.modeling_layers import GradientCheckpointingLayer

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


# CPU --------------------------------------------------------------------------------------------------------
def native_bf16_flags(flags: set[str]) -> list[str]:
    """The flags that give this CPU native bfloat16 matrix arithmetic (AVX512-BF16, AMX)."""
    return [flag for flag in BF16_CPU_FLAGS if flag in flags]


def uses_bf16(precision: str, llm_dtype: str | None) -> bool:
    return precision.startswith("bf16") or llm_dtype == "bfloat16"


def describe_cpu(flags: set[str]) -> str:
    """Which precisions this CPU runs natively."""
    native = native_bf16_flags(flags)
    if native:
        return f"CPU: float32 and bfloat16 native ({', '.join(native)})"
    return (
        "CPU: float32 native; bfloat16 emulated (no AVX512-BF16 or AMX): use 32-true and --llm-dtype float32"
    )


# Memory and steps -------------------------------------------------------------------------------------------
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA max allocated bytes on a GPU; the process's peak resident set on a CPU (Linux: KiB → bytes)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _hidden_states(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


class StepProfiler(Callback):
    """Step times, tokens through the first backbone block and the first text-model layer in each
    forward pass, peak memory of the training steps, and (``generate``) one generation at the end."""

    def __init__(self, generate: bool) -> None:
        self.generate = generate
        self.step_seconds: list[float] = []
        self.tokens = {"image": 0, "text": 0}
        self.peak_memory = 0
        self.generation: dict[str, Any] = {}
        self._counting = False
        self._start = 0.0
        self._handles: list[Any] = []
        self._last_batch: dict[str, Any] = {}

    def _count(self, kind: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self._counting:
                self.tokens[kind] += math.prod(_hidden_states(args, kwargs).shape[:2])

        return hook

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        text_layer = next((m for m in pl_module.modules() if isinstance(m, GradientCheckpointingLayer)), None)
        layers = {"image": pl_module.backbone.layers[0], "text": text_layer}
        self._handles = [
            layer.register_forward_pre_hook(self._count(kind), with_kwargs=True)
            for kind, layer in layers.items()
            if layer is not None
        ]
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, idx: int
    ) -> None:
        _synchronize(pl_module.device)
        self.tokens = dict.fromkeys(self.tokens, 0)
        self._counting = True
        self._start = time.perf_counter()

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        self._counting = False  # a recomputed block in backward is not a new token

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        _synchronize(pl_module.device)
        self.step_seconds.append(time.perf_counter() - self._start)
        self._last_batch = batch

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self.peak_memory = peak_memory_bytes(pl_module.device)
        if self.generate:  # here, not after fit: Lightning moves the module to the CPU at teardown
            self.generation = self._generate(trainer, pl_module)

    def _generate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        """One generation with the stage's decoding settings on the last training batch."""
        pl_module.eval()
        batch, device = self._last_batch, pl_module.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad(), trainer.strategy.precision_plugin.forward_context():
            _synchronize(device)
            start = time.perf_counter()
            visual = pl_module.encode_visual(batch["images"], batch.get("view_mask"))
            ids = pl_module.llm.generate_ids(visual, pl_module.decoding)
            _synchronize(device)
            seconds = time.perf_counter() - start
        return {
            "seconds": seconds,
            "new_tokens": int(ids.numel()),
            "tokens_per_second": ids.numel() / seconds,
            "num_beams": pl_module.decoding.num_beams,
            "peak_memory_bytes": peak_memory_bytes(device) if device.type == "cuda" else None,
        }
