"""A conversion's outputs checked against torch's on every example of the call, before any kernel is computed.

The conversion's own check (:mod:`torchntk.converters.check`) compares its value and one derivative on the first
example. That leaves two ways to a wrong kernel on the other examples:

- **A cache served another model's conversion.** The conversion caches are keyed by the architecture fingerprint,
  which reads the model's code and state statically. What it misses leaves the key unchanged, and the cached
  conversion of the model as it was is served: hostile probing found twenty such changes in one process (a helper
  module's constant read through ``getattr``, a class attribute on a metaclass, a library method patched through
  ``functools.wraps``...) and one between processes (a constant read through ``importlib.import_module``), each
  returning the old model's kernel. Their outputs differ from torch's on the examples where the change matters,
  not necessarily the first.
- **A route translates an op wrongly for values the first example does not reach.**

So every conversion has its outputs compared with torch's forward on every example of both batches. Where this
process checked the conversion (exported, or loaded from disk and checked) the check's own compiled program gives the
values, one example at a time: nothing is traced or compiled, and a second process loads everything it runs.
A conversion from the memory cache whose check program is no longer kept is run by a jitted batched forward, in
chunks. The caller drops a disagreeing conversion from the caches and converts afresh; one that disagrees when
fresh is refused. Cost: one forward pass over the examples in torch and in JAX per call (per example: unbatched).
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


def worst_disagreement(
    problem: NTKProblem, batched: Callable[[Any, Any], Any], function_key: str, target: Any
) -> float:
    """The largest difference between the converted function's outputs and torch's on any example of ``x1`` and
    ``x2``, relative to that chunk's largest output (NaN where both are NaN agrees). ``batched(params, inputs)`` is
    the converted function on a batch, used where the check's program is not kept (:func:`checked_value`)."""
    from torchntk.converters import checked_value

    one = checked_value(function_key, {name: value.detach().cpu().numpy() for name, value in problem.params.items()})
    worst = 0.0
    if one is not None:
        for chunk, want in outputs_in_chunks(problem, CHUNK):
            rows = [one([x[i].cpu().numpy() for x in chunk]) for i in range(chunk[0].shape[0])]
            worst = max(worst, _relative(torch.from_numpy(np.stack(rows)).to(want), want))
        return worst
    import jax

    forward = _FORWARDS.setdefault(function_key, jax.jit(batched))
    params = {name: to_jax_array(value, target) for name, value in problem.params.items()}
    for chunk, want in outputs_in_chunks(problem, CHUNK):
        got = to_torch(forward(params, tuple(to_jax_array(x, target) for x in chunk)), problem.device)
        worst = max(worst, _relative(got.to(want.dtype), want))
    return worst


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference relative to the largest output; NaN where both are NaN counts as agreement."""
    if got.shape != want.shape:
        return float("inf")
    scale = float(want.abs().max()) if want.numel() else 0.0
    difference = (got - want).abs()
    both_nan = got.isnan() & want.isnan()
    return float(np.nan_to_num(float(torch.where(both_nan, 0.0, difference).max()), nan=np.inf)) / (scale + 1e-30)
