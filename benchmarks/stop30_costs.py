"""What the 2026-12-05 (third) session's checks cost, each against the call it guards, side by side in one process
(medians, ``_common.timed_side_by_side``):

- the whole-chunk checks of the torch-native methods against torch's backward, now on every chunk
  (``_autograd_check.check_jacobians_summed``: one batched backward and one pass over the Jacobians;
  ``check_forward_mode_summed``: two backwards and a JVP);
- the probe's first forward under ``_backward_conventions.BackwardConventions`` (a dispatch mode: a Python call per
  aten op), against the same forward without it.

    python benchmarks/stop30_costs.py  # about three minutes on 2 cores; results/stop30_costs.json

It measures the code of that session (commit 5e008d3; run it in a worktree of it): the next session replaced
NTK-vector products' chunk checks by one along each tile's own tangents (``stop31_costs.py``).
"""

from __future__ import annotations

import torch
from _common import RESULTS, timed_side_by_side
from checks_cost import run_on_check_models
from torch import nn

import torchntk
from torchntk._backward_conventions import BackwardConventions
from torchntk._problem import prepare
from torchntk.torch_native._autograd_check import (
    check_forward_mode_summed,
    check_jacobians_summed,
    parameter_direction,
)
from torchntk.torch_native.jacobian_contraction import batch_jacobians
from torchntk.torch_native.ntk_vector_products import _products


def _costs(model: nn.Module, x: torch.Tensor, trace: bool) -> dict:
    axes = {"trace_axes": (-1,)} if trace else {}
    problem = prepare(model, x, None, params=None, trace_axes=axes.get("trace_axes", ()), diagonal_axes=())
    inputs = problem.x1
    with torch.enable_grad():
        jacobians = batch_jacobians(problem, inputs)

    def products(tangent: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.enable_grad():
            return _products(problem, inputs, {name: t[None, None] for name, t in tangent.items()}, False)[0, 0]

    def forward_watched() -> None:
        with torch.no_grad(), BackwardConventions(problem.params.values()):
            model(x[:4])

    def forward_plain() -> None:
        with torch.no_grad():
            model(x[:4])

    calls = {
        "jacobian_contraction": lambda: torchntk.ntk(model, x, implementation="jacobian_contraction", **axes),
        "ntk_vector_products": lambda: torchntk.ntk(model, x, implementation="ntk_vector_products", **axes),
        "jacobians_summed_check": lambda: check_jacobians_summed(
            problem, inputs, jacobians, parameter_direction(problem)
        ),
        "forward_mode_summed_check": lambda: check_forward_mode_summed(problem, inputs, products),
        "forward_4_watched": forward_watched,
        "forward_4_plain": forward_plain,
    }
    times = timed_side_by_side(calls, {})
    median = {name: t["median_s"] for name, t in times.items()}
    return {
        "times": times,
        "jc_check_share": median["jacobians_summed_check"] / median["jacobian_contraction"],
        "nvp_check_share": median["forward_mode_summed_check"] / median["ntk_vector_products"],
        "watched_forward_extra_s": median["forward_4_watched"] - median["forward_4_plain"],
        "watched_forward_extra_share_of_jc": (median["forward_4_watched"] - median["forward_4_plain"])
        / median["jacobian_contraction"],
    }


if __name__ == "__main__":
    run_on_check_models(_costs, RESULTS / "stop30_costs.json")
