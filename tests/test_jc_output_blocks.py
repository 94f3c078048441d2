"""Jacobian contraction with both sides' Jacobian rows built a block of outputs at a time, where the kernel pairs each
output with itself only (every output axis traced or diagonal) and one example pair's Jacobians exceed
``max_memory``: the same kernel as the explicit-Jacobian oracle, rows checked against torch's backward."""

from __future__ import annotations

import importlib

import pytest
import torch
from _oracle import oracle_ntk
from _zoo import ZOO, make
from torch import nn

import torchntk
from torchntk._problem import prepare
from torchntk._tiles import TileOptions, tile_bytes
from torchntk.torch_native import output_blocks
from torchntk.torch_native._autograd_check import tile_check_bytes
from torchntk.torch_native._errors import UnsupportedModelError
from torchntk.torch_native.jacobian_contraction import bytes_per_example, minimum_bytes_per_example
from torchntk.torch_native.output_blocks import (
    contraction_block,
    contraction_bytes_per_example,
    contraction_fixed_bytes,
)

OUTPUTS = 13  # blocks of 2 and 5 leave 1 and 3: a last block shorter than the others


def _model_and_inputs(n1: int = 3, n2: int = 2, outputs: tuple[int, ...] = (OUTPUTS,)):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, int(torch.tensor(outputs).prod())))
    model = nn.Sequential(model, nn.Unflatten(1, outputs)).double()
    return model, torch.randn(n1, 4, dtype=torch.float64), torch.randn(n2, 4, dtype=torch.float64)


def _budget_for_block(problem, block: int) -> int:
    """The budget under which the whole batch's rows take exactly ``block`` outputs at a time in one tile."""
    examples = max(problem.n1, problem.n2)
    per_example = contraction_bytes_per_example(problem, block)
    return int(tile_bytes(problem, per_example, examples, contraction_fixed_bytes(problem, block)))


CASES = {
    "trace": dict(outputs=(OUTPUTS,), trace_axes=(-1,), diagonal_axes=()),
    "diagonal-outputs": dict(outputs=(OUTPUTS,), trace_axes=(), diagonal_axes=(-1,)),
    "trace-and-diagonal": dict(outputs=(3, 5), trace_axes=(1,), diagonal_axes=(2,)),
    "trace-two-axes": dict(outputs=(3, 5), trace_axes=(1, 2), diagonal_axes=()),
    "paired-trace": dict(outputs=(OUTPUTS,), trace_axes=(-1,), diagonal_axes=(0,)),
}


@pytest.mark.parametrize("block", [1, 2, 5])
@pytest.mark.parametrize("x2_none", [False, True], ids=["x1-x2", "x2-none"])
@pytest.mark.parametrize("case", list(CASES))
def test_output_blocked_jc_matches_the_oracle(case, x2_none, block):
    spec = dict(CASES[case])
    outputs = spec.pop("outputs")
    paired = 0 in spec["diagonal_axes"]
    model, x1, x2 = _model_and_inputs(n1=2 if paired else 3, outputs=outputs)
    if paired:
        x2 = torch.randn_like(x1)
    elif x2_none:
        x2 = None
    problem = prepare(model, x1, x2, params=None, **spec)
    budget = _budget_for_block(problem, block)
    assert budget < tile_bytes(problem, bytes_per_example(problem), 1, tile_check_bytes(problem))  # a pair exceeds it
    assert contraction_block(problem, TileOptions(max_memory=budget), bytes_per_example(problem)) == block
    kernel = torchntk.ntk(model, x1, x2, implementation="jacobian_contraction", max_memory=budget, **spec)
    expected = oracle_ntk(model, (x1,), None if x2 is None else (x2,), **spec)
    assert kernel.shape == expected.shape
    assert ((kernel - expected).abs().max() / expected.abs().max()).item() < 1e-10


def test_free_output_axes_or_a_fitting_pair_build_whole_jacobians():
    model, x1, x2 = _model_and_inputs()
    free = prepare(model, x1, x2, params=None, trace_axes=(), diagonal_axes=())
    assert contraction_block(free, TileOptions(max_memory=1000), bytes_per_example(free)) is None
    traced = prepare(model, x1, x2, params=None, trace_axes=(-1,), diagonal_axes=())
    whole = int(tile_bytes(traced, bytes_per_example(traced), 1, tile_check_bytes(traced)))
    assert contraction_block(traced, TileOptions(max_memory=whole), bytes_per_example(traced)) is None
    assert contraction_block(traced, TileOptions(max_memory=whole - 1), bytes_per_example(traced)) is not None
    assert contraction_block(traced, TileOptions(chunk_size=1, max_memory=1), bytes_per_example(traced)) is None


