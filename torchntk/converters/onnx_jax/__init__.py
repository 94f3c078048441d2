"""The "onnx-jax" route: interpret an ONNX graph op by op with ``jax.lax``, without TensorFlow.

>>> g = onnx_to_jax(model_proto)
>>> outputs = g(*graph_inputs)  # list of jax.Array, one per graph output

Handlers live in ``ops_*`` modules (one short function per op, registered in ``_core.HANDLERS``);
``SUPPORTED_OPS`` lists them.
"""

from . import ops_elementwise, ops_nn, ops_reduce, ops_resize, ops_tensor  # noqa: F401  (register handlers)
from ._core import HANDLERS, UnsupportedOnnxOp
from ._interpreter import OnnxJaxFunction, onnx_to_jax

SUPPORTED_OPS: frozenset[str] = frozenset(HANDLERS)

__all__ = ["SUPPORTED_OPS", "OnnxJaxFunction", "UnsupportedOnnxOp", "onnx_to_jax"]
