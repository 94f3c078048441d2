"""``x2=None``: the symmetric kernel of one batch of examples from its upper triangle of example blocks.

The pair contraction of structured derivatives costs ``N1·N2`` times one pair's work. When both sides are the same
examples, ``Θ[b, a] = Θ[a, b]ᵀ`` (sides swapped), so the ``N`` examples are split into ``B`` equal blocks and only
the ``B(B+1)/2`` pairs of blocks ``p ≤ q`` are contracted — ``(B+1)/(2B)`` of the work: 0.75 for ``B = 2``, 0.625
for ``B = 4`` — and the others mirrored.

The pairs are unrolled with static slices, which XLA folds into the dots (no copies). A ``jax.lax.scan`` over the
pairs would compile one block contraction only, but measured slower than no blocking at all (FCN W=1024, O=100,
N=8: 42.6 vs 39.7 ms for B=4; unrolled: 25.0 ms) — its dynamic slices copy and the kernel carried through the loop
is updated block by block. Unrolling multiplies the contraction program by ``B(B+1)/2``, so ``B`` is bounded by
the program's size (:data:`MOST_CONTRACTIONS`): deep networks, whose compile time matters most, keep one block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

Array = Any

#: The most blocks: beyond it the blocks' dots get small for a saving that tends to one half only slowly.
MOST_BLOCKS = 4
#: The most contractions (einsums) the unrolled symmetric program may hold: its compile time grows with them.
MOST_CONTRACTIONS = 40


def block_count(count: int, contractions_per_pair: int) -> int:
    """Blocks for the symmetric kernel of ``count`` examples whose pair contraction holds
    ``contractions_per_pair`` einsums: the largest ``B ≤ MOST_BLOCKS`` dividing ``count`` that keeps the unrolled
    program within :data:`MOST_CONTRACTIONS` (1: no blocking)."""
    for blocks in range(min(MOST_BLOCKS, count), 1, -1):
        if count % blocks == 0 and blocks * (blocks + 1) // 2 * contractions_per_pair <= MOST_CONTRACTIONS:
            return blocks
    return 1


def symmetric_kernels(
    count: int,
    blocks: int,
    take: Callable[[int, int], Any],
    contract: Callable[[Any, Any], list[Array]],
    mirrors: list[tuple[int, ...]],
) -> list[Array]:
    """The kernels (one per output leaf, batch axes first: ``-> list[Array[N, N, ...]]``) of a batch with itself
    from ``blocks`` equal blocks of examples.

    ``take(start, size)`` returns the ingredients of examples ``start .. start+size``, ``contract(a, b)`` the
    kernels between two such blocks, ``mirrors[leaf]`` the permutation of kernel axes that swaps the two sides
    (:func:`torchntk._axes.swap_kernel_sides`).
    """
    if blocks == 1:
        whole = take(0, count)
        return contract(whole, whole)
    size = count // blocks
    parts = {
        (p, q): contract(take(p * size, size), take(q * size, size)) for p in range(blocks) for q in range(p, blocks)
    }
    kernels = []
    for leaf, mirror in enumerate(mirrors):
        rows = [
            jnp.concatenate(
                [parts[p, q][leaf] if q >= p else jnp.transpose(parts[q, p][leaf], mirror) for q in range(blocks)],
                axis=1,
            )
            for p in range(blocks)
        ]
        kernels.append(jnp.concatenate(rows, axis=0))
    return kernels
