"""torchntk.converters: turn a PyTorch model into a pure JAX function of its weights (see ``to_jax``).

>>> jm = to_jax(model.eval(), (x,))          # x: (N, *in) with a batch axis
>>> jm.fn(jm.params, x0)                      # one example x0: (*in,) -> (*out,)
"""

from .api import JaxModel, clear_memory_cache, forget, from_memory, is_converted, to_jax, to_jax_while_checking
from .check import DERIVATIVE_TOL, VALUE_TOL, checked_program, random_direction
from .errors import ConversionError, NonFiniteCheckError, RouteFellBack, TrainingFlagError
from .onnx_export import export_onnx

__all__ = [
    "ConversionError",
    "JaxModel",
    "NonFiniteCheckError",
    "RouteFellBack",
    "TrainingFlagError",
    "DERIVATIVE_TOL",
    "VALUE_TOL",
    "checked_program",
    "clear_memory_cache",
    "export_onnx",
    "forget",
    "from_memory",
    "is_converted",
    "random_direction",
    "to_jax",
    "to_jax_while_checking",
]
