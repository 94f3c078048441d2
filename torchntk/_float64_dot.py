"""θ-sized dot products accumulated in float64 without θ-sized float64 copies (the derivative checks' projections)."""

from __future__ import annotations

import torch
from torch import Tensor

# Entries of a θ-sized tensor taken to float64 at once by dot64: 8 MB of float64 per operand.
_DOT_SLICE = 1 << 20


def dot64(a: Tensor, b: Tensor) -> Tensor:
    """``Σ a·b`` accumulated in float64, a slice of :data:`_DOT_SLICE` entries at a time: float64 copies of two
    θ-sized tensors and their product took six times θ's float32 bytes beside the tile (9·P·4 bytes at the peak of a
    tile budgeted at 2.2·P·4)."""
    if a.layout != torch.strided or b.layout != torch.strided:  # a sparse gradient (nn.Embedding(sparse=True)): small
        return (a.double() * b.double()).sum()
    a, b = a.reshape(-1), b.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for start in range(0, a.numel(), _DOT_SLICE):
        total += torch.dot(a[start : start + _DOT_SLICE].double(), b[start : start + _DOT_SLICE].double())
    return total
