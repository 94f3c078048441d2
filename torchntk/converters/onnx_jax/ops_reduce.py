"""ONNX reductions (Reduce*, ArgMax/ArgMin), whose axes moved from an attribute to an input across opsets."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ._core import Node, Value, axes_from, normalize_axes, register, where, xp
from .ops_elementwise import torch_abs


def _square_sum(m, x, **kw):  # noqa: ANN001, ANN202 - numpy/jax module and keyword passthrough
    return m.sum(x * x, **kw)


def _l2_norm(m, x, **kw):  # noqa: ANN001, ANN202
    """sqrt(sum x²) whose derivative at x = 0 is 0, as torch's linalg_vector_norm (not sqrt's 0 · inf = NaN).

    A zero vector is common: swin_v2 normalises the keys of zero-padded window tokens (no key bias).
    """
    squares = _square_sum(m, x, **kw)
    if m is np:
        return np.sqrt(squares)
    positive = squares > 0
    return where(positive, m.sqrt(where(positive, squares, 1.0)), 0.0)


_REDUCTIONS: dict[str, Callable[..., Value]] = {
    "ReduceSum": lambda m, x, **kw: m.sum(x, **kw),
    "ReduceMean": lambda m, x, **kw: m.mean(x, **kw),
    "ReduceMax": lambda m, x, **kw: m.max(x, **kw),
    "ReduceMin": lambda m, x, **kw: m.min(x, **kw),
    "ReduceProd": lambda m, x, **kw: m.prod(x, **kw),
    "ReduceSumSquare": _square_sum,
    "ReduceL1": lambda m, x, **kw: m.sum(torch_abs(x), **kw),
    "ReduceL2": _l2_norm,
    "ReduceLogSumExp": lambda m, x, **kw: m.log(m.sum(m.exp(x), **kw)),
}


# aten ops whose max/min has the derivative of the element their index picks, the first among ties (torch's
# max.dim and min.dim, and adaptive max pooling exported as max.dim: onnx_export): not split evenly among the
# ties, as amax and JAX's max.
_FIRST_OF_TIES = frozenset({"aten.max.dim", "aten.min.dim"})


def _first_extreme(m, x: Value, axes: tuple[int, ...], keepdims: bool, largest: bool) -> Value:  # noqa: ANN001
    """max/min over ``axes`` as the element argmax/argmin picks (the first in row-major order among ties)."""
    kept = x.ndim - len(axes)
    moved = m.moveaxis(x, axes, tuple(range(kept, x.ndim)))
    flat = moved.reshape(*moved.shape[:kept], -1)
    index = (m.argmax if largest else m.argmin)(flat, axis=-1)
    picked = m.take_along_axis(flat, index[..., None], axis=-1)[..., 0]
    return m.expand_dims(picked, axes) if keepdims else picked


@register(*_REDUCTIONS)
def reduce(node: Node, x: Value, axes: Value = None) -> Value:
    # ReduceSum takes axes as an input from opset 13, the other reductions from opset 18.
    axes = axes_from(node, axes, 13 if node.op_type == "ReduceSum" else 18)
    if not axes:
        if node.attr("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.ndim))
    axes = tuple(sorted(normalize_axes(axes, x.ndim)))
    keepdims = bool(node.attr("keepdims", 1))
    if node.op_type in ("ReduceMax", "ReduceMin") and node.aten in _FIRST_OF_TIES:
        return _first_extreme(xp(x), x, axes, keepdims, largest=node.op_type == "ReduceMax")
    return _REDUCTIONS[node.op_type](xp(x), x, axis=axes, keepdims=keepdims)


@register("ArgMax", "ArgMin")
def arg_extreme(node: Node, x: Value) -> Value:
    m, axis = xp(x), normalize_axes([node.attr("axis", 0)], x.ndim)[0]
    find = m.argmax if node.op_type == "ArgMax" else m.argmin
    if node.attr("select_last_index", 0):  # search the reversed axis, then map back
        index = x.shape[axis] - 1 - find(m.flip(x, axis), axis=axis)
    else:
        index = find(x, axis=axis)
    index = m.expand_dims(index, axis) if node.attr("keepdims", 1) else index
    return index.astype(np.int64) if m is np else index
