"""The one module touching JAX's jaxpr structures: check its assumptions on the installed JAX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from torchntk.bridge.cotangents import find_uses
from torchntk.bridge.jaxpr_tools import Const, UnevaluableError, evaluate, trace_program, without_custom_rules


@jax.custom_jvp
def _softplus(x):
    return jnp.log1p(jnp.exp(x))


_softplus.defjvp(lambda primals, tangents: (_softplus(primals[0]), jax.nn.sigmoid(primals[0]) * tangents[0]))


def _nested(w, x):
    inner = jax.jit(lambda a, b: jnp.tanh(a @ b))
    h = jax.checkpoint(lambda a: inner(a, w) * 2.0)(x)
    return _softplus(h).sum() + jax.jit(lambda a: a * 3.0)(w).sum()


def test_call_primitives_are_inlined_and_evaluate_like_jax():
    w, x = jnp.ones((3, 2)) * 0.3, jnp.arange(6.0).reshape(2, 3) / 6
    program = trace_program(_nested, w, x)
    names = {eqn.name for eqn in program.eqns}
    assert not names & {"jit", "pjit", "remat2", "checkpoint", "custom_jvp_call", "closed_call"}, names
    (out,), _ = evaluate(program, [w, x])
    np.testing.assert_allclose(out, _nested(w, x), rtol=1e-6)


def test_linearized_program_has_parameters_as_inputs_and_residuals_as_consts():
    w, x = jnp.ones((3, 2)) * 0.3, jnp.ones((2, 3))
    _, linear = jax.linearize(lambda p: _nested(p, x), w)
    program = trace_program(linear, w)
    assert len(program.inputs) == 1 and program.consts
    assert program.shapes[program.inputs[0]] == (3, 2)
    (out,), _ = evaluate(program, [jnp.ones((3, 2))])
    np.testing.assert_allclose(out, linear(jnp.ones((3, 2))), rtol=1e-6)


def test_literals_become_consts():
    program = trace_program(lambda a: a * 2.0, jnp.ones(3))
    assert any(isinstance(atom, Const) for eqn in program.eqns for atom in eqn.inputs)


def test_find_uses_follows_single_consumer_relabelings_only():
    x = jnp.ones((2, 3))
    # w.T has a single consumer chain → the dot_general is the only use of w (an alias).
    program = trace_program(lambda w: x @ (-w.T), jnp.ones((3, 3)))
    uses, _, aliases = find_uses(program)
    assert [program.eqns[u.eqn].name for u in uses] == ["dot_general"] and len(aliases) == 2
    # w used twice: the transpose itself is a use, not an alias.
    program = trace_program(lambda w: x @ w.T + x @ w, jnp.ones((3, 3)))
    uses, _, aliases = find_uses(program)
    assert sorted(program.eqns[u.eqn].name for u in uses) == ["dot_general", "transpose"] and not aliases


def _scale_with_custom_vjp():
    @jax.custom_vjp
    def scale(x):
        return 3 * x

    scale.defvjp(lambda x: (3 * x, None), lambda _, g: (3 * g,))
    return scale


def test_custom_vjp_linearization_is_refused_clearly():
    _, linear = jax.linearize(_scale_with_custom_vjp(), jnp.ones(2))
    with pytest.raises(UnevaluableError, match="custom_vjp"):
        trace_program(linear, jnp.ones(2))


def test_without_custom_rules_differentiates_the_primal():
    scale = _scale_with_custom_vjp()
    stripped = without_custom_rules(lambda p: {"y": jnp.sin(scale(p["w"]))}, {"w": jnp.ones(2)})
    _, linear = jax.linearize(stripped, {"w": jnp.ones(2)})
    np.testing.assert_allclose(linear({"w": jnp.ones(2)})["y"], 3 * jnp.cos(3.0) * jnp.ones(2), rtol=1e-6)


def test_structured_ntk_through_custom_vjp():
    from torchntk.bridge import structured_ntk_fn

    scale = _scale_with_custom_vjp()
    f = lambda w, x: jnp.tanh(scale(x @ w))  # noqa: E731
    w, x = jnp.ones((3, 2)) * 0.2, jnp.arange(6.0).reshape(2, 3) / 6
    jac = jax.jacrev(f)(w, x).reshape(2, 2, 6)  # its backward rule agrees with the primal here
    np.testing.assert_allclose(structured_ntk_fn(f)(x, None, w), jnp.einsum("apk,bqk->abpq", jac, jac), rtol=1e-5)
