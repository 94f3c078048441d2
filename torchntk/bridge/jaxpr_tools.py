"""Every contact with JAX's jaxpr data structures lives here (and is tested in ``tests/test_bridge_jaxpr_tools.py``).

The rest of the bridge sees a flat, private-free program: :class:`Program` holds a list of :class:`Eqn` whose
inputs are integer value ids or :class:`Const` literals. Nested call primitives (``jit``, ``closed_call``,
``remat``, ``custom_jvp_call``, …) are inlined, so every equation that consumes a parameter is visible.

A ``scan`` (a network's repeated blocks rolled into a loop) stays one equation whose body is a flat program of its
own (:attr:`Eqn.body`), so that what the structured program holds does not grow with the number of iterations; on
request (:func:`trace_program`'s ``unroll_scans``) it is unrolled into the flat program instead.

Only public names are used: ``jax.make_jaxpr`` and ``jax.extend.core`` (``ClosedJaxpr``, ``Jaxpr``, ``Literal``,
``Primitive``). The assumptions about internals are the table :data:`CALL_JAXPR_PARAM` below (which parameter of
a call primitive holds its body), checked by the tests on the installed JAX, and the scan parameters read
(``jaxpr``, ``num_consts``, ``num_carry``, ``length``, ``reverse``), exercised by ``tests/test_bridge_rolled_scans.py``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.extend.core as jex

#: Call-like primitives whose body is inlined, and the parameter that holds the body (a Jaxpr or ClosedJaxpr
#: taking exactly the equation's inputs). ``custom_jvp_call`` / ``custom_vjp_call`` bodies are the primal
#: function, which is what a linear jaxpr evaluates.
CALL_JAXPR_PARAM: dict[str, str] = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "named_call": "call_jaxpr",
}

#: Primitives a linear jaxpr may hold that cannot be evaluated forwards (only transposed).
UNEVALUABLE = {"custom_lin": "a jax.custom_vjp function (its linearization only has a backward rule)"}


#: The loop primitive kept rolled. Its body (parameter ``jaxpr``) is a ClosedJaxpr taking ``consts, carry, x slices``
#: and returning ``carry, y slices``; ``num_consts``, ``num_carry``, ``length`` and ``reverse`` say how its inputs
#: split, its trip count and direction.
SCAN = "scan"


class UnevaluableError(NotImplementedError):
    """A linear program holds a primitive that can only be transposed, not evaluated forwards."""


@dataclass(frozen=True)
class Const:
    """A literal input of an equation."""

    value: Any


Atom = int | Const


@dataclass(frozen=True)
class Eqn:
    """One primitive application of a flattened program: ``outputs = primitive.bind(*inputs, **params)``."""

    primitive: jex.Primitive
    inputs: tuple[Atom, ...]
    outputs: tuple[int, ...]
    params: dict[str, Any] = field(hash=False)
    body: Program | None = field(default=None, hash=False)  # a scan's body, flattened

    @property
    def name(self) -> str:
        return self.primitive.name

    def bind(self, *args: Any, **param_overrides: Any) -> list[Any]:
        """Apply the primitive to ``args`` (parameters optionally overridden); always return a list of outputs."""
        out = self.primitive.bind(*args, **(self.params | param_overrides))
        return list(out) if self.primitive.multiple_results else [out]


@dataclass
class Program:
    """A flat program: ``inputs`` (one id per input leaf) → ``outputs`` (atoms), through ``eqns``.

    ``consts`` maps the ids of closed-over values (residuals of a linearization) to their values; ``shapes`` and
    ``dtypes`` hold every id's abstract value.
    """

    inputs: tuple[int, ...]
    outputs: tuple[Atom, ...]
    eqns: list[Eqn]
    consts: dict[int, Any]
    shapes: dict[int, tuple[int, ...]]
    dtypes: dict[int, Any]


def trace_program(fun: Callable[..., Any], *example_args: Any, unroll_scans: bool = False) -> Program:
    """``jax.make_jaxpr(fun)(*example_args)``, flattened into a :class:`Program` with call primitives inlined.

    Values ``fun`` closes over (possibly tracers of an enclosing transformation) become ``Program.consts``. A
    ``scan`` stays one equation with its flattened :attr:`Eqn.body`, or is unrolled with ``unroll_scans``.
    """
    closed = jax.make_jaxpr(fun)(*example_args)
    return _Flattener(unroll_scans).flatten(closed)


class _Flattener:
    def __init__(self, unroll_scans: bool = False) -> None:
        self.unroll_scans = unroll_scans
        self._ids = itertools.count()
        self.eqns: list[Eqn] = []
        self.consts: dict[int, Any] = {}
        self.shapes: dict[int, tuple[int, ...]] = {}
        self.dtypes: dict[int, Any] = {}

    def _new_id(self, var: Any) -> int:
        new = next(self._ids)
        self.shapes[new] = tuple(var.aval.shape)
        self.dtypes[new] = var.aval.dtype
        return new

    def flatten(self, closed: jex.ClosedJaxpr) -> Program:
        jaxpr = closed.jaxpr
        env: dict[Any, Atom] = {}
        for var, value in zip(jaxpr.constvars, closed.consts, strict=True):
            env[var] = self._new_id(var)
            self.consts[env[var]] = value
        inputs = tuple(self._new_id(var) for var in jaxpr.invars)
        env.update(zip(jaxpr.invars, inputs, strict=True))
        outputs = self._inline(jaxpr, env)
        return Program(inputs, outputs, self.eqns, self.consts, self.shapes, self.dtypes)

    def _read(self, env: dict[Any, Atom], atom: Any) -> Atom:
        if isinstance(atom, jex.Literal):
            return Const(atom.val)
        return env[atom]

    def _inline(self, jaxpr: jex.Jaxpr, env: dict[Any, Atom]) -> tuple[Atom, ...]:
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name in UNEVALUABLE:
                raise UnevaluableError(
                    f"structured derivatives cannot evaluate primitive {name!r}, produced by {UNEVALUABLE[name]}; "
                    "use a jax.custom_jvp rule instead, or another NTK implementation."
                )
            inputs = tuple(self._read(env, atom) for atom in eqn.invars)
            body = eqn.params.get(CALL_JAXPR_PARAM.get(name, ""))
            if body is not None:
                results = self._inline_call(body, inputs)
            elif name == SCAN and self.unroll_scans and eqn.params["length"] > 0:
                results = self._inline_call(_unrolled_scan(eqn), inputs)
            else:
                loop = _Flattener().flatten(eqn.params["jaxpr"]) if name == SCAN else None
                outputs = tuple(self._new_id(var) for var in eqn.outvars)
                self.eqns.append(Eqn(eqn.primitive, inputs, outputs, dict(eqn.params), loop))
                results = outputs
            for var, result in zip(eqn.outvars, results, strict=True):
                env[var] = result  # a DropVar is simply never read
        return tuple(self._read(env, atom) for atom in jaxpr.outvars)

    def _inline_call(self, body: Any, inputs: Sequence[Atom]) -> tuple[Atom, ...]:
        if isinstance(body, jex.ClosedJaxpr):
            jaxpr, consts = body.jaxpr, body.consts
        else:
            jaxpr, consts = body, ()
        env: dict[Any, Atom] = {}
        for var, value in zip(jaxpr.constvars, consts, strict=True):
            env[var] = self._new_id(var)
            self.consts[env[var]] = value
        env.update(zip(jaxpr.invars, inputs, strict=True))
        return self._inline(jaxpr, env)


def _unrolled_scan(eqn: Any) -> jex.ClosedJaxpr:
    """A scan equation as a program of its inputs with the body repeated ``length`` times (x slices taken, y slices
    stacked): every iteration's equations become equations of the flat program."""
    body = _Flattener().flatten(eqn.params["jaxpr"])
    consts, carries = eqn.params["num_consts"], eqn.params["num_carry"]
    length, reverse = eqn.params["length"], eqn.params["reverse"]

    def unrolled(*args: Any) -> list[Any]:
        carry, xs = list(args[consts : consts + carries]), args[consts + carries :]
        ys: list[Any] = [None] * length
        for step in reversed(range(length)) if reverse else range(length):
            outs, _ = evaluate(body, [*args[:consts], *carry, *(x[step] for x in xs)])
            carry, ys[step] = outs[:carries], outs[carries:]
        return [*carry, *(jax.numpy.stack([y[k] for y in ys]) for k in range(len(ys[0])))]

    avals = [jax.ShapeDtypeStruct(var.aval.shape, var.aval.dtype) for var in eqn.invars]
    return jax.make_jaxpr(unrolled)(*avals)


