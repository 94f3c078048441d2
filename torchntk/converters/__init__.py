"""torchntk.converters: turn a PyTorch model into a pure JAX function of its weights (see ``to_jax``)."""

from .errors import ConversionError
from .onnx_export import export_onnx

__all__ = ["ConversionError", "export_onnx"]
