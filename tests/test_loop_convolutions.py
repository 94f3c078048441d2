"""Convolutions inside loops rewritten to XLA:CPU's fast layout: the same values and derivatives, and the layout."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from torchntk.converters.loop_convolutions import fast_convolutions


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _normal(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape) * 0.3


# (input layout, kernel layout, output layout, spatial input shape, kwargs): torch's NCHW, NHWC, 1-D and 3-D,
# strided, dilated, padded, grouped and depthwise convolutions.
CASES = {
    "nchw": ("NCHW", "OIHW", "NCHW", (6, 6), {}),
    "nhwc": ("NHWC", "HWIO", "NHWC", (6, 6), {}),
    "mixed": ("NHWC", "OIHW", "NCHW", (6, 6), {}),
    "strided_dilated": ("NCHW", "OIHW", "NCHW", (9, 9), {"window_strides": (2, 1), "rhs_dilation": (1, 2)}),
    "grouped": ("NCHW", "OIHW", "NCHW", (6, 6), {"feature_group_count": 2}),
    "depthwise": ("NCHW", "OIHW", "NCHW", (6, 6), {"feature_group_count": 4}),
    "1d": ("NCH", "OIH", "NCH", (7,), {}),
    "3d": ("NCDHW", "OIDHW", "NCDHW", (4, 4, 4), {}),
}
C = 4


def _model(case):
    lhs, rhs, out, spatial, kwargs = CASES[case]
    groups = kwargs.get("feature_group_count", 1)
    strides = kwargs.get("window_strides", (1,) * len(spatial))
    rhs_dilation = kwargs.get("rhs_dilation", (1,) * len(spatial))
    kernel_oi = {"O": C, "I": C // groups}
    kernel_shape = tuple(kernel_oi.get(d, 3) for d in rhs)
    x_shape = tuple({"N": 2, "C": C}.get(d, 0) for d in lhs)
    sizes = iter(spatial)
    x_shape = tuple(s if s else next(sizes) for s in x_shape)

    def conv(h, w):
        return lax.conv_general_dilated(
            h,
            w,
            strides,
            "SAME",
            rhs_dilation=rhs_dilation,
            dimension_numbers=(lhs, rhs, lhs),
            feature_group_count=groups,
        )

    def f(weights, x):
        def block(h, w):
            y = conv(h, w)
            if y.shape != h.shape:  # strided: brought back to h's shape by a second, transposed-layout use
                y = jnp.resize(y, h.shape)
            return h + jnp.tanh(y), None

        h, _ = lax.scan(block, x, weights)
        return lax.conv_general_dilated(
            h, weights[0], (1,) * len(spatial), "SAME", dimension_numbers=(lhs, rhs, out), feature_group_count=groups
        )

    weights = _normal(1, (3, *kernel_shape))
    return f, weights, _normal(2, x_shape)


@pytest.mark.parametrize("case", CASES)
def test_same_values_and_derivatives(case):
    f, weights, x = _model(case)
    loss = lambda w, x: jnp.sum(jnp.sin(f(w, x)))  # noqa: E731
    np.testing.assert_allclose(fast_convolutions(f)(weights, x), f(weights, x), rtol=1e-12, atol=1e-12)
    grads = jax.grad(loss, argnums=(0, 1))
    for got, want in zip(fast_convolutions(grads)(weights, x), grads(weights, x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)
    tangent = (_normal(3, weights.shape), _normal(4, x.shape))
    jvp = lambda w, x: jax.jvp(f, (w, x), tangent)  # noqa: E731
    for got, want in zip(fast_convolutions(jvp)(weights, x), jvp(weights, x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)


def _loop_convolution_layouts(fun, *args):
    """The dimension labels of the convolutions XLA keeps inside while loops, after optimisation."""
    text = jax.jit(fun).lower(*args).compile().as_text()
    lines = [line for line in text.splitlines() if " convolution(" in line and "while/body" in line]
    return [re.search(r"dim_labels=([^,]+),", line).group(1) for line in lines]


def test_loop_convolutions_take_the_fast_layout():
    f, weights, x = _model("nchw")
    grads = jax.grad(lambda w, x: jnp.sum(f(w, x) ** 2), argnums=(0, 1))
    before = _loop_convolution_layouts(grads, weights, x)
    after = _loop_convolution_layouts(fast_convolutions(grads), weights, x)
    assert before and any(label != "b01f_01io->b01f" for label in before)
    assert after and all(label == "b01f_01io->b01f" for label in after)


def test_loops_inside_calls_take_the_fast_layout():
    """A structured program's loops sit inside a jitted function: its scans are rewritten too (they were not:
    a rolled ResNet's derivative convolutions kept the kernel layout ``01oi``, 254 ms an iteration each at O0)."""
    f, weights, x = _model("nchw")
    grads = jax.jit(jax.grad(lambda w, x: jnp.sum(f(w, x) ** 2), argnums=(0, 1)))
    nested = jax.jit(lambda w, x: grads(w, x))
    for fun in (grads, nested):
        after = _loop_convolution_layouts(fast_convolutions(fun), weights, x)
        assert after and all(label == "b01f_01io->b01f" for label in after)
    for got, want in zip(fast_convolutions(nested)(weights, x), nested(weights, x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)


def test_functions_without_loops_are_unchanged():
    f = lambda w, x: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))  # noqa: E731
    w, x = _normal(5, (C, C, 3, 3)), _normal(6, (2, C, 5, 5))
    got = jax.make_jaxpr(fast_convolutions(f))(w, x)
    assert [e.primitive.name for e in got.jaxpr.eqns] == ["conv_general_dilated"]
    np.testing.assert_array_equal(fast_convolutions(f)(w, x), f(w, x))


