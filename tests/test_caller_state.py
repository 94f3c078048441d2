"""The caller's process-wide torch state and what torchntk caches under it (found by hostile probing).

- ``torch.inference_mode()`` around the call, or inputs made under it: computed; weights made under it: refused.
- A ``torch.func`` transform around the call: refused by name (torch's own messages were about data pointers).
- A default device other than the model's (``torch.set_default_device("meta")``): computed on the model's.
- A forward reading ``torch.is_grad_enabled()``: every method and every check take grad mode's function (a
  disk-cached graph was checked against the no-grad branch and refused, in every later process).
- A disk-cached graph that torch disagrees with is dropped and exported afresh, not refused for good; a conversion
  made under a caller's torch function mode is never cached.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _oracle import oracle_ntk
from torch import nn
from torch.overrides import TorchFunctionMode

import torchntk
from torchntk.converters import cache, clear_memory_cache
from torchntk.converters.api import to_jax

METHODS = ("jacobian_contraction", "ntk_vector_products", "structured_derivatives")


def mlp(act=torch.tanh) -> nn.Module:
    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.l2(act(self.l1(x)))

    torch.manual_seed(0)
    return MLP().double().eval()


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("method", METHODS)
def test_inside_inference_mode_and_inputs_made_there(method, private_cache):
    model, x = mlp(), torch.randn(3, 4, dtype=torch.float64)
    want = oracle_ntk(model, (x,), None)
    with torch.inference_mode():
        inside = torchntk.ntk(model, x, implementation=method)
        made_there = x.clone()
    assert relative(inside, want) < 1e-12
    assert made_there.is_inference()
    assert relative(torchntk.ntk(model, made_there, implementation=method), want) < 1e-12
    v = torch.randn(3, 3, dtype=torch.float64)
    with torch.inference_mode():
        product = torchntk.ntk_vp(model, x, None, v)
    assert relative(product, torch.einsum("ijab,jb->ia", want, v)) < 1e-12


def test_weights_made_under_inference_mode_are_refused_with_the_fix():
    with torch.inference_mode():
        model = mlp()
    with pytest.raises(ValueError, match=r"made under torch.inference_mode\(\).*copy.deepcopy"):
        torchntk.ntk(model, torch.randn(2, 4, dtype=torch.float64))
    copied = copy.deepcopy(model)
    x = torch.randn(2, 4, dtype=torch.float64)
    assert relative(torchntk.ntk(copied, x), oracle_ntk(copied, (x,), None)) < 1e-12


@pytest.mark.parametrize("transform", ["vmap", "grad", "jacrev"])
def test_inside_a_torch_func_transform_is_refused_by_name(transform):
    model = mlp()

    def f(x: torch.Tensor) -> torch.Tensor:
        return torchntk.ntk(model, x.reshape(1, 4), implementation="jacobian_contraction").sum()

    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="inside a torch.func transform"):
        getattr(torch.func, transform)(f)(x if transform == "vmap" else x[0])


@pytest.mark.parametrize("method", METHODS)
def test_a_default_device_other_than_the_models(method, private_cache):
    model, x = mlp(), torch.randn(3, 4, dtype=torch.float64)
    want = oracle_ntk(model, (x,), None)
    before = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        got = torchntk.ntk(model, x, implementation=method)
    finally:
        torch.set_default_device(before)
    assert got.device.type == "cpu" and relative(got, want) < 1e-12


class GradFlag(nn.Module):
    """Reads torch.is_grad_enabled(), as torch's fused no-grad attention paths do: J is of grad mode's branch."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.l2(torch.tanh(self.l1(x)))
        return 2 * y if torch.is_grad_enabled() else y


@pytest.mark.parametrize("caller", ["grad", "no_grad"])
def test_a_forward_reading_grad_mode_from_the_disk_cache(caller, private_cache):
    torch.manual_seed(0)
    model, x = GradFlag().double().eval(), torch.randn(3, 4, dtype=torch.float64)
    want = oracle_ntk(model, (x,), None)
    with torch.no_grad() if caller == "no_grad" else torch.enable_grad():
        for _ in range(2):  # the second from the disk cache, its graph checked against torch's value again
            got = torchntk.ntk(model, x, implementation="structured_derivatives")
            assert relative(got, want) < 1e-12
            clear_memory_cache()
        for method in METHODS[:2]:
            assert relative(torchntk.ntk(model, x, implementation=method), want) < 1e-12


