"""prepare's coupling probe and float32 rounding (``_probe._rounding_refusal``): where a float32 model's examples
forwarded together and one by one disagree beyond the tolerance, a float64 copy of the model tells rounding (a
difference of two nearly equal sums of 4096 terms: refused as "coupled" before) from coupling (batch statistics, in
float32 only or in both), and the kernel of an accepted model is the float64 oracle's to float32 accuracy."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchntk
from torchntk._probe import ROUNDING_WIDEST, _disagreement
from torchntk._problem import prepare


class Cancelling(nn.Module):
    """Two nearly equal sums of 4096 terms subtracted: float32 keeps few digits of the difference (``spread``: how
    far the two weight vectors are apart, relative)."""

    def __init__(self, spread: float = 1e-4) -> None:
        super().__init__()
        torch.manual_seed(0)
        w = torch.randn(1, 4096)
        self.first = nn.Parameter(w * 10)
        self.second = nn.Parameter(w * 10 * (1 + spread * torch.randn(1, 4096)))

    def forward(self, x):
        return x @ self.first.T - x @ self.second.T


class CoupledInFloat32(Cancelling):
    """Batch statistics only where the input is float32 (code that reads the dtype): float64 shows no coupling."""

    def forward(self, x):
        out = super().forward(x)
        return out - out.mean(0) if x.dtype == torch.float32 else out


class Coupled(Cancelling):
    def forward(self, x):
        out = super().forward(x)
        return out - 0.1 * out.mean(0)


class NoCopies(Cancelling):
    def __deepcopy__(self, memo):
        raise RuntimeError("this model cannot be copied")


def _x(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 4096, generator=torch.Generator().manual_seed(1))


def _prepare(model: nn.Module):
    return prepare(model, _x(), None, params=None, trace_axes=(), diagonal_axes=())


def _disagreement_in_float32(model: nn.Module) -> float:
    x = _x()[:4]
    with torch.no_grad():
        together, alone = model(x), torch.cat([model(x[i : i + 1]) for i in range(4)])
    return _disagreement(together, alone)


def test_float32_rounding_is_not_taken_for_coupling():
    model = Cancelling()
    # float32 alone refused it (the probe's float32 tolerance: 1e-3)
    assert 1e-3 < _disagreement_in_float32(model) < ROUNDING_WIDEST
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    _prepare(model)
    for name, p in model.named_parameters():  # the referee's float64 copy left the model as it was
        assert p.dtype == torch.float32 and torch.equal(p, before[name])


@pytest.mark.parametrize("implementation", ["jacobian_contraction", "ntk_vector_products"])
def test_the_accepted_models_kernel_is_the_float64_oracles(implementation):
    model, x = Cancelling(), _x()
    got = torchntk.ntk(model, x, implementation=implementation).double()
    exact = copy.deepcopy(model).double()
    jac = torch.func.vmap(
        torch.func.jacrev(lambda p, e: torch.func.functional_call(exact, p, (e[None],))[0]), (None, 0)
    )(dict(exact.named_parameters()), x.double())
    flat = torch.cat([j.flatten(2) for j in jac.values()], 2)  # [N, O, P]
    want = torch.einsum("aip,bjp->abij", flat, flat)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_coupled_models_are_still_refused():
    with pytest.raises(ValueError, match="examples are coupled"):
        _prepare(Coupled())
    with pytest.raises(ValueError, match="otherwise in float32"):  # float64 shows none: the float32 gap is order one
        _prepare(CoupledInFloat32())


def test_a_coupled_float64_model_is_refused():
    with pytest.raises(ValueError, match="examples are coupled"):
        prepare(Coupled().double(), _x().double(), None, params=None, trace_axes=(), diagonal_axes=())


def test_rounding_beyond_the_widest_allowance_is_refused_with_its_cause():
    model = Cancelling(spread=1e-5)
    assert _disagreement_in_float32(model) > ROUNDING_WIDEST
    with pytest.raises(ValueError, match=r"shows no coupling.*rounding.*model\.double\(\)"):
        _prepare(model)


def test_a_model_without_a_float64_copy_keeps_the_float32_verdict():
    with pytest.raises(ValueError, match="examples are coupled"):
        _prepare(NoCopies())
    _prepare(NoCopies(spread=1e-1))  # the referee runs only where the float32 forwards disagree


def test_the_disagreement_measure_at_its_edges():
    zeros = torch.zeros(2, 3)
    assert _disagreement(zeros + 1e-40, zeros) == 0.0  # within the smallest normal number, every output 0
    assert _disagreement(zeros + 1.0, zeros) > 1e30
    nan = torch.tensor([[float("nan"), 1.0]])
    assert _disagreement(nan, nan.clone()) == 0.0
    assert _disagreement(nan, torch.tensor([[0.5, 1.0]])) == float("inf")
    assert _disagreement(torch.tensor([[1.0, 101.0]]), torch.tensor([[1.0, 100.0]])) == pytest.approx(1 / 200)


def test_the_referee_computes_with_the_values_in_params():
    """params= may give θ other values than the model's own: the float64 referee must run those (with the model's
    own, far from cancelling, it judged a 7e-2 float32 gap against outputs 1e4 times larger and accepted it)."""
    cancelling = Cancelling(spread=1e-5)
    model = Cancelling(spread=1e-5)
    with torch.no_grad():
        model.second.mul_(-1.0)  # its own weights add the two sums: nothing cancels
    values = {name: p.detach().clone() for name, p in cancelling.named_parameters()}
    with pytest.raises(ValueError, match="shows no coupling"):
        prepare(model, _x(), None, params=values, trace_axes=(), diagonal_axes=())
    prepare(model, _x(), None, params=None, trace_axes=(), diagonal_axes=())  # its own values agree in float32
