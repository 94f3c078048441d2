"""Element-wise ONNX ops: arithmetic with numpy broadcasting, comparisons, casts and activations.

Every handler works on static (numpy) and traced (JAX) values alike through :func:`xp`, so that shape
arithmetic (``Shape → Mul → Concat``) stays concrete. Activations are written with ``where`` rather than
``maximum``/``clip`` because JAX splits the derivative of ``max`` evenly at ties (0.5 at ``relu(0)``) whereas
torch gives 0, and exact zeros are common (``relu(relu(x))``, zero padding, a depthwise convolution of a window of
ReLU6 zeros). Where one ONNX op comes from aten ops with different derivatives at their kinks, the handler follows
the aten op recorded by the exporter (:attr:`Node.aten`), as measured on torch 2.14: ``hardtanh``/``relu6``
(ReLU6, Hardtanh) and ``clamp`` with number bounds are flat at their bounds (derivative 0 there), ``clamp`` with
tensor bounds and ``maximum``/``minimum`` split the derivative (0.5 each at a tie), ``hardsigmoid`` and
``hardswish`` are flat at ±3 (``tests/test_kink_conventions.py``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._core import Node, Value, astype, is_static, np_dtype, register, where, xp


def _sigmoid(x: Value) -> Value:
    return 1.0 / (1.0 + np.exp(-x)) if is_static(x) else jax.nn.sigmoid(x)


def _erf(x: Value) -> Value:
    # numpy has no erf; static erf only appears in constant-folding leftovers, so a vectorized math.erf is enough.
    return np.vectorize(math.erf, otypes=[x.dtype])(x) if is_static(x) else lax.erf(x)


def torch_abs(x: Value) -> Value:
    """``|x|`` as ``x · sign(x)``: derivative sign(x), 0 at x = 0 as torch's (JAX's ``abs`` takes 1 there)."""
    return np.abs(x) if is_static(x) else x * jnp.sign(x)


_UNARY = {
    "Neg": "negative",
    "Sqrt": "sqrt",
    "Exp": "exp",
    "Log": "log",
    "Reciprocal": "reciprocal",
    "Tanh": "tanh",
    "Floor": "floor",
    "Ceil": "ceil",
    "Round": "round",  # both numpy and jax round half to even, as ONNX does
    "Sign": "sign",
    "Sin": "sin",
    "Cos": "cos",
    "Tan": "tan",
    "Asin": "arcsin",
    "Acos": "arccos",
    "Atan": "arctan",
    "Sinh": "sinh",
    "Cosh": "cosh",
    "Asinh": "arcsinh",
    "Acosh": "arccosh",
    "Atanh": "arctanh",
    "Not": "logical_not",
    "IsNaN": "isnan",
}


@register(*_UNARY)
def unary(node: Node, x: Value) -> Value:
    return getattr(xp(x), _UNARY[node.op_type])(x)


@register("Abs")
def abs_(node: Node, x: Value) -> Value:
    return torch_abs(x)


@register("Sigmoid")
def sigmoid(node: Node, x: Value) -> Value:
    return _sigmoid(x)


@register("Erf")
def erf(node: Node, x: Value) -> Value:
    return _erf(x)


@register("Identity")
def identity(node: Node, x: Value) -> Value:
    return x


@register("Dropout")
def dropout(node: Node, x: Value, ratio: Value = None, training_mode: Value = None) -> tuple[Value, Value]:
    if training_mode is not None and (not is_static(training_mode) or bool(training_mode)):
        raise node.unsupported("training_mode=True; put the model in eval mode before exporting")
    return x, np.ones(np.shape(x), dtype=bool)


_BINARY = {
    "Add": "add",
    "Sub": "subtract",
    "Mul": "multiply",
    "Equal": "equal",
    "Less": "less",
    "LessOrEqual": "less_equal",
    "Greater": "greater",
    "GreaterOrEqual": "greater_equal",
    "And": "logical_and",
    "Or": "logical_or",
    "Xor": "logical_xor",
}


@register(*_BINARY)
def binary(node: Node, a: Value, b: Value) -> Value:
    return getattr(xp(a, b), _BINARY[node.op_type])(a, b)


@register("Div")
def div(node: Node, a: Value, b: Value) -> Value:
    if np.issubdtype(a.dtype, np.integer):  # ONNX integer division truncates toward zero, like C
        if is_static(a) and is_static(b):
            return (np.sign(a) * np.sign(b) * (np.abs(a) // np.abs(b))).astype(a.dtype)
        a, b = jnp.broadcast_arrays(a, b)
        return lax.div(a, b.astype(a.dtype))
    return xp(a, b).divide(a, b)


@register("Mod")
def mod(node: Node, a: Value, b: Value) -> Value:
    m = xp(a, b)
    return m.fmod(a, b) if node.attr("fmod", 0) else m.mod(a, b)


@register("Pow")
def power(node: Node, x: Value, y: Value) -> Value:
    exponent = float(y.reshape(-1)[0]) if is_static(y) and y.size == 1 else None
    if exponent is not None and exponent.is_integer() and not is_static(x):
        # An integer power becomes lax.integer_pow, whose derivative is a plain multiply; y has one element,
        # so broadcasting against it only adds unit axes.
        return lax.integer_pow(x, int(exponent)).reshape(jnp.broadcast_shapes(x.shape, y.shape))
    return astype(xp(x, y).power(x, y), x.dtype)  # ONNX Pow keeps the base's type


_VARIADIC = {"Sum": "add", "Max": "maximum", "Min": "minimum"}


@register("Sum", "Max", "Min", "Mean")
def variadic(node: Node, *values: Value) -> Value:
    if node.op_type in ("Max", "Min") and len(values) == 2 and node.aten == "aten.clamp.default":
        # torch.clamp(x, min=c) exported as Max(x, c): flat at the bound, where maximum would split the derivative.
        x, bound = values
        outside = x <= bound if node.op_type == "Max" else x >= bound
        return where(outside, astype(xp(bound).asarray(bound), x.dtype), x)
    m = xp(*values)
    total = functools.reduce(getattr(m, _VARIADIC.get(node.op_type, "add")), values)
    return total / len(values) if node.op_type == "Mean" else total


@register("Where")
def where_op(node: Node, condition: Value, a: Value, b: Value) -> Value:
    return where(condition, a, b)


@register("IsInf")
def isinf(node: Node, x: Value) -> Value:
    m = xp(x)
    positive = m.isposinf(x) if node.attr("detect_positive", 1) else m.zeros(x.shape, bool)
    negative = m.isneginf(x) if node.attr("detect_negative", 1) else m.zeros(x.shape, bool)
    return m.logical_or(positive, negative)


@register("Cast")
def cast(node: Node, x: Value) -> Value:
    return astype(x, np_dtype(node.attr("to")))


@register("CastLike")
def cast_like(node: Node, x: Value, target: Value) -> Value:
    return astype(x, target.dtype)


def _clamp_by_tensors(x: Value, low: Value, high: Value) -> Value:
    """``clamp(x, low, high)`` with tensor bounds and torch's derivative, case by case (its ``clamp_backward`` and
    ``clamp_backward_min_max``): inside, x's; at a bound below the other, split half and half with that bound; equal
    bounds, x's where x sits on them (not a quarter, as max-then-min gave), the bound's outside; crossed bounds
    (low > high), high's. ``y = wₓ·x + w_low·low + w_high·high`` with constant weights summing to 1 (exact values)."""
    m = xp(x, low, high)
    low = -m.inf if low is None else astype(low, x.dtype)
    high = m.inf if high is None else astype(high, x.dtype)
    one, half, zero = 1.0, 0.5, 0.0
    ordered = low < high
    w_x = where(ordered, where((x > low) & (x < high), one, where((x == low) | (x == high), half, zero)), zero)
    w_x = where((low == high) & (x == low), one, w_x)
    w_low = where(
        ordered, where(x < low, one, where(x == low, half, zero)), where((low == high) & (x < low), one, zero)
    )
    w_high = 1.0 - w_x - w_low
    # the bounds' terms only where they count: 0 · inf is NaN for a bound left out
    return w_x * x + where(w_low > 0, w_low * low, zero) + where(w_high > 0, w_high * high, zero)


