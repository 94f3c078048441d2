"""A conversion's outputs are compared with torch's on every example of a call, not only on the first (the
conversion's own check): a route that errs where only later examples reach is refused, and a conversion from the disk
cache whose model changed in a way its key cannot see (as between two processes) is converted afresh."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from _oracle import oracle_ntk
from torch import nn

import torchntk
from torchntk.converters import ConversionError, clear_memory_cache
from torchntk.converters.onnx_jax import _core


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.last = nn.Linear(3, 4), nn.Linear(4, 2)
        with torch.no_grad():
            self.first.weight.copy_(torch.eye(4, 3))
            self.first.bias.zero_()

    def forward(self, x):
        return self.last(torch.tanh(self.first(x)))


def _inputs() -> torch.Tensor:
    """Example 0 small, example 2 large (pre-activations of 3)."""
    return torch.tensor([[0.1, -0.2, 0.3], [0.2, 0.1, -0.4], [3.0, 3.0, -3.0]], dtype=torch.float64)


def test_a_route_wrong_beyond_the_first_example_is_refused(monkeypatch, private_cache):
    import jax.numpy as jnp

    right = _core.HANDLERS["Tanh"]

    def wrong_above_two(node, x):  # what a mistranslated op looks like: right on example 0 only
        return jnp.where(x > 2, 0.5 * x, right(node, x))

    monkeypatch.setitem(_core.HANDLERS, "Tanh", wrong_above_two)
    model, x = Wide().double().eval(), _inputs()
    with pytest.raises(ConversionError, match="disagree with torch's on some examples"):
        torchntk.ntk(model, x, implementation="structured_derivatives")
    # auto computes the kernel torch-native instead
    got = torchntk.ntk(model, x, implementation="auto")
    torch.testing.assert_close(got, oracle_ntk(model, (x,), None), rtol=1e-10, atol=1e-12)
    # and on the first example alone the conversion passes (what its own check sees)
    torchntk.ntk(model, x[:2], implementation="structured_derivatives")


class ReadsAHiddenThreshold(nn.Module):
    """A threshold read through ``importlib`` at run time: no static reading of the code sees it."""

    def __init__(self, module_name: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.module_name = module_name
        self.first, self.last = nn.Linear(3, 4), nn.Linear(4, 2)
        with torch.no_grad():
            self.first.weight.copy_(torch.eye(4, 3))
            self.first.bias.zero_()

    def forward(self, x):
        h = self.first(x)
        threshold = importlib.import_module(self.module_name).THRESHOLD
        return self.last(torch.where(h > threshold, h, 0.5 * h))


def test_a_disk_cached_conversion_of_a_changed_model_is_converted_afresh(tmp_path, monkeypatch, private_cache):
    name = "torchntk_test_hidden_threshold"
    (tmp_path / f"{name}.py").write_text("THRESHOLD = 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    model, x = ReadsAHiddenThreshold(name).double().eval(), _inputs()
    x[2] = 1.5  # between the two thresholds: only example 2 sees the change
    first = torchntk.ntk(model, x, implementation="structured_derivatives")
    torch.testing.assert_close(first, oracle_ntk(model, (x,), None), rtol=1e-10, atol=1e-12)

    clear_memory_cache()  # what a second process has: the disk cache only
    monkeypatch.setattr(importlib.import_module(name), "THRESHOLD", 2.0)
    want = oracle_ntk(model, (x,), None)
    assert not torch.allclose(want, first)  # the change matters
    for method in ("structured_derivatives", "auto"):
        got = torchntk.ntk(model, x, implementation=method)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=method)


class XlogyAtZero(nn.Module):
    """``xlogy(h[:3], h[3:]² + 1)`` behind an identity Linear (θ): torch's backward gives x's derivative at x = 0 by
    its own formula; the exported ``Where(x == 0, x, x·log y)`` took 1 there (0.69 off)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.last = nn.Linear(6, 6), nn.Linear(3, 2)
        with torch.no_grad():
            self.first.weight.copy_(torch.eye(6))
            self.first.bias.zero_()

    def forward(self, x):
        h = self.first(x)
        return self.last(torch.xlogy(h[:, :3], h[:, 3:] * h[:, 3:] + 1))


