"""Selective-scan implementations against the float64 reference, gradcheck, dtypes, fallback, dispatcher."""

from __future__ import annotations

import importlib
import importlib.abc
import math
import sys
import types
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mambaxray_ctl.ops import cpu_fused, cuda
from mambaxray_ctl.ops.cpu_fused import cpu_fused_available, selective_scan_cpu_fused
from mambaxray_ctl.ops.reference import selective_scan_reference
from mambaxray_ctl.ops.selective_scan import resolve_impl, selective_scan

# The dispatcher module (the package attribute of that name is the function).
dispatcher = importlib.import_module("mambaxray_ctl.ops.selective_scan")
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
TOLERANCE = {torch.float64: {"atol": 1e-10, "rtol": 1e-10}, torch.float32: {"atol": 1e-5, "rtol": 1e-4}}

ALL = {"with_D": True, "with_z": True, "with_bias": True, "softplus": True}
BARE = {"with_D": False, "with_z": False, "with_bias": False, "softplus": False}
# batch, dim, L, d_state, options of make_inputs
CASES = [
    pytest.param(1, 5, 1, 16, ALL, id="L1"),
    pytest.param(3, 13, 37, 16, ALL, id="oddL-all"),
    pytest.param(2, 13, 197, 16, ALL, id="L197"),
    pytest.param(3, 7, 23, 1, BARE, id="N1-bare"),
    pytest.param(1, 9, 31, 16, {**ALL, "with_z": False, "softplus": False}, id="no-z-no-softplus"),
    pytest.param(2, 6, 19, 5, {**BARE, "with_z": True, "softplus": True}, id="N5-z-softplus"),
    pytest.param(3, 10, 40, 16, {**BARE, "with_bias": True, "softplus": True}, id="bias-softplus"),
]


