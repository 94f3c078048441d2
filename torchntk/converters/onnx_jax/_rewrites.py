"""Graph rewrites applied once at conversion time, so that linearized programs avoid needless primitives.

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
