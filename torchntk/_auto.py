"""``implementation="auto"`` and :func:`torchntk.explain`: estimate every method's cost, pick the cheapest.

Torch-native methods are costed with the paper's Table 1 (in multiply-adds) and a forward pass counted by
``torch.utils.flop_counter.FlopCounterMode``; structured derivatives with XLA's cost analysis of the compiled
kernel function (which converts the model: only done when the torch-native estimate is long enough for the
conversion to pay off). Multiply-adds become seconds at a rate per method measured on CPU (``_MACS_PER_SECOND``:
torch's vmap/jacrev/jvp machinery reaches a fraction of XLA's fused GEMMs), and the fastest estimate wins. The
choice is cached per (architecture, shapes, dtype, device, layout).
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from torchntk._problem import NTKProblem
from torchntk._tiles import TileOptions, memory_budget, per_example_fn, tile_bytes
from torchntk.torch_native.jacobian_contraction import bytes_per_example as jc_bytes_per_example
from torchntk.torch_native.ntk_vector_products import bytes_per_example as nvp_bytes_per_example

logger = logging.getLogger("torchntk")

# A JVP or a VJP costs about 3 forward passes (paper App. D).
_AD_FACTOR = 3
# Multiply-adds per second each method sustains on a CPU (benchmarks/auto_choice.py, benchmarks/fcn.py: FCNs of
# width 64-2048 on 2 x86_64 cores); only their ratios matter for the choice.
_MACS_PER_SECOND = {"jacobian_contraction": 2e10, "ntk_vector_products": 1e10, "structured_derivatives": 5e10}
# Below this many estimated seconds of torch-native work, converting the model to JAX (seconds, once) is not tried.
_CONVERSION_WORTH = 0.05


@dataclass(frozen=True)
class Estimate:
    """Estimated cost of one method: multiply-adds for the whole kernel and bytes of one tile's intermediates."""

    implementation: str
    flops: float
    memory_bytes: float

    @property
    def seconds(self) -> float:
        """Predicted wall-clock seconds at the method's measured rate (``_MACS_PER_SECOND``)."""
        return self.flops / _MACS_PER_SECOND[self.implementation]


@dataclass(frozen=True)
class Explanation:
    """What ``implementation="auto"`` does for one call: ``choice``, the ``estimates`` behind it, and why."""

    choice: str
    estimates: tuple[Estimate, ...]
    reason: str
    route: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


_CHOICES: dict[str, Explanation] = {}


def forward_flops(problem: NTKProblem) -> float:
    """Multiply-adds of one example's forward pass (``FlopCounterMode``; at least P, one per parameter)."""
    fn = per_example_fn(problem)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn(problem.params, *(x[0] for x in problem.x1))
        counted = counter.get_total_flops() / 2
    except Exception as error:  # a model FlopCounterMode cannot trace still gets an estimate
        logger.debug("FlopCounterMode failed (%s); estimating the forward pass as P", error)
        counted = 0
    return float(max(counted, problem.num_params))


def torch_native_estimates(problem: NTKProblem) -> list[Estimate]:
    """Table 1 costs of Jacobian contraction and NTK-vector products for ``problem``."""
    fp, o, p = forward_flops(problem), problem.out_size, problem.num_params
    n1, n2 = problem.n1, (0 if problem.x2 is None else problem.n2)
    pairs = problem.n1 if problem.paired else problem.n1 * problem.n2
    return [
        Estimate(
            "jacobian_contraction",
            (n1 + n2) * o * _AD_FACTOR * fp + pairs * o * o * p,
            tile_bytes(problem, jc_bytes_per_example(problem), 1),
        ),
        Estimate(
            "ntk_vector_products",
            max(n1, problem.n2) * o * _AD_FACTOR * fp + pairs * o * _AD_FACTOR * fp,
            tile_bytes(problem, nvp_bytes_per_example(problem), 1),
        ),
    ]


def _choice_key(problem: NTKProblem, options: TileOptions) -> str:
    model = problem.model
    described = [[f"{type(m).__module__}.{type(m).__qualname__}", m.extra_repr()] for _, m in model.named_modules()]
    items = [
        described,
        sorted((n, tuple(p.shape), str(p.dtype)) for n, p in problem.params.items()),
        [tuple(x.shape) for x in problem.x1],
        None if problem.x2 is None else [tuple(x.shape) for x in problem.x2],
        str(problem.out_dtype),
        str(problem.device),
        problem.trace_axes,
        problem.diagonal_axes,
        options.chunk_size,
        options.max_memory,
    ]
    return hashlib.sha256(json.dumps(items, default=str).encode()).hexdigest()


def explain_problem(problem: NTKProblem, options: TileOptions) -> Explanation:
    """Estimates and the choice of ``implementation="auto"`` for ``problem`` (cached)."""
    key = _choice_key(problem, options)
    if key in _CHOICES:
        explanation = _CHOICES[key]
        logger.debug("auto picked %s (cached): %s", explanation.choice, explanation.reason)
        return explanation
    budget = memory_budget(problem, options.max_memory)
    estimates = torch_native_estimates(problem)
    fitting = [e for e in estimates if e.memory_bytes <= budget]
    best_native = min(fitting or estimates, key=lambda e: e.seconds)
    notes: list[str] = []
    route = None
    if fitting and best_native.seconds < _CONVERSION_WORTH:
        reason = (
            f"{best_native.implementation} is estimated at {best_native.seconds:.3f} s, too short to pay for "
            "converting the model to JAX for structured derivatives"
        )
        choice = best_native
    else:
        try:
            from torchntk.bridge.torch_glue import structured_cost

            flops, memory, route = structured_cost(problem, options)
            estimates.append(Estimate("structured_derivatives", flops, memory))
        except Exception as error:  # conversion or interpreter failure: fall back, and say why once
            message = (
                f"torchntk: structured derivatives cannot handle this model ({type(error).__name__}: "
                f"{str(error)[:400]}); implementation='auto' falls back to {best_native.implementation}."
            )
            warnings.warn(message, RuntimeWarning, stacklevel=4)
            notes.append(message)
        candidates = [e for e in estimates if e.memory_bytes <= budget]
        # When nothing fits, run the least hungry: its error names the memory it needs.
        choice = (
            min(candidates, key=lambda e: e.seconds) if candidates else min(estimates, key=lambda e: e.memory_bytes)
        )
        reason = f"{choice.implementation} has the shortest estimated time ({choice.seconds:.3f} s)"
        if not fitting:
            reason += f" among methods whose one-pair tile fits the {budget:,}-byte memory budget"
    explanation = Explanation(choice.implementation, tuple(estimates), reason, route, tuple(notes))
    logger.debug("auto picked %s: %s; estimates %s", explanation.choice, reason, estimates)
    _CHOICES[key] = explanation
    return explanation
