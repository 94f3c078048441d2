"""Layers where a method was silently off, crashed or refused wrongly (stop 29's catalogue of torch.nn layers), each
against the float64 explicit-Jacobian oracle."""

from __future__ import annotations

import pytest
import torch
from _oracle import oracle_ntk
from torch import nn

import torchntk


class OddConstants(nn.Module):
    """Constants the ONNX export stores in float32: a slope of 1/3 met only by the derivative where the later
    examples are exactly 0 (SD's float64 kernel was 4e-8 off, silently), an ELU's alpha, a norm's eps."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(3, 3)
        with torch.no_grad():
            self.first.weight.copy_(torch.eye(3))
            self.first.bias.zero_()
        self.body = nn.Sequential(
            nn.LeakyReLU(1 / 3), nn.Linear(3, 4), nn.ELU(alpha=1 / 3), nn.LayerNorm(4, eps=1 / 3), nn.Linear(4, 2)
        )

    def forward(self, x):
        return self.body(self.first(x))


def test_float32_attributes_of_a_float64_model_are_exact_in_structured_derivatives(private_cache):
    model = OddConstants().double().eval()
    x1 = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    x2 = torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.0, -0.2]], dtype=torch.float64)
    want = oracle_ntk(model, (x1,), (x2,))
    got = torchntk.ntk(model, x1, x2, implementation="structured_derivatives")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


class PReLUNet(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 3), nn.PReLU(channels), nn.Linear(3, 3))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("n", [2, 3])  # 3 = the weight's size: vmap's wrong values, without a shape error
@pytest.mark.parametrize("method", ["jacobian_contraction", "ntk_vector_products", "auto"])
def test_prelu_is_computed_by_the_torch_native_methods(method, n):
    """torch.func's batching of PReLU's backward raised a raw shape error (n != 3) or gave wrong Jacobians, which the
    check refused (n == 3): now one example at a time."""
    model, x = PReLUNet(3).double().eval(), torch.randn(n, 4, dtype=torch.float64)
    got = torchntk.ntk(model, x, implementation=method)
    torch.testing.assert_close(got, oracle_ntk(model, (x,), None), rtol=1e-10, atol=1e-12)


class Cells(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lstm, self.gru, self.head = nn.LSTMCell(3, 4), nn.GRUCell(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h, _ = self.lstm(x)
        return self.head(self.gru(h))


class SolveWithBuffer(nn.Module):
    """``linalg.solve`` with an unbatched right-hand side: vmap gave Jacobians of another shape, silently."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.head = nn.Linear(9, 9), nn.Linear(6, 2)
        self.register_buffer("b", torch.randn(3, 2))

    def forward(self, x):
        a = self.lin(x).reshape(-1, 3, 3) + 4 * torch.eye(3, dtype=x.dtype)
        return self.head(torch.linalg.solve(a, self.b).flatten(1))


class RReLUEval(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 4), nn.RReLU(), nn.Linear(4, 2))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize(("build", "features"), [(Cells, 3), (SolveWithBuffer, 9), (RReLUEval, 3)])
def test_ops_vmap_cannot_batch_run_one_example_at_a_time(build, features):
    """Raw torch errors before (RNN cells are not RNNBase; rrelu has no batching rule; solve's shapes)."""
    model = build().double().eval()
    x = torch.randn(3, features, dtype=torch.float64)
    x[1, 0] = 0.0
    want = oracle_ntk(model, (x,), None)
    for method in ("jacobian_contraction", "auto"):
        torch.testing.assert_close(torchntk.ntk(model, x, implementation=method), want, rtol=1e-10, atol=1e-12)


class FilledInPlace(nn.Module):
    """A new tensor written in place with batched values: vmap raised "is not possible because there exists a
    Tensor `other` ...", raw, from every torch-native method and auto."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 4)
        self.register_buffer("index", torch.tensor([[0, 2, 5, 7]]))

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return torch.zeros(x.shape[0], 8, dtype=x.dtype).scatter_(1, self.index.expand(x.shape[0], 4), h)


def test_a_new_tensor_filled_in_place_runs_one_example_at_a_time():
    model, x = FilledInPlace().double().eval(), torch.randn(3, 3, dtype=torch.float64)
    want = oracle_ntk(model, (x,), None)
    for method in ("jacobian_contraction", "auto"):
        torch.testing.assert_close(torchntk.ntk(model, x, implementation=method), want, rtol=1e-10, atol=1e-12)


class FoldedConstant(nn.Module):
    """``torch.full_like(h, 1/3)`` is folded by the ONNX export into a float64 initializer holding float32(1/3); on a
    branch the first example does not take, behind a large output offset, SD's float64 kernel was 5e-9 off."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.lin(x)
        return self.head(torch.where(h > 1, h * torch.full_like(h, 1 / 3), h)) + 1e4


def test_a_float64_constant_folded_in_float32_is_refused_by_structured_derivatives(private_cache):
    from torchntk.converters import ConversionError

    model, x = FoldedConstant().double().eval(), torch.randn(3, 3, dtype=torch.float64)
    with pytest.raises(ConversionError, match="the float32 rounding of another number"):
        torchntk.ntk(model, x, implementation="structured_derivatives")
    torch.testing.assert_close(torchntk.ntk(model, x), oracle_ntk(model, (x,), None), rtol=1e-10, atol=1e-9)
