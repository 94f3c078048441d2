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
