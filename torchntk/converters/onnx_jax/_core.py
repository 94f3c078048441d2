"""Shared pieces of the ONNX → JAX interpreter: the error type, the op registry and the node view.

Values flowing through the interpreter are either *static* (``numpy.ndarray``: initializers, constants and
everything computed only from them, e.g. shape sub-graphs) or *traced* (``jax.Array`` / tracers, i.e.
anything that depends on a graph input). Static values stay numpy so that shapes remain concrete while
JAX traces the function; handlers pick ``numpy`` or ``jax.numpy`` with :func:`xp`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax.numpy as jnp
import numpy as np
import onnx
from jax import lax
from onnx import helper, numpy_helper

from ..errors import ConversionError

Value = Any  # np.ndarray (static) or jax.Array (traced); None for an omitted optional input.
Handler = Callable[..., Value]

HANDLERS: dict[str, Handler] = {}


class UnsupportedOnnxOp(ConversionError, ValueError):
    """An ONNX node (op type, attribute combination or dynamic shape) that the onnx-jax route cannot interpret: a
    :class:`~torchntk.converters.ConversionError` wherever it is met (an attribute value only while tracing, past
    the route's own error handling: auto and the user saw a raw error naming no fix)."""

    def __init__(self, op_type: str, node_name: str, detail: str = "") -> None:
        self.op_type = op_type
        self.node_name = node_name
        what = f"ONNX op {op_type!r} (node {node_name!r})"
        message = f"{what}: {detail}" if detail else f"{what} is not supported by the onnx-jax route"
        super().__init__(message)


def register(*op_types: str) -> Callable[[Handler], Handler]:
    """Register ``fn`` as the handler of the given ONNX op types (default domain)."""

    def decorate(fn: Handler) -> Handler:
        for op_type in op_types:
            if op_type in HANDLERS:
                raise RuntimeError(f"duplicate handler for ONNX op {op_type}")
            HANDLERS[op_type] = fn
        return fn

    return decorate


def tensor_to_array(tensor: onnx.TensorProto | onnx.SparseTensorProto) -> np.ndarray:
    """A dense numpy array from a (sparse) ONNX tensor."""
    if isinstance(tensor, onnx.TensorProto):
        return numpy_helper.to_array(tensor)
    values, indices = numpy_helper.to_array(tensor.values), numpy_helper.to_array(tensor.indices)
    dense = np.zeros(int(np.prod(tensor.dims)), values.dtype)
    # Indices are either linear positions (nnz,) or coordinates (nnz, rank).
    flat = indices if indices.ndim == 1 else np.ravel_multi_index(tuple(indices.T), tuple(tensor.dims))
    dense[flat] = values
    return dense.reshape(tuple(tensor.dims))


def _shortest_float(value: float) -> float:
    """A float32 attribute as the shortest decimal that rounds to it (0.1f → 0.1): ONNX stores float attributes
    in 32 bits, and a float64 model's ``LeakyReLU(0.1)`` or BatchNorm ``eps=1e-5`` must not compute with 0.1f."""
    return float(str(np.float32(value)))


# Constants torch computes with that no aten call spells out (SELU's alpha and scale, hardsigmoid's 1/6), exact.
_TORCH_CONSTANTS = (1.6732632423543772848170429916717, 1.0507009873554804934193349852946, 1.0 / 6.0)


def exact_candidates(numbers: Sequence[float]) -> tuple[float, ...]:
    """What a float32 constant of a node may stand for, exactly: its aten call's Python numbers, their reciprocals
    and square roots (``vector_norm(x, 3)`` exports ``x ** (1/3)``; attention's ``scale`` is split as a square root
    on each side), and torch's own constants."""
    derived = [*numbers, *_TORCH_CONSTANTS]
    for n in numbers:
        if n != 0:
            derived.append(1.0 / n)
        if n > 0:
            derived += [math.sqrt(n), 1.0 / math.sqrt(n)]
    return tuple(derived)


def exact_value(rounded: float, candidates: Sequence[float]) -> float:
    """``rounded`` (a float32 constant) as the one candidate it is the float32 rounding of, else as it is."""
    if rounded in candidates:
        return rounded
    matches = {c for c in candidates if float(np.float32(c)) == rounded}
    return matches.pop() if len(matches) == 1 else rounded


def _exact_float(value: float, candidates: Sequence[float]) -> float:
    """A float32 attribute exact where it is the float32 rounding of one of ``candidates`` (:func:`exact_candidates`:
    a float64 ``LeakyReLU(1/3)`` computed with 0.33333334, its kernel 4e-8 off, silently, where the slope met only
    the derivative), else the shortest decimal it rounds (0.1f → 0.1)."""
    rounded = float(np.float32(value))
    exact = exact_value(rounded, candidates)
    return exact if exact != rounded else _shortest_float(value)


def _attribute_value(attribute: onnx.AttributeProto, candidates: Sequence[float] = ()) -> Any:
    """A decoded attribute; float ones by :func:`_exact_float`."""
    if attribute.type == onnx.AttributeProto.FLOAT:
        return _exact_float(attribute.f, candidates)
    if attribute.type == onnx.AttributeProto.FLOATS:
        return [_exact_float(v, candidates) for v in attribute.floats]
    value = helper.get_attribute_value(attribute)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, onnx.TensorProto | onnx.SparseTensorProto):
        return tensor_to_array(value)
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode() for v in value]
    return value


