"""Convolutions in the form XLA:CPU runs fast: in its canonical layout inside loops, small ones as matrix products.

XLA:CPU runs a convolution on its fast (Eigen) path only in one layout — input ``(batch, spatial..., feature)``,
kernel ``(spatial..., in, out)``, output ``(batch, spatial..., feature)`` — and its ``ConvCanonicalization`` pass,
which rewrites other layouts into that one, rewrites *top-level* convolutions only. Inside a loop (a rolled run of
repeated blocks: ``lax.scan``, :mod:`torchntk.converters.onnx_jax._rolling`; the output-block loop of structured
derivatives: :mod:`torchntk.bridge.output_blocks`, 3× slower per row before) or a conditional's branch, a
convolution in torch's NCHW layout,
or one of the transposed convolutions JAX derives for its derivatives, runs on a naive loop nest instead: 6 residual
3×3 convolutions, 20×64×8×8, forward 8.4 ms unrolled against 214 ms rolled; resnet50's structured ingredients
0.23 s unrolled against 0.87 s rolled.

:func:`fast_convolutions` re-expresses a function through its jaxpr with every convolution inside a scan body in
that layout (a transpose of each operand and of the result, which XLA fuses into its neighbours or folds where two
meet). Values are unchanged: only the order in which the same array is laid out in memory. With
``cpu_forms``, it also runs, anywhere and derivatives included, every convolution of a few output pixels as the
matrix product of its patches and every depthwise convolution as a sum over its filter's taps
(:mod:`torchntk.converters.patch_convolutions`: XLA:CPU runs those 10-100× slower than their multiply-adds allow);
exact up to summation order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jex
from jax import lax

from .patch_convolutions import faster_form

#: Call-like primitives whose body takes the equation's inputs as they are (inlined wherever they are, so that the
#: scans and convolutions in them are rewritten too: a structured program's loops sit inside a jit). Loops in loops
#: are scans, handled on their own; ``while`` and ``cond`` bodies are left as they are, and so are custom derivative
#: rules (``custom_jvp_call``: ``jax.nn.relu``'s derivative at 0), which inlining would replace by the derivative of
#: their primal computation.
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr"}
_CALLS |= {"remat2": "jaxpr", "checkpoint": "jaxpr", "named_call": "call_jaxpr"}


def fast_convolutions(fun: Callable[..., Any], *, cpu_forms: bool = False) -> Callable[..., Any]:
    """``fun`` with every convolution inside a ``lax.scan`` body in XLA:CPU's fast layout, and with ``cpu_forms``
    every convolution that XLA:CPU runs slowly in a faster form
    (:func:`~torchntk.converters.patch_convolutions.faster_form`: small ones as a matrix product of their patches,
    depthwise ones as a sum over taps; same values up to summation order).

    Apply it to the function that is jitted (after any differentiation: the derivatives of a convolution are other
    convolutions, which must be rewritten too). It traces ``fun`` once more into a jaxpr and evaluates that: use it
    only where ``fun`` has loops, or for programs that run on XLA:CPU (``cpu_forms``).
    """

    @functools.wraps(fun)
    def rewritten(*args: Any) -> Any:
        closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*args)
        outs = _evaluate(closed.jaxpr, closed.consts, jax.tree.leaves(args), False, cpu_forms)
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return rewritten


def _evaluate(
    jaxpr: jex.Jaxpr, consts: Sequence[Any], args: Sequence[Any], in_loop: bool, cpu_forms: bool
) -> list[Any]:
    env: dict[Any, Any] = {}

    def read(atom: Any) -> Any:
        return atom.val if isinstance(atom, jex.Literal) else env[atom]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        inputs = [read(atom) for atom in eqn.invars]
        name = eqn.primitive.name
        faster = None
        if cpu_forms and name == "conv_general_dilated":
            faster = faster_form(eqn.params, inputs[0].shape, inputs[1].shape)
        if name == "scan":
            outs = _scan(eqn.params, inputs, cpu_forms)
        elif name == "cond":  # a branch is no top-level computation either (output blocks' recomputed side)
            outs = _cond(eqn.params, inputs, cpu_forms)
        elif faster is not None:
            outs = [faster(*inputs, **eqn.params)]
        elif in_loop and name == "conv_general_dilated":
            outs = [_canonical_convolution(*inputs, **eqn.params)]
        elif name in _CALLS and eqn.params.get(_CALLS[name]) is not None:  # loops inside calls too (inlined)
            body = eqn.params[_CALLS[name]]
            inner, inner_consts = (body.jaxpr, body.consts) if hasattr(body, "consts") else (body, ())
            outs = _evaluate(inner, inner_consts, inputs, in_loop, cpu_forms)
        else:
            out = _bind(eqn, inputs)
            outs = list(out) if eqn.primitive.multiple_results else [out]
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(atom) for atom in jaxpr.outvars]


def _bind(eqn: Any, inputs: list[Any]) -> Any:
    """``eqn``'s primitive applied to ``inputs`` as ``jax.core.eval_jaxpr`` applies it (a custom derivative rule's
    parameters re-made for binding; older JAX returned sub-functions first)."""
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = params if isinstance(params, tuple) else ((), params)
    with eqn.ctx.manager:
        return eqn.primitive.bind(*subfuns, *inputs, **params)


def _scan(params: dict[str, Any], inputs: list[Any], cpu_forms: bool) -> list[Any]:
    """The scan again, its body evaluated with canonical convolutions (and ``cpu_forms``: same consts, carry, slices,
    trip count)."""
    body, consts, carries = params["jaxpr"], params["num_consts"], params["num_carry"]

    def step(carry: list[Any], xs: list[Any]) -> tuple[list[Any], list[Any]]:
        outs = _evaluate(body.jaxpr, body.consts, [*inputs[:consts], *carry, *xs], True, cpu_forms)
        return outs[:carries], outs[carries:]

    carry, ys = lax.scan(
        step,
        list(inputs[consts : consts + carries]),
        list(inputs[consts + carries :]),
        length=params["length"],
        reverse=params["reverse"],
        unroll=params["unroll"],
    )
    return [*carry, *ys]


def _cond(params: dict[str, Any], inputs: list[Any], cpu_forms: bool) -> list[Any]:
    """The conditional again, each branch evaluated with canonical convolutions (and ``cpu_forms``: same index and
    operands)."""

    def branch(closed: Any) -> Callable[..., list[Any]]:
        return lambda *operands: _evaluate(closed.jaxpr, closed.consts, operands, True, cpu_forms)

    return list(lax.switch(inputs[0], [branch(closed) for closed in params["branches"]], *inputs[1:]))


def _canonical_convolution(lhs: Any, rhs: Any, *, dimension_numbers: Any, **params: Any) -> Any:
    """The convolution of ``conv_general_dilated`` with operands and result transposed to (and back from) input
    ``(batch, spatial..., feature)``, kernel ``(spatial..., in, out)``, output ``(batch, spatial..., feature)``."""
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    n = len(lhs_spec) - 2
    lhs_order = (lhs_spec[0], *lhs_spec[2:], lhs_spec[1])
    rhs_order = (*rhs_spec[2:], rhs_spec[1], rhs_spec[0])
    canonical = lax.ConvDimensionNumbers(
        lhs_spec=(0, n + 1, *range(1, n + 1)), rhs_spec=(n + 1, n, *range(n)), out_spec=(0, n + 1, *range(1, n + 1))
    )
    out = lax.conv_general_dilated_p.bind(
        lax.transpose(lhs, lhs_order), lax.transpose(rhs, rhs_order), dimension_numbers=canonical, **params
    )
    back = [0] * (n + 2)  # result axis a of the original layout is axis back[a] of the canonical one
    back[out_spec[0]], back[out_spec[1]] = 0, n + 1
    for i, axis in enumerate(out_spec[2:]):
        back[axis] = 1 + i
    return lax.transpose(out, back)