def test_custom_derivative_rules_in_loops_are_kept():
    """``jax.nn.relu``'s custom rule gives 0 at 0 where ``max(x, 0)``'s own derivative gives 1/2: a function rewritten
    before it is differentiated (a converted model's fn) must keep the rule."""

    def f(w, x):
        def block(h, k):
            y = lax.conv_general_dilated(h, k, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
            return jax.nn.relu(y) + 0.5 * h, None  # h = 0 in the first block: y = 0 exactly, the kink

        return jnp.sum(lax.scan(block, x, w)[0] * x2)

    w, x, x2 = _normal(7, (2, C, C, 3, 3)), np.zeros((2, C, 5, 5)), _normal(8, (2, C, 5, 5))
    want = jax.grad(f, argnums=(0, 1))(w, x)
    got = jax.grad(fast_convolutions(f), argnums=(0, 1))(w, x)
    for g, v in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, v)


def test_convolutions_in_conditional_branches_take_the_fast_layout():
    """Output blocks along a free axis recompute ``x1``'s block in a ``lax.cond`` inside their loop: its branches'
    convolutions are rewritten too, with the same values and derivatives; the branch taken follows the index."""
    f, weights, x = _model("nchw")
    conv = lambda h, w: lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))  # noqa: E731

    def g(w, x):
        def step(h, i):
            kept = lax.cond(i % 2 == 0, lambda h: jnp.tanh(conv(h, w[0])), lambda h: h * 0.5, h)
            return kept + conv(h, w[1]), None

        h, _ = lax.scan(step, x, jnp.arange(3))
        return lax.cond(h.sum() > 0, lambda h: conv(h, w[2]), lambda h: -h, h)

    grads = jax.grad(lambda w, x: jnp.sum(jnp.sin(g(w, x))), argnums=(0, 1))
    for fun in (g, grads):
        got, want = fast_convolutions(fun)(weights, x), fun(weights, x)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12)
    before = _loop_convolution_layouts(grads, weights, x)
    after = _loop_convolution_layouts(fast_convolutions(grads), weights, x)
    assert before and any(label != "b01f_01io->b01f" for label in before)
    assert len(after) >= 3 and all(label == "b01f_01io->b01f" for label in after)
