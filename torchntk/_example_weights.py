"""Weights that give each example of a summed check the same say.

A check of a whole chunk compares one sum over its examples (``Σ_n u_n·J_n v``, torch's by one batched backward)
with the same sum from the method or conversion being checked. Compared to the sum's scale, one example's error
is diluted by the others: an example whose outputs were ~100× larger hid another example's wrong derivative in
float32 (a kernel 3e-2 off), and one tie among 40 examples hid forward mode's other derivative (1e-1 off). Weighing
each example's term by the inverse of its own size (known from the checked side, before torch's backward runs)
makes every example's error count as its own relative error. The weights are bounded (:data:`FLOOR` of the largest
term) so that an example whose term is zero by chance does not amplify rounding without end.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: The smallest term weighed as its own size, relative to the largest: below it, rounding would be amplified.
FLOOR = 1e-2


def example_weights(terms: Tensor) -> Tensor:
    """``1 / max(|term_n|, FLOOR·max|term|)`` per example (a leading axis of ``terms``; any others are reduced by
    their largest finite magnitude), in float64; ones where every term is zero or none is finite."""
    sizes = torch.nan_to_num(terms.detach().double(), nan=0.0, posinf=0.0, neginf=0.0).abs()
    sizes = sizes.reshape(sizes.shape[0], -1).amax(1) if sizes.ndim > 1 else sizes
    largest = float(sizes.max()) if sizes.numel() else 0.0
    if largest == 0.0:
        return torch.ones_like(sizes)
    return 1.0 / sizes.clamp(min=FLOOR * largest)
