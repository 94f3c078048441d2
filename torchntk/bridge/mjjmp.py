"""The MJJMP (paper eq. 10–12): one 4-operand contraction per pair of uses of a parameter.

Operands ``(∂f1/∂y1, ∂y1/∂θ, ∂y2/∂θ, ∂f2/∂y2)``, the middle two in structured form (:mod:`.structure`). The
structures are encoded in einsum letters alone, so pairs of uses with different structures need no special case:

- each θ axis has one letter, shared by both sides;
- a ``y`` axis diagonal with θ axis ``b`` takes ``b``'s letter in its cotangent (constant-block-diagonal: the
  sub-array lacks ``b``, so it is contracted once between the cotangents; block-diagonal: the sub-array carries
  ``b`` too);
- a FREE ``y`` axis gets its own letter, shared by the cotangent and the sub-array;
- output block-tiled axes were summed out of the cotangent already;
- a θ axis that appears in no operand (input block-tiled on both sides) contributes its size as a factor.

When one side is structured along θ's axis ``b`` and the other is not, the shared letter yields exactly the
intersection of the two structures (paper §E.8). The contraction order is opt_einsum's.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import opt_einsum

from torchntk._axes import kernel_subscripts, spare_letters
from torchntk.bridge.cotangents import UseInfo
from torchntk.bridge.structure import FREE, TILED


def _side_subscripts(
    info: UseInfo, out_letters: str, theta_letters: str, fresh: list[str], batched: bool
) -> tuple[str, str]:
    """Subscripts of one side's cotangent and sub-array; consumes letters from ``fresh`` for FREE axes."""
    ct, sub_free = [], []
    for kind in info.structure.y_axes:
        if kind == TILED:
            continue
        if kind == FREE:
            letter = fresh.pop()
            ct.append(letter)
            sub_free.append(letter)
        else:
            ct.append(theta_letters[kind])
    sub = ([out_letters[0]] if batched else []) + sub_free
    sub += [theta_letters[b] for b in info.structure.carried_theta]
    return out_letters + "".join(ct), "".join(sub)


def pair_contraction(
    info1: UseInfo,
    info2: UseInfo,
    operands: tuple[Any, Any, Any, Any],
    *,
    out_ndim: int,
    trace_axes: tuple[int, ...],
    diagonal_axes: tuple[int, ...],
    batched: bool,
    stacked: bool = False,
) -> Any:
    """Θ[l, k1, k2] for uses ``info1`` (of x1) and ``info2`` (of x2) of the same parameter, *summed* (not averaged)
    over traced axes.

    ``operands = (ct1, sub1, sub2, ct2)``: cotangents ``(N1, *out, *y1')`` and sub-arrays ``(N1, *sub1)`` when
    ``batched`` (else without the ``N`` axes). Returns the kernel block ``-> Array[N1, N2, O, O, ...]`` in the
    layout of :mod:`torchntk._axes`. ``stacked``: every operand has a leading axis ``G`` of G pairs of uses with
    these same structures and shapes (of different parameters, e.g. the repeated blocks of a ResNet stage), summed:
    one contraction in the program instead of G.
    """
    if info1.theta_shape != info2.theta_shape:
        raise ValueError(
            f"a parameter has shapes {info1.theta_shape} and {info2.theta_shape} on the two sides of the kernel; "
            "x1 and x2 must trace to the same program (same per-example shapes)."
        )
    first, second, result = kernel_subscripts(out_ndim, trace_axes, diagonal_axes)
    theta_ndim = len(info1.theta_shape)
    n_free = sum(kind == FREE for kind in info1.structure.y_axes + info2.structure.y_axes)
    letters = spare_letters(out_ndim, theta_ndim + n_free + stacked)
    theta_letters, fresh = letters[:theta_ndim], list(letters[theta_ndim : theta_ndim + n_free])
    group = letters[-1] if stacked else ""
    ct1, sub1 = _side_subscripts(info1, first, theta_letters, fresh, batched)
    ct2, sub2 = _side_subscripts(info2, second, theta_letters, fresh, batched)
    used = set(ct1 + sub1 + sub2 + ct2)
    factor = math.prod(n for letter, n in zip(theta_letters, info1.theta_shape, strict=True) if letter not in used)
    indexed = (info1.structure.indexed, info2.structure.indexed)
    if indexed != (None, None):
        terms, operands = _indexed_terms(indexed, info1.theta_shape, theta_letters, group, (sub1, sub2), operands)
    else:
        terms = (f"{group}{sub1}", f"{group}{sub2}")
    spec = f"{group}{ct1},{','.join(terms)},{group}{ct2}->{result}"
    block = accurate_contract(spec, *operands)
    return block * factor if factor != 1 else block


