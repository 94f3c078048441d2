"""What a forward may not change, and what torchntk puts back (``_module_state``, ``_probe``), and torch.func's
derivatives checked against torch's backward (``torch_native._autograd_check``).

Hostile probing found each of these returning a wrong kernel, or changing the caller's model or tensors, silently."""

from __future__ import annotations

import io

import pytest
import torch
from _oracle import oracle_ntk
from torch import nn

import torchntk
from torchntk.torch_native._errors import UnsupportedModelError

METHODS = ("jacobian_contraction", "ntk_vector_products", "structured_derivatives", "auto")


class WritesIntoLaterRows(nn.Module):
    """``x[x > 1] *= 2``: the probe's first examples are ≤ 1, so their values stay; the caller's x1 changed and
    tiles compounded (x8, x16) before."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x):
        x.mul_(torch.where(x > 1, 2.0, 1.0))
        return torch.tanh(self.lin(x))


@pytest.mark.parametrize("method", METHODS)
def test_a_write_into_the_input_is_refused_before_it_changes_the_callers_tensor(method, private_cache):
    model = WritesIntoLaterRows().double().eval()
    x = torch.tensor([[0.5, 0.2], [0.1, -0.3], [2.0, 3.0]], dtype=torch.float64)
    kept = x.clone()
    with pytest.raises(ValueError, match="writes into its input 0 in place"):
        torchntk.ntk(model, x, implementation=method, chunk_size=1 if method != "auto" else None)
    assert torch.equal(x, kept)


class ActNorm(nn.Module):
    """Glow's data-dependent initialisation through ``.data`` (no version counter moves) and a Python flag."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.bias = nn.Linear(3, 2), nn.Parameter(torch.zeros(2))
        self.initialized = False

    def forward(self, x):
        h = self.lin(x)
        if not self.initialized:
            self.bias.data.copy_(-h.mean(0))
            self.initialized = True
        return h + self.bias


@pytest.mark.parametrize("method", METHODS)
def test_a_data_dependent_initialisation_is_refused_and_the_model_left_as_it_was(method, private_cache):
    model = ActNorm().double().eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="writes into its own state|changes its own attributes"):
        torchntk.ntk(model, x, implementation=method)
    assert model.initialized is False
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    model(x)  # initialised by the user: then its NTK is that of a fixed function
    torch.testing.assert_close(
        torchntk.ntk(model, x, implementation=method), oracle_ntk(model, (x,), None), rtol=1e-10, atol=1e-12
    )


class LazyCache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self._w = nn.Linear(3, 3), None

    def forward(self, x):
        if self._w is None:
            self._w = self.lin.weight * 2
        return torch.tanh(x @ self._w.T)


class TiedView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(3, 3)
        self.dec_w = self.enc.weight[:]  # a view with a graph back to the parameter

    def forward(self, x):
        return torch.tanh(self.enc(x)) @ self.dec_w


@pytest.mark.parametrize("method", METHODS)
def test_tensors_derived_from_parameters_outside_forward_are_refused(method, private_cache):
    x = torch.randn(3, 3)  # float32: .double() does not reach the tensors these modules hold
    cold = LazyCache().eval()
    with pytest.raises(ValueError, match="changes its own attributes"):
        torchntk.ntk(cold, x, implementation=method)
    assert cold._w is None  # put back: the user's training would otherwise lose the weight's gradient
    warm = LazyCache().eval()
    warm(x)
    with pytest.raises(ValueError, match="computed from the parameters outside forward"):
        torchntk.ntk(warm, x, implementation=method)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="computed from the parameters outside forward"):
        torchntk.ntk(TiedView().eval(), x, implementation=method)


