"""ONNX rewrites that give the onnx-tf route torch's derivatives at kinks, before onnx2tf sees the graph.

The onnx-tf route's derivatives are JAX's derivatives of tf2jax's translations of onnx2tf's TensorFlow ops, and at
a kink they need not be torch's: ``Clip`` becomes ``jnp.clip`` (derivative split at a bound where torch's hardtanh
is flat), ``LeakyRelu`` becomes ``jax.nn.leaky_relu`` (1 at 0 where torch takes the slope), ``Abs`` JAX's ``abs`` (1
at 0, torch 0). Where the first example has no ties the conversion check cannot see it, and the NTK of every example
that has ties is silently another function's (hardtanh's kernel was 23% off, leaky_relu's 1.9%). Each op below is
rewritten as ONNX ``Where`` over comparisons of its input, which every route differentiates as a selection: the
derivative of the chosen branch, so the convention is the comparison's (``x > 0`` or ``x <= low``), chosen to be
torch's op by op (the aten op the node was exported from decides between ``clamp``'s conventions, as in the onnx-jax
handlers). ``tests/test_kink_conventions.py`` runs every convention on both routes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_jax._core import exported_from


class _Builder:
    """New nodes and scalar constants for one rewritten node, named after it."""

    def __init__(self, node: onnx.NodeProto, constants: list[onnx.TensorProto]) -> None:
        self.node, self.constants, self.nodes, self._count = node, constants, [], 0

    def _name(self) -> str:
        self._count += 1
        return f"{self.node.name or self.node.op_type}__torch_kink_{self._count}"

    def const(self, value: float) -> str:
        name = self._name()
        self.constants.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def ints(self, values: list[int]) -> str:
        name = self._name()
        self.constants.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def op(self, op_type: str, *inputs: str, output: str | None = None, **attrs) -> str:
        output = output or self._name()
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=self._name(), **attrs))
        return output


Rule = Callable[[_Builder, onnx.NodeProto], None]
_RULES: dict[str, Rule] = {}


def _rule(*op_types: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op_type in op_types:
            _RULES[op_type] = fn
        return fn

    return register


def _attr(node: onnx.NodeProto, name: str, default: float) -> float:
    for attribute in node.attribute:
        if attribute.name == name:
            return float(helper.get_attribute_value(attribute))
    return default


def _flat_outside(b: _Builder, x: str, low: str | None, high: str | None, output: str) -> None:
    """``x`` clamped to [low, high] with derivative 0 at the bounds (hardtanh, relu6, clamp with numbers)."""
    y = x
    if low:
        y = b.op("Where", b.op("LessOrEqual", y, low), low, y, output=None if high else output)
    if high:
        b.op("Where", b.op("GreaterOrEqual", y, high), high, y, output=output)


@_rule("Clip")
def _clip(b: _Builder, node: onnx.NodeProto) -> None:
    if exported_from(node) == "aten.clamp.Tensor":  # tensor bounds: torch splits at ties, as maximum/minimum do
        b.nodes.append(node)
        return
    low, high = (list(node.input[1:]) + ["", ""])[:2]
    if len(node.input) == 1:  # opset < 11: bounds as attributes
        low, high = b.const(_attr(node, "min", -3.4e38)), b.const(_attr(node, "max", 3.4e38))
    if not low and not high:
        b.op("Identity", node.input[0], output=node.output[0])
        return
    _flat_outside(b, node.input[0], low or None, high or None, node.output[0])


@_rule("Max", "Min")
def _clamp_by_max_min(b: _Builder, node: onnx.NodeProto) -> None:
    if exported_from(node) != "aten.clamp.default" or len(node.input) != 2:
        b.nodes.append(node)  # maximum/minimum: split at ties in torch and in JAX alike
        return
    x, bound = node.input
    outside = b.op("LessOrEqual" if node.op_type == "Max" else "GreaterOrEqual", x, bound)
    b.op("Where", outside, bound, x, output=node.output[0])


@_rule("LeakyRelu")
def _leaky_relu(b: _Builder, node: onnx.NodeProto) -> None:
    x = node.input[0]
    negative = b.op("Mul", x, b.const(_attr(node, "alpha", 0.01)))
    b.op("Where", b.op("Greater", x, b.const(0.0)), x, negative, output=node.output[0])


@_rule("PRelu")
def _prelu(b: _Builder, node: onnx.NodeProto) -> None:
    x, slope = node.input
    b.op("Where", b.op("Greater", x, b.const(0.0)), x, b.op("Mul", x, slope), output=node.output[0])


@_rule("Elu")
def _elu(b: _Builder, node: onnx.NodeProto) -> None:
    x = node.input[0]
    positive = b.op("Greater", x, b.const(0.0))
    below = b.op("Where", positive, b.const(0.0), x)  # exp of x ≤ 0 only: no overflow in the unused branch
    negative = b.op("Mul", b.const(_attr(node, "alpha", 1.0)), b.op("Sub", b.op("Exp", below), b.const(1.0)))
    b.op("Where", positive, x, negative, output=node.output[0])


@_rule("HardSigmoid")
def _hard_sigmoid(b: _Builder, node: onnx.NodeProto) -> None:
    alpha, beta = _attr(node, "alpha", 0.2), _attr(node, "beta", 0.5)
    if exported_from(node).startswith("aten.hardsigmoid"):
        alpha, beta = 1.0 / 6.0, 0.5
    x = node.input[0]
    line = b.op("Add", b.op("Mul", x, b.const(alpha)), b.const(beta))
    upper = b.op("Where", b.op("GreaterOrEqual", x, b.const((1 - beta) / alpha)), b.const(1.0), line)
    b.op("Where", b.op("LessOrEqual", x, b.const(-beta / alpha)), b.const(0.0), upper, output=node.output[0])


@_rule("Abs")
def _abs(b: _Builder, node: onnx.NodeProto) -> None:
    x = node.input[0]
    b.op("Mul", x, b.op("Sign", x), output=node.output[0])  # derivative sign(x): 0 at 0, as torch's


@_rule("ReduceL1")
def _reduce_l1(b: _Builder, node: onnx.NodeProto) -> None:
    x = node.input[0]
    axes = node.input[1] if len(node.input) > 1 else ""
    for attribute in node.attribute:  # opset < 18: axes as an attribute; ReduceSum takes them as an input
        if attribute.name == "axes":
            axes = b.ints(list(attribute.ints))
    keep = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "axes"}
    inputs = (b.op("Mul", x, b.op("Sign", x)), axes) if axes else (b.op("Mul", x, b.op("Sign", x)),)
    b.op("ReduceSum", *inputs, output=node.output[0], **keep)


def with_torch_kinks(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose kink ops are ``Where`` forms with torch's derivatives (module docstring)."""
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    graph = rewritten.graph
    constants: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        rule = _RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rule is None:
            nodes.append(node)
            continue
        builder = _Builder(node, constants)
        rule(builder, node)
        nodes.extend(builder.nodes)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(constants)
    return rewritten
