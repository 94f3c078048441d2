"""Small convolutions as a matrix product of their patches, where XLA:CPU's convolution is slow.

XLA:CPU's convolution collapses on feature maps of a few pixels: a 512→512 3×3 convolution of 32 examples of 2×2
pixels takes 290 ms (1 G multiply-adds/s), against 9 ms for 3×3 pixels and 5 ms as a matrix product; 256→256 on
2×2 pixels 17 ms; the derivative of a strided 256→512 convolution onto 4×4 pixels 61 ms (resnet18's last stages at
64×64 and 32×32 inputs: 35 ms per output row and example at 64×64 against 16 ms at 96×96). :func:`patch_convolution`
computes the same convolution as the product of its patches (one strided slice of the padded input per filter tap)
with the filter: the same multiply-adds, run as a matrix product, exact up to summation order.

Depthwise convolutions (one input channel per group: ConvNeXt's, EfficientNet's, MobileNet's) are slow on XLA:CPU at
every size tried: 768 channels 7×7 on 2×2 pixels 27 ms against 2.4 ms as a sum over the filter's taps of shifted
input times weight; 96 channels 7×7 on 16×16 pixels 57 ms against 3.1 ms (derivative 54 against 16 ms).
:func:`depthwise_convolution` computes them so, with no patches held (the output's size at a time).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from jax import lax

#: A convolution is rewritten when its output has at most this many positions per example and feature (4×4) and its
#: filter at most this many taps (7×7): its patches then hold at most ``taps`` times the output positions, little
#: beside the matrix product (a weight gradient's "filter" is the whole feature map: never rewritten).
MAX_POSITIONS = 16
MAX_TAPS = 49


def is_small(params: dict[str, Any], lhs_shape: tuple[int, ...], rhs_shape: tuple[int, ...]) -> bool:
    """Whether :func:`patch_convolution` should replace a ``conv_general_dilated`` of these operands and ``params``
    (ungrouped only)."""
    if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
        return False
    return _taps_count(params, rhs_shape) <= MAX_TAPS and 0 < _positions(params, lhs_shape, rhs_shape) <= MAX_POSITIONS


def is_depthwise(params: dict[str, Any], lhs_shape: tuple[int, ...], rhs_shape: tuple[int, ...]) -> bool:
    """Whether :func:`depthwise_convolution` should replace it: grouped with one input channel per group (a
    weight gradient's batch groups excluded), at most ``MAX_TAPS`` taps."""
    _, rhs_spec, _ = params["dimension_numbers"]
    return (
        params["feature_group_count"] > 1
        and params["batch_group_count"] == 1
        and rhs_shape[rhs_spec[1]] == 1
        and _taps_count(params, rhs_shape) <= MAX_TAPS
        and _positions(params, lhs_shape, rhs_shape) > 0
    )


def faster_form(params: dict[str, Any], lhs_shape: tuple[int, ...], rhs_shape: tuple[int, ...]) -> Any:
    """The function computing this ``conv_general_dilated`` faster on XLA:CPU (called as the primitive is bound:
    ``(lhs, rhs, **params)``), or ``None`` to keep the convolution."""
    if is_small(params, lhs_shape, rhs_shape):
        return patch_convolution
    if is_depthwise(params, lhs_shape, rhs_shape):
        return depthwise_convolution
    return None


def _taps_count(params: dict[str, Any], rhs_shape: tuple[int, ...]) -> int:
    _, rhs_spec, _ = params["dimension_numbers"]
    return math.prod(rhs_shape[d] for d in rhs_spec[2:])


def _positions(params: dict[str, Any], lhs_shape: tuple[int, ...], rhs_shape: tuple[int, ...]) -> int:
    return math.prod(_output_spatial(params, lhs_shape, rhs_shape))


def _output_spatial(params: dict[str, Any], lhs_shape: tuple[int, ...], rhs_shape: tuple[int, ...]) -> list[int]:
    lhs_spec, rhs_spec, _ = params["dimension_numbers"]
    sizes = []
    for d, (lo, hi) in enumerate(params["padding"]):
        extent = (lhs_shape[lhs_spec[2 + d]] - 1) * params["lhs_dilation"][d] + 1 + lo + hi
        window = (rhs_shape[rhs_spec[2 + d]] - 1) * params["rhs_dilation"][d] + 1
        sizes.append(max(0, (extent - window) // params["window_strides"][d] + 1))
    return sizes


def _shifted_inputs(lhs: Any, rhs: Any, params: dict[str, Any]) -> tuple[Any, list[Any], list[int]]:
    """``(filter (O, I, *K), one input slice (N, C, *out) per filter tap in row-major order, out)``."""
    lhs_spec, rhs_spec, _ = params["dimension_numbers"]
    x = lax.transpose(lhs, tuple(lhs_spec))  # (N, C, *S)
    w = lax.transpose(rhs, tuple(rhs_spec))  # (O, I, *K)
    out = _output_spatial(params, lhs.shape, rhs.shape)
    config = [(0, 0, 0), (0, 0, 0)] + [
        (lo, hi, dilation - 1) for (lo, hi), dilation in zip(params["padding"], params["lhs_dilation"], strict=True)
    ]
    x = lax.pad(x, lax.full((), 0, x.dtype), config)
    strides, dilations = params["window_strides"], params["rhs_dilation"]
    taps = []
    for tap in itertools.product(*(range(k) for k in w.shape[2:])):
        start = [0, 0] + [t * r for t, r in zip(tap, dilations, strict=True)]
        limit = [x.shape[0], x.shape[1]] + [
            s + (n - 1) * stride + 1 for s, n, stride in zip(start[2:], out, strides, strict=True)
        ]
        taps.append(lax.slice(x, start, limit, [1, 1, *strides]))
    return w, taps, out


def _to_output_layout(y: Any, params: dict[str, Any]) -> Any:
    """``y`` of shape ``(N, O, *out)`` in the convolution's output layout."""
    out_spec = params["dimension_numbers"][2]
    inverse = [0] * len(out_spec)
    for i, d in enumerate(out_spec):
        inverse[d] = i
    return lax.transpose(y, tuple(inverse))


def patch_convolution(lhs: Any, rhs: Any, **params: Any) -> Any:
    """``lax.conv_general_dilated_p.bind(lhs, rhs, **params)`` (ungrouped) as patches times filter."""
    w, taps, out = _shifted_inputs(lhs, rhs, params)
    patches = lax.concatenate([lax.expand_dims(t, (2,)) for t in taps], 2)  # (N, C, T, *out)
    w = w.reshape(w.shape[0], w.shape[1], len(taps))  # (O, C, T)
    y = lax.dot_general(
        patches,
        w,
        (((1, 2), (1, 2)), ((), ())),
        precision=params.get("precision"),
        preferred_element_type=params.get("preferred_element_type"),
    )  # (N, *out, O)
    return _to_output_layout(lax.transpose(y, (0, len(out) + 1, *range(1, len(out) + 1))), params)


def depthwise_convolution(lhs: Any, rhs: Any, **params: Any) -> Any:
    """``lax.conv_general_dilated_p.bind(lhs, rhs, **params)`` with one input channel per group (``G`` groups,
    ``m`` outputs each: output ``g·m + j`` reads input channel ``g``) as a sum over the filter's taps of the shifted
    input times that tap's weights, in the filter's row-major tap order."""
    w, taps, out = _shifted_inputs(lhs, rhs, params)
    groups = params["feature_group_count"]
    n, multiplier = taps[0].shape[0], w.shape[0] // groups
    w = w.reshape(groups, multiplier, len(taps))  # (G, m, T)
    total = None
    for t, shifted in enumerate(taps):  # (N, G, *out)
        weight = w[:, :, t].reshape(1, groups, multiplier, *([1] * len(out)))
        term = lax.expand_dims(shifted, (2,)) * weight  # (N, G, m, *out)
        total = term if total is None else total + term
    dtype = params.get("preferred_element_type")
    y = total.reshape(n, groups * multiplier, *out)
    return _to_output_layout(y if dtype is None else y.astype(dtype), params)
