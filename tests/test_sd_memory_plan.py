"""Structured derivatives' tiles checked against XLA's own memory plan before they run.

The per-example memory model (``memory_plan.bytes_per_example``) counts intermediates of the forward's size; a
grouped convolution's sub-arrays and a contraction's per-row weight gradients can take more (regnet_x_32gf: a tile
planned at 0.9 GB needed 9.8 GB by XLA's plan and was killed at 10 GB). ``fit_to_memory`` reads the compiled
programs' buffer assignment and shrinks the tile, or refuses it with a clear error before it runs; auto leaves
structured derivatives out where they do not fit.
"""

from __future__ import annotations

import pytest
import torch
from _oracle import oracle_ntk
from torch import nn

import torchntk
from torchntk import _auto as auto_module
from torchntk._problem import prepare
from torchntk._tiles import TileOptions, tile_bytes
from torchntk.bridge import memory_plan, torch_glue
from torchntk.bridge.device import jax_scope


def grouped_net() -> nn.Module:
    """A grouped convolution: its sub-arrays carry θ's group axis, which the memory model does not count."""
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1, groups=8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, 10),
        )
        .double()
        .eval()
    )


@pytest.fixture
def grouped():
    torch.manual_seed(1)
    return grouped_net(), torch.randn(4, 3, 16, 16, dtype=torch.float64)


def _fit(model, x, max_memory):
    problem = prepare(model, x, None, params=None, trace_axes=(), diagonal_axes=())
    options = TileOptions(max_memory=max_memory)
    choice = memory_plan.choose_blocks(problem, options)
    converted = torch_glue.convert(problem)
    with jax_scope(problem) as target, torch_glue.compile_tier(problem, choice.chunk):
        return problem, choice, torch_glue.fit_to_memory(problem, converted, choice, options, target)[0]


def test_a_tile_the_model_underestimates_is_shrunk_to_xla_plan(grouped):
    model, x = grouped
    budget = 100_000_000
    problem, planned, fitted = _fit(model, x, budget)
    assert tile_bytes(problem, planned.per_example, planned.chunk) <= budget  # the model said it fits
    assert fitted.chunk < planned.chunk and fitted.xla_bytes <= budget  # XLA's plan said it does not
    kernel = torchntk.ntk(model, x, implementation="structured_derivatives", max_memory=budget)
    expected = oracle_ntk(model, (x,), None)
    assert torch.allclose(kernel, expected, rtol=0, atol=1e-10 * expected.abs().max().item())


def test_a_tile_that_does_not_fit_by_xla_plan_is_refused_before_running(grouped, monkeypatch):
    model, x = grouped
    problem = prepare(model, x, None, params=None, trace_axes=(), diagonal_axes=())
    smallest = tile_bytes(problem, memory_plan.bytes_per_example(problem, memory_plan.minimum_rows_for(problem)), 1)
    budget = int(smallest) + 1  # the model's smallest tile fits; XLA's plan of it does not (~4.7x more)
    ran = []
    monkeypatch.setattr(torch_glue, "to_torch", lambda *a, **k: ran.append(True))
    with pytest.raises(ValueError, match="XLA's plan for 1 example"):
        torchntk.ntk(model, x, implementation="structured_derivatives", max_memory=budget)
    assert not ran  # refused before any tile ran
    monkeypatch.undo()
    # auto costs structured derivatives by the same plan: left out, a torch-native method that fits runs instead
    for name in ("_CHOICES", "_NATIVE", "_SPENT", "_FAILED"):
        monkeypatch.setattr(auto_module, name, {})
    monkeypatch.setattr(auto_module, "conversion_seconds", lambda problem: 0.0)  # convert and cost it at once
    monkeypatch.setattr(auto_module, "compile_seconds", lambda problem: 0.0)
    explanation = torchntk.explain(model, x, max_memory=budget)
    structured = next(e for e in explanation.estimates if e.implementation == "structured_derivatives")
    assert structured.memory_bytes > budget and explanation.choice != "structured_derivatives"
    kernel = torchntk.ntk(model, x, max_memory=budget)
    expected = oracle_ntk(model, (x,), None)
    assert torch.allclose(kernel, expected, rtol=0, atol=1e-10 * expected.abs().max().item())


@pytest.mark.parametrize("trace_axes, shrunk", [((-1,), "rows"), ((), "chunk")])
def test_matching_blocks_shrink_rows_before_examples(monkeypatch, trace_axes, shrunk):
    """Where XLA's plan of a blocked tile exceeds the budget, blocks that meet only their match (a traced axis) give
    up rows first (down to ``target_rows``: a block costs one forward more), keeping the whole batch in one tile;
    free blocks give up examples first. The fitted kernel is the oracle's either way."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 64)).double().eval()
    x = torch.randn(4, 5, dtype=torch.float64)
    problem = prepare(model, x, None, params=None, trace_axes=trace_axes, diagonal_axes=())
    budget = int(tile_bytes(problem, memory_plan.bytes_per_example(problem, 40), 4))
    choice = memory_plan.BlockChoice(4, 40, memory_plan.bytes_per_example(problem, 40))
    real, plans = torch_glue.tile_memory, []

    def tile_memory(programs):  # XLA's plan of the first tile 1.25× the budget, then its own
        plans.append(real(programs))
        return budget * 1.25 if len(plans) == 1 else min(plans[-1], budget)

    monkeypatch.setattr(torch_glue, "tile_memory", tile_memory)
    converted = torch_glue.convert(problem)
    options = TileOptions(max_memory=budget)
    with jax_scope(problem) as target, torch_glue.compile_tier(problem, choice.chunk):
        fitted = torch_glue.fit_to_memory(problem, converted, choice, options, target)[0]
    assert (fitted.chunk, fitted.rows) == ((4, 32) if shrunk == "rows" else (3, 40))
    assert memory_plan.target_rows(problem) == (8 if shrunk == "rows" else 64)
    monkeypatch.undo()
    kernel = torch_glue.structured_derivatives(problem, options, output_block=fitted.rows)
    expected = oracle_ntk(model, (x,), None, trace_axes=trace_axes)
    assert torch.allclose(kernel, expected, rtol=0, atol=1e-10 * expected.abs().max().item())