def without_custom_rules(fun: Callable[[Any], Any], example: Any) -> Callable[[Any], Any]:
    """``fun`` (of one pytree) re-expressed through its flattened program: ``custom_jvp`` / ``custom_vjp`` bodies
    are inlined, so differentiating it differentiates the primal computation instead of the custom rules."""
    out_shape = jax.eval_shape(fun, example)
    program = trace_program(fun, example)

    def stripped(tree: Any) -> Any:
        outs, _ = evaluate(program, jax.tree.leaves(tree))
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return stripped


def evaluate(
    program: Program,
    inputs: Sequence[Any],
    after_eqn: Callable[[int, list[Any]], list[Any]] | None = None,
    instead: dict[int, Callable[[list[Any]], list[Any]]] | None = None,
) -> tuple[list[Any], dict[int, Any]]:
    """Run ``program`` on ``inputs``; return its outputs and the environment (id → value).

    ``after_eqn(index, outputs)`` may replace each equation's outputs (used to add perturbations);
    ``instead[index](inputs)`` computes an equation's outputs in place of binding it (a scan run with perturbations
    inside its body).
    """
    instead = instead or {}
    env: dict[int, Any] = dict(program.consts)
    env.update(zip(program.inputs, inputs, strict=True))

    def read(atom: Atom) -> Any:
        return atom.value if isinstance(atom, Const) else env[atom]

    for index, eqn in enumerate(program.eqns):
        args = [read(atom) for atom in eqn.inputs]
        outs = instead[index](args) if index in instead else eqn.bind(*args)
        if after_eqn is not None:
            outs = after_eqn(index, outs)
        env.update(zip(eqn.outputs, outs, strict=True))
    return [read(atom) for atom in program.outputs], env
