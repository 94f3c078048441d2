"""Structured derivatives' memory model: how many examples per tile side and output cotangent rows per block fit.

One example's ingredients hold, per output cotangent row, a few copies of the forward's intermediates (Y entries:
:func:`activation_numel`), and once its sub-arrays and residuals (:func:`bytes_per_example`). :func:`choose_blocks`
turns a memory budget into a :class:`BlockChoice`; ``torch_glue.fit_to_memory`` then checks the compiled first tile
against XLA's own plan and shrinks it. No JAX here: auto and the API ask it before anything is converted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from torchntk._activations import activation_numel
from torchntk._problem import NTKProblem
from torchntk._tiles import TileOptions, chunk_for_memory, memory_budget, tile_bytes

# Bytes per example, in units of Y entries: per cotangent row (the row's ∂f/∂y^k, a few copies while XLA runs),
# and once (sub-arrays, e.g. a convolution's input patches, and the forward's residuals).
_COTANGENT_COPIES = 4
_FIXED_COPIES = 12
# Cotangent rows per block that auto-sized blocking aims for before it shrinks the chunk of examples instead, where
# blocks of a free axis meet every block of the other side.
_TARGET_ROWS = 64
# Where blocks meet only their match (traced or diagonal), a larger chunk saves building each example's cotangents
# again in every tile of its row, and a smaller block costs one forward pass more per block (counted as this many
# cotangent rows of work); blocks keep at least _MATCHING_MIN_ROWS rows. resnet18 at 224×224, O = 1000 traced,
# N = 8 at 16 GB: 1 example × 130 rows before (each example's 1000 rows built in 8 tiles), now 8 × 13.
_BLOCK_FORWARD_ROWS = 1.0
_MATCHING_MIN_ROWS = 8


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

    Where blocks meet only their match (:func:`blocks_match`: a traced or diagonal output axis), the chunk of least
    work by :func:`_matching_chunk` (the whole batch where it fits). Otherwise unblocked when one example pair fits;
    else the largest chunk that holds ``_TARGET_ROWS`` rows (larger chunks repeat less per-example work: every tile
    recomputes its two sides' ingredients). Then the most rows that chunk allows.
    Raises the tiles' clear ``ValueError`` when even one row of one pair does not fit.
    """
    out = problem.out_size
    activations = activation_numel(problem)

    def bytes_for(rows: int | None) -> float:
        return bytes_per_example(problem, rows, activations)

    least = minimum_rows_for(problem)
    if rows is not None:
        rows = max(least, min(rows, out))
        chunk = options.chunk_size or chunk_for_memory(problem, bytes_for(rows), options.max_memory)
        return BlockChoice(chunk, rows, bytes_for(rows))
    whole = bytes_for(None)
    budget = memory_budget(problem, options.max_memory)
    per_row = bytes_for(1) - bytes_for(0)

    def rows_that_fit(chunk: int) -> int:
        """The most rows whose tile of ``chunk`` examples per side fits (tile_bytes is linear in the per-example
        bytes); negative where not even the rows' fixed part does."""
        return int((budget - tile_bytes(problem, bytes_for(0), chunk)) / chunk // per_row)

    if options.chunk_size:
        chunk = options.chunk_size
    elif blocks_match(problem) and (matching := _matching_chunk(problem, out, least, rows_that_fit)) is not None:
        chunk = matching
    elif tile_bytes(problem, whole, 1) <= budget:
        return BlockChoice(chunk_for_memory(problem, whole, options.max_memory), out, whole)
    else:
        chunk_for_memory(problem, bytes_for(least), options.max_memory)  # the clear error
        target = max(least, min(out, target_rows(problem)))
        target_bytes = bytes_for(target)
        fits = tile_bytes(problem, target_bytes, 1) <= budget
        chunk = chunk_for_memory(problem, target_bytes, options.max_memory) if fits else 1
    rows = even_rows(out, least, max(least, min(out, rows_that_fit(chunk))))
    return BlockChoice(chunk, rows, bytes_for(rows))


def _plan(problem: NTKProblem, rows: int) -> Any:
    """How one example's output is blocked at ``rows`` rows per block (``output_blocks.BlockPlan``)."""
    from torchntk.bridge.output_blocks import plan_blocks

    shape = (1, *problem.out_shape)
    return plan_blocks(shape, shape, problem.trace_axes, problem.diagonal_axes, True, rows)


def blocks_match(problem: NTKProblem) -> bool:
    """Whether output blocks meet only their match (blocked along a traced or diagonal axis), not every block of the
    other side (a free axis)."""
    return _plan(problem, minimum_rows_for(problem)).mode in ("trace", "diagonal")


def target_rows(problem: NTKProblem) -> int:
    """Rows per block that auto-sized blocking keeps before it takes fewer examples per tile."""
    return _MATCHING_MIN_ROWS if blocks_match(problem) else _TARGET_ROWS


def _matching_chunk(problem: NTKProblem, out: int, least: int, rows_that_fit: Callable[[int], int]) -> int | None:
    """The chunk of least work for blocks that meet only their match, or ``None`` where not even one example holds
    ``_MATCHING_MIN_ROWS`` rows (``least``: one row of the blocked axis). ``k = ⌈N/chunk⌉`` chunks build each
    example's cotangents about ``k`` times (once per tile of its row), in blocks of the most rows ``chunk`` allows
    (``rows_that_fit``, evened: :func:`even_rows`), each block adding a forward pass: work ∝
    ``k·blocks·(rows + _BLOCK_FORWARD_ROWS)``. Ties go to the larger chunk."""
    every = max(problem.n1, problem.n2)
    floor = min(out, _MATCHING_MIN_ROWS)
    if rows_that_fit(1) < floor:
        return None
    best, least_work = None, math.inf
    for k in range(1, every + 1):
        if k * (out + _BLOCK_FORWARD_ROWS) >= least_work:  # no larger k does less
            break
        chunk = -(-every // k)
        fit = min(out, rows_that_fit(chunk))
        if fit < floor:
            continue
        rows = even_rows(out, least, fit)
        work = k * -(-out // rows) * (rows + _BLOCK_FORWARD_ROWS)
        if work < least_work:
            best, least_work = chunk, work
    return best


def even_rows(out: int, least: int, rows: int) -> int:
    """``rows`` per block made as even as the block count allows (``⌈O/b⌉`` blocks of about equal size, in whole
    rows of the blocked axis, ``least`` rows each): the last block is padded with fewer zero rows (O = 10 in blocks
    of 8: two blocks of 5, not 8 and a padded 8)."""
    length, size = out // least, max(1, rows // least)
    blocks = -(-length // size)
    return -(-length // blocks) * least


def block_steps(problem: NTKProblem, choice: BlockChoice) -> int:
    """Iterations of the output-block loop of one tile (blocks along a traced/diagonal axis, else block pairs)."""
    plan = _plan(problem, choice.rows)
    if plan.mode in ("whole", "trace", "diagonal"):
        return plan.count1
    return plan.count1 * (plan.count1 + 1) // 2 if problem.x2 is None else plan.count1 * plan.count2