@register("Clip")
def clip(node: Node, x: Value, low: Value = None, high: Value = None) -> Value:
    if node.opset < 11:
        low, high = node.attr("min"), node.attr("max")
    if node.aten == "aten.clamp.Tensor":
        return _clamp_by_tensors(x, low, high)
    # hardtanh, relu6 and clamp with number bounds: derivative 1 on (low, high) only, 0 at the bounds
    if low is not None:
        x = where(x <= low, astype(xp(low).asarray(low), x.dtype), x)
    if high is not None:
        x = where(x >= high, astype(xp(high).asarray(high), x.dtype), x)
    return x


@register("Relu")
def relu(node: Node, x: Value) -> Value:
    return where(x > 0, x, 0)


@register("LeakyRelu")
def leaky_relu(node: Node, x: Value) -> Value:
    return where(x > 0, x, x * node.attr("alpha", 0.01))


@register("PRelu")
def prelu(node: Node, x: Value, slope: Value) -> Value:
    return where(x > 0, x, x * slope)


@register("ThresholdedRelu")
def thresholded_relu(node: Node, x: Value) -> Value:
    return where(x > node.attr("alpha", 1.0), x, 0)


def _elu(x: Value, alpha: float) -> Value:
    m = xp(x)
    return where(x > 0, x, alpha * m.expm1(where(x > 0, 0, x)))  # inner where: no inf*0 in the tangent