def test_the_least_memory_counts_one_output_at_a_time_only_where_blocks_apply():
    model, x1, x2 = _model_and_inputs()
    free = prepare(model, x1, x2, params=None, trace_axes=(), diagonal_axes=())
    traced = prepare(model, x1, x2, params=None, trace_axes=(-1,), diagonal_axes=())
    assert minimum_bytes_per_example(free) == bytes_per_example(free) + tile_check_bytes(free)
    assert minimum_bytes_per_example(traced) < bytes_per_example(traced) / 2
    one = int(tile_bytes(traced, minimum_bytes_per_example(traced), 1))
    with pytest.raises(ValueError, match="too small for even one tile"):
        torchntk.ntk(model, x1, x2, implementation="jacobian_contraction", max_memory=one - 1, trace_axes=(-1,))
    kernel = torchntk.ntk(model, x1, x2, implementation="jacobian_contraction", max_memory=one, trace_axes=(-1,))
    expected = oracle_ntk(model, (x1,), (x2,), trace_axes=(-1,))
    assert ((kernel - expected).abs().max() / expected.abs().max()).item() < 1e-10


def test_a_small_batch_tile_recomputes_rows_per_tile_and_stays_exact():
    """A budget under the whole batch at one output shrinks the tile: chunks meet in several tiles."""
    model, x1, x2 = _model_and_inputs(n1=5, n2=4)
    problem = prepare(model, x1, x2, params=None, trace_axes=(-1,), diagonal_axes=())
    budget = int(tile_bytes(problem, contraction_bytes_per_example(problem, 1), 2, contraction_fixed_bytes(problem, 1)))
    assert contraction_block(problem, TileOptions(max_memory=budget), bytes_per_example(problem)) == 1
    for x2_side in (x2, None):
        kernel = torchntk.ntk(
            model, x1, x2_side, implementation="jacobian_contraction", max_memory=budget, trace_axes=(-1,)
        )
        expected = oracle_ntk(model, (x1,), None if x2_side is None else (x2_side,), trace_axes=(-1,))
        assert ((kernel - expected).abs().max() / expected.abs().max()).item() < 1e-10


@pytest.mark.parametrize("name", list(ZOO))
def test_output_blocked_jc_on_the_zoo(name):
    """Several inputs, buffers, tied weights, and a (C, H, W) output traced over all its axes, one output at a
    time."""
    model, x1, x2 = make(name)
    out_ndim = model(*(x[:1] for x in x1)).ndim
    axes = {"trace_axes": tuple(range(1, out_ndim)), "diagonal_axes": ()}
    problem = prepare(model, x1, x2, params=None, **axes)
    budget = _budget_for_block(problem, 1)
    assert contraction_block(problem, TileOptions(max_memory=budget), bytes_per_example(problem)) == 1
    kernel = torchntk.ntk(model, x1, x2, implementation="jacobian_contraction", max_memory=budget, **axes)
    expected = oracle_ntk(model, x1, x2, **axes)
    assert ((kernel - expected).abs().max() / expected.abs().max()).item() < 1e-10


def test_rows_that_disagree_with_torch_backward_are_refused(monkeypatch):
    """A wrong row (as a wrong batching rule of torch.func would give) is caught by the rows' check, for both
    methods that build rows in blocks, before a kernel is returned."""
    model, x1, x2 = _model_and_inputs()
    real = output_blocks.jacobian_rows

    def skewed(problem, inputs, outputs, by_autograd=False):  # wrong by either way of building rows
        rows = real(problem, inputs, outputs, by_autograd)
        return {name: r * 1.5 if name.endswith("2.weight") else r for name, r in rows.items()}

    monkeypatch.setattr(output_blocks, "jacobian_rows", skewed)
    problem = prepare(model, x1, x2, params=None, trace_axes=(-1,), diagonal_axes=())
    budget = _budget_for_block(problem, 2)
    with pytest.raises(UnsupportedModelError, match="Jacobian rows"):
        torchntk.ntk(model, x1, x2, implementation="jacobian_contraction", max_memory=budget, trace_axes=(-1,))
    # the module, not the function of the same name that torchntk.torch_native exports
    ntk_vector_products = importlib.import_module("torchntk.torch_native.ntk_vector_products")
    monkeypatch.setattr(ntk_vector_products, "jacobian_rows", skewed)
    full = prepare(model, x1, x2, params=None, trace_axes=(), diagonal_axes=())
    one_output = int(tile_bytes(full, ntk_vector_products.minimum_bytes_per_example(full), 1))
    with pytest.raises(UnsupportedModelError, match="Jacobian rows"):
        torchntk.ntk(model, x1, x2, implementation="ntk_vector_products", max_memory=one_output)


