"""What a conversion check on the first example cannot see: cases that only later examples reach.

Hostile probing found three classes of silent errors in structured derivatives, each invisible to the check
because example 0 sat away from them:
- a float64 model's Python numbers exported as float32 (``h >= 0.7`` compared with 0.699999988): inputs between the
  two took the other branch (0.49 off);
- max/min over a dim and adaptive max pooling with tied maxima: torch gives the derivative to the first, the
  conversion split it (3-14% off);
- ``clamp`` with tensor bounds that are equal: torch gives all of it to x on them (a quarter went).
(And max pooling over dilated windows, which JAX cannot differentiate: it raised inside JAX.)
Here example 0 is generic and the others sit exactly on the constant, the ties and the bounds; every method must
equal the explicit-Jacobian oracle (float64)."""

from __future__ import annotations

import pytest
import torch
from _oracle import oracle_ntk
from torch import nn
from torch.nn import functional as F

import torchntk


class Around(nn.Module):
    """identity Linear (θ on the input side), ``op``, then a Linear to 2 outputs."""

    def __init__(self, op, width: int, out_width: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.last, self.op = nn.Linear(width, width), nn.Linear(out_width, 2), op
        with torch.no_grad():
            self.first.weight.copy_(torch.eye(width))
            self.first.bias.zero_()

    def forward(self, x):
        return self.last(self.op(self.first(x)).reshape(x.shape[0], -1))


def _between(constant: float) -> float:
    """A float64 strictly between ``constant`` and its float32 rounding."""
    rounded = float(torch.tensor(constant, dtype=torch.float32).double())
    return (constant + rounded) / 2


GENERIC = [0.31, -1.27, 2.13, 0.77, -0.58, 1.91]
CASES = {
    # op, width, out width, later examples (each a row of `width` inputs)
    "masked_fill ge 0.7": (lambda h: h.masked_fill(h >= 0.7, 0.0), 2, 2, [[_between(0.7), 0.5]]),
    "where gt 0.1": (lambda h: torch.where(h > 0.1, h, torch.zeros_like(h)), 2, 2, [[_between(0.1), 0.2]]),
    "threshold 0.1": (lambda h: F.threshold(h, 0.1, 0.0), 2, 2, [[_between(0.1), -0.2]]),
    "hardtanh 0.3": (lambda h: F.hardtanh(h, -0.3, 0.3), 2, 2, [[_between(0.3), _between(-0.3)]]),
    "clamp 0.3": (lambda h: torch.clamp(h, min=0.3), 2, 2, [[_between(0.3), 1.0]]),
    "normalize eps": (lambda h: F.normalize(h, dim=-1, eps=1e-3) * 3, 2, 2, [[0.0, 0.0]]),
    "max dim ties": (lambda h: h.reshape(-1, 2, 3).max(-1).values, 6, 2, [[1, 1, 0, 2, 2, 0], [3, -1, 3, 3, 0, 0]]),
    "min dim ties": (lambda h: h.reshape(-1, 2, 3).min(1).values, 6, 3, [[1, 1, 0, 1, 1, 0], [5, 5, 5, 5, 5, 5]]),
    "adaptive max pool ties": (
        lambda h: nn.AdaptiveMaxPool2d(1)(F.relu(h).reshape(-1, 2, 1, 3)),
        6,
        2,
        [[-1, -2, -3, 1, 1, 0], [2, 2, 2, 0, 0, 0]],
    ),
    "dilated max pool ties": (  # JAX has no derivative of a dilated max window: the conversion raised inside JAX
        lambda h: F.max_pool2d(F.relu(h).reshape(-1, 1, 2, 3), (1, 2), dilation=(1, 2)),
        6,
        2,
        [[-1, -2, -3, 1, 0, 1], [2, 2, 2, 0, 0, 0]],
    ),
    "clamp equal tensor bounds": (
        lambda h: torch.clamp(h[:, :2], h[:, 2:4], h[:, 4:]),
        6,
        2,
        [[0, 0, 0, 1, 0, 1], [2, -1, 1, 0, 1, 0]],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("paired", [False, True])
def test_what_only_later_examples_reach(name, paired, private_cache):
    op, width, out_width, later = CASES[name]
    model = Around(op, width, out_width).double().eval()
    x = torch.tensor([GENERIC[:width], *later], dtype=torch.float64)
    x2 = torch.tensor([list(reversed(GENERIC[:width])), *reversed(later)], dtype=torch.float64) if paired else None
    want = oracle_ntk(model, (x,), None if x2 is None else (x2,))
    for method in ("structured_derivatives", "auto", "jacobian_contraction"):
        got = torchntk.ntk(model, x, x2, implementation=method)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"{method}: {name}")
