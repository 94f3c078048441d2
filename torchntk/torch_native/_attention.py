"""Attention that forward-mode AD and vmap handle, for both torch-native methods.

``F.scaled_dot_product_attention`` dispatches on CPU and GPU to fused kernels (flash, memory-efficient, cuDNN)
that have no forward-mode derivative, and ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` take a fused
"fast path" in eval mode (``_native_multi_head_attention``, ``_transformer_encoder_layer_fwd``) that has none
either. Inside :func:`differentiable_attention` attention runs through the math backend — the same function
written with matmul and softmax, which every AD mode supports and vmap batches — and the fast paths are off.
Under Jacobian contraction's ``vmap(jacrev)`` the fused CPU kernels have no batching rule (torch loops over the
examples and warns): the math backend was 2-3x faster there (``benchmarks/reliability_overhead.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


@contextmanager
def differentiable_attention() -> Iterator[None]:
    """SDPA by its math backend and the nn attention fast paths disabled for the block; both restored after."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