def _indexed_terms(
    indexed: tuple[int | None, int | None],
    theta_shape: tuple[int, ...],
    theta_letters: str,
    group: str,
    subs: tuple[str, str],
    operands: tuple[Any, Any, Any, Any],
) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    """The middle terms and operands where a sub-array is indexed (:mod:`.structure`): two indexed along the same θ
    axis are contracted over it as one equality of their indices, ``[i1 == i2]`` (tokens × tokens where the one-hots
    were tokens × vocabulary each); a single one is built as its one-hot."""
    ct1, first, second, ct2 = operands
    size = theta_shape[indexed[0]] if indexed[0] is not None else 0
    # the equality has the ids of both sides (tokens × tokens), the one-hots each side's ids × the θ axis: the
    # smaller wins (swin's 2,401 relative positions in a table of 169 rows: the one-hots)
    stacked = first.shape[0] if group else 1  # the stack's axis is in both sides' sizes, once in the equality's
    equality_smaller = first.size * second.size // stacked <= (first.size + second.size) * size
    if indexed[0] is not None and indexed[0] == indexed[1] and equality_smaller:
        letter = theta_letters[indexed[0]]
        left, right = (group + term.replace(letter, "") for term in subs)
        target = left + "".join(dict.fromkeys(c for c in right if c not in left))  # a shared batch letter once
        lead = _on_letters(first, left, target)
        equal = (lead == _on_letters(second, right, target)) & (lead >= 0)  # -1: a row out of range, zeros
        return (target,), (ct1, equal.astype(ct1.dtype), ct2)
    built = [
        jax.nn.one_hot(sub, theta_shape[axis], dtype=ct1.dtype) if axis is not None else sub  # -1: zeros
        for sub, axis in zip((first, second), indexed, strict=True)
    ]
    return (f"{group}{subs[0]}", f"{group}{subs[1]}"), (ct1, *built, ct2)


#: The most terms one dot adds in sequence. XLA:CPU accumulates a float32 dot's terms one after another, so its
#: error grows like K·ε: 1.3e-3 relative for K = 2.4M (a kernel entry summed over a conv layer's θ and outputs),
#: where a reduction, summing in a tree, stays near 1e-6.
LONGEST_SUM = 1 << 14


def accurate_contract(spec: str, *operands: Any) -> Any:
    """``einsum(spec, *operands)`` in opt_einsum's optimal order, each pairwise step a dot that sums at most
    :data:`LONGEST_SUM` terms: a longer step keeps its largest summed axes in its output and sums them afterwards
    with a reduction (its intermediate grows by their size, only where the step's output is small)."""
    _, path = opt_einsum.contract_path(spec, *operands, optimize="optimal")
    arrays = list(operands)
    for indices, removed, step, _, _ in path.contraction_list:
        inputs = [arrays.pop(i) for i in sorted(indices, reverse=True)]
        sources, output = step.split("->")
        sizes = {
            letter: n
            for term, a in zip(sources.split(","), inputs, strict=True)
            for letter, n in zip(term, a.shape, strict=True)
        }
        kept = ""
        if len(inputs) == 2:
            longest = math.prod(sizes[letter] for letter in removed)
            for letter in sorted(removed, key=lambda letter: (-sizes[letter], letter)):  # the same in every process
                if longest <= LONGEST_SUM:
                    break
                kept += letter
                longest //= sizes[letter]
        result = jnp.einsum(f"{sources}->{output}{kept}", *inputs)
        arrays.append(result.sum(tuple(range(len(output), len(output) + len(kept)))) if kept else result)
    return arrays[0]


def _on_letters(array: Any, letters: str, target: str) -> Any:
    """``array`` (axes named ``letters``) with its axes in ``target``'s order and size-1 axes for the rest of
    ``target``: ready to broadcast against another array of ``target``'s letters."""
    ordered = [c for c in target if c in letters]
    moved = jnp.transpose(array, [letters.index(c) for c in ordered])
    return moved.reshape([array.shape[letters.index(c)] if c in letters else 1 for c in target])
