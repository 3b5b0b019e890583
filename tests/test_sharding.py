"""FSDP and DeepSpeed for the stages (``mambaxray_ctl.stages.sharding``), as far as a CPU can show.

Lightning's FSDP cannot run on a CPU with torch 2.13 (FSDP refuses Lightning's ``device_id=None`` there,
and its CPU offload of full state dicts crashes), and DeepSpeed needs CUDA. So these tests build the
strategies from the project's config files, wrap a real stage-3 module (tiny LM in bf16) with FSDP the
way :class:`StageFSDPStrategy` does, in a one-process gloo group, and check the export and checkpoint
functions on real state dicts. ``fit``, resume and predict through Lightning under both strategies need
GPUs and are not automated yet (README, "GPU check").
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy, Strategy
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.fsdp.wrap import CustomPolicy, ModuleWrapPolicy

from mambaxray_ctl.backbone.blocks import ARMBlock
from mambaxray_ctl.lightning_cli import MambaXrayCLI
from mambaxray_ctl.stages.reportgen import ReportGenModule
from mambaxray_ctl.stages.sharding import (
    WRAP_LAYERS,
    StageDeepSpeedStrategy,
    StageFSDPStrategy,
    float32_state_dict,
    frozen_entries,
    frozen_modules,
    fsdp_full_state_dict,
    import_classes,
    merge_masters,
    missing_trainable,
    restore_frozen,
    submodule_entries,
)
from test_ddp import run_command
from test_stage1_arm import tiny_arm
from test_stage_losses import free_port
from test_stages_cli import CONFIGS, cli_args

ROOT = Path(__file__).resolve().parents[1]
FSDP_ON_CPU = ["-c", str(CONFIGS / "trainer" / "fsdp.yaml"), "--trainer.accelerator=cpu"]
FSDP_ON_CPU += ["--trainer.devices=1", "--trainer.precision=32-true"]
FSDP_ON_CPU += ["--model.init_args.backbone.ssm_impl=null"]


@pytest.fixture
def process_group() -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def reportgen(world: Path, **kwargs: Any) -> ReportGenModule:
    lm = {"name": str(world / "text" / "lm"), "dtype": "bfloat16", "max_target_tokens": 8}
    return ReportGenModule(**{"backbone": {"preset": "test_arm_tiny"}, "lm": lm, **kwargs})


def wrap_as_the_strategy_does(module: nn.Module) -> FSDP:
    strategy = StageFSDPStrategy()
    return FSDP(
        module,
        device_id=torch.device("cpu"),
        sharding_strategy=strategy.sharding_strategy,
        ignored_states=frozen_modules(module),
        **strategy.kwargs,
    )


def own_parameters(unit: FSDP) -> list[nn.Parameter]:
    """A unit's module's parameters, less those of the units nested in it."""
    return [p for name, p in unit.module.named_parameters() if "_fsdp_wrapped_module" not in name]


def strategy_config(name: str) -> dict[str, Any]:
    return yaml.safe_load((CONFIGS / "trainer" / f"{name}.yaml").read_text())["trainer"]["strategy"]


def parse_strategy(name: str) -> tuple[ArgumentParser, Any]:
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    return parser, parser.parse_object({"strategy": strategy_config(name)})


# Configs ---------------------------------------------------------------------------------------------------
def test_fsdp_config_builds_the_stage_strategy_through_the_cli(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [a for a in cli_args(world, tmp_path, "stage3", "fit", *FSDP_ON_CPU) if a != "fit"]
    monkeypatch.setattr("sys.argv", ["mambaxray-ctl"])
    strategy = MambaXrayCLI(args=args, run=False).trainer.strategy
    assert isinstance(strategy, StageFSDPStrategy)
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert strategy.kwargs["use_orig_params"] is True
    assert isinstance(strategy.kwargs["auto_wrap_policy"], CustomPolicy)


def test_deepspeed_config_names_zero_2_without_frozen_parameters() -> None:
    _, config = parse_strategy("deepspeed")
    assert config.strategy.class_path == "mambaxray_ctl.stages.sharding.StageDeepSpeedStrategy"
    assert config.strategy.init_args.stage == 2
    assert config.strategy.init_args.exclude_frozen_parameters is True
    assert issubclass(StageDeepSpeedStrategy, DeepSpeedStrategy)


def test_deepspeed_config_builds_the_strategy_when_deepspeed_is_installed() -> None:
    pytest.importorskip("deepspeed")
    parser, config = parse_strategy("deepspeed")
    strategy = parser.instantiate_classes(config).strategy
    assert isinstance(strategy, StageDeepSpeedStrategy)
    assert strategy.config["zero_optimization"]["stage"] == 2
    assert strategy.exclude_frozen_parameters is True


def test_wrap_layers_name_importable_module_classes() -> None:
    classes = import_classes(WRAP_LAYERS)
    assert ARMBlock in classes and all(issubclass(c, nn.Module) for c in classes)
    assert {c.__name__ for c in classes} >= {"Qwen2DecoderLayer", "LlamaDecoderLayer", "BertLayer"}


# FSDP wrapping --------------------------------------------------------------------------------------------
def test_one_flat_unit_cannot_hold_the_bf16_lm_and_the_float32_trainables(
    world: Path, process_group: None
) -> None:
    """The old config's failure: the frozen LM's leftovers (embeddings, final norm) share the root unit
    with float32 parameters."""
    module = reportgen(world)
    policy = ModuleWrapPolicy(set(import_classes(WRAP_LAYERS)))
    with pytest.raises(ValueError, match="uniform"):
        FSDP(module, device_id=torch.device("cpu"), auto_wrap_policy=policy, use_orig_params=True)


def test_frozen_modules_are_the_largest_all_frozen_submodules(world: Path) -> None:
    arm = tiny_arm()
    assert frozen_modules(arm) == [arm.backbone.norm_f]  # stage 1's unused final norm
    module = reportgen(world, ctl_ft={"weight": 0})
    assert frozen_modules(module) == [module.llm, module.text_proj]


def test_fsdp_units_hold_only_float32_trainables_and_the_frozen_lm_stays_whole(
    world: Path, process_group: None
) -> None:
    module = reportgen(world)
    assert frozen_modules(module) == [module.llm]
    lm_shapes = {name: p.shape for name, p in module.llm.named_parameters()}
    wrapped = wrap_as_the_strategy_does(module)

    units = FSDP.fsdp_modules(wrapped)
    assert sorted(type(u.module).__name__ for u in units) == ["ARMBlock", "ARMBlock", "ReportGenModule"]
    lm_params = set(module.llm.parameters())
    for unit in units:
        own = [p for p in own_parameters(unit) if p not in lm_params]
        assert own and all(p.requires_grad and p.dtype == torch.float32 for p in own), type(unit.module)
    assert {name: p.shape for name, p in module.llm.named_parameters()} == lm_shapes
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in lm_params)


def test_fsdp_trains_and_its_full_state_dict_is_the_float32_model_without_prefixes(
    world: Path, process_group: None
) -> None:
    module = reportgen(world)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    wrapped = wrap_as_the_strategy_does(module)
    state = fsdp_full_state_dict(wrapped, offload=False)
    assert state.keys() == before.keys()
    assert all(torch.equal(state[k], v) for k, v in before.items())

    batch = {
        "images": torch.randn(2, 1, 3, 64, 64),
        "view_mask": torch.ones(2, 1, dtype=torch.bool),
        "reports": ["the heart is enlarged .", "no pleural effusion ."],
    }
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    wrapped(batch).loss.backward()
    optimizer.step()
    after = fsdp_full_state_dict(wrapped, offload=False)
    assert not torch.equal(
        after["backbone.layers.0.mixer.in_proj.weight"], before["backbone.layers.0.mixer.in_proj.weight"]
    )
    assert not torch.equal(after["mapper.0.weight"], before["mapper.0.weight"])
    lm_keys = [k for k in before if k.startswith("llm.")]
    assert lm_keys and all(torch.equal(after[k], before[k]) for k in lm_keys)
    assert all(after[k].dtype == torch.float32 for k in after if k.startswith("backbone."))


BATCH_REPORTS = ["the heart is enlarged .", "no pleural effusion ."]


def one_step(model: nn.Module, images: torch.Tensor) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model({"images": images, "reports": BATCH_REPORTS}).loss.backward()
    optimizer.step()


def two_rank_worker(world: Path, out: Path) -> None:
    """Each of 2 ranks takes one FULL_SHARD step on the same batch (so FSDP's averaged gradient is the
    1-process one); rank 0 saves the gathered state dict next to a 1-process step's."""
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    tiny = {"preset": "test_arm_tiny", "overrides": {"drop_path_rate": 0.0}}
    module = reportgen(world, backbone=tiny, ctl_ft={"gather": False})
    reference = copy.deepcopy(module)
    wrapped = wrap_as_the_strategy_does(module)
    images = torch.randn(2, 1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    one_step(wrapped, images)
    one_step(reference, images)
    local = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    state = fsdp_full_state_dict(wrapped, offload=False)
    if dist.get_rank() == 0:
        total = sum(p.numel() for p in reference.parameters() if p.requires_grad)
        torch.save({"fsdp": state, "single": reference.state_dict(), "local": local, "total": total}, out)
    dist.destroy_process_group()


def test_two_rank_full_shard_step_gathers_to_the_one_process_weights(world: Path, tmp_path: Path) -> None:
    out = tmp_path / "states.pt"
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        f"--master-port={free_port()}",
    ]
    run_command([*launch, __file__, str(world), str(out)], timeout=300)
    saved = torch.load(out)
    assert saved["local"] < saved["total"]  # rank 0 held a shard of the trainables, not all of them
    fsdp, single = saved["fsdp"], saved["single"]
    assert fsdp.keys() == single.keys()
    for key, value in single.items():
        torch.testing.assert_close(fsdp[key], value, atol=1e-6, rtol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    assert fsdp["backbone.layers.0.mixer.in_proj.weight"].dtype == torch.float32


# DeepSpeed checkpoints and export -------------------------------------------------------------------------
def test_frozen_entries_keep_the_module_s_frozen_parameters_and_restore_them(world: Path) -> None:
    """Stage 3 without CTL-FT: the LM is dropped by the module, the frozen ``text_proj`` must travel."""
    module = reportgen(world, ctl_ft={"weight": 0})
    state = module.state_dict()
    for key in module._frozen_llm_keys():
        state.pop(key, None)
    entries = frozen_entries(state, module)
    assert sorted(entries) == ["text_proj.bias", "text_proj.weight"]

    fresh = reportgen(world, ctl_ft={"weight": 0})
    assert not torch.equal(fresh.text_proj.weight, module.text_proj.weight)
    restore_frozen(fresh, entries)
    assert torch.equal(fresh.text_proj.weight, module.text_proj.weight)
    with pytest.raises(RuntimeError, match="lacks"):
        restore_frozen(fresh, {"text_proj.extra": torch.zeros(1)})


def test_frozen_entries_are_empty_when_only_the_lm_is_frozen(world: Path) -> None:
    module = reportgen(world)
    state = {k: v for k, v in module.state_dict().items() if k not in module._frozen_llm_keys()}
    assert frozen_entries(state, module) == {}


def test_export_state_is_float32_under_a_plain_strategy() -> None:
    module = tiny_arm()
    module.trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    module.backbone.bfloat16()
    module.backbone.register_buffer("steps", torch.tensor([3, 300]))  # integers stay integers
    state = submodule_entries(float32_state_dict(module, "backbone."), "backbone")
    assert state.keys() == module.backbone.state_dict().keys()
    for key, value in module.backbone.state_dict().items():
        expected = value.float() if value.is_floating_point() else value
        assert state[key].dtype == expected.dtype and torch.equal(state[key], expected), key
    assert state["steps"].dtype == torch.int64
    left_out = {"backbone.steps", "backbone.pos_embed"}
    kept = float32_state_dict(module, exclude=left_out)
    assert set(kept) == set(module.state_dict()) - left_out  # the whole module, less what is excluded


def test_master_weights_replace_the_bf16_parameters_of_the_export() -> None:
    bf16 = {"weight": torch.randn(3, 2).bfloat16(), "step": torch.tensor(4)}
    master = torch.randn(3, 2)
    merged = merge_masters(bf16, {"weight": master})
    assert merged["weight"] is master and merged["step"] is bf16["step"]
    with pytest.raises(ValueError, match="master weight"):
        merge_masters(bf16, {"weight": torch.randn(2, 3)})


def test_reportgen_loads_a_checkpoint_whose_weights_the_strategy_loaded(world: Path) -> None:
    module = reportgen(world)
    module.on_load_checkpoint({})  # FSDP has popped state_dict, DeepSpeed never put it there
    with pytest.raises(RuntimeError, match="unexpected"):
        module.on_load_checkpoint({"state_dict": {**module.state_dict(), "foreign.weight": torch.zeros(1)}})


if __name__ == "__main__":
    two_rank_worker(Path(sys.argv[1]), Path(sys.argv[2]))


def test_missing_trainable_names_the_trainable_parameters_a_checkpoint_lacks() -> None:
    module = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    module[1].requires_grad_(False)
    missing = ["_forward_module.0.bias", "_forward_module.1.weight", "1.bias"]
    assert missing_trainable(module, missing) == ["0.bias"]
    assert missing_trainable(module, ["1.weight", "1.bias"]) == []