#: Model metadata: digests (:func:`values_digest`) of the float64 weights the export holds constant (unselected
#: parameters), which it may fold into new initializers (a frozen Linear's weight, transposed).
CONSTANT_WEIGHTS_KEY = "torchntk.constant_weights"


def values_digest(array: np.ndarray) -> str:
    """A digest of an array's values in row-major order, whatever its shape (a reshape: the same; a transpose is
    another array, recorded apart)."""
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float64).ravel().tobytes()).hexdigest()[:32]


def constant_weights(model: onnx.ModelProto) -> frozenset[str]:
    """The :data:`CONSTANT_WEIGHTS_KEY` digests recorded in ``model`` (none in a graph exported elsewhere)."""
    recorded = next((p.value for p in model.metadata_props if p.key == CONSTANT_WEIGHTS_KEY), "[]")
    return frozenset(json.loads(recorded))


def exported_from(proto: onnx.NodeProto) -> str:
    """The aten op named by torch's dynamo exporter in the node's ``namespace`` metadata (its last scope, e.g.
    ``"model.1: torch.nn.modules.activation.ReLU6/hardtanh: aten.hardtanh.default"``), ``""`` when absent.

    One ONNX op can come from aten ops whose derivatives differ where the function has a kink (``Clip`` from
    ``hardtanh`` is flat at its bounds, from ``clamp`` it is not): the handler picks torch's convention by it.
    """
    meta = {prop.key: prop.value for prop in proto.metadata_props}
    aten = meta.get("namespace", "").rsplit("/", 1)[-1].partition(": ")[2]
    if aten == "aten.clamp.Tensor" and _number_bounds(meta.get("pkg.torch.onnx.fx_node", "")):
        return "aten.clamp.default"  # torch.export turned clamp(x, 0.0, 6.0)'s numbers into scalar_tensor nodes
    return aten


def _number_bounds(fx_node: str) -> bool:
    """Whether an exported ``clamp.Tensor`` call (``... = call_function[...](args = (%x, %scalar_tensor, ...)``)
    had numbers as bounds: each bound ``None``, a literal or a ``scalar_tensor`` node."""
    args = re.search(r"args = \((.*)\), kwargs", fx_node)
    if args is None:
        return False
    bounds = [a.strip() for a in args.group(1).split(",")[1:]]
    return all(b == "None" or b.startswith("%scalar_tensor") or re.fullmatch(r"-?[\d.e+-]+", b) for b in bounds)


# A float literal of an exported aten call (``aten.hardtanh.default](args = (%x, -0.3, 0.3)``): a decimal point or an
# exponent, not part of a name (``%scalar_tensor_2``, ``conv2d``).
_FLOAT_LITERAL = re.compile(r"(?<![\w%.])-?(?:\d+\.\d*(?:e[+-]?\d+)?|\.\d+(?:e[+-]?\d+)?|\d+e[+-]?\d+)(?![\w.])")


def literal_numbers(proto: onnx.NodeProto) -> tuple[float, ...]:
    """The Python numbers of the aten call a node was exported from (its ``pkg.torch.onnx.fx_node`` metadata), exact:
    the exporter's translations turn some of them into float32 constants (see :func:`exact_numbers`)."""
    fx_node = next((prop.value for prop in proto.metadata_props if prop.key == "pkg.torch.onnx.fx_node"), "")
    call = fx_node.partition("](")[2]
    return tuple(float(text) for text in _FLOAT_LITERAL.findall(call))