def _plant_foreign_graph(model: nn.Module, other: nn.Module, x: torch.Tensor) -> None:
    """The disk entry of ``model``'s key made to hold ``other``'s graph (valid, checked: a stale entry)."""
    names = [n for n, _ in model.named_parameters()]
    to_jax(other, x[:1])
    other_key = cache.conversion_key(other, (x[:1],), names, "auto").digest
    entry = cache.read_entry(other_key)
    assert entry is not None
    cache.write_entry(cache.conversion_key(model, (x[:1],), names, "auto").digest, *entry)
    clear_memory_cache()


@pytest.mark.parametrize("path", ["ntk", "to_jax"])
def test_a_disk_entry_torch_disagrees_with_is_exported_afresh(path, private_cache):
    model, other = mlp(torch.sin), mlp(torch.tanh)
    x = torch.randn(3, 4, dtype=torch.float64)
    _plant_foreign_graph(model, other, x)
    key = cache.conversion_key(model, (x[:1],), [n for n, _ in model.named_parameters()], "auto").digest
    stale = cache.read_entry(key)
    if path == "ntk":  # its check beside the first tile's compile (deferred)
        got = torchntk.ntk(model, x, implementation="structured_derivatives")
        assert relative(got, oracle_ntk(model, (x,), None)) < 1e-12
    else:  # its check in line
        converted = to_jax(model, x[:1])
        assert "export" in converted.timings
    fresh = cache.read_entry(key)
    assert fresh is not None and fresh.onnx_bytes != stale.onnx_bytes  # replaced by the model's own graph


class Doubled(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        return 2 * out if func is torch.tanh else out


def test_a_conversion_under_a_callers_mode_is_not_cached(private_cache):
    model, x = mlp(), torch.randn(3, 4, dtype=torch.float64)
    with Doubled():
        under_mode = torchntk.ntk(model, x, implementation="structured_derivatives")
    with Doubled():
        want_mode = oracle_ntk(model, (x,), None)
    assert relative(under_mode, want_mode) < 1e-12
    assert not list(cache.cache_dir().glob("*")) or all(
        cache.read_entry(k) is None
        for k in [cache.conversion_key(model, (x[:1],), [n for n, _ in model.named_parameters()], "auto").digest]
    )
    plain = torchntk.ntk(model, x, implementation="structured_derivatives")
    assert relative(plain, oracle_ntk(model, (x,), None)) < 1e-12


class SavedInputTanh(torch.autograd.Function):
    """A correct torch.func-style Function that saves its input for forward mode: torch.func cannot vmap its VJP
    ("flat_bdims must not be None")."""

    generate_vmap_rule = True

    @staticmethod
    def forward(h):
        return torch.tanh(h)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(inputs[0], output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)

    @staticmethod
    def jvp(ctx, dh):
        _, y = ctx.saved_tensors
        return dh * (1 - y * y)


def test_ntk_vp_where_torch_func_cannot_batch_the_vjp():
    """Found in a second probing round: ntk_vp, Lanczos eigvalsh and CG kernel_regression refused this model,
    saying it had no jvp; Θ·v's VJP now falls back to torch's plain backward, vector by vector."""
    model = mlp(SavedInputTanh.apply)
    x1, x2 = torch.randn(4, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    v = torch.randn(2, 3, 3, dtype=torch.float64)
    want = torch.einsum("ijab,kjb->kia", oracle_ntk(model, (x1,), (x2,)), v)
    assert relative(torchntk.ntk_vp(model, x1, x2, v), want) < 1e-12


def test_inside_a_dual_level_and_under_saved_tensor_hooks():
    """A caller's forward-AD dual level made NTK-vector products fail with torch's "Nested forward mode AD is not
    supported": now refused by name, and auto and Jacobian contraction compute under it. A caller's save_on_cpu was
    blamed on the model: Jacobian contraction takes it by torch's backward now."""
    model, x = mlp(), torch.randn(3, 4, dtype=torch.float64)
    want = oracle_ntk(model, (x,), None)
    with torch.autograd.forward_ad.dual_level():
        with pytest.raises(torchntk.UnsupportedModelError, match="dual_level"):
            torchntk.ntk(model, x, implementation="ntk_vector_products")
        assert relative(torchntk.ntk(model, x, implementation="jacobian_contraction"), want) < 1e-12
        assert relative(torchntk.ntk(model, x), want) < 1e-12
    with torch.autograd.graph.save_on_cpu():  # refused, blamed on the model, then: torch's backward takes it
        assert relative(torchntk.ntk(model, x, implementation="jacobian_contraction"), want) < 1e-12
