"""torchntk.bridge: structured derivatives on JAX functions (and, via ``torch_glue``, on PyTorch models)."""

from torchntk.bridge.structured import structured_ntk_fn

__all__ = ["structured_ntk_fn"]