def make_inputs(
    batch: int,
    dim: int,
    length: int,
    d_state: int,
    *,
    with_D: bool = True,
    with_z: bool = True,
    with_bias: bool = True,
    softplus: bool = True,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> dict[str, Tensor | None]:
    """Mamba-like inputs (made in float64, then cast): A < 0, time steps in [1e-3, 0.1]-ish."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    if softplus:  # delta_bias = softplus^-1(dt), dt ~ logU[1e-3, 0.1]
        dt = torch.exp(rand(dim) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        bias, delta = dt + torch.log(-torch.expm1(-dt)), 0.5 * randn(batch, dim, length)
    else:  # positive time steps without softplus
        bias, delta = 0.05 * rand(dim), 0.1 * rand(batch, dim, length) + 0.01
    inputs = {
        "u": randn(batch, dim, length),
        "delta": delta,
        "A": -torch.exp(0.5 * randn(dim, d_state)),
        "B": randn(batch, d_state, length),
        "C": randn(batch, d_state, length),
        "D": randn(dim) if with_D else None,
        "z": randn(batch, dim, length) if with_z else None,
        "delta_bias": bias if with_bias else None,
    }
    return {k: None if v is None else v.to(dtype) for k, v in inputs.items()}


def run(
    impl: str, inputs: dict[str, Tensor | None], softplus: bool, last_grad: bool = True
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Output, last state and the gradients of a random linear loss of both (or of the output only)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    out, last = selective_scan(
        **{k: leaves.get(k) for k in NAMES}, delta_softplus=softplus, return_last_state=True, impl=impl
    )
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    dlast = torch.randn(last.shape, generator=g, dtype=torch.float64).to(last)
    loss = (out * dout).sum() + (last * dlast).sum() * last_grad
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return out, last, dict(zip(leaves, grads, strict=True))


def to64(inputs: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
    return {k: None if v is None else v.double() for k, v in inputs.items()}


def assert_matches(got: tuple, want: tuple, **tol: float) -> None:
    (out, last, grads), (out_ref, last_ref, grads_ref) = got, want
    torch.testing.assert_close(out.double(), out_ref, **tol)
    torch.testing.assert_close(last.double(), last_ref, **tol)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad.double(), grads_ref[name], **tol, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.fixture(params=["reference", "cpu_fused"])
def impl(request: pytest.FixtureRequest) -> str:
    if request.param == "cpu_fused" and not cpu_fused_available():
        pytest.skip("the fused CPU extension cannot be built here")
    return request.param


@pytest.fixture
def clear_build_cache() -> Iterator[None]:
    cpu_fused._build_error.cache_clear()
    yield
    cpu_fused._build_error.cache_clear()


@pytest.fixture
def fresh_mamba_ssm() -> Iterator[None]:
    """Forget the cached mamba-ssm import and the once-per-process fallback warning, before and after."""

    def clear() -> None:
        cuda._import_selective_scan_fn.cache_clear()
        dispatcher._warn_reference_on_cuda.cache_clear()

    clear()
    yield
    clear()


def fake_mamba_ssm(
    monkeypatch: pytest.MonkeyPatch,
    interface: types.ModuleType | None = None,
    extension: types.ModuleType | None = None,
) -> None:
    """Put a fake ``mamba_ssm.ops.selective_scan_interface`` and compiled ``selective_scan_cuda`` in
    ``sys.modules``; ``None`` makes that import fail as for a module that is not there."""
    for name in ("mamba_ssm", "mamba_ssm.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", interface)
    monkeypatch.setitem(sys.modules, "selective_scan_cuda", extension)


class _NotInstalled(importlib.abc.MetaPathFinder):
    """Finds every module of one top-level package missing, as when that package is not installed."""

    def __init__(self, package: str) -> None:
        self.package = package

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.partition(".")[0] == self.package:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def uninstall_mamba_ssm(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m.partition(".")[0] == "mamba_ssm"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_NotInstalled("mamba_ssm"), *sys.meta_path])


def interface_with(fn: object) -> types.ModuleType:
    interface = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    interface.selective_scan_fn = fn  # type: ignore[attr-defined]
    return interface


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("batch", "dim", "length", "d_state", "options"), CASES)
def test_matches_float64_reference(
    impl: str, dtype: torch.dtype, batch: int, dim: int, length: int, d_state: int, options: dict[str, bool]
) -> None:
    inputs = make_inputs(batch, dim, length, d_state, **options, dtype=dtype)
    got = run(impl, inputs, options["softplus"])
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert all(g.dtype == dtype for g in got[2].values())
    assert_matches(got, run("reference", to64(inputs), options["softplus"]), **TOLERANCE[dtype])


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize(
    "options",
    [
        pytest.param(ALL, id="all"),
        pytest.param(BARE, id="bare"),
        pytest.param({**BARE, "with_D": True}, id="D-only"),
        pytest.param({**BARE, "with_z": True, "softplus": True}, id="z-softplus"),
        pytest.param({**ALL, "softplus": False}, id="bias-no-softplus"),
    ],
)
def test_reference_matches_a_naive_per_step_loop(options: dict[str, bool], reverse: bool) -> None:
    """The float64 reference (the specification the other implementations are tested against) against
    the recurrence written out one time step at a time, walking L forwards or backwards:
    h = exp(dt·A)·h + dt·B_t·u_t, y_t = <C_t, h> + D·u_t, out_t = y_t·silu(z_t), with
    dt = delta_t + bias (softplus-ed or not); output and last state."""
    x = make_inputs(2, 5, 13, 4, **options)
    u, delta, A, B, C, D, z, bias = (x[name] for name in NAMES)
    h = u.new_zeros(2, 5, 4)
    want = torch.empty_like(u)
    for t in reversed(range(13)) if reverse else range(13):
        dt = delta[:, :, t] + (0 if bias is None else bias)
        dt = F.softplus(dt) if options["softplus"] else dt
        h = torch.exp(dt[..., None] * A) * h + dt[..., None] * B[:, None, :, t] * u[:, :, t, None]
        y = (h * C[:, None, :, t]).sum(-1) + (0 if D is None else D * u[:, :, t])
        want[:, :, t] = y if z is None else y * F.silu(z[:, :, t])
    out, last = selective_scan(
        **x, delta_softplus=options["softplus"], return_last_state=True, impl="reference", reverse=reverse
    )
    torch.testing.assert_close(out, want, **TOLERANCE[torch.float64])
    torch.testing.assert_close(last, h, **TOLERANCE[torch.float64])
    if not reverse:  # the dispatcher adds nothing to the reference function itself
        plain = selective_scan_reference(**x, delta_softplus=options["softplus"])
        torch.testing.assert_close(plain, want, **TOLERANCE[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_reverse_equals_scanning_the_flipped_sequence(impl: str, dtype: torch.dtype) -> None:
    """``reverse=True`` walks L backwards: the same as flipping every time-axis input and the output."""
    inputs = make_inputs(2, 7, 23, 16, **ALL, dtype=dtype)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    out, last = selective_scan(**leaves, delta_softplus=True, return_last_state=True, reverse=True, impl=impl)
    flipped = {k: v.flip(-1) if k in {"u", "delta", "B", "C", "z"} else v for k, v in to64(leaves).items()}
    want_out, want_last = selective_scan_reference(**flipped, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(out.double(), want_out.flip(-1), **TOLERANCE[dtype])
    torch.testing.assert_close(last.double(), want_last, **TOLERANCE[dtype])

    grads = torch.autograd.grad(out.sum() + last.sum(), list(leaves.values()))
    want_grads = torch.autograd.grad(want_out.sum() + want_last.sum(), list(leaves.values()))
    for name, grad, want in zip(leaves, grads, want_grads, strict=True):
        torch.testing.assert_close(
            grad.double(), want.double(), **TOLERANCE[dtype], msg=lambda m, n=name: f"d{n}: {m}"
        )
    with torch.inference_mode():
        fast = selective_scan(**inputs, delta_softplus=True, reverse=True, impl=impl)
    torch.testing.assert_close(fast, out.detach(), rtol=0, atol=0)


@pytest.mark.parametrize(("d_state", "options"), [(4, ALL), (16, {**ALL, "softplus": False}), (3, BARE)])
def test_gradcheck(impl: str, d_state: int, options: dict[str, bool]) -> None:
    inputs = make_inputs(2, 3, 5, d_state, **options)
    leaves = {k: v.requires_grad_() for k, v in inputs.items() if v is not None}

    def fn(*tensors: Tensor) -> tuple[Tensor, Tensor]:
        args = dict(zip(leaves, tensors, strict=True))
        return selective_scan(
            **{k: args.get(k) for k in NAMES},
            delta_softplus=options["softplus"],
            return_last_state=True,
            impl=impl,
        )

    assert torch.autograd.gradcheck(fn, tuple(leaves.values()))


def test_non_contiguous_inputs(impl: str) -> None:
    base = make_inputs(2, 6, 21, 16, dtype=torch.float64)
    strided = {
        "u": base["u"].transpose(1, 2).contiguous().transpose(1, 2),
        "delta": torch.stack([base["delta"], base["delta"]], -1)[..., 0],
        "A": base["A"].t().contiguous().t(),
        "B": base["B"].transpose(1, 2).contiguous().transpose(1, 2),
        "C": torch.stack([base["C"], base["C"]], 1)[:, 1],
        "D": torch.stack([base["D"], base["D"]], -1)[:, 0],
        "z": base["z"].transpose(0, 2).contiguous().transpose(0, 2),
        "delta_bias": torch.stack([base["delta_bias"], base["delta_bias"]], -1)[:, 1],
    }
    assert not any(t.is_contiguous() for t in strided.values())
    assert_matches(run(impl, strided, True), run("reference", base, True), **TOLERANCE[torch.float64])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_low_precision_inputs(impl: str, dtype: torch.dtype) -> None:
    inputs = make_inputs(2, 12, 33, 16, dtype=torch.float32)
    for name in ("u", "delta", "B", "C", "z"):  # weights A, D, delta_bias stay float32, as in Mamba
        inputs[name] = inputs[name].to(dtype)
    out, last, grads = run(impl, inputs, True)
    assert out.dtype == dtype and last.dtype == torch.float32
    assert all(grads[k].dtype == inputs[k].dtype for k in grads)
    assert_matches((out, last, grads), run("reference", to64(inputs), True), atol=2e-2, rtol=2e-2)


def test_extreme_values_and_nan(impl: str) -> None:
    """Decays that underflow to 0 (dt * A down to -1e5), zero time steps, and NaN propagation."""
    inputs = make_inputs(2, 5, 17, 16, **BARE)
    inputs["A"] = -torch.logspace(-3, 4, 16, dtype=torch.float64).repeat(5, 1)
    steps = torch.logspace(-3, 1, 16, dtype=torch.float64).expand(2, 5, 16)
    inputs["delta"] = torch.cat([torch.zeros(2, 5, 1, dtype=torch.float64), steps], -1)
    assert_matches(run(impl, inputs, False), run("reference", inputs, False), **TOLERANCE[torch.float64])
    inputs["u"][1, 2, 3] = float("nan")
    got, want = selective_scan(**inputs, impl=impl), selective_scan_reference(**inputs)
    torch.testing.assert_close(got, want, equal_nan=True, atol=1e-10, rtol=0)


def test_fused_op_checks_shapes() -> None:
    if not cpu_fused_available():
        pytest.skip("the fused CPU extension cannot be built here")
    inputs = make_inputs(2, 3, 7, 4, **BARE)
    inputs["B"] = inputs["B"][..., :-1]
    with pytest.raises(RuntimeError, match=r"B has shape \[2, 4, 6\], expected \[2, 4, 7\]"):
        torch.ops.mambaxray_ctl.selective_scan_fwd(*inputs.values(), False)


def test_fused_fallback_warns_once(monkeypatch: pytest.MonkeyPatch, clear_build_cache: None) -> None:
    def no_compiler() -> None:
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(cpu_fused, "_load_extension", no_compiler)
    inputs = make_inputs(1, 4, 9, 16)
    with pytest.warns(RuntimeWarning, match="could not be built.*command not found") as record:
        out = selective_scan_cpu_fused(**inputs, delta_softplus=True)
        selective_scan_cpu_fused(**inputs, delta_softplus=True)
        assert not cpu_fused_available()
        assert resolve_impl("auto", "cpu") == resolve_impl("cpu_fused", "cpu") == "reference"
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    torch.testing.assert_close(out, selective_scan_reference(**inputs, delta_softplus=True))


def test_resolve_impl() -> None:
    assert resolve_impl("reference", "cuda") == "reference"
    assert resolve_impl("auto", "cpu") == ("cpu_fused" if cpu_fused_available() else "reference")
    assert resolve_impl("auto", "meta") == "reference"
    assert resolve_impl("auto", "cuda", torch.float64) == "reference"  # mamba-ssm has no float64 kernel
    with pytest.raises(ValueError, match="unknown selective-scan impl 'triton'"):
        resolve_impl("triton", "cpu")
    with pytest.raises(ValueError, match="needs cpu tensors"):
        resolve_impl("cpu_fused", "cuda")


def test_cuda_impl_without_mamba_ssm_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, fresh_mamba_ssm: None
) -> None:
    uninstall_mamba_ssm(monkeypatch)
    inputs = make_inputs(1, 4, 5, 16, dtype=torch.float32)
    with pytest.raises(
        ImportError, match=r"but mamba-ssm is not installed\. Install it with `make setup-cuda`"
    ):
        selective_scan(**inputs, impl="cuda")


def test_cuda_impl_with_broken_mamba_ssm_names_the_error(
    monkeypatch: pytest.MonkeyPatch, fresh_mamba_ssm: None
) -> None:
    broken = types.ModuleType("mamba_ssm.ops.selective_scan_interface")

    def fail(name: str) -> None:
        raise OSError("libcudart.so.12: cannot open shared object file")  # not an ImportError

    broken.__getattr__ = fail  # type: ignore[method-assign]
    fake_mamba_ssm(monkeypatch, broken)
    with pytest.raises(ImportError, match=r"failed to import \(OSError: libcudart.*`make setup-cuda`"):
        cuda.require_mamba_ssm()


def test_mamba_ssm_without_its_compiled_extension_is_detected(
    monkeypatch: pytest.MonkeyPatch, fresh_mamba_ssm: None
) -> None:
    """selective_scan_fn imports (a release that guards the extension's import) but selective_scan_cuda
    is absent: impl='cuda' says so and how to build it, instead of failing at the first call."""
    fake_mamba_ssm(monkeypatch, interface_with(selective_scan_reference), extension=None)
    monkeypatch.setattr(cuda, "version", lambda name: "2.3.2.post1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cuda.mamba_ssm_problem() == (
        "mamba-ssm 2.3.2.post1 is installed without its compiled CUDA extension selective_scan_cuda "
        "(it was built with MAMBA_SKIP_CUDA_BUILD, or by a mamba-ssm that builds the extension only when "
        "asked to with MAMBA_KEEP_CUDA_BUILD=TRUE)"
    )
    assert not cuda.mamba_ssm_available()
    with pytest.raises(ImportError) as raised:
        resolve_impl("cuda", "cuda", torch.bfloat16)
    message = str(raised.value)
    assert message.startswith("impl='cuda' needs mamba-ssm's CUDA selective scan, but mamba-ssm 2.3.2.post1")
    assert "`make setup-cuda`" in message and "MAMBA_KEEP_CUDA_BUILD=TRUE pip install" in message


def test_working_mamba_ssm_is_chosen_by_auto_on_cuda(
    monkeypatch: pytest.MonkeyPatch, fresh_mamba_ssm: None
) -> None:
    fake_mamba_ssm(
        monkeypatch, interface_with(selective_scan_reference), types.ModuleType("selective_scan_cuda")
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_impl("auto", "cuda", torch.bfloat16) == "cuda"
    assert cuda.require_mamba_ssm() is selective_scan_reference


@pytest.mark.parametrize(
    "rank_env", [{}, {"RANK": "0"}, {"SLURM_PROCID": "0"}], ids=["single", "rank0", "slurm0"]
)
def test_auto_on_cuda_without_mamba_ssm_warns_once(
    monkeypatch: pytest.MonkeyPatch, fresh_mamba_ssm: None, rank_env: dict[str, str]
) -> None:
    for name in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in rank_env.items():
        monkeypatch.setenv(name, value)
    fake_mamba_ssm(monkeypatch, interface_with(selective_scan_reference), extension=None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.warns(RuntimeWarning) as record:
        assert resolve_impl("auto", "cuda", torch.float32) == "reference"
        assert resolve_impl("auto", "cuda", torch.bfloat16) == "reference"
    assert len(record) == 1
    message = str(record[0].message)
    assert "runs the pure-PyTorch reference scan on CUDA tensors because mamba-ssm" in message
    assert "without its compiled CUDA extension selective_scan_cuda" in message
    assert "`make setup-cuda`" in message and "ssm_impl 'cuda'" in message


@pytest.mark.parametrize("rank_env", [{"RANK": "1"}, {"SLURM_PROCID": "3"}], ids=["rank1", "slurm3"])
def test_auto_fallback_warning_is_silent_off_rank_zero(
    monkeypatch: pytest.MonkeyPatch, fresh_mamba_ssm: None, rank_env: dict[str, str]
) -> None:
    monkeypatch.delenv("RANK", raising=False)
    for name, value in rank_env.items():
        monkeypatch.setenv(name, value)
    uninstall_mamba_ssm(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_impl("auto", "cuda", torch.float32) == "reference"


def test_scan_ignores_autocast(impl: str) -> None:
    """Under autocast the scan still computes in float32: the same result as without autocast."""
    inputs = make_inputs(2, 8, 29, 16, dtype=torch.float32)
    want = selective_scan(**inputs, delta_softplus=True, impl=impl)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = selective_scan(**inputs, delta_softplus=True, impl=impl)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("name", "bad", "match"),
    [
        ("B", lambda t: t[..., :-1], r"B must have shape \(batch, d_state, L\) = \(2, 4, 7\), got \(2, 4, 6"),
        ("C", lambda t: t[:, :-1], r"C must have shape"),
        ("A", lambda t: t.t(), r"A must have shape \(dim, d_state\) = \(3, 4\), got \(4, 3\)"),
        ("A", lambda t: t[0], r"A must have shape \(dim, d_state\), got \(4,\)"),
        ("delta", lambda t: t[..., :-1], r"delta must have shape"),
        ("u", lambda t: t[0], r"u must have shape \(batch, dim, L\)"),
        ("D", lambda t: t[:-1], r"D must have shape \(dim,\)"),
        ("z", lambda t: t[:1], r"z must have shape"),
        ("delta_bias", lambda t: t[None], r"delta_bias must have shape"),
        ("u", lambda t: t.long(), r"real floating-point"),
    ],
)
def test_shape_and_dtype_errors(name: str, bad, match: str) -> None:
    inputs = make_inputs(2, 3, 7, 4)
    inputs[name] = bad(inputs[name])
    with pytest.raises(ValueError, match=match):
        selective_scan(**inputs, impl="reference")


def test_unknown_impl_raises() -> None:
    with pytest.raises(ValueError, match="unknown selective-scan impl"):
        selective_scan(**make_inputs(1, 2, 3, 4), impl="fast")  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_impl", ["reference", "cuda", "auto"])
def test_cuda_tensors_match_reference(gpu_impl: str) -> None:
    if gpu_impl == "cuda" and not cuda.mamba_ssm_available():
        pytest.skip("mamba-ssm is not installed")
    inputs = make_inputs(2, 24, 65, 16, dtype=torch.float32)
    on_gpu = {k: None if v is None else v.cuda() for k, v in inputs.items()}
    last_grad = resolve_impl(gpu_impl, "cuda") != "cuda"  # mamba-ssm's backward ignores d(last_state)
    out, last, grads = run(gpu_impl, on_gpu, True, last_grad)
    assert out.is_cuda and last.is_cuda
    got = (out.cpu(), last.cpu(), {k: g.cpu() for k, g in grads.items()})
    assert_matches(got, run("reference", to64(inputs), True, last_grad), **TOLERANCE[torch.float32])
