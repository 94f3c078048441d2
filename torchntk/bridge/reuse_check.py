"""A conversion served from the memory cache, checked on every example of the call before any kernel is computed.

(From the disk cache, a conversion has its value checked on the first example only: a second process must load its
programs, not compile a new one.)

The conversion cache is keyed by the architecture fingerprint, which reads the model's code and state statically.
What it misses leaves the key unchanged, and the cached conversion of the model as it was is served: hostile probing
found twenty such changes (a helper module's constant read through ``getattr``, a class attribute on a metaclass, a
library method patched through ``functools.wraps``, a helper module held as an attribute...), each returning the
old model's kernel. Such a conversion's outputs differ from torch's on the examples where the change matters, not
necessarily the first (the conversion's own check). So a conversion from a cache has its outputs compared with
torch's forward on every example of both batches, in chunks (one forward each side); the caller drops it from the
caches on a mismatch and converts afresh. Cost: one forward pass over the examples in torch and in JAX per call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from torchntk._problem import NTKProblem, outputs_in_chunks
from torchntk.bridge.device import to_jax_array, to_torch

# Examples per forward of the comparison (bounds its memory; at most two compiled shapes per batch size).
CHUNK = 64
# One jitted forward per converted function (jit keeps its executables per input shape).
_FORWARDS: dict[str, Any] = {}


def outputs_agree(problem: NTKProblem, batched: Callable[[Any, Any], Any], function_key: str, target: Any) -> bool:
    """Whether ``batched(params, inputs)`` (the converted function on a batch) gives torch's outputs on every example
    of ``x1`` and ``x2``, within the conversion's own check's tolerance (``converters.check.VALUE_TOL``)."""
    import jax

    from torchntk.converters.check import VALUE_TOL

    forward = _FORWARDS.setdefault(function_key, jax.jit(batched))
    params = {name: to_jax_array(value, target) for name, value in problem.params.items()}
    worst = 0.0
    for chunk, want in outputs_in_chunks(problem, CHUNK):
        got = to_torch(forward(params, tuple(to_jax_array(x, target) for x in chunk)), problem.device)
        worst = max(worst, _relative(got.to(want.dtype), want))
    return worst <= VALUE_TOL[problem.out_dtype == torch.float64]


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference relative to the largest output; NaN where both are NaN counts as agreement."""
    if got.shape != want.shape:
        return float("inf")
    scale = float(want.abs().max()) if want.numel() else 0.0
    difference = (got - want).abs()
    both_nan = got.isnan() & want.isnan()
    return float(np.nan_to_num(float(torch.where(both_nan, 0.0, difference).max()), nan=np.inf)) / (scale + 1e-30)
