"""Sharded training of the stages: FSDP and DeepSpeed ZeRO strategies, and the float32 export under each.

:class:`StageFSDPStrategy` keeps the frozen modules (stage 3's LM, stage 1's unused ``norm_f``) out of
FSDP: they need no gradient reduction and no optimiser state, so each rank keeps them whole, in their
own dtype, as DDP would, and calls them directly (embedding look-ups, ``generate``). The trainable
parameters are sharded in units: each instance of ``wrap_layers`` that holds trainable parameters
(backbone and decoder blocks, text-encoder layers, LM decoder layers carrying LoRA adapters), plus the
root for the rest. No unit then mixes frozen and trainable, or bf16 and float32, parameters.

:class:`StageDeepSpeedStrategy` saves ZeRO checkpoints without the frozen parameters
(``exclude_frozen_parameters``) except those the module keeps in its own checkpoint state (stage 1's
frozen ``norm_f``; stage 3 drops its LM in ``on_save_checkpoint``): those travel in the client state and
are restored on load.

:func:`float32_state_dict` gathers the float32 state the exports are cut from (the backbone's, stage 3's
model but its frozen LM): FSDP's full state dict, or DeepSpeed's float32 master weights (under bf16
DeepSpeed casts the module itself). Both strategies refuse a stage-3 model export as ``ckpt_path``
(:func:`~mambaxray_ctl.stages.export.refuse_model_export`): their checkpoint loading is their own.
"""

from __future__ import annotations

import importlib
from collections.abc import Container, Iterable, Mapping, Sequence
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from torch import Tensor, nn
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import CustomPolicy

from mambaxray_ctl.stages.export import SHARDED_CKPT_PATH, refuse_model_export

WRAP_LAYERS: tuple[str, ...] = (
    "mambaxray_ctl.backbone.blocks.ARMBlock",
    "mambaxray_ctl.backbone.blocks.VimBlock",
    "mambaxray_ctl.stages.arm_decoder.DecoderBlock",
    "torch.nn.TransformerEncoderLayer",
    "transformers.models.bert.modeling_bert.BertLayer",
    "transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer",
    "transformers.models.llama.modeling_llama.LlamaDecoderLayer",
)
FROZEN_STATE_KEY = "frozen_state_dict"


def import_classes(paths: Iterable[str]) -> tuple[type[nn.Module], ...]:
    """The classes named by dotted paths (``package.module.Class``)."""
    classes = []
    for path in paths:
        module_name, _, name = path.rpartition(".")
        classes.append(getattr(importlib.import_module(module_name), name))
    return tuple(classes)


def trainable_layer_policy(layers: tuple[type[nn.Module], ...]) -> CustomPolicy:
    """FSDP auto-wrap policy: a unit for each instance of ``layers`` that holds a trainable parameter."""

    def wrap(module: nn.Module) -> bool:
        return isinstance(module, layers) and any(p.requires_grad for p in module.parameters())

    return CustomPolicy(wrap)


def frozen_modules(model: nn.Module) -> list[nn.Module]:
    """The largest submodules of ``model`` (not itself) with parameters, all of them frozen."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or any(name.startswith(f"{outer}.") for outer in found):
            continue
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            found[name] = module
    return list(found.values())


class StageFSDPStrategy(FSDPStrategy):
    """:class:`~lightning.pytorch.strategies.FSDPStrategy` with the stages' wrapping (see the module doc).

    ``wrap_layers``: dotted class paths of the layers that become FSDP units when they hold trainable
    parameters. The other arguments are FSDPStrategy's.
    """

    def __init__(
        self,
        wrap_layers: Sequence[str] = WRAP_LAYERS,
        sharding_strategy: str = "FULL_SHARD",
        state_dict_type: str = "full",
        **kwargs: Any,
    ) -> None:
        policy = trainable_layer_policy(import_classes(wrap_layers))
        super().__init__(
            auto_wrap_policy=policy,
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            **kwargs,
        )

    def _setup_model(self, model: nn.Module) -> nn.Module:
        # FSDP moves only what it manages: the frozen modules go to the device here, whole.
        model.to(self.root_device)
        self.kwargs["ignored_states"] = frozen_modules(model)
        # every rank starts from rank 0's weights, even if they were built from different seeds (FSDP
        # supports this on GPUs only)
        self.kwargs.setdefault("sync_module_states", self.root_device.type == "cuda")
        return super()._setup_model(model)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        refuse_model_export(checkpoint_path, SHARDED_CKPT_PATH)
        return super().load_checkpoint(checkpoint_path, weights_only)


class StageDeepSpeedStrategy(DeepSpeedStrategy):
    """:class:`~lightning.pytorch.strategies.DeepSpeedStrategy` whose checkpoints keep the module's own
    frozen parameters (see the module doc); set ``exclude_frozen_parameters: true`` to leave the rest out.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        checkpoint[FROZEN_STATE_KEY] = frozen_entries(checkpoint["state_dict"], self.lightning_module)
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        refuse_model_export(checkpoint_path, SHARDED_CKPT_PATH)
        module = self.lightning_module
        strict = module.strict_loading
        module.strict_loading = False  # the engine's file lacks the frozen parameters: restored below
        missing: set[str] = set()
        hook = module.register_load_state_dict_post_hook(lambda _, keys: missing.update(keys.missing_keys))
        try:
            checkpoint = super().load_checkpoint(checkpoint_path, weights_only)
        finally:
            module.strict_loading = strict
            hook.remove()
        lost = missing_trainable(module, missing)
        if lost:
            raise RuntimeError(f"{checkpoint_path} lacks trainable parameters of the module: {lost[:8]}")
        restore_frozen(module, checkpoint.pop(FROZEN_STATE_KEY, {}))
        return checkpoint


