"""Kernel layout shared by every NTK path: trace and diagonal axes, subscripts, shapes.

The kernel of outputs ``f1`` of shape ``(N1, *out)`` and ``f2`` of shape ``(N2, *out)`` has, for each output axis
``i`` (axis 0 is the batch axis) in order:

- two axes ``(d1_i, d2_i)`` when ``i`` is neither traced nor diagonal (the two output shapes interleaved, as in
  neural-tangents: outputs ``(N, O)`` give a ``(N1, N2, O, O)`` kernel);
- one axis ``d_i`` when ``i`` is in ``diagonal_axes`` (only ``Θ[..., a, a, ...]`` is kept);
- no axis when ``i`` is in ``trace_axes``: the axis is contracted and *averaged* (divided by its size), following
  neural-tangents' documented semantics, not summed as in the PyTorch NTK tutorial.
"""

from __future__ import annotations

import math
import operator
import string
from collections.abc import Iterable, Sequence
from typing import Any

import torch

_LETTERS = string.ascii_letters


def _integer(axis: Any) -> int | None:
    """``axis`` as an int when it is one (a Python, NumPy or 0-d integer tensor's), else ``None`` (a bool is not)."""
    if isinstance(axis, bool) or (isinstance(axis, torch.Tensor) and axis.dtype == torch.bool):
        return None
    try:
        return operator.index(axis)
    except TypeError:
        return None


def _as_tuple(axes: Any) -> tuple[Any, ...]:
    if axes is None:
        return ()
    if _integer(axes) is not None:
        return (axes,)
    if isinstance(axes, torch.Tensor) and axes.ndim == 0:
        return (axes,)  # refused below, by its dtype
    try:
        return tuple(axes)
    except TypeError:
        raise TypeError(f"axes must be an integer or a tuple of integers, got {axes!r}; pass e.g. (-1,).") from None


