"""The torch-native checks' comparison of θ-sized tensors (``_autograd_check._relative`` and its finite fast path):
the same verdicts on finite values, NaNs and infinities as the NaN-aware comparison, per parameter without
concatenating θ, and the θ-direction drawn in the parameters' dtype."""

from __future__ import annotations

import math

import pytest
import torch

from torchntk._float64_dot import dot64
from torchntk.torch_native._autograd_check import _direction, _largest_finite_relative, _relative


def _both(got: dict, want: dict) -> tuple[float | None, float]:
    flat = torch.cat([w.reshape(-1) for w in want.values()])
    return _largest_finite_relative(got, want), _relative(
        torch.cat([g.reshape(-1) for g in got.values()]), flat, flat.abs()
    )


def test_finite_values_give_the_same_relative_error():
    want = {"a": torch.tensor([1.0, -4.0]), "b": torch.tensor([[2.0, 0.5]])}
    got = {"a": torch.tensor([1.0, -4.2]), "b": torch.tensor([[2.0, 0.5]])}
    fast, full = _both(got, want)
    assert fast == pytest.approx(0.05) and full == pytest.approx(0.05)


@pytest.mark.parametrize(
    ("got", "want", "expected"),
    [
        ([math.nan, 1.0], [math.nan, 1.0], 0.0),  # NaN in both at one place: agreement
        ([math.nan, 1.0], [0.5, 1.0], math.inf),  # NaN in one: disagreement
        ([math.inf, 1.0], [math.inf, 1.0], 0.0),
        ([math.inf, 1.0], [-math.inf, 1.0], math.inf),
        ([2.0, 1.0], [math.inf, 1.0], math.inf),
    ],
)
def test_non_finite_values_leave_the_fast_path(got, want, expected):
    fast, full = _both({"a": torch.tensor(got)}, {"a": torch.tensor(want)})
    assert fast is None
    assert full == expected if expected == 0.0 else full > 1e30  # torch's nan_to_num: inf as float32's largest


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_directions_are_drawn_in_the_parameters_dtype(dtype):
    d = _direction((3, 5), torch.empty((), dtype=dtype), seed=5)
    assert d.dtype == dtype and d.shape == (3, 5) and d.isfinite().all() and d.std() > 0.3
    assert torch.equal(d, _direction((3, 5), torch.empty((), dtype=dtype), seed=5))  # fixed per seed


def test_dot64_accumulates_in_float64_across_slices(monkeypatch):
    import torchntk._float64_dot as module

    monkeypatch.setattr(module, "_DOT_SLICE", 7)
    a, b = torch.randn(100), torch.randn(100)
    assert dot64(a, b).dtype == torch.float64
    assert float(dot64(a, b)) == pytest.approx(float(a.double() @ b.double()), rel=1e-12)


def test_dot64_takes_sparse_gradients():
    """nn.Embedding(sparse=True) gives sparse gradients: the reuse check's projection took them (reshape failed)."""
    dense = torch.randn(11, 4)
    sparse = (dense * (torch.rand(11, 1) > 0.5)).to_sparse()
    assert float(dot64(sparse, dense)) == pytest.approx(float((sparse.to_dense().double() * dense.double()).sum()))
