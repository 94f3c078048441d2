"""Neural-network ONNX ops in torch layout: convolutions, pooling, normalizations, matrix products, softmax.

Convolutions stay NCHW/OIHW (``lax.conv_general_dilated`` with ``feature_group_count``) so that the
linearized program contains the same convolutions as the torch model, without layout transposes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax

from ._core import Node, Value, is_static, normalize_axes, register, xp

Pads = list[tuple[int, int]]


def _spatial_pads(node: Node, spatial: Sequence[int], windows: Sequence[int], strides: Sequence[int]) -> Pads:
    """(low, high) padding per spatial axis from ``auto_pad``/``pads``; ``windows`` are dilated kernel extents."""
    auto_pad = node.attr("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, window, stride in zip(spatial, windows, strides, strict=True):
            total = max(0, (-(-size // stride) - 1) * stride + window - size)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if auto_pad == "SAME_UPPER" else (big, small))
        return pads
    if auto_pad == "VALID":
        return [(0, 0)] * len(spatial)
    if auto_pad != "NOTSET":
        raise node.unsupported(f"auto_pad={auto_pad!r}")
    flat = node.attr("pads", [0] * 2 * len(spatial))
    return list(zip(flat[: len(spatial)], flat[len(spatial) :], strict=True))


def _window_geometry(node: Node, x: Value, kernel: Sequence[int]) -> tuple[list[int], list[int], list[int], Pads]:
    """Strides, dilations, dilated window extents and padding of a conv/pool node."""
    n = len(kernel)
    strides = list(node.attr("strides", [1] * n))
    dilations = list(node.attr("dilations", [1] * n))
    windows = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    return strides, dilations, windows, _spatial_pads(node, x.shape[2:], windows, strides)


def _torch_layout(rank: int) -> lax.ConvDimensionNumbers:
    spec = tuple(range(rank))
    return lax.ConvDimensionNumbers(spec, spec, spec)


def _per_channel(v: Value, like: Value) -> Value:
    """A per-channel vector broadcast over an N, C, spatial... tensor (one broadcast_in_dim when traced)."""
    if is_static(v):
        return v.reshape((-1,) + (1,) * (like.ndim - 2))
    return lax.broadcast_in_dim(v, (1, v.shape[0]) + (1,) * (like.ndim - 2), (1,))


@register("Conv")
def conv(node: Node, x: Value, w: Value, b: Value = None) -> Value:
    strides, dilations, _, pads = _window_geometry(node, x, w.shape[2:])
    y = lax.conv_general_dilated(
        x,
        w,
        strides,
        pads,
        rhs_dilation=dilations,
        dimension_numbers=_torch_layout(x.ndim),
        feature_group_count=node.attr("group", 1),
    )
    return y if b is None else y + _per_channel(b, x)


@register("ConvTranspose")
def conv_transpose(node: Node, x: Value, w: Value, b: Value = None) -> Value:
    group, n = node.attr("group", 1), x.ndim - 2
    strides, dilations, windows, pads = _window_geometry(node, x, w.shape[2:])
    extra = list(node.attr("output_padding", [0] * n))
    if node.attr("output_shape") is not None or node.attr("auto_pad", "NOTSET") != "NOTSET":
        raise node.unsupported("output_shape/auto_pad on ConvTranspose; export with explicit pads instead")
    # A transposed conv is the conv of the stride-dilated input with the flipped, in/out-swapped kernel.
    c_in, c_out = w.shape[0], w.shape[1] * group
    kernel = xp(w).reshape(w, (group, c_in // group, w.shape[1], *w.shape[2:]))
    kernel = xp(w).swapaxes(kernel, 1, 2).reshape((c_out, c_in // group, *w.shape[2:]))
    kernel = lax.rev(kernel, tuple(range(2, 2 + n)))
    padding = [(win - 1 - lo, win - 1 - hi + e) for win, (lo, hi), e in zip(windows, pads, extra, strict=True)]
    y = lax.conv_general_dilated(
        x,
        kernel,
        [1] * n,
        padding,
        lhs_dilation=strides,
        rhs_dilation=dilations,
        dimension_numbers=_torch_layout(x.ndim),
        feature_group_count=group,
    )
    return y if b is None else y + _per_channel(b, x)


def _pool_padding(node: Node, x: Value, kernel: Sequence[int]) -> tuple[list[int], list[int], Pads, Pads]:
    """Strides, dilations, the explicit pads, and the pads including ``ceil_mode``'s extra trailing cells."""
    strides, dilations, windows, pads = _window_geometry(node, x, kernel)
    if not node.attr("ceil_mode", 0):
        return strides, dilations, pads, pads
    padded = []
    for size, window, stride, (lo, hi) in zip(x.shape[2:], windows, strides, pads, strict=True):
        out = -(-(size + lo + hi - window) // stride) + 1
        if (out - 1) * stride >= size + lo:  # the last window must start inside the input or its left padding
            out -= 1
        padded.append((lo, max(hi, (out - 1) * stride + window - size - lo)))
    return strides, dilations, pads, padded


@register("MaxPool")
def max_pool(node: Node, x: Value) -> Value:
    if len(node.outputs) > 1 and node.outputs[1]:
        raise node.unsupported("the Indices output of MaxPool")
    kernel = node.attr("kernel_shape")
    strides, dilations, _, padded = _pool_padding(node, x, kernel)
    init = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
    if any(d != 1 for d in dilations):
        return _dilated_max_pool(x, kernel, strides, dilations, padded, np.asarray(init, x.dtype))
    # A numpy init value lets lax recognise the max monoid and emit reduce_window_max, which has a JVP (a jnp
    # array becomes a traced constant: generic reduce_window, which cannot be linearized).
    return lax.reduce_window(
        x,
        np.asarray(init, x.dtype),
        lax.max,
        (1, 1, *kernel),
        (1, 1, *strides),
        [(0, 0), (0, 0), *padded],
        window_dilation=(1, 1, *dilations),
    )


def _dilated_max_pool(
    x: Value, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int], padded: Pads, init: np.ndarray
) -> Value:
    """Max pooling over dilated windows as the largest of the windows' strided slices, the first of ties (torch's
    order: window positions row-major): JAX has no derivative of a dilated ``reduce_window_max``."""
    x = lax.pad(x, init, [(0, 0, 0), (0, 0, 0), *((lo, hi, 0) for lo, hi in padded)])
    spatial = x.shape[2:]
    outs = [(n - (k - 1) * d - 1) // s + 1 for n, k, d, s in zip(spatial, kernel, dilations, strides, strict=True)]
    slices = []
    for offsets in itertools.product(*(range(k) for k in kernel)):
        starts = [o * d for o, d in zip(offsets, dilations, strict=True)]
        limits = [start + (out - 1) * s + 1 for start, out, s in zip(starts, outs, strides, strict=True)]
        slices.append(lax.slice(x, (0, 0, *starts), (*x.shape[:2], *limits), (1, 1, *strides)))
    windows = jnp.stack(slices, axis=-1)
    first = jnp.argmax(windows, axis=-1)
    return jnp.take_along_axis(windows, first[..., None], axis=-1)[..., 0]


def _window_counts(
    size: int, lo: int, hi: int, extra: int, kernel: int, stride: int, dilation: int, out: int, include_pad: bool
) -> np.ndarray:
    """Number of cells each 1-D pooling window averages over (explicit pads count only with count_include_pad)."""
    mask = np.concatenate(
        [np.full(lo, include_pad), np.ones(size, bool), np.full(hi, include_pad), np.zeros(extra, bool)]
    )
    starts = np.arange(out) * stride
    return mask[starts[:, None] + np.arange(kernel)[None, :] * dilation].sum(axis=1)


@register("AveragePool")
def average_pool(node: Node, x: Value) -> Value:
    kernel = node.attr("kernel_shape")
    strides, dilations, pads, padded = _pool_padding(node, x, kernel)
    total = lax.reduce_window(
        x,
        np.zeros((), x.dtype),  # numpy, as in MaxPool: reduce_window_sum, not a generic reduce_window
        lax.add,
        (1, 1, *kernel),
        (1, 1, *strides),
        [(0, 0), (0, 0), *padded],
        window_dilation=(1, 1, *dilations),
    )
    # The divisor is static and separable over axes: an outer product of 1-D window counts.
    include = bool(node.attr("count_include_pad", 0))
    divisor = np.ones((), np.float64)
    for axis, (size, k, s, d, (lo, hi), (_, phi)) in enumerate(
        zip(x.shape[2:], kernel, strides, dilations, pads, padded, strict=True)
    ):
        counts = _window_counts(size, lo, hi, phi - hi, k, s, d, total.shape[2 + axis], include)
        divisor = np.multiply.outer(divisor, counts)
    return total / divisor.astype(x.dtype)


@register("GlobalAveragePool", "GlobalMaxPool")
def global_pool(node: Node, x: Value) -> Value:
    m, axes = xp(x), tuple(range(2, x.ndim))
    return (m.mean if node.op_type == "GlobalAveragePool" else m.max)(x, axis=axes, keepdims=True)


@register("BatchNormalization")
def batch_norm(node: Node, x: Value, scale: Value, bias: Value, mean: Value, var: Value) -> Value:
    if node.attr("training_mode", 0):
        raise node.unsupported("training_mode=1; put the model in eval mode before exporting")
    # (x - mean) · (scale / std) + bias: the per-channel factor is formed on vectors of C, so the activations see one
    # subtract, one multiply and one add (not two multiplies): a fifth fewer operations in a DenseNet's structured
    # program. The (usually constant) mean is subtracted first: x - mean is exact where x is close to it.
    m = xp(mean, var)
    shifted = var + np.asarray(node.attr("epsilon", 1e-5), var.dtype)
    inv_std = 1 / np.sqrt(shifted) if m is np else lax.rsqrt(shifted)
    return (x - _per_channel(mean, x)) * _per_channel(inv_std * scale, x) + _per_channel(bias, x)


def _normalize(x: Value, axes: tuple[int, ...], epsilon: float) -> tuple[Value, Value, Value]:
    """(x - mean) / sqrt(var + eps) over ``axes``, with the mean and inverse standard deviation."""
    m = xp(x)
    mean = m.mean(x, axis=axes, keepdims=True)
    centered = x - mean
    variance = m.mean(centered * centered, axis=axes, keepdims=True) + np.asarray(epsilon, x.dtype)
    # rsqrt's tangent is one multiply; 1 / sqrt would add a div and a neg to the linearized program.
    inv_std = 1 / np.sqrt(variance) if m is np else lax.rsqrt(variance)
    return centered * inv_std, mean, inv_std


@register("LayerNormalization")
def layer_norm(node: Node, x: Value, scale: Value, bias: Value = None) -> tuple[Value, Value, Value]:
    # stash_type asks for float32 statistics; a float64 graph keeps float64 (what torch computes), and
    # lower precisions are upcast as the attribute asks.
    dtype = np.promote_types(x.dtype, np.float32) if node.attr("stash_type", 1) == 1 else x.dtype
    axis = normalize_axes([node.attr("axis", -1)], x.ndim)[0]
    y, mean, inv_std = _normalize(x.astype(dtype), tuple(range(axis, x.ndim)), node.attr("epsilon", 1e-5))
    y = y.astype(x.dtype) * scale
    return (y if bias is None else y + bias), mean, inv_std


@register("InstanceNormalization")
def instance_norm(node: Node, x: Value, scale: Value, bias: Value) -> Value:
    y, _, _ = _normalize(x, tuple(range(2, x.ndim)), node.attr("epsilon", 1e-5))
    return y * _per_channel(scale, x) + _per_channel(bias, x)


@register("GroupNormalization")
def group_norm(node: Node, x: Value, scale: Value, bias: Value) -> Value:
    groups = node.attr("num_groups")
    grouped = x.reshape((x.shape[0], groups, -1))
    y, _, _ = _normalize(grouped, (2,), node.attr("epsilon", 1e-5))
    if node.opset < 21:  # opset 18 gives one scale/bias per group, opset 21 one per channel
        y = y * scale.reshape(1, groups, 1) + bias.reshape(1, groups, 1)
        return y.reshape(x.shape)
    return y.reshape(x.shape) * _per_channel(scale, x) + _per_channel(bias, x)


@register("Gemm")
def gemm(node: Node, a: Value, b: Value, c: Value = None) -> Value:
    # Contract the right axes instead of materializing transposes (torch Linear exports transB=1).
    contract_a = 0 if node.attr("transA", 0) else 1
    contract_b = 1 if node.attr("transB", 0) else 0
    if is_static(a) and is_static(b):
        y = np.tensordot(a, b, axes=(contract_a, contract_b))
    else:
        y = lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())))
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    if alpha != 1.0:
        y = y * np.asarray(alpha, y.dtype)
    if c is None or beta == 0.0:
        return y
    return y + (c if beta == 1.0 else c * np.asarray(beta, c.dtype))


