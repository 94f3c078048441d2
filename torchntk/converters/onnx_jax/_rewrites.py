"""Graph rewrites applied once at conversion time, so that linearized programs avoid needless primitives, and so
that the function is torch's where the exported graph is not quite.

The dynamo exporter writes ``x @ W.T`` (torch Linear on a >2-D input) as ``MatMul(x, Transpose(W))``. Run
literally, the tangent of every such weight goes through a ``transpose`` before the ``dot_general``; as an
Einsum ``...k,nk->...n`` it is a single ``dot_general`` contracting W's second axis, like Gemm with transB.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from ._core import Node


def fuse_transposed_matmul(nodes: Sequence[Node], graph_outputs: Sequence[str]) -> list[Node]:
    """Replace ``MatMul(a, Transpose(w, perm=[1, 0]))`` by ``Einsum(a, w)`` when the transpose has no other use."""
    producers = {out: node for node in nodes for out in node.outputs}
    uses = Counter(name for node in nodes for name in node.inputs) + Counter(graph_outputs)
    fused, dropped = [], set()
    for node in nodes:
        transpose = producers.get(node.inputs[1]) if node.op_type == "MatMul" else None
        if (
            transpose is not None
            and transpose.op_type == "Transpose"
            and list(transpose.attr("perm", [])) == [1, 0]
            and uses[node.inputs[1]] == 1
        ):
            dropped.add(id(transpose))
            node = Node(
                "Einsum",
                node.name,
                node.opset,
                (node.inputs[0], transpose.inputs[0]),
                node.outputs,
                {"equation": "...k,nk->...n"},
            )
        fused.append(node)
    return [node for node in fused if id(node) not in dropped]


# aten ops whose ONNX counterpart is defined for float32 only: the exporter wraps them in Cast(float32) ... Cast back.
_FLOAT32_ONLY = frozenset({"aten.celu.default"})


def drop_precision_casts(nodes: Sequence[Node]) -> list[Node]:
    """The exporter's Casts around an op ONNX defines for float32 only (``Celu``) become identities, so a float64
    model's op runs in float64 as torch's does (through float32 it disagreed with torch by 5.6e-9 and was refused)."""
    return [
        Node("Identity", n.name, n.opset, n.inputs[:1], n.outputs, {}, n.aten)
        if n.op_type == "Cast" and n.aten in _FLOAT32_ONLY
        else n
        for n in nodes
    ]


def fuse_clamp_by_tensors(nodes: Sequence[Node], graph_outputs: Sequence[str]) -> list[Node]:
    """``Min(Max(x, low), high)`` exported from one ``clamp(x, low, high)`` with tensor bounds becomes one ``Clip``
    of that call, whose handler has torch's derivative where the bounds are equal (each node alone cannot: a
    quarter went to x where torch gives all of it, and half to low where torch gives all)."""
    producers = {out: node for node in nodes for out in node.outputs}
    uses = Counter(name for node in nodes for name in node.inputs) + Counter(graph_outputs)
    fused, dropped = [], set()
    for node in nodes:
        if node.op_type == "Min" and node.aten == "aten.clamp.Tensor" and node.call and len(node.inputs) == 2:
            inner = [name for name in node.inputs if (p := producers.get(name)) is not None and p.call == node.call]
            maximum = producers[inner[0]] if len(inner) == 1 else None
            if (
                maximum is not None
                and maximum.op_type == "Max"
                and len(maximum.inputs) == 2
                and uses[maximum.outputs[0]] == 1
            ):
                high = next(name for name in node.inputs if name != inner[0])
                dropped.add(id(maximum))
                inputs = (maximum.inputs[0], maximum.inputs[1], high)
                node = Node("Clip", node.name, node.opset, inputs, node.outputs, {}, node.aten, (), node.call)
        fused.append(node)
    return [node for node in fused if id(node) not in dropped]