@dataclass(frozen=True)
class Node:
    """A read-only view of one ONNX node with its attributes decoded and the model's default-domain opset."""

    op_type: str
    name: str
    opset: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    aten: str = ""  # the aten op the node was exported from (e.g. "aten.hardtanh.default"), "" when not recorded
    numbers: tuple[float, ...] = ()  # that aten call's Python numbers (literal_numbers)
    call: str = ""  # that aten call's node in the exported program ("%clamp"): ONNX nodes of one call share it

    @classmethod
    def from_proto(cls, proto: onnx.NodeProto, opset: int, index: int) -> Node:
        aten, numbers = exported_from(proto), literal_numbers(proto)
        candidates = exact_candidates(numbers)
        attrs = {a.name: _attribute_value(a, candidates) for a in proto.attribute}
        name = proto.name or f"{proto.op_type}_{index}"
        inputs, outputs = tuple(proto.input), tuple(proto.output)
        fx_node = next((prop.value for prop in proto.metadata_props if prop.key == "pkg.torch.onnx.fx_node"), "")
        call = fx_node.split(" :", 1)[0] if fx_node.startswith("%") else ""
        return cls(proto.op_type, name, opset, inputs, outputs, attrs, aten, numbers, call)

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def unsupported(self, detail: str) -> UnsupportedOnnxOp:
        """An error naming this node, for an attribute value or input the interpreter cannot handle, and the fix."""
        source = f" (exported from {self.aten})" if getattr(self, "aten", None) else ""
        return UnsupportedOnnxOp(
            self.op_type,
            self.name,
            f"{detail}{source}. Use implementation='jacobian_contraction' or 'ntk_vector_products' (auto falls back "
            "to them), or the onnx-tf route for a float32 model",
        )


def exact_numbers(node: Node, args: list[Value]) -> list[Value]:
    """``args`` with each float64 constant that is a number of the node's aten call rounded to float32 (the
    exporter's ``hardtanh(x, -0.3, 0.3)`` bounds hold -0.30000001) replaced by that number, as torch computes a float64
    model with it: inputs between the two took the other branch of the converted function, silently."""
    if not node.numbers:
        return args
    candidates = exact_candidates(node.numbers)
    fixed = list(args)
    for i, value in enumerate(args):
        if is_static(value) and value.dtype == np.float64 and value.size == 1:
            rounded = float(value.reshape(-1)[0])
            exact = exact_value(rounded, candidates)
            if exact != rounded:
                fixed[i] = np.full_like(value, exact)
    return fixed


def is_static(value: Value) -> bool:
    """True for values known at conversion time (numpy), False for traced JAX values."""
    return isinstance(value, np.ndarray | np.generic)


def xp(*values: Value) -> Any:
    """``numpy`` when every given value is static (keeps shape arithmetic concrete), else ``jax.numpy``."""
    return np if all(v is None or is_static(v) for v in values) else jnp


def static(node: Node, value: Value, what: str) -> np.ndarray | None:
    """Return ``value`` as numpy, or explain that this input must not depend on the graph inputs."""
    if value is None or is_static(value):
        return None if value is None else np.asarray(value)
    raise node.unsupported(
        f"its {what} is computed from graph inputs, but JAX needs it known at conversion time; "
        "export the model with static shapes (no dynamic axes) so the exporter folds it to a constant"
    )


def static_ints(node: Node, value: Value, what: str) -> list[int] | None:
    """A static int64 input (axes, pads, shape ...) as a Python list, or None when omitted."""
    array = static(node, value, what)
    return None if array is None else [int(v) for v in array.reshape(-1)]


def normalize_axes(axes: Sequence[int], rank: int) -> list[int]:
    """ONNX allows negative axes counted from the end."""
    return [a + rank if a < 0 else a for a in axes]


def axes_from(node: Node, value: Value, attr_since: int) -> list[int] | None:
    """Axes given as an attribute before opset ``attr_since`` and as an optional input from then on."""
    if node.opset < attr_since:
        return node.attr("axes")
    return static_ints(node, value, "axes input")


def np_dtype(onnx_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(onnx_type))


def astype(value: Value, dtype: np.dtype) -> Value:
    """Cast keeping static values static."""
    return value.astype(dtype) if is_static(value) else jnp.asarray(value).astype(dtype)


def where(condition: Value, a: Value, b: Value) -> Value:
    """``numpy.where`` on static values, else one ``select_n`` (``jnp.where`` would nest a jit in the jaxpr)."""
    if all(is_static(v) or isinstance(v, bool | int | float) for v in (condition, a, b)):
        return np.where(condition, a, b)
    dtype = jnp.result_type(a, b)
    shape = np.broadcast_shapes(np.shape(condition), np.shape(a), np.shape(b))
    condition, a, b = (
        jnp.broadcast_to(jnp.asarray(v, t), shape) for v, t in ((condition, bool), (a, dtype), (b, dtype))
    )
    return lax.select(condition, a, b)
