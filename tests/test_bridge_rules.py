"""Each structure rule against ``jax.jacfwd`` (float64, 1e-10): the structured form rebuilds the exact Jacobian."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from torchntk.bridge.jaxpr_tools import evaluate, trace_program
from torchntk.bridge.rules import STRUCTURE_RULES, RuleContext, plain_jacobian, structured_jacobian
from torchntk.bridge.structure import FREE, TILED, Structure, StructuredJacobian, to_dense
from torchntk.converters.compile_cache import FAST_COMPILE_OPTIONS

TOL = 1e-10


def _rng(seed: int, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float64)


def rule_context(fun, theta_shape, name: str, *, linearize: bool = False) -> RuleContext:
    """Context of the first ``name`` equation consuming θ in ``fun`` (or in its linearization)."""
    theta = _rng(0, theta_shape)
    traced = fun
    if linearize:  # the primitive only appears in a linear (JVP) program, e.g. add_any, select_and_gather_add
        _, traced = jax.linearize(fun, theta)
    program = trace_program(traced, theta)
    inputs = [program.inputs[0]]
    for eqn in program.eqns:  # follow θ through inserted converts/copies to the primitive under test
        if any(a in inputs for a in eqn.inputs):
            if eqn.name == name:
                break
            inputs += list(eqn.outputs)
    else:
        raise AssertionError(f"no {name} consumes θ in {[e.name for e in program.eqns]}")
    wanted = [a for a in eqn.inputs if isinstance(a, int)]
    found = jax.jit(lambda t: [evaluate(program, [t])[1][a] for a in wanted])(jnp.zeros(theta_shape, jnp.float64))
    env = dict(zip(wanted, found, strict=True))
    values = tuple(a.value if not isinstance(a, int) else env[a] for a in eqn.inputs)
    arg = next(i for i, a in enumerate(eqn.inputs) if a in inputs)
    y = eqn.outputs[0]
    return RuleContext(name, eqn.params, values, arg, 0, program.shapes[y], program.dtypes[y], eqn.bind)


def check_rule(ctx: RuleContext, *, expect: Structure | None = None) -> StructuredJacobian:
    """The registered rule applies, claims ``expect`` (if given), and rebuilds the Jacobian exactly.

    Everything runs in one ``jax.jit`` (eager dispatch of many small ops is slow to compile), compiled without
    LLVM's optimisation passes (float64 convolutions' Jacobians: ~3 s each with them, ~0.5 s without).
    """
    found: list[StructuredJacobian] = []
    y_ndim = len(ctx.y_shape)

    def compare(inputs):
        here = dataclasses.replace(ctx, inputs=inputs)
        jac = STRUCTURE_RULES[ctx.name](here)
        assert jac is not None, f"rule for {ctx.name} declined"
        found.append(jac)
        truth = jax.jacfwd(here.as_function_of_theta())(jnp.zeros_like(here.theta))
        cotangent = _rng(1, (3, *ctx.y_shape)).astype(truth.dtype)
        expected = jnp.tensordot(cotangent, truth, y_ndim)  # (3, *θ)
        pulled = cotangent if jac.pullback is None else jax.vmap(jac.pullback)(cotangent)
        dense = to_dense(jac, pulled.shape[1:], ctx.theta_shape)
        product = jnp.tensordot(pulled, dense, pulled.ndim - 1)
        return jac.sub, (dense if jac.pullback is None else truth), truth, product, expected

    sub, dense, truth, product, expected = jax.jit(compare).lower(ctx.inputs).compile(FAST_COMPILE_OPTIONS)(ctx.inputs)
    jac = found[0]
    if expect is not None:
        assert jac.structure == expect
    pulled_shape = ctx.y_shape if jac.pullback is None else jax.eval_shape(jac.pullback, jnp.zeros(ctx.y_shape)).shape
    assert sub.shape == jac.structure.sub_shape(pulled_shape, ctx.theta_shape)
    np.testing.assert_allclose(dense, truth, atol=TOL, rtol=0)
    np.testing.assert_allclose(product, expected, atol=TOL, rtol=0)
    return StructuredJacobian(jac.structure, sub, jac.pullback)


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


# ----------------------------------------------------------------------------------------------------------------
# dot_general: θ's free axes constant-block-diagonal, batch axes block-diagonal.

DOT_CASES = [
    # (lhs shape, rhs shape, dimension_numbers, which argument is θ, expected y_axes, expected theta_in_sub)
    ((3, 4), (4, 5), (((1,), (0,)), ((), ())), 1, (FREE, 1), (True, False)),  # x @ θ
    ((5, 4), (4, 3), (((1,), (0,)), ((), ())), 0, (0, FREE), (False, True)),  # θ @ x
    ((2, 3, 4), (2, 4, 5), (((2,), (1,)), ((0,), (0,))), 1, (0, FREE, 2), (True, True, False)),  # batched
    ((2, 3, 4), (2, 4, 5), (((2,), (1,)), ((0,), (0,))), 0, (0, 1, FREE), (True, False, True)),
    ((4, 2, 5), (3, 5, 4), (((0, 2), (2, 1)), ((), ())), 0, (1, FREE), (True, False, True)),  # two contractions
    ((5, 2, 4), (4, 3, 2), (((2,), (0,)), ((1,), (2,))), 0, (1, 0, FREE), (False, True, True)),  # odd batch axes
]


@pytest.mark.parametrize("lhs_shape, rhs_shape, dims, theta_arg, y_axes, in_sub", DOT_CASES)
def test_dot_general(lhs_shape, rhs_shape, dims, theta_arg, y_axes, in_sub):
    other = _rng(2, (lhs_shape, rhs_shape)[1 - theta_arg])
    if theta_arg == 0:
        fun = lambda t: lax.dot_general(t, other, dims)  # noqa: E731
    else:
        fun = lambda t: lax.dot_general(other, t, dims)  # noqa: E731
    theta_shape = (lhs_shape, rhs_shape)[theta_arg]
    check_rule(rule_context(fun, theta_shape, "dot_general"), expect=Structure(y_axes, in_sub))


# ----------------------------------------------------------------------------------------------------------------
# conv_general_dilated: output features constant-block-diagonal (block-diagonal when grouped).

CONV_CASES = [
    # lhs shape, rhs (θ) shape, specs, kwargs
    ((2, 3, 6, 5), (4, 3, 3, 2), ("NCHW", "OIHW", "NCHW"), {}),
    ((2, 6, 5, 3), (3, 2, 3, 4), ("NHWC", "HWIO", "NHWC"), {"window_strides": (2, 1), "padding": "SAME"}),
    ((1, 3, 7, 7), (4, 3, 3, 3), ("NCHW", "OIHW", "NCHW"), {"padding": ((1, 2), (0, 1)), "rhs_dilation": (2, 1)}),
    ((2, 3, 5, 4), (2, 3, 2, 2), ("NCHW", "OIHW", "NCHW"), {"lhs_dilation": (2, 1), "padding": ((1, 1), (1, 0))}),
    ((2, 4, 5, 5), (6, 2, 3, 3), ("NCHW", "OIHW", "NCHW"), {"feature_group_count": 2}),  # grouped
    ((2, 5, 5, 3), (3, 3, 1, 6), ("NHWC", "HWIO", "NHWC"), {"feature_group_count": 3}),  # depthwise, ×2
    ((4, 3, 5, 5), (4, 3, 3, 3), ("NCHW", "OIHW", "NCHW"), {"batch_group_count": 2}),
    ((2, 3, 7), (4, 3, 3), ("NCH", "OIH", "NCH"), {"window_strides": (2,)}),  # 1-D
    ((2, 5, 2, 3), (4, 3, 2, 2), ("NHWC", "OIHW", "NCWH"), {}),  # mixed layouts
]


@pytest.mark.parametrize("lhs_shape, rhs_shape, specs, kwargs", CONV_CASES)
def test_conv_general_dilated(lhs_shape, rhs_shape, specs, kwargs, monkeypatch):
    lhs = _rng(3, lhs_shape)
    n_spatial = len(lhs_shape) - 2
    options = {"window_strides": (1,) * n_spatial, "padding": "VALID"} | kwargs

    def fun(t):
        dn = lax.conv_dimension_numbers(lhs.shape, t.shape, specs)
        return lax.conv_general_dilated(lhs, t, dimension_numbers=dn, **options)

    ctx = rule_context(fun, rhs_shape, "conv_general_dilated")
    jac = check_rule(ctx)
    grouped = kwargs.get("feature_group_count", 1) > 1 or kwargs.get("batch_group_count", 1) > 1
    out_feature_y, out_feature_theta = specs[2].index("C"), specs[1].index("O")
    assert jac.structure.y_axes[out_feature_y] == out_feature_theta
    assert jac.structure.theta_in_sub[out_feature_theta] == grouped  # block-diagonal iff grouped
    # Rows pulled back to θ (a weight gradient per row) instead of patches, where _patches_outweigh_rows says so.
    monkeypatch.setattr("torchntk.bridge.rules._patches_outweigh_rows", lambda ctx: ctx.rows is not None)
    pulled = check_rule(dataclasses.replace(ctx, rows=1), expect=Structure.identity(len(rhs_shape)))
    assert pulled.pullback is not None


def test_conv_patches_or_rows_pulled_back_whichever_is_smaller():
    from torchntk.bridge.rules import _patches_outweigh_rows

    def deep_conv(rows: int, size: int) -> RuleContext:  # 512 → 512 channels, 3×3, size×size: θ has 2.4M entries
        dn = lax.conv_dimension_numbers((1, 512, size, size), (512, 512, 3, 3), ("NCHW", "OIHW", "NCHW"))
        params = {"dimension_numbers": dn, "feature_group_count": 1}
        inputs = (None, np.zeros((512, 512, 3, 3), np.float32))
        return RuleContext("conv_general_dilated", params, inputs, 1, 0, (1, 512, size, size), jnp.float32, None, rows)

    assert not _patches_outweigh_rows(deep_conv(None, 56))  # rows unknown: patches, as before
    assert _patches_outweigh_rows(deep_conv(1, 112))  # patches 58M entries ≥ 8 × one 2.4M weight gradient
    assert not _patches_outweigh_rows(deep_conv(10, 112))  # ten rows: the patches
    assert not _patches_outweigh_rows(deep_conv(1, 2))  # 2×2: patches 18k


def test_conv_input_as_parameter_falls_back():
    kernel = _rng(4, (2, 3, 2, 2))
    fun = lambda t: lax.conv(t, kernel, (1, 1), "VALID")  # noqa: E731
    ctx = rule_context(fun, (1, 3, 4, 4), "conv_general_dilated")
    assert STRUCTURE_RULES["conv_general_dilated"](ctx) is None
    jac = structured_jacobian(ctx)
    assert jac.structure == Structure.dense(4, 4)
    np.testing.assert_allclose(to_dense(jac, ctx.y_shape, ctx.theta_shape), jax.jacfwd(fun)(ctx.theta), atol=TOL)


# ----------------------------------------------------------------------------------------------------------------
# Elementwise: constant-block-diagonal (constant factor) or block-diagonal (array factor), tiled for scalars.

ELEMENTWISE = [
    ("mul", lambda t: t * _rng(5, (3, 4)), (3, 4), Structure((0, 1), (True, True))),
    ("mul", lambda t: t * 2.5, (3, 4), Structure((0, 1), (False, False))),
    ("mul", lambda t: _rng(5, (3, 4)) * t, (3, 4), Structure((0, 1), (True, True))),
    ("div", lambda t: t / (2 + _rng(6, (3, 4)) ** 2), (3, 4), Structure((0, 1), (True, True))),
    ("div", lambda t: t / 4.0, (2, 3), Structure((0, 1), (False, False))),
    ("neg", lambda t: -t, (2, 3), Structure((0, 1), (False, False))),
    ("sub", lambda t: _rng(7, (2, 3)) - t, (2, 3), Structure((0, 1), (False, False))),
    ("add", lambda t: t + _rng(7, (2, 3)), (2, 3), Structure((0, 1), (False, False))),
    ("convert_element_type", lambda t: t.astype(jnp.float32).astype(jnp.float64), (2, 3), Structure.identity(2)),
    ("copy", lambda t: jnp.array(t, copy=True), (2, 3), Structure.identity(2)),
    (
        "select_n",
        lambda t: lax.select_n(_rng(8, (3, 4)) > 0, jnp.zeros((3, 4)), t),
        (3, 4),
        Structure((0, 1), (True, True)),
    ),
    ("select_n", lambda t: lax.select_n(True, jnp.zeros((3, 4)), t), (3, 4), Structure((0, 1), (False, False))),
    ("select_n", lambda t: lax.select_n(0, t, jnp.ones((3,))), (3,), Structure((0,), (False,))),
]


@pytest.mark.parametrize("name, fun, shape, expect", ELEMENTWISE, ids=[c[0] for c in ELEMENTWISE])
def test_elementwise(name, fun, shape, expect):
    check_rule(rule_context(fun, shape, name), expect=expect)


def test_add_any_and_scalar_tiling():
    other = _rng(9, (3, 4))
    # add_any only appears in linear programs (the product rule sums two tangents).
    ctx = rule_context(lambda t: jnp.sin(t) * t, (3, 4), "add_any", linearize=True)
    check_rule(ctx, expect=Structure.identity(2))
    ctx = RuleContext("add", {}, (jnp.zeros(()), other), 0, 0, (3, 4), jnp.float64, lambda a, b: [lax.add(a, b)])
    check_rule(ctx, expect=Structure((TILED, TILED), ()))  # a scalar θ broadcast: output block-tiled


def _binary(name: str, theta_shape, other_shape, theta_arg: int = 0) -> RuleContext:
    """``lax.<name>`` of θ and another operand, lax broadcasting their size-1 axes (as converted models do)."""
    other = _rng(11, other_shape) if other_shape is not None else jnp.asarray(1.7)
    inputs = (jnp.zeros(theta_shape), other) if theta_arg == 0 else (other, jnp.zeros(theta_shape))
    y_shape = jnp.broadcast_shapes(theta_shape, jnp.shape(other))
    bind = {
        "add": lambda a, b: [lax.add(a, b)],
        "mul": lambda a, b: [lax.mul(a, b)],
        "sub": lambda a, b: [lax.sub(a, b)],
    }
    return RuleContext(name, {}, inputs, theta_arg, 0, y_shape, jnp.float64, bind[name])


BROADCAST_ELEMENTWISE = [
    # a conv bias (1, C, 1, 1) added to activations (N, C, H, W): C entries, tiled over N, H, W
    ("add", (1, 3, 1, 1), (2, 3, 4, 5), 0, Structure((TILED, 1, TILED, TILED), (False,) * 4)),
    ("sub", (1, 3, 1, 1), (1, 3, 4, 5), 1, Structure((0, 1, TILED, TILED), (False,) * 4)),
    # BatchNorm's scale (1, C, 1, 1) times activations: FREE along the repeated axes, block-diagonal along C
    ("mul", (1, 3, 1, 1), (2, 3, 4, 5), 0, Structure((FREE, 1, FREE, FREE), (False, True, False, False))),
    ("mul", (1, 3, 1, 1), (2, 3, 4, 5), 1, Structure((FREE, 1, FREE, FREE), (False, True, False, False))),
    # activations θ times a per-channel scale: block-diagonal only along C, constant along the rest
    ("mul", (2, 3, 4, 5), (1, 3, 1, 1), 0, Structure((0, 1, 2, 3), (False, True, False, False))),
    # both broadcast, along different axes
    ("mul", (3, 1), (1, 4), 0, Structure((0, FREE), (False, False))),
    ("add", (3, 1), (1, 4), 1, Structure((0, TILED), (False, False))),
    # a scalar factor; a factor varying only along θ's repeated axis
    ("mul", (1, 4), None, 0, Structure((0, 1), (False, False))),
    ("mul", (1, 4), (3, 1), 0, Structure((FREE, 1), (False, False))),
]


@pytest.mark.parametrize("name, theta_shape, other_shape, arg, expect", BROADCAST_ELEMENTWISE)
def test_elementwise_with_broadcast_operands(name, theta_shape, other_shape, arg, expect):
    jac = check_rule(_binary(name, theta_shape, other_shape, arg), expect=expect)
    assert jac.sub.size <= max(1, np.prod(other_shape or ()))  # never more than the factor: no dense Y × θ


# ----------------------------------------------------------------------------------------------------------------
# Relabelings, broadcasts and reductions.

SHAPE_OPS = [
    ("transpose", lambda t: t.transpose(2, 0, 1), (2, 3, 4), Structure((2, 0, 1), (False,) * 3)),
    ("squeeze", lambda t: t.squeeze((0, 2)), (1, 3, 1, 4), Structure((1, 3), (False,) * 4)),
    ("broadcast_in_dim", lambda t: jnp.broadcast_to(t, (2, 3, 4)), (3, 1), Structure((TILED, 0, TILED), (False,) * 2)),
    (
        "broadcast_in_dim",
        lambda t: t[:, None, :] + jnp.zeros((3, 5, 4)),
        (3, 4),
        Structure((0, TILED, 1), (False,) * 2),
    ),
    ("reduce_sum", lambda t: t.sum((0, 2)), (2, 3, 4), Structure((1,), (False,) * 3)),
    ("reduce_sum", lambda t: t.sum(), (2, 3), Structure((), (False, False))),
]


@pytest.mark.parametrize("name, fun, shape, expect", SHAPE_OPS, ids=[c[0] for c in SHAPE_OPS])
def test_shape_ops(name, fun, shape, expect):
    check_rule(rule_context(fun, shape, name), expect=expect)


WINDOW_CASES = [
    # window, strides, padding: NCHW average-pool-like sums; N and C untouched → constant-block-diagonal.
    ((1, 1, 2, 2), (1, 1, 2, 2), "VALID"),
    ((1, 1, 3, 3), (1, 1, 1, 2), "SAME"),
    ((1, 2, 2, 1), (1, 1, 1, 1), ((0, 0), (0, 0), (1, 0), (0, 0))),
]


@pytest.mark.parametrize("window, strides, padding", WINDOW_CASES)
def test_reduce_window_sum(window, strides, padding):
    fun = lambda t: lax.reduce_window(t, 0.0, lax.add, window, strides, padding)  # noqa: E731
    jac = check_rule(rule_context(fun, (2, 3, 5, 4), "reduce_window_sum"))
    for axis, size in enumerate(window):
        assert (jac.structure.y_axes[axis] == axis) == (size == 1 and strides[axis] == 1)


PULLBACK_CASES = [
    ("reshape", lambda t: t.reshape(6, 4), (2, 3, 4)),
    ("pad", lambda t: lax.pad(t, 0.0, ((1, 2, 0), (-1, 1, 1))), (3, 4)),
    ("rev", lambda t: jnp.flip(t, (0, 2)), (2, 3, 4)),
    ("concatenate", lambda t: jnp.concatenate([_rng(10, (2, 4)), t], 0), (3, 4)),
    ("concatenate", lambda t: jnp.concatenate([t, _rng(10, (3, 1))], 1), (3, 4)),
    ("slice", lambda t: t[1:3, ::2], (4, 5)),
    ("dynamic_slice", lambda t: lax.dynamic_slice(t, (1, 0), (2, 3)), (4, 5)),
    ("gather", lambda t: t[jnp.array([2, 0, 2]), jnp.array([1, 1, 0])], (4, 3)),  # points: no whole axis
    ("cumsum", lambda t: jnp.cumsum(t, 1), (2, 4)),
    ("dynamic_update_slice", lambda t: lax.dynamic_update_slice(jnp.zeros((5, 4)), t, (1, 1)), (2, 3)),
]


@pytest.mark.parametrize("name, fun, shape", PULLBACK_CASES, ids=[c[0] for c in PULLBACK_CASES])
def test_pullback_rules(name, fun, shape):
    jac = check_rule(rule_context(fun, shape, name), expect=Structure.identity(len(shape)))
    assert jac.pullback is not None


GATHER_CASES = [
    # embedding lookups: the feature axes are sliced whole → constant-block-diagonal with y's offset axes, the rows
    # one-hot, stored by their indices (indexed)
    (lambda t: t[jnp.array([2, 0, 2])], (4, 3), Structure((FREE, 1), (True, False), indexed=0)),
    (
        lambda t: t[jnp.array([[1, 3], [0, 0]])],
        (4, 3, 2),
        Structure((FREE, FREE, 1, 2), (True, False, False), indexed=0),
    ),
    (lambda t: jnp.take(t, jnp.array([0, 2]), axis=1), (3, 4), Structure((0, FREE), (False, True), indexed=1)),
    # out of range: a row of zeros (fill) or the last row (clip)
    (lambda t: jnp.take(t, jnp.array([0, 5]), axis=0, mode="fill"), (4, 3), Structure((FREE, 1), (True, False), 0)),
    (lambda t: jnp.take(t, jnp.array([7, 1]), axis=0, mode="clip"), (4, 3), Structure((FREE, 1), (True, False), 0)),
]


@pytest.mark.parametrize("fun, shape, expect", GATHER_CASES)
def test_gather(fun, shape, expect):
    jac = check_rule(rule_context(fun, shape, "gather"), expect=expect)
    assert jac.pullback is None


def test_split_every_output():
    for out in range(3):
        ctx = rule_context(lambda t: jnp.split(t, [1, 3], axis=1)[0], (2, 5), "split")
        ctx = RuleContext(
            ctx.name, ctx.params, ctx.inputs, 0, out, ((2, 1), (2, 2), (2, 2))[out], ctx.y_dtype, ctx.bind
        )
        check_rule(ctx, expect=Structure.identity(2))


def test_select_and_gather_add():
    pool = lambda t: lax.reduce_window(t, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")  # noqa: E731
    ctx = rule_context(pool, (1, 4, 6, 2), "select_and_gather_add", linearize=True)
    check_rule(ctx, expect=Structure.identity(4))


# ----------------------------------------------------------------------------------------------------------------
# Fallback and dispatch.


def test_plain_jacobian_fallback():
    tri = jnp.tril(_rng(11, (3, 3))) + 3 * jnp.eye(3)
    fun = lambda t: lax.linalg.triangular_solve(tri, t, left_side=True, lower=True)  # noqa: E731
    ctx = rule_context(fun, (3, 2), "triangular_solve")
    assert "triangular_solve" not in STRUCTURE_RULES
    jac = structured_jacobian(ctx)
    assert jac.structure == Structure.dense(2, 2) and jac.pullback is None
    np.testing.assert_allclose(jac.sub, jax.jacfwd(fun)(ctx.theta), atol=TOL)
    wide = plain_jacobian(rule_context(lambda t: t.sum(0), (5, 2), "reduce_sum"))  # reverse mode when y < θ
    np.testing.assert_allclose(wide.sub, jax.jacfwd(lambda t: t.sum(0))(jnp.zeros((5, 2))), atol=TOL)


def test_structure_validation():
    with pytest.raises(ValueError, match="two y axes"):
        Structure((0, 0), (False,))
    with pytest.raises(ValueError, match="out of range"):
        Structure((3,), (False,))
