"""A structured kernel with NaN entries is refused, not returned."""

from __future__ import annotations

import torch
from torch import Tensor


class NonFiniteKernelError(RuntimeError):
    """Structured derivatives gave NaN kernel entries: refused, not returned (auto falls back to torch-native)."""


def refuse_nan(kernel: Tensor) -> Tensor:
    """``kernel`` unchanged unless it holds NaN, then :class:`NonFiniteKernelError`.

    The check against torch compares values and a forward-mode derivative, which a backward pass can still differ
    from in one way: ``0 · ∞`` (a cotangent of 0 through sqrt at 0, say), NaN in reverse mode only. The first
    example's outputs are finite by then (the conversion check refuses others), not necessarily the others'; in
    every case the torch-native methods give torch's answer (NaN rows where torch's are). ±Inf passes: a float32
    kernel of huge weights overflows in torch's methods alike.
    """
    if not bool(torch.isnan(kernel).any()):
        return kernel
    raise NonFiniteKernelError(
        f"structured derivatives gave {int(torch.isnan(kernel).sum())} NaN kernel entries: the model's outputs "
        "are NaN on some examples (a sqrt or log of a negative value), or a backward pass through an op at a "
        "singular point (a norm or sqrt of exactly 0) multiplied 0 by ∞. Use implementation="
        "'jacobian_contraction' or 'ntk_vector_products', which follow torch's own backward."
    )
