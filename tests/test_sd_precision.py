"""float32 structured derivatives as accurate as float32 Jacobian contraction.

A kernel entry sums over a layer's θ and the outputs: millions of terms (2.4M for a 32→32 3×3 conv with O = 256).
XLA:CPU adds a float32 dot's terms one after another (error ~K·ε, 1e-3 relative there), so
:func:`torchntk.bridge.mjjmp.accurate_contract` keeps every dot's sum short and sums the rest with reductions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import opt_einsum
import pytest
import torch
from _oracle import oracle_ntk
from torch import nn

import torchntk
from torchntk.bridge.mjjmp import LONGEST_SUM, accurate_contract


def relative_error(value, reference) -> float:
    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(value - reference).max() / np.abs(reference).max())


def test_a_long_float32_sum_stays_accurate():
    rng = np.random.default_rng(0)
    a, b = (rng.random((2_400_000, 3)).astype(np.float32) for _ in range(2))
    reference = a.astype(np.float64).T @ b.astype(np.float64)
    plain = jax.jit(lambda a, b: opt_einsum.contract("ka,kb->ab", a, b))(a, b)
    ours = jax.jit(lambda a, b: accurate_contract("ka,kb->ab", a, b))(a, b)
    assert relative_error(ours, reference) < 1e-5
    # What the test guards against: when XLA's own dot is as accurate, this test no longer shows anything.
    assert relative_error(plain, reference) > 10 * relative_error(ours, reference)


@pytest.mark.parametrize(
    "spec, shapes",
    [
        (
            "acneml,anmlfgh,bkjifgh,bckeji->ab",
            [(2, 5, 1, 4, 6, 6), (2, 1, 6, 6, 3, 2, 2), (3, 1, 6, 6, 3, 2, 2), (3, 5, 1, 4, 6, 6)],
        ),
        ("ij,jk,kl->il", [(4, 300), (300, 200), (200, 5)]),
        ("ab,ab->", [(130, 140), (130, 140)]),
    ],
)
def test_accurate_contract_equals_einsum(spec, shapes, monkeypatch):
    monkeypatch.setattr("torchntk.bridge.mjjmp.LONGEST_SUM", 7)  # split every step, even these small ones
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        operands = [jnp.asarray(rng.normal(size=shape)) for shape in shapes]
        assert relative_error(accurate_contract(spec, *operands), np.einsum(spec, *operands)) < 1e-12
    assert LONGEST_SUM >= 1024


def test_float32_sd_tile_of_several_examples_matches_the_oracle():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 256),
    )
    x = torch.randn(3, 3, 32, 32)
    reference = oracle_ntk(model.double(), (x.double(),), None, trace_axes=(-1,))
    kernel = torchntk.ntk(model.float(), x, trace_axes=(-1,), implementation="structured_derivatives")
    assert relative_error(kernel, reference) < 2e-5