def canonicalize_axes(
    ndim: int,
    trace_axes: int | Iterable[int] | None = (),
    diagonal_axes: int | Iterable[int] | None = (),
    *,
    batch_axis: bool = True,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validate ``trace_axes`` and ``diagonal_axes`` for outputs of ``ndim`` axes; return them sorted, non-negative.

    ``ndim`` counts every axis of the (batched) output, the batch axis 0 included. With ``batch_axis=True``
    tracing axis 0 is refused (average the ``diagonal_axes=(0,)`` kernel instead).
    """
    trace, diag = _as_tuple(trace_axes), _as_tuple(diagonal_axes)
    given_trace = trace
    canonical = []
    for name, axes in (("trace_axes", trace), ("diagonal_axes", diag)):
        out = []
        for given in axes:
            axis = _integer(given)
            if axis is None:
                raise TypeError(f"{name} must hold integers, got {given!r}; pass e.g. {name}=(-1,).")
            if not -ndim <= axis < ndim:
                raise ValueError(
                    f"{name} holds axis {axis}, out of range for an output with {ndim} axes "
                    f"(batch axis included); use axes in [{-ndim}, {ndim - 1}]."
                )
            out.append(axis % ndim)
        if len(set(out)) != len(out):
            raise ValueError(f"{name}={axes} repeats an axis; list each axis once.")
        canonical.append(tuple(sorted(out)))
    trace, diag = canonical
    both = set(trace) & set(diag)
    if both:
        raise ValueError(
            f"axes {sorted(both)} are in both trace_axes and diagonal_axes; an axis is either traced or diagonal."
        )
    if batch_axis and 0 in trace:
        raise ValueError(
            f"trace_axes={given_trace} holds the batch axis 0 (axes count from the batch axis of the output, which "
            f"has {ndim} axes: {-ndim} is the batch axis); trace output axes only, or compute with "
            "diagonal_axes=(0,) and average over it instead."
        )
    return trace, diag


def kernel_subscripts(
    ndim: int, trace_axes: Sequence[int], diagonal_axes: Sequence[int], *, offset: int = 0
) -> tuple[str, str, str]:
    """Einsum letters ``(f1_axes, f2_axes, kernel_axes)`` for outputs of ``ndim`` axes (canonical axes).

    Traced and diagonal axes share one letter between ``f1`` and ``f2``; traced ones are absent from the kernel.
    Letters are taken from position ``offset`` on (2 per axis), so a caller can reserve others.
    """
    if offset + 2 * ndim > len(_LETTERS):
        raise ValueError(f"outputs with {ndim} axes are too many for an einsum; flatten some output axes first.")
    first, second, result = [], [], []
    for axis in range(ndim):
        a, b = _LETTERS[offset + 2 * axis], _LETTERS[offset + 2 * axis + 1]
        if axis in trace_axes:
            first.append(a), second.append(a)
        elif axis in diagonal_axes:
            first.append(a), second.append(a), result.append(a)
        else:
            first.append(a), second.append(b), result.extend((a, b))
    return "".join(first), "".join(second), "".join(result)


def spare_letters(ndim: int, count: int, *, offset: int = 0) -> str:
    """``count`` einsum letters unused by :func:`kernel_subscripts` with the same ``ndim`` and ``offset``."""
    used = offset + 2 * ndim
    if used + count > len(_LETTERS):
        raise ValueError(f"outputs with {ndim} axes leave too few einsum letters; flatten some output axes first.")
    return _LETTERS[used : used + count]


def kernel_shape(
    shape1: Sequence[int], shape2: Sequence[int], trace_axes: Sequence[int], diagonal_axes: Sequence[int]
) -> tuple[int, ...]:
    """Shape of the kernel between outputs of shapes ``shape1`` and ``shape2`` (canonical axes)."""
    if len(shape1) != len(shape2):
        raise ValueError(f"outputs of different ranks {tuple(shape1)} and {tuple(shape2)} have no kernel.")
    out = []
    for axis, (d1, d2) in enumerate(zip(shape1, shape2, strict=True)):
        if (axis in trace_axes or axis in diagonal_axes) and d1 != d2:
            kind = "traced" if axis in trace_axes else "diagonal"
            raise ValueError(f"{kind} axis {axis} has sizes {d1} and {d2}; a {kind} axis needs equal sizes.")
        if axis in diagonal_axes:
            out.append(d1)
        elif axis not in trace_axes:
            out.extend((d1, d2))
    return tuple(out)


def trace_size(shape: Sequence[int], trace_axes: Sequence[int]) -> int:
    """Number of entries averaged over by the traced axes (1 when nothing is traced)."""
    return math.prod(shape[axis] for axis in trace_axes)


def full_kernel_subscripts(
    ndim: int, trace_axes: Sequence[int], diagonal_axes: Sequence[int], *, paired_batch: bool = False
) -> str:
    """Einsum ``'full->kernel'`` that reduces a full interleaved kernel ``(N1, N2, d1, d1', ...)`` to the kernel.

    With ``paired_batch=True`` the input holds one batch axis ``(N, d1, d1', ...)`` (example ``n`` of ``x1``
    against example ``n`` of ``x2``; axis 0 must then be diagonal). Divide the result by :func:`trace_size`.
    """
    first, second, result = kernel_subscripts(ndim, trace_axes, diagonal_axes)
    if not paired_batch:
        full = "".join(a + b for a, b in zip(first, second, strict=True))
    elif 0 not in diagonal_axes:
        raise ValueError("a paired batch needs the batch axis 0 in diagonal_axes.")
    else:
        full = first[0] + "".join(a + b for a, b in zip(first[1:], second[1:], strict=True))
    return f"{full}->{result}"


def swap_kernel_sides(ndim: int, trace_axes: Sequence[int], diagonal_axes: Sequence[int]) -> tuple[int, ...]:
    """Permutation of kernel axes that turns ``Θ(x1, x2)`` into ``Θ(x2, x1)`` (each interleaved pair swapped)."""
    perm, position = [], 0
    for axis in range(ndim):
        if axis in trace_axes:
            continue
        if axis in diagonal_axes:
            perm.append(position)
            position += 1
        else:
            perm.extend((position + 1, position))
            position += 2
    return tuple(perm)
