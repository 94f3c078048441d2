"""The NTK by structured derivatives agrees across the two conversion routes (onnx-tf, onnx-jax).

onnx2tf rounds through float32, so the routes are compared in float32 (1e-5 relative); in float64 only onnx-jax
runs, and it matches the oracle to 1e-10 (tests/test_structured_torch.py).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from _zoo import make

from torchntk.bridge import structured_ntk_fn
from torchntk.converters import to_jax


def _route_ntk(model, x1, x2, route):
    converted = to_jax(model, x1, route=route)
    assert converted.route == route

    def batched(params, inputs):
        return jax.vmap(lambda *example: converted.fn(params, *example))(*inputs)

    ntk_fn = structured_ntk_fn(batched)
    as_jax = lambda xs: tuple(jax.numpy.asarray(x.numpy()) for x in xs)  # noqa: E731
    return np.asarray(ntk_fn(as_jax(x1), as_jax(x2), converted.params))


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "residual", "two_inputs", "conv_map"])
def test_routes_agree(name):
    model, x1, x2 = make(name, dtype=torch.float32)
    model.eval()
    via_tf = _route_ntk(model, x1, x2, "onnx-tf")
    via_jax = _route_ntk(model, x1, x2, "onnx-jax")
    assert via_tf.shape == via_jax.shape
    assert np.abs(via_tf - via_jax).max() / np.abs(via_jax).max() < 1e-5