class PaddedEmbedding(nn.Module):
    """``nn.Embedding(padding_idx=0)``: torch gives the padding row no gradient; the exported Gather gives it one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.lin = nn.Embedding(5, 3, padding_idx=0), nn.Linear(9, 2)

    def forward(self, x):
        return self.lin(torch.tanh(self.emb(x.long())).reshape(x.shape[0], -1))


class GradientGate(nn.Module):
    """A tensor hook registered in forward that masks the gradient where |h| ≥ 2.5 (torch's backward follows it)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.last = nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.first(x)
        if h.requires_grad:
            mask = (h.abs() < 2.5).to(h.dtype)
            h.register_hook(lambda g: g * mask)
        return self.last(h)


LATER_DERIVATIVES = {
    # model, inputs: example 0 away from the special point, later ones on it
    "xlogy at 0": (XlogyAtZero, [[0.5, 0.4, 0.3, -1.2, 0.7, 2.0], [0.0, 0.0, 0.0, 1.0, 2.0, 3.0], [0.0] * 6]),
    "gradient hook in forward": (
        GradientGate,
        [[0.1, -0.2, 0.3, 0.2, -0.1, 0.05], [5.0, -5.0, 4.0, 3.0, 0.1, 0.2], [0.0, 6.0, 1.0, -6.0, 2.0, 0.0]],
    ),
}


@pytest.mark.parametrize("name", list(LATER_DERIVATIVES))
def test_a_derivative_only_later_examples_reach_is_refused(name, private_cache):
    build, rows = LATER_DERIVATIVES[name]
    model, x = build().double().eval(), torch.tensor(rows, dtype=torch.float64)
    want = oracle_ntk(model, (x,), None)
    with pytest.raises(ConversionError, match="derivatives .* disagree with torch's on some examples"):
        torchntk.ntk(model, x, implementation="structured_derivatives")
    torch.testing.assert_close(torchntk.ntk(model, x, implementation="auto"), want, rtol=1e-10, atol=1e-12)
    # on example 0 alone the conversion agrees with torch
    torch.testing.assert_close(
        torchntk.ntk(model, x[:1], implementation="structured_derivatives"),
        oracle_ntk(model, (x[:1],), None),
        rtol=1e-10,
        atol=1e-12,
    )


def test_a_padding_index_is_refused_by_name_before_converting(private_cache):
    """The padding row's derivative differs only where a later example holds the padding id; the lookup's
    ``padding_idx`` is now refused in the export, on example 0 alone too (``_backward_conventions``)."""
    model = PaddedEmbedding().double().eval()
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, 2.0, 4.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    for batch in (x, x[:1]):
        with pytest.raises(ConversionError, match="padding_idx=0"):
            torchntk.ntk(model, batch, implementation="structured_derivatives")
    torch.testing.assert_close(torchntk.ntk(model, x, implementation="auto"), oracle_ntk(model, (x,), None))


@pytest.mark.parametrize("name", ["xlogy at 0", "gradient hook in forward"])
def test_the_batched_check_program_refuses_the_same(name, monkeypatch, private_cache):
    """From two examples on, the converted side runs batches of the check's program vmapped (the last one padded)."""
    from torchntk.converters import check

    monkeypatch.setattr(check, "CHECK_BATCHES", (2,))
    build, rows = LATER_DERIVATIVES[name]
    model, x = build().double().eval(), torch.tensor(rows, dtype=torch.float64)  # 3 examples: batches of 2, padded
    with pytest.raises(ConversionError, match="derivatives .* disagree with torch's on some examples"):
        torchntk.ntk(model, x, implementation="structured_derivatives")
    torch.testing.assert_close(
        torchntk.ntk(model, x[:1].expand(3, -1), implementation="structured_derivatives"),
        oracle_ntk(model, (x[:1].expand(3, -1),), None),
        rtol=1e-10,
        atol=1e-12,
    )


def test_an_argument_the_onnx_export_drops_is_refused_by_name(private_cache):
    """Found by hostile probing: avg_pool2d(divisor_override=5) was exported as a plain average, and refused late by
    the conversion's check with "Please report this"; auto computes it torch-native."""
    import torch.nn.functional as F

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)
            self.head = torch.nn.Linear(12, 2)

        def forward(self, x):
            return self.head(F.avg_pool2d(torch.tanh(self.conv(x)), 2, divisor_override=5).flatten(1))

    torch.manual_seed(0)
    model, x = Pooled().double(), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    with pytest.raises(ConversionError, match="avg_pool2d with divisor_override"):
        torchntk.ntk(model, x, implementation="structured_derivatives")
    torch.testing.assert_close(torchntk.ntk(model, x), oracle_ntk(model, (x,), None), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(LATER_DERIVATIVES))
def test_one_example_of_x2_at_the_special_point_is_refused(name, private_cache):
    """One example per side: the comparison runs the check's own program one example at a time (no batched one)."""
    from torchntk._problem import prepare
    from torchntk.bridge.reuse_check import comparison_batch

    build, rows = LATER_DERIVATIVES[name]
    model, x = build().double().eval(), torch.tensor(rows, dtype=torch.float64)
    x1, x2 = x[:1], x[2:3]
    assert comparison_batch(prepare(model, x1, x2, params=None, trace_axes=(), diagonal_axes=())) == 1
    with pytest.raises(ConversionError, match="derivatives .* disagree with torch's on some examples"):
        torchntk.ntk(model, x1, x2, implementation="structured_derivatives")