def missing_trainable(module: nn.Module, missing_keys: Iterable[str]) -> list[str]:
    """The trainable parameters of ``module`` among ``missing_keys`` (names relative to ``module`` or to
    a wrapper around it), sorted."""
    missing = set(missing_keys)
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    return sorted(n for n in trainable if n in missing or any(k.endswith(f".{n}") for k in missing))


def frozen_entries(state_dict: Mapping[str, Tensor], module: nn.Module) -> dict[str, Tensor]:
    """The entries of ``state_dict`` that are frozen parameters of ``module``, on the CPU."""
    frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
    return {name: value.detach().cpu() for name, value in state_dict.items() if name in frozen}


def restore_frozen(module: nn.Module, entries: Mapping[str, Tensor]) -> None:
    """Copy :func:`frozen_entries` back into ``module``; a name it does not have is an error."""
    result = module.load_state_dict(dict(entries), strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"frozen parameters this module lacks: {result.unexpected_keys[:8]}")


def float32_state_dict(
    module: LightningModule, prefix: str = "", exclude: Container[str] = frozenset()
) -> dict[str, Tensor]:
    """The entries of ``module``'s whole state dict whose names start with ``prefix``, less those named
    in ``exclude``, on the CPU with floating-point tensors in float32 (others as they are), for an
    export; full names (:func:`submodule_entries` cuts a submodule's out).

    Under FSDP and DeepSpeed this is a collective: call it on every rank; under FSDP only rank 0 gets
    the gathered tensors. Under DeepSpeed the parameters it optimises come from its float32 masters.
    """
    strategy = module.trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        state = fsdp_full_state_dict(strategy.model, offload=strategy.root_device.type != "cpu")
    else:
        state = module.state_dict()
    state = {key: value for key, value in state.items() if key.startswith(prefix) and key not in exclude}
    if isinstance(strategy, DeepSpeedStrategy):
        state = merge_masters(state, zero_masters(module, state))
    return {key: _float32_cpu(value) for key, value in state.items()}


def merge_masters(state: Mapping[str, Tensor], masters: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with the tensors of ``masters`` in place of its own (same names and shapes)."""
    for key, master in masters.items():
        if state[key].shape != master.shape:
            raise ValueError(f"{key}: master weight {tuple(master.shape)} != {tuple(state[key].shape)}")
    return {key: masters.get(key, value) for key, value in state.items()}


def submodule_entries(state: Mapping[str, Tensor], name: str) -> dict[str, Tensor]:
    """The entries of submodule ``name`` in a module's ``state``, named relative to it."""
    prefix = f"{name}."
    return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}


def fsdp_full_state_dict(model: nn.Module, offload: bool) -> dict[str, Tensor]:
    """FSDP's full state dict, gathered on rank 0 (elsewhere only the ignored modules' entries), a
    collective. ``offload`` gathers onto the CPU (on a CPU device torch 2.13 crashes with it)."""
    config = FullStateDictConfig(offload_to_cpu=offload, rank0_only=True)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
        return model.state_dict()


def zero_masters(module: nn.Module, names: Container[str]) -> dict[str, Tensor]:
    """DeepSpeed's float32 master weights of the parameters of ``module`` named in ``names`` that it
    optimises (a collective per parameter: call on every rank)."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {}
    for key, param in module.named_parameters():
        if key not in names:
            continue
        master = safe_get_full_fp32_param(param)
        if master is not None:
            masters[key] = master
    return masters


def _float32_cpu(value: Tensor) -> Tensor:
    value = value.detach().cpu().contiguous()  # safetensors writes contiguous tensors only
    return value.float() if value.is_floating_point() else value
