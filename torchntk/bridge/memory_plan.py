"""Structured derivatives' memory model: how many examples per tile side and output cotangent rows per block fit.

One example's ingredients hold, per output cotangent row, a few copies of the forward's intermediates (Y entries:
:func:`activation_numel`), and once its sub-arrays and residuals (:func:`bytes_per_example`). :func:`choose_blocks`
turns a memory budget into a :class:`BlockChoice`; ``torch_glue.fit_to_memory`` then checks the compiled first tile
against XLA's own plan and shrinks it. No JAX here: auto and the API ask it before anything is converted.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from torchntk._activations import activation_numel
from torchntk._problem import NTKProblem
from torchntk._tiles import TileOptions, chunk_for_memory, memory_budget, tile_bytes

# Bytes per example, in units of Y entries: per cotangent row (the row's ∂f/∂y^k, a few copies while XLA runs),
# and once (sub-arrays, e.g. a convolution's input patches, and the forward's residuals).
_COTANGENT_COPIES = 4
_FIXED_COPIES = 12
# Cotangent rows per block that auto-sized blocking aims for before it shrinks the chunk of examples instead.
_TARGET_ROWS = 64


def bytes_per_example(problem: NTKProblem, rows: int | None = None, activations: int | None = None) -> float:
    """Memory of one example's ingredients with ``rows`` output cotangent rows at once (``None``: all outputs);
    ``activations`` is :func:`activation_numel` when the caller has it (it runs a forward pass)."""
    itemsize = torch.empty((), dtype=problem.out_dtype).element_size()
    rows = problem.out_size if rows is None else rows
    activations = activation_numel(problem) if activations is None else activations
    return (_COTANGENT_COPIES * rows + _FIXED_COPIES) * activations * itemsize


def minimum_rows_for(problem: NTKProblem) -> int:
    """Fewest cotangent rows per example output blocking can reach (one row along the blocked axis)."""
    from torchntk.bridge.output_blocks import minimum_rows

    return minimum_rows((1, *problem.out_shape), problem.trace_axes, problem.diagonal_axes, batched=True)


class BlockChoice(NamedTuple):
    """Examples per tile side and output cotangent rows per block (``rows == out_size``: no blocking)."""

    chunk: int
    rows: int
    per_example: float  # bytes_per_example at ``rows``
    xla_bytes: float | None = None  # XLA's plan of the first tile's memory, once checked (fit_to_memory)


def choose_blocks(problem: NTKProblem, options: TileOptions, rows: int | None = None) -> BlockChoice:
    """Chunk and output block for ``options`` (``rows`` forces the block).

    Unblocked when one example pair fits; otherwise the largest chunk that holds ``_TARGET_ROWS`` rows (larger
    chunks repeat less per-example work: every tile recomputes its two sides' ingredients), then the most rows that
    chunk allows. Raises the tiles' clear ``ValueError`` when even one row of one pair does not fit.
    """
    out = problem.out_size
    activations = activation_numel(problem)

    def bytes_for(rows: int | None) -> float:
        return bytes_per_example(problem, rows, activations)

    if rows is not None:
        rows = max(minimum_rows_for(problem), min(rows, out))
        chunk = options.chunk_size or chunk_for_memory(problem, bytes_for(rows), options.max_memory)
        return BlockChoice(chunk, rows, bytes_for(rows))
    whole = bytes_for(None)
    budget = memory_budget(problem, options.max_memory)
    if options.chunk_size:
        chunk = options.chunk_size
    elif tile_bytes(problem, whole, 1) <= budget:
        return BlockChoice(chunk_for_memory(problem, whole, options.max_memory), out, whole)
    else:
        least = minimum_rows_for(problem)
        chunk_for_memory(problem, bytes_for(least), options.max_memory)  # the clear error
        target = max(least, min(out, _TARGET_ROWS))
        target_bytes = bytes_for(target)
        fits = tile_bytes(problem, target_bytes, 1) <= budget
        chunk = chunk_for_memory(problem, target_bytes, options.max_memory) if fits else 1
    # The most rows whose tile of `chunk` examples per side fits (tile_bytes is linear in the per-example bytes).
    per_row = bytes_for(1) - bytes_for(0)
    spare = (budget - tile_bytes(problem, bytes_for(0), chunk)) / chunk
    rows = max(minimum_rows_for(problem), min(out, int(spare // per_row)))
    return BlockChoice(chunk, rows, bytes_for(rows))


def block_steps(problem: NTKProblem, choice: BlockChoice) -> int:
    """Iterations of the output-block loop of one tile (blocks along a traced/diagonal axis, else block pairs)."""
    from torchntk.bridge.output_blocks import plan_blocks

    shape = (1, *problem.out_shape)
    plan = plan_blocks(shape, shape, problem.trace_axes, problem.diagonal_axes, True, choice.rows)
    if plan.mode in ("whole", "trace", "diagonal"):
        return plan.count1
    return plan.count1 * (plan.count1 + 1) // 2 if problem.x2 is None else plan.count1 * plan.count2
