"""Derivatives at kinks follow torch's conventions, op by op, on both routes.

Exact ties are common in real networks (a depthwise convolution over a window of ReLU6 zeros gives an exact 0, and
BatchNorm with zero bias keeps it): mobilenet_v2's structured kernel was 9.6% off because ONNX's ``Clip`` took
torch.clamp's derivative (1 at the bounds) where ReLU6 is torch's hardtanh (0 at the bounds). Each case feeds
pre-activations exactly at the kinks and compares the structured NTK with the explicit-Jacobian oracle (float64)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from _oracle import oracle_ntk
from test_routes_ntk import _route_ntk
from torch import nn
from torch.nn import functional as F

import torchntk
from torchntk._api import _run_with_fallback
from torchntk._auto import Explanation
from torchntk._problem import prepare
from torchntk._tiles import TileOptions
from torchntk.converters.onnx_jax._core import exported_from

KINKS = torch.tensor([-7.0, -6.0, -3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0, 6.0, 7.0], dtype=torch.float64)


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


ACTIVATIONS = {
    "ReLU6": nn.ReLU6(),
    "relu6": Lambda(F.relu6),
    "Hardtanh": nn.Hardtanh(-1.0, 1.0),
    "clamp": Lambda(lambda x: torch.clamp(x, 0.0, 6.0)),
    "clamp_min": Lambda(lambda x: torch.clamp(x, min=0.0)),
    "clamp_max": Lambda(lambda x: torch.clamp(x, max=6.0)),
    "clamp_tensor": Lambda(lambda x: torch.clamp(x, torch.zeros_like(x), torch.full_like(x, 6.0))),
    "ReLU": nn.ReLU(),
    "LeakyReLU": nn.LeakyReLU(0.1),
    "Hardsigmoid": nn.Hardsigmoid(),
    "Hardswish": nn.Hardswish(),
    "maximum": Lambda(lambda x: torch.maximum(x, torch.zeros_like(x))),
    "minimum": Lambda(lambda x: torch.minimum(x, torch.ones_like(x))),
    "abs": Lambda(torch.abs),
    "l1_norm": Lambda(lambda x: x + torch.linalg.vector_norm(x[..., :6], ord=1, dim=-1, keepdim=True)),
    "Softplus": nn.Softplus(),
    "Softplus_threshold": nn.Softplus(beta=2.0, threshold=2.0),
    "ELU": nn.ELU(0.5),
    "SELU": nn.SELU(),
    "CELU": nn.CELU(2.0),
    "PReLU": nn.PReLU(11, 0.2),
    "Threshold": nn.Threshold(1.0, 0.5),
    "Softshrink": nn.Softshrink(0.5),
    "Hardshrink": nn.Hardshrink(0.5),
}


def _at_kinks(activation: nn.Module) -> nn.Module:
    """x ↦ W2 act(W1 x + b1) with W1 = I and b1 = 0: the pre-activations are exactly the inputs."""
    n = len(KINKS)
    first = nn.Linear(n, n)
    with torch.no_grad():
        first.weight.copy_(torch.eye(n))
        first.bias.zero_()
    torch.manual_seed(0)
    return nn.Sequential(first, activation, nn.Linear(n, 2)).double().eval()


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_structured_kernel_at_kinks_equals_oracle(name):
    model = _at_kinks(ACTIVATIONS[name])
    x = torch.stack([KINKS, KINKS.flip(0)])
    kernel = torchntk.ntk(model, x, implementation="structured_derivatives")
    want = oracle_ntk(model, (x,), None)
    # torch's hardsigmoid backward multiplies by 1/6 rounded to float32 (also in float64): 3e-8 from the exact 1/6
    tol = 1e-7 if name in ("Hardsigmoid",) else 1e-10
    np.testing.assert_allclose(kernel.numpy(), want.numpy(), atol=tol * float(want.abs().max()), rtol=0)


def test_depthwise_relu6_exact_zeros():
    """The mobilenet_v2 pattern: ReLU6 → depthwise conv (windows of exact zeros) → BatchNorm → ReLU6."""
    model, x = _depthwise_relu6()
    model, x = model.double(), x.double()
    with torch.no_grad():
        hidden = model[:4](x)
    assert int((hidden == 0).sum()) > 0  # the case needs exact ties
    kernel = torchntk.ntk(model, x, implementation="structured_derivatives")
    want = oracle_ntk(model, (x,), None)
    np.testing.assert_allclose(kernel.numpy(), want.numpy(), atol=1e-10 * float(want.abs().max()), rtol=0)


def test_exported_from_reads_the_aten_op():
    node = onnx.helper.make_node("Clip", ["x"], ["y"])
    assert exported_from(node) == ""
    entry = node.metadata_props.add()
    entry.key = "namespace"
    entry.value = (
        ": W/model: torch.nn.Sequential/model.1: torch.nn.modules.activation.ReLU6/hardtanh: aten.hardtanh.default"
    )
    assert exported_from(node) == "aten.hardtanh.default"


POOLS = {
    "MaxPool2d": nn.MaxPool2d(2),
    "MaxPool2d_overlapping": nn.MaxPool2d(3, stride=1, padding=1),
    "AdaptiveMaxPool2d": nn.AdaptiveMaxPool2d(1),
    "amax": Lambda(lambda x: torch.amax(x, dim=(2, 3), keepdim=True)),
    "max_dim": Lambda(lambda x: x.flatten(2).max(dim=2).values[..., None, None]),
}


@pytest.mark.parametrize("name", list(POOLS))
def test_max_pooling_over_ties(name):
    """Windows of exact ties (ReLU zeros and repeated values): torch and the converted function must route the
    derivative to the same elements."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU(), POOLS[name], nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 2, 4, 4))  # materialise the lazy layer
    model = model.double().eval()
    x = torch.tensor([0.0, 1.0, -1.0, 2.0], dtype=torch.float64).repeat(2, 2, 4, 1)  # repeated values: ties
    x[1] = x[1].flip(-1)
    kernel = torchntk.ntk(model, x, implementation="structured_derivatives")
    want = oracle_ntk(model, (x,), None)
    np.testing.assert_allclose(kernel.numpy(), want.numpy(), atol=1e-10 * float(want.abs().max()), rtol=0)


