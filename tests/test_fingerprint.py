"""The architecture fingerprint (torchntk._fingerprint) and the conversion cache that relies on it.

Every case is a pair of models that compute different functions with the same parameters and buffers: the
fingerprint must tell them apart, and a converted function of one must never serve the other.
"""

from __future__ import annotations

import array
import functools
import types

import jax
import numpy as np
import pytest
import torch
from torch import nn

from torchntk._fingerprint import architecture
from torchntk.converters import NonFiniteCheckError, to_jax
from torchntk.converters import cache as conv_cache

SCALE = 2.0  # a module-level constant read by ScaledByGlobal.forward


class WithActivation(nn.Module):
    def __init__(self, act=torch.relu) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)
        self.act = act

    def forward(self, x):
        return self.act(self.lin(x))


class ScaledByGlobal(WithActivation):
    def forward(self, x):
        return self.lin(x) * SCALE


class WithTensorAttribute(WithActivation):
    def __init__(self, shift: torch.Tensor) -> None:
        super().__init__()
        self.shift = shift  # a plain attribute, not a buffer

    def forward(self, x):
        return self.lin(x) + self.shift


class Opaque:
    """An object the fingerprint cannot see into: its value lives in a builtin container's storage."""

    def __init__(self, scale: float) -> None:
        self.cell = array.array("d", [scale])

    @property
    def scale(self) -> float:
        return self.cell[0]


class WithOpaque(WithActivation):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.config = Opaque(scale)

    def forward(self, x):
        return self.lin(x) * self.config.scale


def _scaled(k):
    return lambda t: torch.tanh(k * t)


def _digest(model: nn.Module) -> str:
    return architecture(model).digest


def test_equal_models_equal_fingerprints():
    assert _digest(WithActivation()) == _digest(WithActivation())
    assert architecture(WithActivation()).certain
    seq = [nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()) for _ in range(2)]
    assert _digest(seq[0]) == _digest(seq[1])
    with torch.no_grad():  # values are not part of the architecture
        seq[1][0].weight.add_(1.0)
        seq[1][1].running_mean.add_(1.0)
    assert _digest(seq[0]) == _digest(seq[1])


@pytest.mark.parametrize(
    "make_other",
    [
        lambda: WithActivation(torch.tanh),  # function-valued attribute: a builtin
        lambda: WithActivation(nn.functional.gelu),  # a Python function
        lambda: WithActivation(functools.partial(nn.functional.leaky_relu, negative_slope=0.3)),
        lambda: WithActivation(lambda t: torch.tanh(t)),  # a lambda: by its code
        lambda: WithActivation(_scaled(2.0)),  # a closure: by its cell values
        lambda: ScaledByGlobal(),  # another forward
    ],
)
def test_function_attributes_and_forward_code(make_other):
    base = _digest(WithActivation(torch.relu))
    assert _digest(make_other()) != base
    assert _digest(WithActivation(_scaled(2.0))) != _digest(WithActivation(_scaled(3.0)))


def test_module_constant_tensor_attribute_hook_and_patched_method(monkeypatch):
    before = _digest(ScaledByGlobal())
    monkeypatch.setattr(__import__(__name__), "SCALE", 3.0)
    assert _digest(ScaledByGlobal()) != before

    assert _digest(WithTensorAttribute(torch.ones(3))) != _digest(WithTensorAttribute(torch.zeros(3)))

    model = WithActivation()
    plain = _digest(model)
    handle = model.lin.register_forward_hook(lambda module, args, out: out * 2)
    assert _digest(model) != plain
    handle.remove()
    assert _digest(model) == plain

    model.forward = types.MethodType(lambda self, x: self.lin(x) * 5, model)  # an instance's own forward
    assert _digest(model) != plain

    monkeypatch.setattr(WithActivation, "forward", lambda self, x: -self.act(self.lin(x)))
    assert _digest(WithActivation()) != plain


def test_opaque_attribute_is_uncertain():
    fingerprint = architecture(WithOpaque(2.0))
    assert not fingerprint.certain and "config" in fingerprint.uncertain[0]


def _agrees(model: nn.Module, x: torch.Tensor) -> bool:
    jm = to_jax(model, (x,), route="onnx-jax")
    got = np.asarray(jm.fn(jm.params, jax.numpy.asarray(x[0].numpy())))
    return np.allclose(got, model(x[:1])[0].detach().numpy(), rtol=1e-5, atol=1e-6)


