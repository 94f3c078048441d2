"""What the 2026-12-05 (fourth) session's checks cost, each against the call it guards, side by side in one process
(medians, ``_common.timed_side_by_side``):

- NTK-vector products' check along each tile's own tangents (``ntk_vector_products._check_tile``: the tile's
  products combined, one weighted backward of the x1 chunk), against the NTK-vector products call;
- a store's projections of the outputs and the Jacobian over every example (``_model_projections._projections``:
  one forward and backward in chunks of 8), against a Jacobian contraction call writing a store;
- the probe (``_problem.prepare``: its forwards now in grad mode, each shape's first watched, the graph walked for
  the model's own Parameters), against the Jacobian contraction call.

    python benchmarks/stop31_costs.py  # about three minutes on 2 cores; results/stop31_costs.json
"""

from __future__ import annotations

import tempfile

import torch
from _common import RESULTS, timed_side_by_side
from checks_cost import run_on_check_models
from torch import nn

import torchntk
from torchntk._model_projections import _projections
from torchntk._problem import prepare
from torchntk.torch_native._autograd_check import combined_rows, row_weights
from torchntk.torch_native.jacobian_contraction import batch_jacobians
from torchntk.torch_native.ntk_vector_products import _check_tile, _products


def _costs(model: nn.Module, x: torch.Tensor, trace: bool) -> dict:
    axes = {"trace_axes": (-1,)} if trace else {}
    problem = prepare(model, x, None, params=None, trace_axes=axes.get("trace_axes", ()), diagonal_axes=())
    inputs = problem.x1
    with torch.enable_grad():
        jacobians = batch_jacobians(problem, inputs)
        k = len(problem.out_shape)
        rows = {name: j.reshape(j.shape[0], problem.out_size, *j.shape[1 + k :]) for name, j in jacobians.items()}
        products = _products(problem, inputs, rows, False)
    weights = row_weights(problem, len(inputs[0]), problem.out_size)
    tangent = combined_rows(rows, weights)

    def tile_check() -> None:
        with torch.enable_grad():
            _check_tile(problem, inputs, products, weights, tangent, False)

    directory = tempfile.mkdtemp()
    calls = {
        "jacobian_contraction": lambda: torchntk.ntk(model, x, implementation="jacobian_contraction", **axes),
        "jacobian_contraction_to_a_new_store": lambda: torchntk.ntk(
            model, x, implementation="jacobian_contraction", out=tempfile.mktemp(dir=directory, suffix=".npy"), **axes
        ),
        "ntk_vector_products": lambda: torchntk.ntk(model, x, implementation="ntk_vector_products", **axes),
        "nvp_tile_check": tile_check,
        "store_projections": lambda: _projections(problem),
        "probe": lambda: prepare(model, x, None, params=None, trace_axes=(), diagonal_axes=()),
    }
    times = timed_side_by_side(calls, {})
    median = {name: t["median_s"] for name, t in times.items()}
    return {
        "times": times,
        "nvp_tile_check_share": median["nvp_tile_check"] / median["ntk_vector_products"],
        "store_projections_share": median["store_projections"] / median["jacobian_contraction_to_a_new_store"],
        "probe_share_of_jc": median["probe"] / median["jacobian_contraction"],
    }


if __name__ == "__main__":
    run_on_check_models(_costs, RESULTS / "stop31_costs.json")
