"""Which method to run: cost estimates from the paper's Table 1 with a measured forward pass.

``[FP]``, the cost of one example's forward pass, is counted by ``torch.utils.flop_counter.FlopCounterMode``;
the rest of each formula is the paper's (Table 1), in multiply-adds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from torchntk._problem import NTKProblem
from torchntk._tiles import per_example_fn

logger = logging.getLogger("torchntk")

# A JVP or a VJP costs about 3 forward passes (paper App. D).
_AD_FACTOR = 3


@dataclass(frozen=True)
class Estimate:
    """Estimated cost of one method on one problem (multiply-adds and bytes of its largest intermediates)."""

    implementation: str
    flops: float
    memory_bytes: float


def forward_flops(problem: NTKProblem) -> float:
    """Multiply-adds of one example's forward pass (``FlopCounterMode``; 2·P when it cannot count)."""
    fn = per_example_fn(problem)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn(problem.params, *(x[0] for x in problem.x1))
        counted = counter.get_total_flops() / 2
    except Exception as error:  # a model FlopCounterMode cannot trace still gets an estimate
        logger.debug("FlopCounterMode failed (%s); estimating the forward pass as 2·P", error)
        counted = 0
    return float(max(counted, problem.num_params))


def torch_native_estimates(problem: NTKProblem) -> list[Estimate]:
    """Table 1 costs of Jacobian contraction and NTK-vector products for ``problem``."""
    fp, o, p = forward_flops(problem), problem.out_size, problem.num_params
    n1 = problem.n1
    n2 = 0 if problem.x2 is None else problem.n2
    pairs = problem.n1 if problem.paired else problem.n1 * problem.n2
    itemsize = torch.empty((), dtype=problem.out_dtype).element_size()
    jacobians = (n1 + n2) * o * _AD_FACTOR * fp
    return [
        Estimate("jacobian_contraction", jacobians + pairs * o * o * p, (n1 + n2) * o * p * itemsize),
        Estimate(
            "ntk_vector_products",
            max(n2, n1 if problem.x2 is None else 0) * o * _AD_FACTOR * fp + pairs * o * _AD_FACTOR * fp,
            max(n1, problem.n2) * o * p * itemsize,
        ),
    ]


def choose(estimates: list[Estimate]) -> Estimate:
    best = min(estimates, key=lambda e: e.flops)
    logger.debug("auto picked %s among %s", best.implementation, estimates)
    return best
