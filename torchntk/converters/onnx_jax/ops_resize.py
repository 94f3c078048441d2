"""ONNX Resize (and the older Upsample) in ``nearest`` and ``linear`` modes, one spatial axis at a time.

Resizing is separable: nearest becomes a static take (slices, broadcasts and reshapes for the usual
integer upsampling), linear a product with a static interpolation matrix along each resized axis.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from ._core import Node, Value, is_static, normalize_axes, register, static
from ._indexing import take_static


def _source_coordinates(mode: str, out: int, size: int, scale: float) -> np.ndarray:
    """Input coordinate of each output cell (ONNX ``coordinate_transformation_mode``)."""
    x = np.arange(out, dtype=np.float64)
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if out > 1 else np.zeros(out)
    if mode == "half_pixel_symmetric":
        offset = size / 2 * (1 - out / (scale * size))
        return offset + (x + 0.5) / scale - 0.5
    if mode == "align_corners":
        return x * (size - 1) / (out - 1) if out > 1 else np.zeros(out)
    if mode == "asymmetric":
        return x / scale
    raise ValueError(mode)


_ROUNDING = {
    "round_prefer_floor": lambda c: np.ceil(c - 0.5),
    "round_prefer_ceil": lambda c: np.floor(c + 0.5),
    "floor": np.floor,
    "ceil": np.ceil,
}


def _linear_matrix(coords: np.ndarray, size: int) -> np.ndarray:
    """(out, in) weights of 1-D linear interpolation, clamping coordinates to the input like onnxruntime."""
    coords = np.clip(coords, 0, size - 1)
    low = np.floor(coords).astype(np.int64)
    high = np.minimum(low + 1, size - 1)
    frac = coords - low
    matrix = np.zeros((len(coords), size))
    np.add.at(matrix, (np.arange(len(coords)), low), 1 - frac)
    np.add.at(matrix, (np.arange(len(coords)), high), frac)
    return matrix


def _apply_matrix(x: Value, matrix: np.ndarray, axis: int) -> Value:
    matrix = matrix.astype(x.dtype)
    if is_static(x):
        return np.moveaxis(np.tensordot(matrix, x, axes=(1, axis)), 0, axis)
    y = lax.dot_general(x, matrix, (((axis,), (1,)), ((), ())))
    return jnp.moveaxis(y, -1, axis)


def _target(node: Node, x: Value, scales: Value, sizes: Value) -> tuple[list[int], list[float], list[int]]:
    """Resized axes with their output sizes and scales."""
    axes = normalize_axes(node.attr("axes", list(range(x.ndim))), x.ndim)
    sizes = static(node, sizes, "sizes input")
    if sizes is not None and sizes.size:
        if node.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
            raise node.unsupported("keep_aspect_ratio_policy other than 'stretch'")
        outs = [int(s) for s in sizes]
        return axes, [o / x.shape[a] for o, a in zip(outs, axes, strict=True)], outs
    scales = [float(s) for s in static(node, scales, "scales input")]
    return axes, scales, [int(np.floor(x.shape[a] * s)) for a, s in zip(axes, scales, strict=True)]


@register("Resize", "Upsample")
def resize(node: Node, x: Value, *extra: Value) -> Value:
    if node.opset < 11:  # Resize-10 / Upsample take (X, scales) and use asymmetric coordinates
        scales = extra[0] if extra else np.asarray(node.attr("scales"), np.float32)  # an attribute in Upsample-7
        sizes, coordinates, rounding = None, "asymmetric", "floor"
    else:
        scales, sizes = (list(extra) + [None, None, None])[1:3]
        coordinates = node.attr("coordinate_transformation_mode", "half_pixel")
        rounding = node.attr("nearest_mode", "round_prefer_floor")
    mode = node.attr("mode", "nearest")
    if mode not in ("nearest", "linear") or coordinates == "tf_crop_and_resize" or node.attr("antialias", 0):
        raise node.unsupported(
            f"mode={mode!r}, coordinate_transformation_mode={coordinates!r}, antialias={node.attr('antialias', 0)}; "
            "only nearest/linear without antialias and without crop are supported"
        )
    for axis, scale, out in zip(*_target(node, x, scales, sizes), strict=True):
        size = x.shape[axis]
        if out == size and scale == 1.0:
            continue
        coords = _source_coordinates(coordinates, out, size, scale)
        if mode == "nearest":
            x = take_static(x, np.clip(_ROUNDING[rounding](coords), 0, size - 1).astype(np.int64), axis)
        else:
            x = _apply_matrix(x, _linear_matrix(coords, size), axis)
    return x
