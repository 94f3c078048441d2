"""Torch-native NTK methods written with ``torch.func``: no JAX needed."""

from torchntk.torch_native.jacobian_contraction import jacobian_contraction
from torchntk.torch_native.ntk_vector_products import ntk_vector_product, ntk_vector_products

__all__ = ["jacobian_contraction", "ntk_vector_product", "ntk_vector_products"]
