"""The structured-derivatives interpreter against an explicit JAX Jacobian oracle (float64, 1e-10)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from torchntk._axes import canonicalize_axes, full_kernel_subscripts, trace_size
from torchntk.bridge import structured_ntk_fn

TOL = 1e-10


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _normal(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """float64 numpy data: module-level parameters stay float64 whatever the x64 setting at import."""
    return np.random.default_rng(seed).standard_normal(shape)


def oracle(f, x1, x2, params, trace_axes=(), diagonal_axes=(), batched=True):
    """Jacobian contraction: ``jacrev`` of the whole batch, contracted over every parameter, laid out by _axes.
    Jitted as one program (eager, every primitive compiled on its own: ~0.03 s each)."""
    x2 = x1 if x2 is None else x2
    return jax.jit(lambda p, a, b: _oracle(f, a, b, p, trace_axes, diagonal_axes, batched))(params, x1, x2)


def _oracle(f, x1, x2, params, trace_axes, diagonal_axes, batched):
    out1, out2 = f(params, x1), f(params, x2)
    leaves1, treedef = jax.tree.flatten(out1)
    leaves2 = jax.tree.leaves(out2)
    jac1 = treedef.flatten_up_to(jax.jacrev(f)(params, x1))
    jac2 = treedef.flatten_up_to(jax.jacrev(f)(params, x2))
    kernels = []
    for o1, o2, j1, j2 in zip(leaves1, leaves2, jac1, jac2, strict=True):
        nd = o1.ndim
        full = sum(
            jnp.tensordot(a.reshape(*o1.shape, -1), b.reshape(*o2.shape, -1), ((nd,), (nd,)))
            for a, b in zip(jax.tree.leaves(j1), jax.tree.leaves(j2), strict=True)
        )
        full = full.transpose([i for k in range(nd) for i in (k, nd + k)])  # interleave the two outputs' axes
        trace, diag = canonicalize_axes(nd, trace_axes, diagonal_axes, batch_axis=batched)
        kernels.append(jnp.einsum(full_kernel_subscripts(nd, trace, diag), full) / trace_size(o1.shape, trace))
    return jax.tree.unflatten(treedef, kernels)


def assert_matches(f, x1, x2, params, **kwargs):
    batched = kwargs.get("vmap_axes", 0) == 0
    got = structured_ntk_fn(f, **kwargs)(x1, x2, params)
    want = oracle(f, x1, x2, params, kwargs.get("trace_axes", ()), kwargs.get("diagonal_axes", ()), batched)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=TOL * max(1.0, float(jnp.abs(w).max())), rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Small functions, each exercising a primitive (or a combination) on a parameter. x: (N, 3).


def _maxpool(t):
    return lax.reduce_window(t, -jnp.inf, lax.max, (2, 2), (2, 2), "VALID")


def _avgpool(t):
    return lax.reduce_window(t, 0.0, lax.add, (2, 2), (1, 2), "VALID") / 4


def _w(seed, shape):
    return _normal(100 + seed, shape)


FUNCTIONS = {
    "mlp": (
        lambda p, x: jnp.tanh(jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]),
        {"w1": _w(0, (3, 5)), "b1": _w(1, (5,)), "w2": _w(2, (5, 2)), "b2": _w(3, (2,))},
    ),
    "used_twice": (lambda p, x: jnp.sin(x @ p["w"]) @ p["w"], {"w": _w(4, (3, 3))}),
    "dot_and_transpose": (lambda p, x: x @ p["w"] + jnp.tanh(x) @ p["w"].T, {"w": _w(5, (3, 3))}),
    "dot_and_reduce_sum": (lambda p, x: x @ p["w"] * p["w"].sum(0), {"w": _w(6, (3, 4))}),
    "mul_div_sub_neg": (
        lambda p, x: (x * p["s"]) / 3.0 - p["b"] + jnp.sin(x) @ (-p["w"]) + (x @ p["w"]) ** 2 / (1 + x**2),
        {"s": _w(7, (3,)), "b": _w(8, (3,)), "w": _w(9, (3, 3))},
    ),
    "broadcast_scalar": (lambda p, x: x * p["c"] + p["c"], {"c": _w(10, ())}),
    "reshape_alias": (lambda p, x: x @ p["w"].reshape(3, 4), {"w": _w(11, (12,))}),
    "reshape_shared": (lambda p, x: x @ p["w"].reshape(3, 4) + p["w"][:4], {"w": _w(12, (12,))}),
    "squeeze": (lambda p, x: x @ lax.squeeze(p["w"], (0,)) + p["w"].sum(0)[0], {"w": _w(13, (1, 3, 4))}),
    "reduce_window_sum": (lambda p, x: x @ _avgpool(p["w"]), {"w": _w(14, (4, 6))}),
    "pad": (lambda p, x: x @ jnp.pad(p["w"], ((1, 0), (0, 2))), {"w": _w(15, (2, 3))}),
    "concatenate": (
        lambda p, x: x @ jnp.concatenate([p["a"], p["b"], p["a"]], 1),
        {"a": _w(16, (3, 2)), "b": _w(17, (3, 1))},
    ),
    "copy": (lambda p, x: x @ jnp.array(p["w"], copy=True) + x @ p["w"] * 2, {"w": _w(18, (3, 2))}),
    "select_n": (lambda p, x: jnp.where(x > 0, p["b"], 0.5 * x) + jnp.where(True, p["b"], 0.0), {"b": _w(19, (3,))}),
    "rev": (lambda p, x: x @ jnp.flip(p["w"], 0) + x @ p["w"], {"w": _w(20, (3, 2))}),
    "select_and_gather_add": (lambda p, x: x @ _maxpool(p["w"]), {"w": _w(21, (6, 4))}),
    "split": (lambda p, x: (x @ jnp.split(p["w"], 2, 1)[0]) * (x @ jnp.split(p["w"], 2, 1)[1]), {"w": _w(22, (3, 4))}),
    "dynamic_slice": (lambda p, x: x @ lax.dynamic_slice(p["w"], (1, 0), (3, 2)), {"w": _w(23, (5, 2))}),
    "fallback_triangular_solve": (
        lambda p, x: (
            x @ lax.linalg.triangular_solve(jnp.eye(3) * 2 + jnp.tril(jnp.ones((3, 3))), p["w"], left_side=True)
        ),
        {"w": _w(24, (3, 2))},
    ),
    # Dyadic data (multiples of 1/8) round-trips float32 exactly; w is converted twice: once an alias, once a use.
    "convert_element_type": (
        lambda p, x: x @ p["w"].astype(jnp.float32).astype(x.dtype) + x @ p["v"] + p["v"].astype(jnp.float32).sum(),
        {"w": np.round(_w(25, (3, 2)) * 8) / 8, "v": np.round(_w(26, (3, 2)) * 8) / 8},
    ),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_small_functions(name):
    f, params = FUNCTIONS[name]
    x1, x2 = np.round(_normal(1, (2, 3)) * 8) / 8, np.round(_normal(2, (3, 3)) * 8) / 8  # dyadic: see convert
    assert_matches(f, x1, x2, params)


@pytest.mark.parametrize("name", ["mlp", "used_twice", "dot_and_transpose", "concatenate", "select_n", "split"])
def test_small_functions_unbatched(name):
    f, params = FUNCTIONS[name]
    x1, x2 = _normal(1, (2, 3)), _normal(2, (3, 3))
    assert_matches(f, x1, x2, params, vmap_axes=None)
    assert_matches(f, x1, None, params, vmap_axes=None, trace_axes=(0,))


def test_embedding_gather_with_integer_inputs():
    params = {"emb": _w(30, (7, 4)), "w": _w(31, (4, 2))}
    f = lambda p, ids: jnp.tanh(p["emb"][ids].sum(-2)) @ p["w"]  # noqa: E731
    ids1 = jnp.array([[0, 3, 3], [6, 1, 2]])
    ids2 = jnp.array([[5, 5, 0]])
    assert_matches(f, ids1, ids2, params)


# ----------------------------------------------------------------------------------------------------------------
# Output axes: trace / diagonal combinations on a (N, 2, 3) output.


def _multi_axis(p, x):
    return jnp.tanh(jnp.einsum("ni,ijk->njk", x, p["w"])) * p["s"] + p["b"][:, None]


MULTI_PARAMS = {"w": _w(40, (3, 2, 3)), "s": _w(41, (3,)), "b": _w(42, (2,))}
AXES = [
    ((), ()),
    ((-1,), ()),
    ((1,), ()),
    ((1, 2), ()),
    ((), (1,)),
    ((), (0,)),
    ((), (0, 2)),
    ((2,), (0, 1)),
    ((1,), (2,)),
]


@pytest.mark.parametrize("trace_axes, diagonal_axes", AXES)
def test_trace_and_diagonal_axes(trace_axes, diagonal_axes):
    x1, x2 = _normal(3, (2, 3)), _normal(4, (3, 3))
    kwargs = {"trace_axes": trace_axes, "diagonal_axes": diagonal_axes}
    assert_matches(_multi_axis, x1, None if 0 in diagonal_axes else x2, MULTI_PARAMS, **kwargs)


@pytest.mark.parametrize("trace_axes, diagonal_axes", [((), ()), ((0, 2), ()), ((), (0, 1)), ((1,), (0,))])
def test_trace_and_diagonal_axes_unbatched(trace_axes, diagonal_axes):
    x1 = _normal(3, (2, 3))
    kwargs = {"trace_axes": trace_axes, "diagonal_axes": diagonal_axes, "vmap_axes": None}
    assert_matches(_multi_axis, x1, None, MULTI_PARAMS, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Pytrees, identity outputs.


def test_pytree_params_inputs_outputs():
    params = {"enc": [_w(50, (3, 4)), _w(51, (2, 4))], "head": {"w": _w(52, (4, 2)), "v": _w(53, (4,))}}

    def f(p, x):
        a, b = x
        h = jnp.tanh(a @ p["enc"][0] + b @ p["enc"][1])
        return {"logits": h @ p["head"]["w"], "score": (h * p["head"]["v"]).sum(-1, keepdims=True)}

    x1 = (_normal(5, (2, 3)), _normal(6, (2, 2)))
    x2 = (_normal(7, (1, 3)), _normal(8, (1, 2)))
    assert_matches(f, x1, x2, params)
    assert_matches(f, x1, None, params, diagonal_axes=(0,), trace_axes=(-1,))


def test_parameter_that_is_an_output():
    params = {"w": _w(60, (3, 2)), "b": _w(61, (2,))}
    f = lambda p, x: (jnp.tanh(x @ p["w"] + p["b"]).sum(0), p["b"])  # noqa: E731
    assert_matches(f, _normal(9, (2, 3)), _normal(10, (4, 3)), params, vmap_axes=None)
    g = lambda p, x: jnp.sin(p["w"]) + 0 * x[0, 0]  # noqa: E731  # the param's image, unbatched
    assert_matches(g, _normal(9, (2, 3)), None, params, vmap_axes=None)
    h = lambda p, x: p["w"]  # noqa: E731  # θ itself: identity use
    assert_matches(h, _normal(9, (2, 3)), None, params, vmap_axes=None)


# ----------------------------------------------------------------------------------------------------------------
# Networks: an MLP and a small CNN with pooling (grouped conv, max and average pooling).


def _cnn(p, x):  # x: (N, 6, 6, 2) NHWC
    dn = ("NHWC", "HWIO", "NHWC")
    h = lax.conv_general_dilated(x, p["c1"], (1, 1), "SAME", dimension_numbers=dn) + p["b1"]
    h = jax.nn.relu(h)
    h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")  # max pool → (N, 3, 3, 4)
    h = lax.conv_general_dilated(h, p["c2"], (1, 1), "VALID", dimension_numbers=dn, feature_group_count=2)
    h = jnp.tanh(h).mean((1, 2))  # global average pool → (N, 4)
    return h @ p["w"]


CNN_PARAMS = {"c1": _w(70, (3, 3, 2, 4)), "b1": _w(71, (4,)), "c2": _w(72, (2, 2, 2, 4)), "w": _w(73, (4, 3))}


def test_cnn_with_pooling():
    x1, x2 = _normal(11, (2, 6, 6, 2)), _normal(12, (3, 6, 6, 2))
    assert_matches(_cnn, x1, x2, CNN_PARAMS)
    assert_matches(_cnn, x1, None, CNN_PARAMS, trace_axes=(-1,), diagonal_axes=(0,))


def _hlo_count(fn, *args, op: str) -> int:
    return jax.jit(fn).lower(*args).as_text().count(f"stablehlo.{op}")


def test_two_sides_traced_once_where_they_stack():
    """x2 given: both sides' ingredients come from one computation over x1's then x2's examples, so the program
    holds the network's ingredients once (as x2=None's does), not twice; where the sides cannot stack (other
    trailing shapes, dtypes or trees) each side is traced apart. Every variant equals the oracle."""
    ntk_fn = structured_ntk_fn(_cnn)
    x1, x2 = _normal(11, (2, 6, 6, 2)), _normal(12, (3, 6, 6, 2))
    one_side = _hlo_count(lambda a, p: ntk_fn(a, None, p), x1, CNN_PARAMS, op="tanh")
    assert one_side >= 1
    assert _hlo_count(ntk_fn, x1, x2, CNN_PARAMS, op="tanh") == one_side
    assert_matches(_cnn, x1, x2, CNN_PARAMS)
    assert_matches(_cnn, x1, x2, CNN_PARAMS, trace_axes=(-1,))
    assert_matches(_cnn, x2, x1[:1], CNN_PARAMS, diagonal_axes=(-1,))

    # Other spatial sizes (the global average pool takes both): two traced sides, still the oracle's kernel.
    x_other = _normal(13, (2, 8, 8, 2))
    assert _hlo_count(ntk_fn, x1, x_other, CNN_PARAMS, op="tanh") == 2 * one_side
    assert_matches(_cnn, x1, x_other, CNN_PARAMS)

    # Pytree inputs with two leaves stack leaf by leaf; differing trees do not.
    params = {"a": _w(90, (3, 4)), "b": _w(91, (2, 4))}

    def f(p, x):
        return jnp.tanh(x["u"] @ p["a"] + x.get("v", x["u"][:, :2]) @ p["b"])

    y1 = {"u": _normal(14, (2, 3)), "v": _normal(15, (2, 2))}
    y2 = {"u": _normal(16, (4, 3)), "v": _normal(17, (4, 2))}
    assert_matches(f, y1, y2, params)
    assert_matches(f, y1, {"u": y2["u"]}, params)
    pytree_fn = structured_ntk_fn(f)
    assert _hlo_count(pytree_fn, y1, y2, params, op="tanh") == 1
    assert _hlo_count(pytree_fn, y1, {"u": y2["u"]}, params, op="tanh") == 2
    # Other dtypes: not concatenated (that would promote one side).
    as_float32 = {k: v.astype(np.float32) for k, v in y2.items()}
    assert _hlo_count(pytree_fn, y1, as_float32, params, op="tanh") == 2


def test_cnn_unbatched():
    assert_matches(_cnn, _normal(11, (2, 6, 6, 2)), _normal(12, (1, 6, 6, 2)), CNN_PARAMS, vmap_axes=None)


def test_deep_mlp_list_params():
    params = [_w(80 + i, s) for i, s in enumerate([(3, 8), (8, 8), (8, 8), (8, 4)])]

    def f(p, x):
        for w in p[:-1]:
            x = jax.nn.relu(x @ w / jnp.sqrt(w.shape[0]))
        return x @ p[-1]

    assert_matches(f, _normal(13, (4, 3)), _normal(14, (5, 3)), params)


# ----------------------------------------------------------------------------------------------------------------
# Jit, dtypes and errors.


def test_float32_and_outer_jit():
    with jax.enable_x64(False):
        f, params = FUNCTIONS["mlp"]
        params32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
        x1 = jnp.asarray(_normal(1, (2, 3)), jnp.float32)
        ntk_fn = jax.jit(structured_ntk_fn(f))
        got = ntk_fn(x1, None, params32)
        assert got.dtype == jnp.float32 and got.shape == (2, 2, 2, 2)
        np.testing.assert_allclose(got, oracle(f, x1, None, params32), atol=1e-5, rtol=1e-5)


def test_errors():
    f, params = FUNCTIONS["mlp"]
    x = _normal(1, (2, 3))
    with pytest.raises(ValueError, match="vmap_axes"):
        structured_ntk_fn(f, vmap_axes=1)
    with pytest.raises(ValueError, match="batch axis 0"):
        structured_ntk_fn(lambda p, x: (x @ p["w1"]).sum(0))(x, None, params)
    with pytest.raises(ValueError, match=r"trace_axes=\(0,\) holds the batch axis 0"):
        structured_ntk_fn(f, trace_axes=(0,))(x, None, params)
    with pytest.raises(TypeError, match="needs params"):
        structured_ntk_fn(f)(x, None)


# ----------------------------------------------------------------------------------------------------------------
# Repeated blocks: pairs of uses with the same structures and shapes are stacked into one contraction.


def _repeated_blocks(p, x):  # x: (N, 5, 5, 3) NHWC; three residual blocks of the same shapes, mixed structures
    dn = ("NHWC", "HWIO", "NHWC")
    h = x @ p["stem"]
    for block in p["blocks"]:
        r = lax.conv_general_dilated(h, block["conv"], (1, 1), "SAME", dimension_numbers=dn) + block["bias"]
        r = jnp.tanh(r) * block["scale"]  # a per-channel scale: block-diagonal along channels
        h = h + r @ block["dense"]
    return h.mean((1, 2)) @ p["head"]


def _repeated_params():
    block = lambda s: {  # noqa: E731
        "conv": _w(s, (3, 3, 4, 4)),
        "bias": _w(s + 1, (4,)),
        "scale": _w(s + 2, (4,)),
        "dense": _w(s + 3, (4, 4)),
    }
    return {"stem": _w(90, (3, 4)), "blocks": [block(100 + 10 * i) for i in range(3)], "head": _w(91, (4, 2))}


@pytest.mark.parametrize(
    "trace_axes, diagonal_axes",
    [pytest.param((), (), marks=pytest.mark.slow), ((-1,), ()), pytest.param((), (-1,), marks=pytest.mark.slow)],
)
def test_repeated_blocks_grouped_equal_ungrouped_and_oracle(trace_axes, diagonal_axes, monkeypatch):
    from torchntk.bridge import structured

    x1, x2 = _normal(21, (2, 5, 5, 3)), _normal(22, (3, 5, 5, 3))
    params = _repeated_params()
    kwargs = {"trace_axes": trace_axes, "diagonal_axes": diagonal_axes}
    groups = []
    grouping = structured.same_contractions
    monkeypatch.setattr(structured, "same_contractions", lambda *a: groups.append(grouping(*a)) or groups[-1])
    grouped = structured_ntk_fn(_repeated_blocks, **kwargs)(x1, x2, params)
    assert any(len(pairs) == 3 for pairs in groups[-1])  # each block's conv/bias/scale/dense: one group of three
    monkeypatch.setattr(
        structured, "same_contractions", lambda *a: [[pair] for pairs in grouping(*a) for pair in pairs]
    )
    ungrouped = structured_ntk_fn(_repeated_blocks, **kwargs)(x1, x2, params)
    np.testing.assert_allclose(grouped, ungrouped, atol=TOL * float(jnp.abs(ungrouped).max()), rtol=0)
    monkeypatch.setattr(structured, "same_contractions", grouping)
    assert_matches(_repeated_blocks, x1, x2, params, **kwargs)
    assert_matches(_repeated_blocks, x1, None, params, **kwargs, output_block=1)


def test_balanced_scales_are_exact_powers_of_two_per_sub_array_and_example():
    """Sub-arrays of several dtypes, batched and not, are divided by the power of two at or below their peak (1
    where the peak is 0, subnormal, inf or NaN), one scale per example; the rescaling is exact."""
    from torchntk.bridge.structured import _balanced

    tiny = np.finfo(np.float32).tiny / 4  # subnormal
    batched = [
        np.array([[3.0, -5.0], [0.0, 0.0]], np.float32),  # peaks 5 and 0
        np.array([[[1e30]], [[tiny]]], np.float32),  # 1e30 and a subnormal
        np.array([[np.inf, 1.0], [np.nan, 2.0]], np.float32),
        np.array([[0.75], [-1e-300]], np.float64),  # another dtype in the same call
    ]
    subs, scales = _balanced([jnp.asarray(s) for s in batched], batched=True)
    expected = [[4.0, 1.0], [2.0**99, 1.0], [1.0, 1.0], [0.5, 2.0**-997]]
    for sub, scale, original, want in zip(subs, scales, batched, expected, strict=True):
        assert scale.shape == (2,) and scale.dtype == original.dtype
        np.testing.assert_array_equal(np.asarray(scale), np.asarray(want, original.dtype))
        back = np.asarray(sub) * np.asarray(scale).reshape(2, *[1] * (original.ndim - 1))
        normal = ~((original != 0) & (np.abs(original) < np.finfo(original.dtype).tiny))  # XLA flushes subnormals
        np.testing.assert_array_equal(back[normal], original[normal])  # exact: NaN == NaN here
    subs, scales = _balanced([jnp.asarray(np.float32(-6.0)), jnp.ones((3,), jnp.float64) * 9], batched=False)
    assert [float(s) for s in scales] == [4.0, 8.0] and float(subs[0]) == -1.5
    assert _balanced([], batched=True) == ([], [])