@register("MatMul")
def matmul(node: Node, a: Value, b: Value) -> Value:
    # jnp.matmul squeezes unit batch axes and re-expands them; the two common layouts map to one dot_general.
    if is_static(a) and is_static(b):
        return np.matmul(a, b)
    if b.ndim == 2 and a.ndim >= 2:  # (..., m, k) @ (k, n)
        return lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())))
    if a.ndim == b.ndim > 2 and a.shape[:-2] == b.shape[:-2]:  # equal batch axes, no broadcasting
        batch = tuple(range(a.ndim - 2))
        return lax.dot_general(a, b, (((a.ndim - 1,), (b.ndim - 2,)), (batch, batch)))
    return jnp.matmul(a, b)


@register("Einsum")
def einsum(node: Node, *operands: Value) -> Value:
    return xp(*operands).einsum(node.attr("equation").replace(" ", ""), *operands)


def _softmax_axes(node: Node, x: Value) -> tuple[Value, int, tuple[int, ...]]:
    """Before opset 13 Softmax works on the input coerced to 2-D at ``axis`` (default 1)."""
    if node.opset >= 13:
        return x, normalize_axes([node.attr("axis", -1)], x.ndim)[0], x.shape
    axis = normalize_axes([node.attr("axis", 1)], x.ndim)[0]
    return xp(x).reshape(x, (int(np.prod(x.shape[:axis])), -1)), 1, x.shape


