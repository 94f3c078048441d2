"""NTK-vector products with the Jacobian rows of x2 built a block of outputs at a time (one example pair over
``max_memory``): the same kernel as the explicit-Jacobian oracle, for every axis setting, blocks that do not divide
O, and one output at a time."""

from __future__ import annotations

import pytest
import torch
from _oracle import oracle_ntk
from _zoo import ZOO, make
from torch import nn

import torchntk
from torchntk._problem import prepare
from torchntk._tiles import TileOptions, tile_bytes
from torchntk.torch_native._autograd_check import tile_check_bytes
from torchntk.torch_native.ntk_vector_products import bytes_per_example, output_block
from torchntk.torch_native.output_blocks import row_check_bytes

OUTPUTS = 7


def _model_and_inputs(n1: int = 3, n2: int = 2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, OUTPUTS)).double()
    return model, torch.randn(n1, 4, dtype=torch.float64), torch.randn(n2, 4, dtype=torch.float64)


def _max_memory_for_block(model, x1, x2, block: int, **axes) -> int:
    """The budget under which NTK-vector products build exactly ``block`` outputs' rows at a time."""
    problem = prepare(model, x1, x2, params=None, **axes)
    return int(tile_bytes(problem, bytes_per_example(problem, block), 1, _blocked_fixed(problem)))


def _blocked_fixed(problem) -> float:
    """A blocked tile's θ-sized buffers: the forward-mode check's two and the rows' check's direction."""
    return tile_check_bytes(problem) + row_check_bytes(problem)


@pytest.mark.parametrize("block", [1, 3, 6])
@pytest.mark.parametrize(
    "trace_axes, diagonal_axes, same",
    [((), (), False), ((-1,), (), False), ((), (-1,), False), ((), (0,), True), ((), (), True)],
    ids=["full", "trace", "diagonal-outputs", "paired", "x2-none"],
)
def test_output_blocked_nvp_matches_the_oracle(block, trace_axes, diagonal_axes, same):
    model, x1, x2 = _model_and_inputs(n1=2 if diagonal_axes == (0,) else 3)
    if diagonal_axes == (0,):
        x2 = torch.randn_like(x1)
    if same and diagonal_axes != (0,):
        x2 = None
    axes = {"trace_axes": trace_axes, "diagonal_axes": diagonal_axes}
    budget = _max_memory_for_block(model, x1, x2, block, **axes)
    problem = prepare(model, x1, x2, params=None, **axes)
    assert output_block(problem, TileOptions(max_memory=budget)) == block
    kernel = torchntk.ntk(model, x1, x2, implementation="ntk_vector_products", max_memory=budget, **axes)
    expected = oracle_ntk(model, (x1,), None if x2 is None else (x2,), **axes)
    assert kernel.shape == expected.shape
    assert ((kernel - expected).abs().max() / expected.abs().max()).item() < 1e-10


def test_a_pair_that_fits_builds_every_row_at_once():
    model, x1, x2 = _model_and_inputs()
    problem = prepare(model, x1, x2, params=None, trace_axes=(), diagonal_axes=())
    full = int(tile_bytes(problem, bytes_per_example(problem), 1, tile_check_bytes(problem)))
    assert output_block(problem, TileOptions(max_memory=full)) is None
    assert output_block(problem, TileOptions(max_memory=full - 1)) == OUTPUTS - 1
    assert output_block(problem, TileOptions(chunk_size=1, max_memory=1)) is None  # a forced chunk is the user's


def test_a_budget_under_one_output_is_refused_with_the_bytes_it_needs():
    model, x1, x2 = _model_and_inputs()
    one = _max_memory_for_block(model, x1, x2, 1, trace_axes=(), diagonal_axes=())
    with pytest.raises(ValueError, match=f"at least {one:,}"):
        torchntk.ntk(model, x1, x2, implementation="ntk_vector_products", max_memory=one - 1)


def test_the_caller_tensors_and_model_are_unchanged():
    model, x1, x2 = _model_and_inputs()
    before = [p.detach().clone() for p in model.parameters()], x1.clone(), x2.clone()
    budget = _max_memory_for_block(model, x1, x2, 2, trace_axes=(), diagonal_axes=())
    torchntk.ntk(model, x1, x2, implementation="ntk_vector_products", max_memory=budget)
    assert all(torch.equal(a, b) for a, b in zip(before[0], model.parameters(), strict=True))
    assert torch.equal(before[1], x1) and torch.equal(before[2], x2)


@pytest.mark.parametrize("name", list(ZOO))
def test_output_blocked_nvp_on_the_zoo(name):
    """Several inputs, buffers, tied weights, and a (C, H, W) output flattened into blocks of 2 outputs."""
    model, x1, x2 = make(name)
    axes = {"trace_axes": (), "diagonal_axes": (1,)} if name == "conv_map" else {"trace_axes": (), "diagonal_axes": ()}
    problem = prepare(model, x1, x2, params=None, **axes)
    budget = int(tile_bytes(problem, bytes_per_example(problem, 2), 1, _blocked_fixed(problem)))
    assert output_block(problem, TileOptions(max_memory=budget)) == 2
    kernel = torchntk.ntk(model, x1, x2, implementation="ntk_vector_products", max_memory=budget, **axes)
    expected = oracle_ntk(model, x1, x2, **axes)
    assert ((kernel - expected).abs().max() / expected.abs().max()).item() < 1e-10
