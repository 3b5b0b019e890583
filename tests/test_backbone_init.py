"""The backbone's from-scratch initialisation follows the official code's (docs/METHOD.md, "Initialisation").

Each parameter group is checked against the distribution the official code draws it from (Vim
``vim/models_mamba.py`` ``_init_weights``/``segm_init_weights``, CTL ``arm/Finetuning/models_mamba.py``):
its bound, its standard deviation and, for zero-initialised tensors, exact zeros.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

from mambaxray_ctl.backbone import create_backbone

# Large enough for a standard deviation within 3 % of its expectation, small enough to build in a second.
ARM = {"embed_dim": 256, "depth": 3, "img_size": 64, "ssm_impl": "reference"}
VIM = {"embed_dim": 128, "depth": 3, "img_size": 64, "ssm_impl": "reference"}


def _uniform(weight: Tensor, bound: float) -> None:
    """Drawn from U(-bound, bound): inside the bound, reaching it, std bound / sqrt(3) (within about five
    standard errors of a sample standard deviation, 0.45 / sqrt(n) relative for a uniform)."""
    assert weight.abs().max() <= bound * (1 + 1e-6)
    assert weight.abs().max() >= 0.98 * bound
    tolerance = max(0.03, 2.5 / math.sqrt(weight.numel()))
    assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=tolerance)


def _kaiming_uniform(linear: torch.nn.Module, scale: float = 1.0) -> None:
    """PyTorch's default linear weight (Kaiming-uniform with a = sqrt(5)): bound 1 / sqrt(fan_in)."""
    _uniform(linear.weight, scale / math.sqrt(linear.weight.shape[1]))


def _zero(tensor: Tensor) -> None:
    assert torch.count_nonzero(tensor) == 0


@pytest.fixture(scope="module")
def arm() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone("arm_base_pz16", **ARM)


@pytest.fixture(scope="module")
def vim() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone("vim_small_patch16", **VIM)


def test_linears_keep_pytorch_default_weights_with_zero_bias(arm: torch.nn.Module) -> None:
    for layer in arm.layers:
        mixer = layer.mixer
        _kaiming_uniform(mixer.in_proj)
        for suffix in ("", "_b", "_c", "_c_b"):
            _kaiming_uniform(getattr(mixer, f"x_proj{suffix}"))
        for linear in (layer.mlp.w1, layer.mlp.w2, layer.mlp.w3):
            _kaiming_uniform(linear)
            _zero(linear.bias)


def test_out_proj_is_kaiming_uniform_divided_by_sqrt_depth(
    arm: torch.nn.Module, vim: torch.nn.Module
) -> None:
    for model in (arm, vim):
        for layer in model.layers:
            _kaiming_uniform(layer.mixer.out_proj, scale=1 / math.sqrt(model.config.depth))


def test_patch_embedding_is_lecun_normal_with_zero_bias(arm: torch.nn.Module, vim: torch.nn.Module) -> None:
    for model in (arm, vim):
        proj = model.patch_embed.proj
        fan_in = proj.weight[0].numel()
        std = math.sqrt(1 / fan_in)  # LeCun: variance 1 / fan_in
        assert proj.weight.std().item() == pytest.approx(std, rel=0.03)
        bound = 2 * std / 0.87962566103423978  # truncated at two standard deviations of the drawn normal
        assert proj.weight.abs().max() <= bound * (1 + 1e-6)
        assert proj.weight.abs().max() >= 0.95 * bound
        _zero(proj.bias)


def test_mamba_parameters_keep_their_own_init(arm: torch.nn.Module, vim: torch.nn.Module) -> None:
    for model in (arm, vim):
        config = model.config
        for layer in model.layers:
            mixer = layer.mixer
            for direction in mixer.directions:
                s = direction.suffix
                dt_proj = getattr(mixer, f"dt_proj{s}")
                _uniform(dt_proj.weight, mixer.dt_rank**-0.5)
                dt = F.softplus(dt_proj.bias)
                assert dt.min() >= config.dt_init_floor * (1 - 1e-5)
                assert dt.max() <= config.dt_max * (1 + 1e-5)
                conv = getattr(mixer, f"conv1d{s}")  # PyTorch's default: fan_in = kernel size (depthwise)
                _uniform(conv.weight, 1 / math.sqrt(config.d_conv))
                assert conv.bias.abs().max() <= 1 / math.sqrt(config.d_conv)
                expected_a = torch.arange(1, config.d_state + 1, dtype=torch.float32).log()
                assert torch.equal(getattr(mixer, f"A{s}_log"), expected_a.expand(mixer.d_inner, -1))
                assert torch.equal(getattr(mixer, f"D{s}"), torch.ones(mixer.d_inner))


def test_tokens_and_norms(arm: torch.nn.Module, vim: torch.nn.Module) -> None:
    for model in (arm, vim):
        tokens = torch.cat([model.cls_token.flatten(), model.pos_embed.flatten()])
        assert tokens.std().item() == pytest.approx(0.02, rel=0.05)
        assert torch.equal(model.norm_f.weight, torch.ones_like(model.norm_f.weight))
    for layer in arm.layers:
        for norm in (layer.norm1, layer.norm2):
            assert torch.equal(norm.weight, torch.ones_like(norm.weight))
            _zero(norm.bias)


def test_trunc_normal_scheme_on_request() -> None:
    torch.manual_seed(0)
    model = create_backbone("arm_base_pz16", **ARM, weight_init="trunc_normal")
    for layer in model.layers:
        for linear in (layer.mixer.in_proj, layer.mixer.x_proj, layer.mlp.w1):
            assert linear.weight.std().item() == pytest.approx(0.02, rel=0.03)
        expected = 0.02 / math.sqrt(model.config.depth)
        assert layer.mixer.out_proj.weight.std().item() == pytest.approx(expected, rel=0.03)
    _uniform(model.patch_embed.proj.weight, 1 / math.sqrt(model.patch_embed.proj.weight[0].numel()))


def test_init_weights_redraws_the_same_scheme(arm: torch.nn.Module) -> None:
    """``init_weights`` (also used after a meta-device build) re-draws, never rescales a second time."""
    model = create_backbone("arm_base_pz16", **ARM)
    model.init_weights()
    model.init_weights()
    for layer in model.layers:
        _kaiming_uniform(layer.mixer.out_proj, scale=1 / math.sqrt(model.config.depth))


def test_unknown_scheme_is_rejected() -> None:
    with pytest.raises(ValueError, match="weight_init must be one of"):
        create_backbone("test_arm_tiny", weight_init="xavier")
