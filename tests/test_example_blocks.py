"""x2=None: the symmetric kernel from the upper triangle of example blocks equals the full contraction and the
explicit-Jacobian oracle (float64), for every kind of output axes, block counts that do and do not divide N, and
the cases where no blocking applies (a diagonal batch axis, vmap_axes=None, programs too large to unroll)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracle import oracle_ntk
from _zoo import make
from test_bridge_ntk import AXES as MULTI_AXES
from test_bridge_ntk import CNN_PARAMS, FUNCTIONS, MULTI_PARAMS, _cnn, _multi_axis, _normal, oracle

import torchntk
from torchntk.bridge import example_blocks, structured_ntk_fn
from torchntk.bridge.structured import structured_ntk_parts

TOL = 1e-10


def _assert_close(actual, expected, tol=TOL):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape
        np.testing.assert_allclose(a, e, atol=tol * max(1.0, float(np.abs(e).max())), rtol=0)


@pytest.fixture
def _x64():
    with jax.enable_x64(True):
        yield


def test_block_count():
    assert example_blocks.block_count(8, 1) == 4
    assert example_blocks.block_count(6, 1) == 3
    assert example_blocks.block_count(9, 1) == 3
    assert example_blocks.block_count(7, 1) == 1  # a prime: no equal blocks
    assert example_blocks.block_count(1, 1) == 1
    assert example_blocks.block_count(8, 5) == 2  # 10 pairs × 5 > 40, 3 pairs × 5 ≤ 40
    assert example_blocks.block_count(8, 17) == 1  # even 3 pairs × 17 > 40


def _parts_both_ways(f, x, params, **axes):
    """(symmetric contraction, full contraction, blocks used) of x with itself."""
    ingredients_fn, contract_fn = structured_ntk_parts(f, **axes)
    side = jax.jit(ingredients_fn)(x, params)
    return jax.jit(lambda s: contract_fn(s, None))(side), jax.jit(lambda s: contract_fn(s, s))(side)


def _symmetric_cases() -> list:
    """Every kind of output axes with N = 7 (prime: a partial last block) by default, and N = 8, 6, 2, 1 (4, 3, 1
    and 2 blocks) with the free axes; the rest of the product runs with -m slow (the default run's budget)."""
    cases = []
    for index, axes in enumerate(MULTI_AXES):
        for n in (8, 6, 7, 2, 1):
            slow = n != 7 and index != 0
            cases.append(pytest.param(n, *axes, marks=[pytest.mark.slow] if slow else []))
    return cases


@pytest.mark.usefixtures("_x64")
@pytest.mark.parametrize("n, trace_axes, diagonal_axes", _symmetric_cases())
def test_symmetric_equals_full_and_oracle(n, trace_axes, diagonal_axes):
    """(N, 2, 3) outputs with traced, diagonal and free axes; N with 4, 3, 1 (prime) and 2 blocks."""
    x = _normal(20 + n, (n, 3))
    axes = {"trace_axes": trace_axes, "diagonal_axes": diagonal_axes}
    symmetric, full = _parts_both_ways(_multi_axis, x, MULTI_PARAMS, **axes)
    _assert_close(symmetric, full)
    want = oracle(_multi_axis, x, None, MULTI_PARAMS, trace_axes, diagonal_axes)
    _assert_close(symmetric, want)
    _assert_close(structured_ntk_fn(_multi_axis, **axes)(x, None, MULTI_PARAMS), want)


@pytest.mark.usefixtures("_x64")
def test_symmetric_cnn():
    x = _normal(31, (4, 6, 6, 2))
    symmetric, full = _parts_both_ways(_cnn, x, CNN_PARAMS)
    _assert_close(symmetric, full)
    _assert_close(symmetric, oracle(_cnn, x, None, CNN_PARAMS))


@pytest.mark.usefixtures("_x64")
def test_symmetric_pytree_outputs():
    def two_heads(p, x):
        h = jnp.tanh(x @ p["w1"])
        return {"a": h @ p["w2"], "b": jnp.sin(h) @ p["w3"]}

    params = {"w1": _normal(7, (3, 4)), "w2": _normal(8, (4, 5)), "w3": _normal(9, (4, 2))}
    x = _normal(10, (6, 3))
    for axes in ({}, {"trace_axes": (-1,)}, {"diagonal_axes": (-1,)}):
        symmetric, full = _parts_both_ways(two_heads, x, params, **axes)
        _assert_close(symmetric, full)
        want = oracle(two_heads, x, None, params, axes.get("trace_axes", ()), axes.get("diagonal_axes", ()))
        _assert_close(symmetric, want)


@pytest.mark.usefixtures("_x64")
@pytest.mark.parametrize("name", ["mlp", "used_twice", "dot_and_transpose"])
def test_symmetric_small_functions(name):
    f, params = FUNCTIONS[name]
    x = np.round(_normal(5, (4, 3)) * 8) / 8
    symmetric, full = _parts_both_ways(f, x, params)
    _assert_close(symmetric, full)
    _assert_close(symmetric, oracle(f, x, None, params))


@pytest.mark.usefixtures("_x64")
def test_blocks_are_really_used(monkeypatch):
    """The symmetric program contracts B(B+1)/2 pairs of blocks (counted), not N² pairs; the count follows
    block_count's bound on the program's size."""
    calls = []
    real = example_blocks.symmetric_kernels

    def counting(count, blocks, take, contract, mirrors):
        calls.append((count, blocks))
        return real(count, blocks, take, contract, mirrors)

    monkeypatch.setattr(example_blocks, "symmetric_kernels", counting)
    x = _normal(3, (8, 3))
    _parts_both_ways(_multi_axis, x, MULTI_PARAMS)
    assert calls == [(8, 4)]
    calls.clear()
    _parts_both_ways(_multi_axis, x, MULTI_PARAMS, diagonal_axes=(0,))  # paired: no blocking at all
    assert calls == []
    monkeypatch.setattr(example_blocks, "MOST_CONTRACTIONS", 1)
    _parts_both_ways(_multi_axis, x, MULTI_PARAMS)
    assert calls == [(8, 1)]


@pytest.mark.usefixtures("_x64")
def test_unbatched_keeps_the_full_contraction():
    x = _normal(4, (4, 3))
    f, params = FUNCTIONS["mlp"]
    got = structured_ntk_fn(f, vmap_axes=None)(x, None, params)
    _assert_close(got, oracle(f, x, None, params, batched=False))


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "two_inputs"])
def test_torch_glue_diagonal_tiles(name):
    """torchntk.ntk(model, x) by structured derivatives, one tile and several (diagonal tiles symmetric, the
    others full), against the float64 oracle."""
    model, x, _ = make(name, n1=8)
    want = oracle_ntk(model, x, None)
    for chunk in (None, 4, 3):
        got = torchntk.ntk(model, x, implementation="structured_derivatives", chunk_size=chunk)
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-10 * float(want.abs().max()), rtol=0)
