"""Output blocking: the structured NTK with the output cotangents of a block of ``b`` rows at a time.

The cotangents ∂f/∂y^k of every parameter-consuming primitive take ``rows · Y`` entries per example, where
``rows`` is the number of outputs per example: for 1000 classes and a ResNet at 224×224, gigabytes per example.
Blocking runs along one per-example output axis of size ``d`` (:func:`plan_blocks` picks it), in ``⌈d/b⌉`` blocks
of ``b`` rows (a last block past the end is padded with zero rows, its kernel entries dropped):

- along a **traced** axis the kernel is the sum over matching blocks, along a **diagonal** axis their
  concatenation: each block of each side is computed exactly once (plus one forward pass per block);
- along a **free** axis every pair of blocks ``(i, j)`` is needed. The loop runs over the pairs ordered by ``i``,
  keeping ``x1``'s block ``i`` while ``x2``'s blocks are recomputed: ``x2``'s cotangent work is ``⌈d/b⌉`` times
  that of one pass. With ``x2=None`` only the pairs ``j ≥ i`` are computed and the others mirrored.

The loops are ``jax.lax.scan`` loops, so XLA holds one block's cotangents per side at a time, and the program
size does not grow with the number of blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from torchntk._axes import kernel_shape, swap_kernel_sides

Array = Any


@dataclass(frozen=True)
class BlockPlan:
    """How one output leaf's kernel is blocked.

    ``axis``: the blocked output axis (numbered as in the batched output, ``None``: nothing to block), of sizes
    ``d1``/``d2`` on the two sides, in blocks of ``size`` rows (``count1``/``count2`` blocks).
    """

    shape1: tuple[int, ...]
    shape2: tuple[int, ...]
    trace: tuple[int, ...]
    diag: tuple[int, ...]
    batched: bool
    axis: int | None
    size: int

    @property
    def ndim(self) -> int:
        return len(self.shape1)

    @property
    def example_axis(self) -> int | None:
        """The blocked axis numbered per example (the batch axis removed)."""
        return None if self.axis is None else self.axis - self.batched

    @property
    def count1(self) -> int:
        return 1 if self.axis is None else -(-self.shape1[self.axis] // self.size)

    @property
    def count2(self) -> int:
        return 1 if self.axis is None else -(-self.shape2[self.axis] // self.size)

    @property
    def blocked(self) -> bool:
        return self.count1 > 1 or self.count2 > 1

    @property
    def mode(self) -> str:
        if not self.blocked:
            return "whole"
        return "trace" if self.axis in self.trace else "diagonal" if self.axis in self.diag else "free"

    def _blocked_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.axis is None:
            return shape
        return tuple(self.size if a == self.axis else n for a, n in enumerate(shape))

    @property
    def block_kernel_shape(self) -> tuple[int, ...]:
        """Kernel shape of one pair of blocks."""
        return kernel_shape(self._blocked_shape(self.shape1), self._blocked_shape(self.shape2), self.trace, self.diag)

    @property
    def kernel_position(self) -> int:
        """Position of the blocked axis' (first) kernel axis."""
        return sum(0 if a in self.trace else 1 if a in self.diag else 2 for a in range(self.axis))


def rows_per_example(shape: tuple[int, ...], batched: bool) -> int:
    """Output entries per example of an output leaf of (batched) ``shape``."""
    return math.prod(shape[1:] if batched else shape)


