"""Structured derivatives through a rolled ``scan``: a network's repeated blocks kept as one loop.

A scan that takes parameters as ``x`` slices (one slice per iteration, each read by nothing else:
:func:`torchntk.bridge.cotangents.find_uses`) holds one use of a distinct parameter per iteration and body equation.
Its ingredients are those of the unrolled program, stacked along a leading axis of iterations: the perturbations
``δ`` are ``x`` slices of one more input, the values the rules read are ``y`` slices of one more output, and each
rule runs once, in a loop over the iterations. The contraction sums over that axis
(:func:`torchntk.bridge.structured.contract`), pairing only the uses of one iteration: the same parameter slice.
What XLA compiles is the body once, not once per block: a ConvNeXt stage of 27 blocks is one loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from torchntk.bridge.jaxpr_tools import Const, Eqn, evaluate
from torchntk.bridge.rules import use_ingredients
from torchntk.bridge.structure import Structure

Array = Any


def run_perturbed(
    scan: Eqn, args: Sequence[Any], deltas: dict[tuple[int, int], Array], needed: Sequence[int]
) -> tuple[list[Any], dict[int, Array]]:
    """Run ``scan`` on ``args`` with ``deltas[(index, out)]`` (``[L, *y]``, one slice per iteration) added to output
    ``out`` of its body's equation ``index``; return the scan's outputs and the body values ``needed`` of every
    iteration (``id -> [L, *v]``)."""
    consts, carries = scan.params["num_consts"], scan.params["num_carry"]
    keys = list(deltas)

    def step(carry: list[Any], sliced: tuple[list[Any], list[Array]]) -> tuple[list[Any], tuple[list, list]]:
        xs, ds = sliced
        added = dict(zip(keys, ds, strict=True))

        def add(index: int, outs: list[Any]) -> list[Any]:
            return [o + added[(index, j)] if (index, j) in added else o for j, o in enumerate(outs)]

        outs, env = evaluate(scan.body, [*args[:consts], *carry, *xs], add)
        new_carry = [jnp.asarray(o, jnp.result_type(c)) for o, c in zip(outs[:carries], carry, strict=True)]
        return new_carry, (outs[carries:], [env[v] for v in needed])

    first = [jnp.asarray(c) for c in args[consts : consts + carries]]
    sliced = (list(args[consts + carries :]), [deltas[k] for k in keys])
    carry, (ys, kept) = jax.lax.scan(step, first, sliced, length=scan.params["length"], reverse=scan.params["reverse"])
    return [*carry, *ys], dict(zip(needed, kept, strict=True))


def needed_values(scan: Eqn, body_eqns: Sequence[int]) -> list[int]:
    """The body values the rules of these body equations read that change per iteration (not the body's consts)."""
    body = scan.body
    return sorted({a for i in body_eqns for a in body.eqns[i].inputs if isinstance(a, int) and a not in body.consts})


def body_uses(
    scan: Eqn, uses: Sequence[tuple[int, int, int]], kept: dict[int, Array], cts: Sequence[Array], rows: int
) -> list[tuple[Structure, tuple[int, ...], Array, Array]]:
    """Per use ``(eqn, arg, out)`` — input ``arg`` of body equation ``eqn`` of ``scan``, output ``out`` — its
    structure, θ's shape (one iteration's), sub-arrays ``[L, *sub]`` and pulled-back cotangents ``[L, R, *y']``
    (tiled axes summed), from the stacked body values ``kept`` and each site's cotangents ``cts`` (``[R, L, *y]``).

    One loop over the iterations for all the uses, not a vmap: vmapped, a convolution's rule batches its weights and
    inputs into one grouped convolution, which XLA:CPU runs several times slower (resnet50's ingredients 0.23 →
    0.87 s); and one loop per use compiled one while loop each (resnet50: 48)."""
    body = scan.body
    found: list[tuple[Structure, tuple[int, ...]]] = []

    def one_iteration(sliced: tuple[dict[int, Array], list[Array]]) -> tuple[list[Array], list[Array]]:
        values, rows_of = sliced
        found.clear()  # traced once; cleared so that a second trace does not append twice
        subs, pulled = [], []
        for (index, arg, out), ct_rows in zip(uses, rows_of, strict=True):
            inputs = tuple(
                a.value if isinstance(a, Const) else body.consts[a] if a in body.consts else values[a]
                for a in body.eqns[index].inputs
            )
            structure, theta_shape, sub, back = use_ingredients(body, index, inputs, arg, out, ct_rows, rows)
            found.append((structure, theta_shape))
            subs.append(sub)
            pulled.append(back)
        return subs, pulled

    subs, pulled = jax.lax.map(one_iteration, (dict(kept), [jnp.moveaxis(ct, 1, 0) for ct in cts]))
    return [(*facts, sub, back) for facts, sub, back in zip(found, subs, pulled, strict=True)]