@pytest.mark.parametrize("method", ["jacobian_contraction", "structured_derivatives", "auto"])
def test_old_weight_norm_is_right_and_left_usable(method, private_cache):
    """(NTK-vector products refuse it: torch has no forward mode for the weight norm.)"""
    torch.manual_seed(0)
    with pytest.warns(FutureWarning):
        normed = nn.utils.weight_norm(nn.Linear(3, 4).double())
    model = nn.Sequential(normed, nn.Tanh(), nn.Linear(4, 2).double()).eval()
    # the oracle deep-copies its model, which the old weight norm forbids: the same function by the new one
    same = nn.utils.parametrizations.weight_norm(nn.Linear(3, 4).double())
    with torch.no_grad():
        same.parametrizations.weight.original0.copy_(normed.weight_g)
        same.parametrizations.weight.original1.copy_(normed.weight_v)
        same.bias.copy_(normed.bias)
    twin = nn.Sequential(same, nn.Tanh(), model[2]).eval()
    x = torch.randn(3, 3, dtype=torch.float64)
    torch.testing.assert_close(
        torchntk.ntk(model, x, implementation=method), oracle_ntk(twin, (x,), None), rtol=1e-10, atol=1e-12
    )
    weight = model[0].weight  # the hook's last assignment: put back, not torch.func's wrapped tensor
    torch.save(weight, io.BytesIO())
    weight.sum().backward()
    assert model[0].weight_v.grad is not None


class Centered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return torch.tanh(self.lin(x - x.mean(0)))


def test_coupling_is_found_past_equal_first_examples(private_cache):
    x = torch.randn(4, 3, dtype=torch.float64)
    x[1] = x[0]
    with pytest.raises(ValueError, match="examples are coupled"):
        torchntk.ntk(Centered().double().eval(), x)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2)).eval()
    with pytest.raises(ValueError, match="without running statistics"):
        torchntk.ntk(bn.double(), x)


class CoupledBesideALargeHead(nn.Module):
    """A regression head of scale 2000 beside a small output coupled through the batch mean."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        h = self.lin(x)
        return torch.stack([2000 * torch.tanh(h[:, 0]), torch.tanh(h[:, 1] - h[:, 1].mean())], dim=1)


def test_coupling_is_judged_per_output(private_cache):
    with pytest.raises(ValueError, match="examples are coupled"):
        torchntk.ntk(CoupledBesideALargeHead().eval(), torch.randn(4, 3))


class CDist(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.centers = nn.Linear(3, 6), nn.Parameter(torch.randn(2, 3))

    def forward(self, x):
        h = self.lin(x).reshape(x.shape[0], 2, 3)
        return torch.cdist(h, self.centers.expand(x.shape[0], 2, 3)).reshape(x.shape[0], -1)


def test_a_wrong_torch_func_derivative_is_refused(private_cache):
    """torch.func's jacrev of torch.cdist is wrong (torch's bug): Jacobian contraction and auto were 1.39 off."""
    model, x = CDist().double().eval(), torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(UnsupportedModelError, match="disagrees with torch.autograd's backward"):
        torchntk.ntk(model, x, implementation="jacobian_contraction")
    with pytest.raises(Exception):  # noqa: B017 - every method refuses (NVP: no forward mode; SD: no export)
        torchntk.ntk(model, x, implementation="auto")


class PReLUAtZero(nn.Module):
    """Forward mode takes PReLU's derivative at 0 as 1, its backward as the slope (the NTK's J is the backward's)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.act, self.last = nn.Linear(2, 2), nn.PReLU(init=0.3), nn.Linear(2, 2)
        with torch.no_grad():
            self.first.weight.copy_(torch.eye(2))
            self.first.bias.zero_()

    def forward(self, x):
        return self.last(self.act(self.first(x)))


def test_forward_mode_off_the_backward_is_refused_by_ntk_vector_products(private_cache):
    model = PReLUAtZero().double().eval()
    x = torch.tensor([[0.0, 0.0], [0.5, -0.7]], dtype=torch.float64)
    with pytest.raises(UnsupportedModelError, match="forward-mode derivative"):
        torchntk.ntk(model, x, implementation="ntk_vector_products")
    want = oracle_ntk(model, (x,), None)
    torch.testing.assert_close(torchntk.ntk(model, x, implementation="auto"), want, rtol=1e-10, atol=1e-12)
