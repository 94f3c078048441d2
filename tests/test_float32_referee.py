"""The per-call check's float32 referee (bridge.reuse_check._float32_error): outputs that disagree with torch's float32
ones beyond the tolerance are judged against torch's float64 forward, so that float32 rounding of a deep, wide
network (depth 10, width 2048: 2.1e-4 on an example with a small output) is not refused as a wrong conversion, while
a conversion that computes something else still is."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import torchntk
from torchntk._problem import prepare
from torchntk.bridge.reuse_check import FLOAT32_WIDEST, _float32_error, _relative_per_example
from torchntk.converters import VALUE_TOL


class Cancelling(nn.Module):
    """Two nearly equal sums of 4096 terms subtracted: float32 keeps few digits of the difference."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        w = torch.randn(1, 4096)
        self.first = nn.Parameter(w * 10)
        self.second = nn.Parameter(w * 10 * (1 + 1e-5 * torch.randn(1, 4096)))

    def forward(self, x):
        return x @ self.first.T - x @ self.second.T


class Plain(Cancelling):
    def forward(self, x):
        return x @ self.first.T + x @ self.second.T


class Float64Elsewhere(Cancelling):
    """Computes another function in float64 (code that reads the dtype): must not widen the tolerance."""

    def forward(self, x):
        out = super().forward(x)
        return out * 0 if x.dtype == torch.float64 else out


def _outputs(model):
    x = torch.randn(6, 4096, generator=torch.Generator().manual_seed(1))
    # prepared for a plain model of the same parameters, then given this one: these tests are of the per-call check
    # alone (prepare's own float64 referee is tests/test_probe_rounding.py's)
    plain = Plain()
    plain.load_state_dict(model.state_dict())
    problem = dataclasses.replace(prepare(plain, x, None, params=None, trace_axes=(), diagonal_axes=()), model=model)
    problem = dataclasses.replace(problem, params=dict(model.named_parameters()))
    with torch.no_grad():
        want = model(x)
        exact = model.double()(x.double()).detach()
        model.float()
    return problem, (x,), want, exact


def test_torchs_own_float32_rounding_exceeds_the_tolerance_here():
    problem, chunk, want, exact = _outputs(Cancelling())
    assert _relative_per_example(want.double(), exact) > VALUE_TOL[False]  # else the cases below test nothing


def test_outputs_as_exact_as_float32_allows_are_accepted():
    problem, chunk, want, exact = _outputs(Cancelling())
    got = exact.float()  # the float64 truth rounded: another sum order could do no better
    error = _relative_per_example(got, want)
    assert error > VALUE_TOL[False]  # the float32 comparison alone refused it
    assert _float32_error(problem, chunk, got, want, error) <= VALUE_TOL[False]


def test_a_wrong_conversion_is_still_refused():
    problem, chunk, want, exact = _outputs(Cancelling())
    scale = want.abs().amax()
    got = want + 0.05 * scale  # 5% off: not rounding
    error = _relative_per_example(got, want)
    assert _float32_error(problem, chunk, got, want, error) > VALUE_TOL[False]


def test_a_model_computing_another_function_in_float64_cannot_widen_it_without_end():
    model = Float64Elsewhere()
    problem, chunk, want, exact = _outputs(model)
    got = want * (1 + 10 * FLOAT32_WIDEST)  # 1% off, while torch's float32 looks 100% off its float64
    error = _relative_per_example(got, want)
    assert _float32_error(problem, chunk, got, want, error) > VALUE_TOL[False]


def test_below_the_tolerance_nothing_is_recomputed_and_the_model_is_untouched():
    model = Cancelling()
    problem, chunk, want, _ = _outputs(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert _float32_error(problem, chunk, want, want, 0.0) == 0.0
    got = want + 0.05 * want.abs().amax()
    _float32_error(problem, chunk, got, want, _relative_per_example(got, want))
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p.detach(), before[name])


@pytest.mark.slow
def test_the_deep_wide_fcn_that_was_refused_is_computed():
    """fcn.py's case depth 10, N = 16, O = 1, W = 2048: refused (2.09e-4) before the referee; its kernel now within
    float32 accuracy of the float64 Jacobian contraction."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import fcn

    model, x1, x2 = fcn.build({"in_dim": 3, "W": 2048, "depth": 10, "O": 1, "N": 16})
    kernel = torchntk.ntk(model, x1, x2, implementation="structured_derivatives", progress=False)
    exact = torchntk.ntk(
        model.double(), x1.double(), x2.double(), implementation="jacobian_contraction", progress=False
    )
    assert float((kernel.double() - exact).abs().max() / exact.abs().max()) < 1e-4