@register("Elu")
def elu(node: Node, x: Value) -> Value:
    return _elu(x, node.attr("alpha", 1.0))


@register("Selu")
def selu(node: Node, x: Value) -> Value:
    return node.attr("gamma", 1.0507009873554805) * _elu(x, node.attr("alpha", 1.6732632423543772))


@register("Celu")
def celu(node: Node, x: Value) -> Value:
    alpha = node.attr("alpha", 1.0)
    return _elu(x / alpha, 1.0) * alpha


def _softplus(x: Value) -> Value:
    m = xp(x)
    # max(x, 0) + log1p(exp(-|x|)), stable for large |x|, with -|x| as a where: derivative sigmoid(0) = 1/2 at 0
    # (through JAX's abs, whose derivative is 1 at 0, it was -1/2)
    return where(x > 0, x, 0) + m.log1p(m.exp(where(x > 0, -x, x)))


@register("Softplus")
def softplus(node: Node, x: Value) -> Value:
    return _softplus(x)


@register("Softsign")
def softsign(node: Node, x: Value) -> Value:
    return x / (1 + xp(x).abs(x))


@register("Mish")
def mish(node: Node, x: Value) -> Value:
    return x * xp(x).tanh(_softplus(x))


def _hard_sigmoid(x: Value, alpha: float, beta: float) -> Value:
    """``clip(alpha·x + beta, 0, 1)``, flat at its bounds as torch's; the bounds are tested on ``x`` itself
    (``x ≤ -beta/alpha``), as torch does: on ``alpha·x + beta`` a rounding (or an FMA in one compiled program and
    not another) decides which side of the kink an exact ``x = -3`` lands on."""
    low, high = -beta / alpha, (1 - beta) / alpha
    return astype(where(x <= low, 0, where(x >= high, 1, alpha * x + beta)), x.dtype)


# The slope of torch's hardsigmoid backward in every dtype: ATen multiplies by ``1.0f / 6.0f`` (0.1666666716 in
# float64, while the value is (x + 3) / 6 exactly): a float64 kernel taking 1/6 was 3e-8 off torch's.
_HARDSIGMOID_SLOPE = float(np.float32(1.0) / np.float32(6.0))


@register("HardSigmoid")
def hard_sigmoid(node: Node, x: Value) -> Value:
    if not node.aten.startswith("aten.hardsigmoid"):
        return _hard_sigmoid(x, node.attr("alpha", 0.2), node.attr("beta", 0.5))
    value = _hard_sigmoid(x, 1.0 / 6.0, 0.5)  # exactly torch's (x + 3) / 6, not the float32 attribute 1/6
    if is_static(x) or x.dtype != jnp.float64:
        return value
    low, high = -3.0, 3.0  # torch's slope inside, its value everywhere
    slope = where((x > low) & (x < high), _HARDSIGMOID_SLOPE * x, 0.0)
    return astype(lax.stop_gradient(value - slope) + slope, x.dtype)


@register("HardSwish")
def hard_swish(node: Node, x: Value) -> Value:
    return x * _hard_sigmoid(x, 1.0 / 6.0, 0.5)


@register("Gelu")
def gelu(node: Node, x: Value) -> Value:
    m = xp(x)
    if node.attr("approximate", "none") == "tanh":
        return 0.5 * x * (1 + m.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))
    return 0.5 * x * (1 + _erf(x * (1 / math.sqrt(2))))