def test_conversion_cache_never_serves_another_model(private_cache):
    x = torch.randn(2, 4)
    assert _agrees(WithActivation(torch.relu).eval(), x)
    # Same weights, another activation: another key (before, the cached relu function came back).
    assert _agrees(WithActivation(torch.tanh).eval(), x)
    key = conv_cache.fingerprint
    names = ["lin.weight", "lin.bias"]
    assert key(WithActivation(torch.relu), (x,), names, "onnx-jax") != key(
        WithActivation(torch.tanh), (x,), names, "onnx-jax"
    )
    # An attribute the fingerprint cannot see: same key, so the cached function is checked against torch first.
    first, second = WithOpaque(2.0).eval(), WithOpaque(-3.0).eval()
    assert key(first, (x,), names, "onnx-jax") == key(second, (x,), names, "onnx-jax")
    assert _agrees(first, x)
    assert _agrees(second, x)  # re-checked, found stale, converted afresh
    assert _agrees(first, x)


def test_compiled_structured_programs_never_serve_another_model(private_cache):
    """One uncertain key, two functions: the second model was converted afresh, but its structured NTK came from the
    program compiled for the first (194% off); compiled programs are keyed by the converted function."""
    from _oracle import oracle_ntk

    import torchntk
    from torchntk._problem import prepare
    from torchntk.bridge.torch_glue import structured_derivatives

    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64)
    first, second = WithOpaque(2.0).double().eval(), WithOpaque(-3.0).double().eval()
    second.load_state_dict(first.state_dict())
    for model in (first, second, first):
        want = oracle_ntk(model, (x,), None)
        kernel = torchntk.ntk(model, x, implementation="structured_derivatives")
        torch.testing.assert_close(kernel, want, rtol=1e-10, atol=1e-12)
        # output blocks: the whole structured program, persisted to disk as a serialized program as well
        problem = prepare(model, x, None, params=None, trace_axes=(), diagonal_axes=())
        torch.testing.assert_close(structured_derivatives(problem, output_block=1), want, rtol=1e-10, atol=1e-12)


def test_nan_weights_or_example_named_whatever_is_cached(private_cache):
    x = torch.randn(2, 4)
    model = WithActivation(torch.tanh).eval()
    broken = WithActivation(torch.tanh).eval()
    with torch.no_grad():
        broken.lin.weight[0, 0] = float("nan")
    for _ in range(2):  # the same error before and after a conversion of this architecture is cached
        with pytest.raises(NonFiniteCheckError, match=r"NaN/Inf values in weight 'lin.weight'"):
            to_jax(broken, (x,), route="onnx-jax")
        with pytest.raises(NonFiniteCheckError, match=r"example 'inputs\[0\]\[0\]'"):
            to_jax(model, (torch.full((2, 4), float("inf")),), route="onnx-jax")
        assert _agrees(model, x)


def test_huge_finite_weights_are_not_called_non_finite(private_cache):
    """The check sums each tensor first (NaN/Inf propagate); a finite sum that overflows float32 is checked exactly."""
    from torchntk.converters.api import _check_finite

    model = WithActivation(torch.tanh).eval()
    with torch.no_grad():
        model.lin.weight.fill_(3e38)  # each entry finite, their float32 sum is inf
    _check_finite(model, dict(model.named_parameters()), (torch.randn(2, 4),))
    with torch.no_grad():
        model.lin.weight[1, 1] = float("-inf")
    with pytest.raises(NonFiniteCheckError, match="lin.weight"):
        _check_finite(model, dict(model.named_parameters()), (torch.randn(2, 4),))


def test_fingerprint_does_not_depend_on_what_ran_before():
    """copy.deepcopy caches __slotnames__ on the class: not a change of the model."""
    import copy

    class Fresh(WithActivation):
        pass

    model = Fresh()
    before = _digest(model)
    copy.deepcopy(model)
    assert _digest(model) == before


def test_training_flags_count_for_stores_not_for_conversions():
    model = WithActivation()
    trained, evaluated = architecture(model.train()).digest, architecture(model.eval()).digest
    assert trained != evaluated  # forward may branch on self.training
    x, names = (torch.randn(2, 4),), ["lin.weight", "lin.bias"]
    assert conv_cache.fingerprint(model.train(), x, names, "auto") == conv_cache.fingerprint(
        model.eval(), x, names, "auto"
    )