def _depthwise_relu6() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    return model.eval(), torch.randn(2, 3, 16, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_conversion_with_other_derivatives_is_refused(monkeypatch, tmp_path, dtype):
    """The class, not the case: a Clip handler that takes torch.clamp's old convention (derivative 1 at the bounds)
    gives equal outputs but other derivatives; the check against torch compares a VJP too and refuses it, and auto
    falls back to a torch-native method with the right kernel."""
    from torchntk.converters import ConversionError, clear_memory_cache, to_jax
    from torchntk.converters.onnx_jax import _core

    def inclusive_clip(node, x, low=None, high=None):
        x = _core.where(x < low, _core.astype(np.asarray(low), x.dtype), x)
        return _core.where(x > high, _core.astype(np.asarray(high), x.dtype), x)

    monkeypatch.setitem(_core.HANDLERS, "Clip", inclusive_clip)
    monkeypatch.setenv("TORCHNTK_CACHE_DIR", str(tmp_path))
    clear_memory_cache()
    model, x = _depthwise_relu6()
    model, x = model.to(dtype), (x - 1.0).to(dtype)  # more ReLU6 zeros: float32's check sees gross mismatches only
    with pytest.raises(ConversionError, match="derivative disagrees with torch"):
        to_jax(model, x, route="onnx-jax")
    assert not list(tmp_path.glob("*.onnxentry"))  # a refused graph is not stored for the next process ...
    clear_memory_cache()
    with pytest.raises(ConversionError, match="derivative disagrees with torch"):
        to_jax(model, x, route="onnx-jax")  # ... which checks its derivative again and refuses it again
    kernel = torchntk.ntk(model, x)  # auto: the conversion is refused, a torch-native method answers
    want = torchntk.ntk(model, x, implementation="jacobian_contraction")
    torch.testing.assert_close(kernel, want)
    clear_memory_cache()


def _normalize_at_zero() -> tuple[nn.Module, torch.Tensor]:
    """swin_v2's pattern: F.normalize of a vector that is exactly 0 (keys of zero-padded tokens, no key bias)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6, bias=False), Lambda(lambda h: F.normalize(h, dim=-1)), nn.Linear(6, 2))
    x = torch.randn(3, 4)
    x[1] = 0.0
    return model.double().eval(), x.double()


def test_norm_at_zero_has_torchs_zero_derivative():
    model, x = _normalize_at_zero()
    kernel = torchntk.ntk(model, x, implementation="structured_derivatives")
    want = oracle_ntk(model, (x,), None)
    assert bool(torch.isfinite(want).all())
    np.testing.assert_allclose(kernel.numpy(), want.numpy(), atol=1e-10 * float(want.abs().max()), rtol=0)


def test_a_kernel_with_nan_from_a_backward_pass_is_refused(monkeypatch, tmp_path):
    """The class, not the case: a ReduceL2 whose backward multiplies 0 by ∞ at a zero vector has finite outputs and a
    finite forward-mode derivative (the check passes), but a NaN kernel: refused, and auto falls back."""
    from torchntk.bridge import torch_glue
    from torchntk.bridge.nonfinite import NonFiniteKernelError
    from torchntk.converters import clear_memory_cache
    from torchntk.converters.onnx_jax import ops_reduce

    naive = dict(ops_reduce._REDUCTIONS, ReduceL2=lambda m, x, **kw: m.sqrt(m.sum(x * x, **kw)))
    monkeypatch.setattr(ops_reduce, "_REDUCTIONS", naive)
    monkeypatch.setattr(torch_glue, "_COMPILED", {})  # not the programs compiled from the right ReduceL2 above
    monkeypatch.setenv("TORCHNTK_CACHE_DIR", str(tmp_path))
    clear_memory_cache()
    model, x = _normalize_at_zero()
    with pytest.raises(NonFiniteKernelError, match="NaN kernel entries"):
        torchntk.ntk(model, x, implementation="structured_derivatives")
    # auto, had it picked structured derivatives (too small a model to pick them by time): the next method answers
    problem = prepare(model, x, None, params=None, trace_axes=(), diagonal_axes=())
    picked = Explanation(choice="structured_derivatives", estimates=(), reason="forced by the test")
    with pytest.warns(RuntimeWarning, match="structured_derivatives failed .*NonFiniteKernelError.*falls back"):
        kernel = _run_with_fallback(problem, TileOptions(), picked)
    torch.testing.assert_close(kernel, oracle_ntk(model, (x,), None))
    clear_memory_cache()


def test_disk_entry_records_the_routes_whose_derivative_was_checked(monkeypatch, tmp_path):
    """A graph loaded from the disk cache skips the derivative check only on a route that passed it when stored."""
    from torchntk.converters import cache, clear_memory_cache, to_jax

    monkeypatch.setenv("TORCHNTK_CACHE_DIR", str(tmp_path))
    clear_memory_cache()
    model, x = _depthwise_relu6()
    first = to_jax(model, x, route="onnx-jax")
    entry = cache.read_entry(first.key)
    assert entry is not None and entry.derivative_checked == ("onnx-jax",)
    clear_memory_cache()
    again = to_jax(model, x, route="onnx-jax")
    assert "disk_cache" in again.timings and "export" not in again.timings
    clear_memory_cache()


class AllActivations(nn.Module):
    """Every activation of ACTIVATIONS on the same pre-activations (exactly the inputs), each with its own head."""

    def __init__(self) -> None:
        super().__init__()
        self.first = _at_kinks(nn.Identity())[0]
        self.activations = nn.ModuleList(ACTIVATIONS.values())
        torch.manual_seed(0)
        self.heads = nn.ModuleList(nn.Linear(len(KINKS), 2) for _ in ACTIVATIONS)

    def forward(self, x):
        h = self.first(x)
        return sum(head(act(h)) for act, head in zip(self.activations, self.heads, strict=True))


def test_onnx_tf_route_all_kinks_in_one_model():
    """The default run's onnx-tf check of every convention at once (one conversion); the slow test below runs each
    activation and pooling on its own."""
    model, x = AllActivations().float().eval(), torch.stack([KINKS + 0.25, KINKS]).float()
    kernel = _route_ntk(model, (x,), (x,), "onnx-tf")
    want = oracle_ntk(model.double(), (x.double(),), None).numpy()
    np.testing.assert_allclose(kernel, want, atol=1e-5 * float(np.abs(want).max()), rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", [*ACTIVATIONS, *POOLS])
def test_onnx_tf_route_at_kinks_equals_oracle(name):
    """onnx2tf + tf2jax's derivatives at kinks are JAX's of TensorFlow's ops, not torch's; the route rewrites kink
    ops into Where forms with torch's conventions (converters/kink_rewrites.py). The first example — the one the
    conversion check sees — has no ties, so only the rewrite can make the kernel of the second one right."""
    if name in POOLS:
        torch.manual_seed(2)
        model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU(), POOLS[name], nn.Flatten(), nn.LazyLinear(2))
        model(torch.zeros(1, 2, 4, 4))
        x = torch.tensor([0.0, 1.0, -1.0, 2.0]).repeat(2, 2, 4, 1)
        x[0] = torch.randn(2, 4, 4)
    else:
        model, x = _at_kinks(ACTIVATIONS[name]), torch.stack([KINKS + 0.25, KINKS])
    model, x = model.float().eval(), x.float()
    kernel = _route_ntk(model, (x,), (x,), "onnx-tf")
    want = oracle_ntk(model.double(), (x.double(),), None).numpy()
    np.testing.assert_allclose(kernel, want, atol=1e-5 * float(np.abs(want).max()), rtol=0)