@register("Softmax", "LogSoftmax")
def softmax(node: Node, x: Value) -> Value:
    m = xp(x)
    y, axis, shape = _softmax_axes(node, x)
    # The max shift only keeps exp finite; it does not change the value, so it carries no derivative.
    peak = m.max(y, axis=axis, keepdims=True)
    shifted = y - (peak if is_static(peak) else lax.stop_gradient(peak))
    if node.op_type == "LogSoftmax":
        out = shifted - m.log(m.sum(m.exp(shifted), axis=axis, keepdims=True))
    else:
        e = m.exp(shifted)
        out = e / m.sum(e, axis=axis, keepdims=True)
    return m.reshape(out, shape)


@register("LRN")
def local_response_norm(node: Node, x: Value) -> Value:
    size = node.attr("size")
    alpha, beta, bias = node.attr("alpha", 1e-4), node.attr("beta", 0.75), node.attr("bias", 1.0)
    pads = [(0, 0), ((size - 1) // 2, size - 1 - (size - 1) // 2)] + [(0, 0)] * (x.ndim - 2)
    window = (1, size) + (1,) * (x.ndim - 2)
    total = lax.reduce_window(x * x, np.zeros((), x.dtype), lax.add, window, (1,) * x.ndim, pads)
    return x / (bias + (alpha / size) * total) ** beta