def plan_blocks(
    shape1: tuple[int, ...],
    shape2: tuple[int, ...],
    trace: tuple[int, ...],
    diag: tuple[int, ...],
    batched: bool,
    output_block: int | None,
) -> BlockPlan:
    """Choose the blocked axis and block size so that at most ``output_block`` rows per example exist at once.

    Traced and diagonal axes are preferred (their blocks are never recomputed), then the largest axis. When even a
    block of one row along that axis exceeds ``output_block`` rows (other axes too large) the block has one row:
    ``minimum_rows`` says what that holds.
    """
    candidates = [a for a in range(1 if batched else 0, len(shape1)) if max(shape1[a], shape2[a]) > 1]
    rows = max(rows_per_example(shape1, batched), rows_per_example(shape2, batched))
    if output_block is None or rows <= output_block or not candidates:
        return BlockPlan(shape1, shape2, trace, diag, batched, None, 1)
    axis = max(candidates, key=lambda a: (a in trace or a in diag, max(shape1[a], shape2[a])))
    others = rows // max(shape1[axis], shape2[axis])
    return BlockPlan(shape1, shape2, trace, diag, batched, axis, max(1, output_block // others))


def minimum_rows(shape: tuple[int, ...], trace: tuple[int, ...], diag: tuple[int, ...], batched: bool) -> int:
    """Fewest cotangent rows per example that blocking can reach for an output leaf of (batched) ``shape``."""
    plan = plan_blocks(shape, shape, trace, diag, batched, 1)
    if plan.axis is None:
        return rows_per_example(shape, batched)
    return rows_per_example(shape, batched) // shape[plan.axis]


def blocked_kernel(
    plan: BlockPlan,
    side1: Callable[[Any], Any],
    side2: Callable[[Any], Any] | None,
    contract: Callable[[Any, Any], Array],
    dtype: Any,
) -> Array:
    """The kernel of one output leaf, block by block (see the module docstring).

    ``side1(start)`` / ``side2(start)`` return the cotangents of the block of rows ``start .. start+size`` along the
    blocked axis (``side2=None``: ``x2`` is ``x1``, the kernel is symmetric); ``contract(c1, c2)`` turns two blocks
    into their kernel block of shape ``plan.block_kernel_shape`` and ``dtype``.
    """
    symmetric = side2 is None
    side2 = side1 if side2 is None else side2
    if plan.mode == "whole":
        first = side1(0)
        return contract(first, first if symmetric else side2(0))
    b = plan.size
    if plan.mode in ("trace", "diagonal"):

        def matching(total: Array, i: Array) -> tuple[Array, Array | None]:
            c1 = side1(i * b)
            block = contract(c1, c1 if symmetric else side2(i * b))
            return (total + block, None) if plan.mode == "trace" else (total, block)

        zero = jnp.zeros(plan.block_kernel_shape if plan.mode == "trace" else (), dtype)
        total, stacked = jax.lax.scan(matching, zero, jnp.arange(plan.count1))
        if plan.mode == "trace":
            return total
        p = plan.kernel_position
        merged = jnp.moveaxis(stacked, 0, p)
        merged = merged.reshape(*merged.shape[:p], -1, *merged.shape[p + 2 :])
        return jax.lax.slice_in_dim(merged, 0, plan.shape1[plan.axis], axis=p)
    return _free_kernel(plan, side1, side2, contract, symmetric, dtype)


def _free_kernel(
    plan: BlockPlan, side1: Callable, side2: Callable, contract: Callable, symmetric: bool, dtype: Any
) -> Array:
    """All pairs of blocks along a free axis, ordered by ``x1``'s block, which is kept while it does not change."""
    b, p = plan.size, plan.kernel_position
    pairs = [(i, j) for i in range(plan.count1) for j in range(plan.count2) if not (symmetric and j < i)]
    first_index, second_index = (jnp.asarray(v, jnp.int32) for v in zip(*pairs, strict=True))
    padded = list(kernel_shape(plan.shape1, plan.shape2, plan.trace, plan.diag))
    padded[p], padded[p + 1] = plan.count1 * b, plan.count2 * b
    mirror = swap_kernel_sides(plan.ndim, plan.trace, plan.diag)
    first_block = side1(0)

    def step(carry: tuple[Array, Array, Any], ij: tuple[Array, Array]) -> tuple[tuple[Array, Array, Any], None]:
        kernel, held, c1 = carry
        i, j = ij
        c1 = jax.lax.cond(i == held, lambda: c1, lambda: side1(i * b))
        block = contract(c1, side2(j * b))
        at = [jnp.zeros((), jnp.int32)] * kernel.ndim
        at[p], at[p + 1] = i * b, j * b
        kernel = jax.lax.dynamic_update_slice(kernel, block.astype(kernel.dtype), at)
        if symmetric:
            at[p], at[p + 1] = j * b, i * b
            kernel = jax.lax.dynamic_update_slice(kernel, jnp.transpose(block, mirror).astype(kernel.dtype), at)
        return (kernel, i, c1), None

    init = (jnp.zeros(padded, dtype), jnp.asarray(0, jnp.int32), first_block)
    (kernel, _, _), _ = jax.lax.scan(step, init, (first_index, second_index))
    kernel = jax.lax.slice_in_dim(kernel, 0, plan.shape1[plan.axis], axis=p)
    return jax.lax.slice_in_dim(kernel, 0, plan.shape2[plan.axis], axis=p + 1)