def test_the_caller_tensors_and_model_are_unchanged():
    model, x1, x2 = _model_and_inputs()
    before = [p.detach().clone() for p in model.parameters()], x1.clone(), x2.clone()
    problem = prepare(model, x1, x2, params=None, trace_axes=(-1,), diagonal_axes=())
    torchntk.ntk(
        model, x1, x2, implementation="jacobian_contraction", max_memory=_budget_for_block(problem, 2), trace_axes=-1
    )
    assert all(torch.equal(a, b) for a, b in zip(before[0], model.parameters(), strict=True))
    assert torch.equal(before[1], x1) and torch.equal(before[2], x2)


def test_auto_counts_output_pairs_and_rebuilt_rows():
    """auto's Jacobian contraction cost: the contraction pairs each output with itself alone where outputs are traced
    (``N1·N2·O·P``, not ``O²``), and tiles of output blocks that cannot hold the batch rebuild their rows."""
    from torchntk._auto import native_terms
    from torchntk.torch_native.jacobian_contraction import examples_differentiated

    model, x1, _ = _model_and_inputs(n1=5)
    full = prepare(model, x1, None, params=None, trace_axes=(), diagonal_axes=())
    traced = prepare(model, x1, None, params=None, trace_axes=(-1,), diagonal_axes=())
    fp, p = 100.0, full.num_params
    assert native_terms(full, fp)["jacobian_contraction"][3] == 25 * OUTPUTS**2 * p
    assert native_terms(traced, fp)["jacobian_contraction"][3] == 25 * OUTPUTS * p
    roomy = TileOptions(max_memory=10**9)
    assert examples_differentiated(traced, roomy) == 5  # unblocked: each example once
    two = int(tile_bytes(traced, contraction_bytes_per_example(traced, 1), 2, contraction_fixed_bytes(traced, 1)))
    tight = TileOptions(max_memory=two)
    # chunks [0:2], [2:4], [4:5]; upper tiles (0,0) 2, (0,1) 4, (0,2) 3, (1,1) 2, (1,2) 3, (2,2) 1
    assert examples_differentiated(traced, tight) == 15
    vjps = native_terms(traced, fp, tight)["jacobian_contraction"][2]
    assert vjps == 3 * native_terms(traced, fp, roomy)["jacobian_contraction"][2]


class _OldStyleCube(torch.autograd.Function):
    """An autograd.Function without torch.func support (no setup_context): its rows come from torch.autograd."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


class _CubeModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, OUTPUTS)

    def forward(self, x):
        return self.b(_OldStyleCube.apply(torch.tanh(self.a(x))))


def test_rows_of_a_model_torch_func_cannot_transform_come_from_autograd():
    torch.manual_seed(0)
    model = _CubeModel().double()
    x1, x2 = torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    problem = prepare(model, x1, x2, params=None, trace_axes=(-1,), diagonal_axes=())
    budget = _budget_for_block(problem, 2)
    assert contraction_block(problem, TileOptions(max_memory=budget), bytes_per_example(problem)) == 2
    kernel = torchntk.ntk(model, x1, x2, implementation="jacobian_contraction", max_memory=budget, trace_axes=(-1,))
    expected = oracle_ntk(model, (x1,), (x2,), trace_axes=(-1,))
    assert ((kernel - expected).abs().max() / expected.abs().max()).item() < 1e-10


class _Distances(nn.Module):
    """torch.cdist, whose batched backward is wrong under torch.func's vmap: its rows must come from autograd."""

    def __init__(self) -> None:
        super().__init__()
        self.centres, self.head = nn.Parameter(torch.randn(5, 3)), nn.Linear(5, OUTPUTS)

    def forward(self, x):
        return self.head(torch.cdist(x, self.centres))


def test_rows_that_torch_func_gets_wrong_are_built_by_autograd():
    """Found by probing: torch.cdist's vmapped rows disagreed with torch's backward and the call was refused (auto
    too: nothing else fitted); unblocked Jacobian contraction recovers by autograd, and so do output blocks now."""
    torch.manual_seed(0)
    model = _Distances().double()
    x1, x2 = torch.randn(3, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    problem = prepare(model, x1, x2, params=None, trace_axes=(-1,), diagonal_axes=())
    budget = _budget_for_block(problem, 3)
    expected = oracle_ntk(model, (x1,), (x2,), trace_axes=(-1,))
    for implementation in ("jacobian_contraction", "auto"):
        kernel = torchntk.ntk(model, x1, x2, implementation=implementation, max_memory=budget, trace_axes=(-1,))
        assert ((kernel - expected).abs().max() / expected.abs().max()).item() < 1e-10
