"""Structured derivatives through rolled scans (a network's repeated blocks as one loop) against the explicit
Jacobian oracle (float64, 1e-10), and the program staying one loop whatever the number of iterations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from test_bridge_ntk import assert_matches

from torchntk.bridge import structured_ntk_fn
from torchntk.bridge.cotangents import find_uses
from torchntk.bridge.jaxpr_tools import trace_program
from torchntk.bridge.structured import structured_ntk_parts


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _normal(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    return scale * np.random.default_rng(seed).standard_normal(shape)


def _blocks(count: int, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    return {
        f"{name}{k}": _normal(seed + 10 * k + i, shape, 0.5)
        for k in range(count)
        for i, (name, shape) in enumerate(shapes.items())
    }


def _stacked(params: dict, name: str, count: int) -> jax.Array:
    return jnp.stack([params[f"{name}{k}"] for k in range(count)])


D = 4


def residual_mlp(count: int):
    """h ← h + tanh(h W_k + b_k), a scan over stacked per-block weights; outputs (N, 3)."""

    def f(p, x):
        h = jnp.tanh(x @ p["w_in"])

        def block(h, wb):
            w, b = wb
            return h + jnp.tanh(h @ w + b), None

        h, _ = lax.scan(block, h, (_stacked(p, "w", count), _stacked(p, "b", count)))
        return h @ p["w_out"]

    params = _blocks(count, {"w": (D, D), "b": (D,)}) | {"w_in": _normal(1, (3, D)), "w_out": _normal(2, (D, 3))}
    return f, params


def conv_blocks(count: int):
    """Residual conv blocks (NHWC, 3×3 SAME, a per-channel scale and bias, relu) rolled; pooled to (N, 2)."""

    def conv(h, w):
        return lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def f(p, x):
        h = conv(x, p["stem"])

        def block(h, ws):
            w, scale, bias = ws
            return h + jax.nn.relu(conv(h, w) * scale + bias), None

        xs = (_stacked(p, "w", count), _stacked(p, "s", count), _stacked(p, "b", count))
        h, _ = lax.scan(block, h, xs)
        return h.mean((1, 2)) @ p["head"]

    params = _blocks(count, {"w": (3, 3, 3, 3), "s": (3,), "b": (3,)})
    params |= {"stem": _normal(3, (3, 3, 2, 3), 0.5), "head": _normal(4, (3, 2))}
    return f, params


def tied_in_body(count: int):
    """Each block uses its weight twice (h W + (h W)ᵀ-like second use through a reshape), reversed scan, with the
    per-iteration outputs summed into the result, and two carries."""

    def f(p, x):
        h, g = jnp.tanh(x @ p["w_in"]), jnp.ones((x.shape[0], D))

        def block(carry, w):
            h, g = carry
            w2 = w.reshape(D * D)[::-1].reshape(D, D)  # the same slice, relabeled: a second use
            h = h + jnp.sin(h @ w) * g
            return (h, g * jnp.cos(h @ w2)), jnp.tanh(h).sum(-1)

        (h, g), ys = lax.scan(block, (h, g), _stacked(p, "w", count), reverse=True)
        return jnp.concatenate([h @ p["w_out"], (ys.T * g.sum(-1, keepdims=True))[:, :2]], axis=-1)

    params = _blocks(count, {"w": (D, D)}) | {"w_in": _normal(5, (3, D)), "w_out": _normal(6, (D, 2))}
    return f, params


def two_runs(count: int):
    """Two scans of identical shapes (their contractions are grouped across the scans), and one leaf scanned whole:
    a single parameter ``W`` of shape (count, D, D) sliced per iteration."""

    def f(p, x):
        h = jnp.tanh(x @ p["w_in"])

        def block(h, w):
            return h + jnp.tanh(h @ w), None

        h, _ = lax.scan(block, h, _stacked(p, "w", count))
        h, _ = lax.scan(block, h, p["W"])
        return h @ p["w_out"]

    params = _blocks(count, {"w": (D, D)}) | {"W": _normal(7, (count, D, D), 0.5)}
    params |= {"w_in": _normal(8, (3, D)), "w_out": _normal(9, (D, 3))}
    return f, params


def shared_weight(count: int):
    """A weight every iteration reads whole (a scan const): not rollable, so the scan is unrolled."""

    def f(p, x):
        h = jnp.tanh(x @ p["w_in"])

        def block(h, w):
            return h + jnp.tanh(h @ w) * p["shared"], None

        h, _ = lax.scan(block, h, _stacked(p, "w", count))
        return h @ p["w_out"]

    params = _blocks(count, {"w": (D, D)}) | {"shared": _normal(10, (D,)), "w_in": _normal(11, (3, D))}
    params |= {"w_out": _normal(12, (D, 3))}
    return f, params


def nested(count: int):
    """A scan inside a scan's body, both over parameter slices: unrolled."""

    def f(p, x):
        h = jnp.tanh(x @ p["w_in"])

        def inner(h, w):
            return h + jnp.tanh(h @ w), None

        def outer(h, ws):
            return lax.scan(inner, h, ws)[0], None

        ws = _stacked(p, "w", count).reshape(count // 2, 2, D, D)
        h, _ = lax.scan(outer, h, ws)
        return h @ p["w_out"]

    params = _blocks(count, {"w": (D, D)}) | {"w_in": _normal(13, (3, D)), "w_out": _normal(14, (D, 3))}
    return f, params


MODELS = {"residual_mlp": residual_mlp, "conv": conv_blocks, "tied": tied_in_body, "two_runs": two_runs}
AXES = [{}, {"trace_axes": (-1,)}, {"diagonal_axes": (-1,)}, {"output_block": 1}, {"vmap_axes": None}]


def _inputs(name: str, n: int, seed: int) -> np.ndarray:
    return _normal(seed, (n, 4, 4, 2) if name == "conv" else (n, 3))


def _rolled(f, params, x) -> bool:
    """Whether the structured program keeps f's scans rolled (its uses found in their bodies)."""
    linear = jax.linearize(lambda p: f(p, x[:1]), params)[1]
    try:
        uses = find_uses(trace_program(linear, params))[0]
    except Exception:
        return False
    return any(use.scan is not None for use in uses)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("axes", AXES, ids=lambda a: ",".join(a) or "plain")
def test_rolled_scans_match_the_oracle(name, axes):
    f, params = MODELS[name](4)
    x1, x2 = _inputs(name, 3, 20), _inputs(name, 2, 21)
    assert _rolled(f, params, x1)
    assert_matches(f, x1, x2, params, **axes)


@pytest.mark.parametrize("name", MODELS)
def test_rolled_scans_symmetric_kernel(name):
    f, params = MODELS[name](3)
    x = _inputs(name, 4, 22)
    assert_matches(f, x, None, params)


@pytest.mark.parametrize("make", [shared_weight, nested], ids=["shared", "nested"])
def test_scans_that_cannot_stay_rolled_are_unrolled(make):
    f, params = make(4)
    x1, x2 = _normal(23, (3, 3)), _normal(24, (2, 3))
    assert not _rolled(f, params, x1)
    assert_matches(f, x1, x2, params)
    assert_matches(f, x1, x2, params, trace_axes=(-1,))


def test_rolled_program_does_not_grow_with_iterations():
    """The ingredients and the contraction of 2 blocks and of 12 blocks are programs of the same size."""
    sizes = []
    for count in (2, 12):
        f, params = residual_mlp(count)
        x = _inputs("residual_mlp", 3, 25)
        ingredients_fn, contract_fn = structured_ntk_parts(f)
        jaxpr = jax.make_jaxpr(lambda p, a, i=ingredients_fn, c=contract_fn: c(i(a, p)))(params, x)
        sizes.append(len(jaxpr.jaxpr.eqns) - 2 * count)  # the per-block weights are stacked: 2 per block
    assert sizes[0] == sizes[1]


def test_rolled_float32_close_to_unrolled():
    f, params = conv_blocks(4)
    x = _inputs("conv", 3, 26).astype(np.float32)
    params32 = {k: v.astype(np.float32) for k, v in params.items()}
    with jax.enable_x64(False):
        got = structured_ntk_fn(f)(x, None, params32)
    want = structured_ntk_fn(f)(x.astype(np.float64), None, params)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.abs(want).max()))
