"""Shape and data-movement ONNX ops: constants, shapes, reshapes, slicing, indexing, concatenation, padding.

Shape-carrying inputs (Reshape targets, Slice bounds, axes, pads, repeats) must be static; they are read
with :func:`static_ints`, which explains the fix when an exporter left them data-dependent.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from ._core import Node, Value, axes_from, is_static, normalize_axes, register, static, static_ints, where, xp
from ._indexing import gather_nd_static, scatter_nd_static, scatter_nd_traced, slice_static, take_static


@register("Constant")
def constant(node: Node) -> np.ndarray:
    for key in ("value", "sparse_value"):
        if key in node.attrs:
            return np.asarray(node.attrs[key])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32)):
        if key in node.attrs:
            return np.asarray(node.attrs[key], dtype)
    for key in ("value_int", "value_ints"):
        if key in node.attrs:
            return np.asarray(node.attrs[key], np.int64)
    raise node.unsupported(f"constant attribute {sorted(node.attrs)} (string constants cannot become JAX arrays)")


@register("ConstantOfShape")
def constant_of_shape(node: Node, shape: Value) -> np.ndarray:
    value = node.attr("value", np.zeros(1, np.float32))
    return np.full(static_ints(node, shape, "shape input"), value.reshape(-1)[0], dtype=value.dtype)


@register("Shape")
def shape_of(node: Node, x: Value) -> np.ndarray:
    return np.asarray(np.shape(x), np.int64)[node.attr("start", 0) : node.attr("end")]


@register("Size")
def size_of(node: Node, x: Value) -> np.ndarray:
    return np.asarray(np.size(x), np.int64)


@register("Range")
def range_(node: Node, start: Value, limit: Value, delta: Value) -> np.ndarray:
    start, limit, delta = (static(node, v, "start/limit/delta") for v in (start, limit, delta))
    return np.arange(start, limit, delta, dtype=start.dtype)


@register("Reshape")
def reshape(node: Node, x: Value, shape: Value) -> Value:
    target = static_ints(node, shape, "target shape")
    if not node.attr("allowzero", 0):  # 0 copies the input's dimension unless allowzero is set
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return xp(x).reshape(x, target)


@register("Flatten")
def flatten(node: Node, x: Value) -> Value:
    axis = normalize_axes([node.attr("axis", 1)], x.ndim)[0]
    return xp(x).reshape(x, (int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:]))))


@register("Transpose")
def transpose(node: Node, x: Value) -> Value:
    return xp(x).transpose(x, node.attr("perm", list(range(x.ndim))[::-1]))


@register("Squeeze")
def squeeze(node: Node, x: Value, axes: Value = None) -> Value:
    axes = axes_from(node, axes, 13)
    axes = [i for i, d in enumerate(x.shape) if d == 1] if axes is None else normalize_axes(axes, x.ndim)
    return xp(x).reshape(x, [d for i, d in enumerate(x.shape) if i not in axes])


@register("Unsqueeze")
def unsqueeze(node: Node, x: Value, axes: Value = None) -> Value:
    axes = axes_from(node, axes, 13)
    shape = list(x.shape)
    axes = normalize_axes(axes, x.ndim + len(axes))
    for axis in sorted(axes):
        shape.insert(axis, 1)
    return xp(x).reshape(x, shape)


@register("Concat")
def concat(node: Node, *values: Value) -> Value:
    return xp(*values).concatenate(values, axis=node.attr("axis"))


@register("Split")
def split(node: Node, x: Value, sizes: Value = None) -> list[Value]:
    axis = normalize_axes([node.attr("axis", 0)], x.ndim)[0]
    n, count = x.shape[axis], len(node.outputs)
    sizes = node.attr("split") if node.opset < 13 else static_ints(node, sizes, "split sizes")
    if not sizes and node.attr("num_outputs") is not None:  # opset 18: the last chunk may be smaller
        chunk = -(-n // node.attr("num_outputs"))
        sizes = [min(chunk, n - i * chunk) for i in range(node.attr("num_outputs"))]
    sizes = sizes or [n // count] * count
    offsets = np.cumsum([0, *sizes])
    return [slice_static(x, axis, int(a), int(b), 1) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


@register("Slice")
def slice_(
    node: Node, x: Value, starts: Value = None, ends: Value = None, axes: Value = None, steps: Value = None
) -> Value:
    if node.opset < 10:
        starts, ends, axes, steps = node.attr("starts"), node.attr("ends"), node.attr("axes"), None
    else:
        starts, ends = static_ints(node, starts, "starts"), static_ints(node, ends, "ends")
        axes, steps = static_ints(node, axes, "axes"), static_ints(node, steps, "steps")
    axes = normalize_axes(axes if axes is not None else range(len(starts)), x.ndim)
    steps = steps or [1] * len(starts)
    for axis, start, end, step in zip(axes, starts, ends, steps, strict=True):
        x = slice_static(x, axis, start, end, step)
    return x


@register("Gather")
def gather(node: Node, x: Value, indices: Value) -> Value:
    axis = normalize_axes([node.attr("axis", 0)], x.ndim)[0]
    if is_static(indices):
        return take_static(x, np.asarray(indices), axis)
    indices = where(indices < 0, indices + x.shape[axis], indices)
    return jnp.take(x, indices, axis=axis)


@register("GatherND")
def gather_nd(node: Node, x: Value, indices: Value) -> Value:
    if node.attr("batch_dims", 0) != 0:
        raise node.unsupported("batch_dims != 0")
    if is_static(indices):
        return gather_nd_static(x, np.asarray(indices))
    index = tuple(jnp.moveaxis(indices, -1, 0))
    return jnp.asarray(x)[index]


@register("GatherElements")
def gather_elements(node: Node, x: Value, indices: Value) -> Value:
    """``torch.gather``: the output has the indices' shape, which may be smaller than ``x``'s on the other axes
    (take_along_axis broadcasts instead): ``x`` is cropped to it there first."""
    axis = normalize_axes([node.attr("axis", 0)], x.ndim)[0]
    m = xp(x, indices)
    crop = tuple(slice(None) if d == axis else slice(0, n) for d, n in enumerate(indices.shape))
    return m.take_along_axis(x[crop], where(indices < 0, indices + x.shape[axis], indices), axis=axis)


@register("Expand")
def expand(node: Node, x: Value, shape: Value) -> Value:
    target = np.broadcast_shapes(x.shape, tuple(static_ints(node, shape, "target shape")))
    return xp(x).broadcast_to(x, target)


@register("Tile")
def tile(node: Node, x: Value, repeats: Value) -> Value:
    return xp(x).tile(x, static_ints(node, repeats, "repeats"))


@register("Pad")
def pad(node: Node, x: Value, pads: Value = None, value: Value = None, axes: Value = None) -> Value:
    if node.opset < 11:
        pads, value = node.attr("pads"), node.attr("value", 0.0)
    else:
        pads = static_ints(node, pads, "pads")
    axes = normalize_axes(static_ints(node, axes, "axes") or range(x.ndim), x.ndim)
    widths = [(0, 0)] * x.ndim
    for i, axis in enumerate(axes):
        widths[axis] = (pads[i], pads[i + len(axes)])
    mode = node.attr("mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise node.unsupported(f"mode={mode!r}")
    fill = np.zeros((), x.dtype) if value is None else value
    if mode == "constant" and not is_static(x):
        # lax.pad takes negative widths (cropping) directly, as ONNX allows.
        fill = np.asarray(fill, x.dtype) if is_static(fill) else jnp.asarray(fill, x.dtype)
        return lax.pad(x, fill.reshape(()), [(a, b, 0) for a, b in widths])
    for axis, (a, b) in enumerate(widths):  # negative widths crop before padding
        x = slice_static(x, axis, max(-a, 0), x.shape[axis] - max(-b, 0), 1)
    options = {"constant_values": fill.reshape(())} if mode == "constant" else {}
    return xp(x, fill).pad(x, [(max(a, 0), max(b, 0)) for a, b in widths], mode=mode, **options)


@register("DepthToSpace", "SpaceToDepth")
def depth_space(node: Node, x: Value) -> Value:
    m, b = xp(x), node.attr("blocksize")
    n, c, h, w = x.shape
    if node.op_type == "SpaceToDepth":
        y = m.reshape(x, (n, c, h // b, b, w // b, b))
        return m.reshape(m.transpose(y, (0, 3, 5, 1, 2, 4)), (n, c * b * b, h // b, w // b))
    if node.attr("mode", "DCR") == "DCR":
        y = m.transpose(m.reshape(x, (n, b, b, c // (b * b), h, w)), (0, 3, 4, 1, 5, 2))
    else:
        y = m.transpose(m.reshape(x, (n, c // (b * b), b, b, h, w)), (0, 1, 4, 2, 5, 3))
    return m.reshape(y, (n, c // (b * b), h * b, w * b))


@register("Trilu")
def trilu(node: Node, x: Value, k: Value = None) -> Value:
    offset = 0 if k is None else static_ints(node, k, "k")[0]
    rows, cols = x.shape[-2:]
    keep = (
        np.triu(np.ones((rows, cols), bool), offset)
        if node.attr("upper", 1)
        else np.tril(np.ones((rows, cols), bool), offset)
    )
    return where(keep, x, np.zeros((), x.dtype))


@register("CumSum")
def cumsum(node: Node, x: Value, axis: Value) -> Value:
    m, axis = xp(x), normalize_axes(static_ints(node, axis, "axis"), x.ndim)[0]
    if node.attr("reverse", 0):
        x = m.flip(x, axis)
    y = m.cumsum(x, axis=axis, dtype=x.dtype)
    if node.attr("exclusive", 0):
        y = y - x
    return m.flip(y, axis) if node.attr("reverse", 0) else y


@register("ScatterND")
def scatter_nd(node: Node, data: Value, indices: Value, updates: Value) -> Value:
    reduction = node.attr("reduction", "none")
    if reduction not in ("none", "add"):
        raise node.unsupported(f"reduction={reduction!r} (only 'none' and 'add' are supported)")
    if not is_static(indices):
        return scatter_nd_traced(data, indices, updates, reduction)
    return scatter_nd_static(data, np.asarray(indices), updates, reduction)


@register("ScatterElements")
def scatter_elements(node: Node, data: Value, indices: Value, updates: Value) -> Value:
    """``torch.scatter`` / ``scatter_add`` along one axis, as the ScatterND that writes the same elements: each
    position ``p`` of ``indices`` addresses ``p`` with its ``axis`` coordinate replaced by ``indices[p]``."""
    reduction = node.attr("reduction", "none")
    if reduction not in ("none", "add"):
        raise node.unsupported(f"reduction={reduction!r} (only 'none' and 'add' are supported)")
    axis = normalize_axes([node.attr("axis", 0)], data.ndim)[0]
    m = xp(indices)
    shape = tuple(indices.shape)
    updates = updates[tuple(slice(0, n) for n in shape)]  # torch allows updates larger than the indices
    indices = where(indices < 0, indices + data.shape[axis], indices)
    grids = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    coordinates = [m.asarray(indices) if d == axis else grids[d].astype(indices.dtype) for d in range(len(shape))]
    coordinates = m.stack(coordinates, axis=-1)
    if is_static(coordinates) and reduction == "none":
        return scatter_nd_static(data, np.asarray(coordinates), updates, reduction)
    # adding: by a segment sum (the static path's 0/1 matrix is elements × writes: 8 GB at 64 × 128 per example)
    return scatter_nd_traced(data, jnp.asarray(coordinates), updates, reduction)
