"""Per-example ingredients of the structured NTK: output cotangents ∂f/∂y^k and Jacobian sub-arrays ∂y^k/∂θ.

Steps 1–4 of the algorithm (``../shared/reference/structured-derivatives-notes.md``):

1. linearize ``f`` in the parameters and flatten the linear map's jaxpr (:mod:`torchntk.bridge.jaxpr_tools`);
2. find every *use* of a parameter: an equation input that is a parameter tangent. A parameter that only flows
   through a bijective relabeling (transpose, reshape, convert, neg, …) with no other consumer is followed through
   it (an *alias*): such maps ``P`` satisfy ``P Pᵀ = I``, so the NTK of the relabeled parameter is the same;
3. re-evaluate the linear program with parameters at zero and an additive perturbation δ_k on every output of a
   consuming equation; ``jax.vjp`` in all δ_k at once, ``jax.vmap``-ed over an identity basis of the outputs,
   yields every ∂f/∂y^k (public API only). An :class:`OutputBlock` limits the basis to ``b`` rows along one
   output axis, so that only ``b·Y`` cotangent entries per example exist at once;
4. apply each use's structure rule (:mod:`torchntk.bridge.rules`) to get its sub-array, pull the cotangent back
   and sum it over output block-tiled axes.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from torchntk.bridge import rolled_scans
from torchntk.bridge.jaxpr_tools import Const, Program, UnevaluableError, evaluate, trace_program, without_custom_rules
from torchntk.bridge.rules import use_ingredients
from torchntk.bridge.structure import Structure

#: Primitives that only relabel (and possibly negate) their single tangent input: P Pᵀ = I.
_RELABELINGS = {"transpose", "reshape", "convert_element_type", "copy", "squeeze", "neg"}


@dataclass(frozen=True)
class Use:
    """θ = parameter ``param`` enters equation ``eqn`` (``None``: θ is itself output ``out``) as input ``arg``;
    the use's ``y`` is that equation's output ``out``, perturbed at site ``site``. ``scan``: the index of the scan
    equation whose body holds ``eqn`` (each iteration uses its own slice of θ), else ``None``."""

    param: int
    site: int
    eqn: int | None
    arg: int
    out: int
    scan: int | None = None


@dataclass(frozen=True)
class UseInfo:
    """Static facts about one use, needed to build its contraction. ``stack``: a use inside a scan body has one
    sub-array and cotangent per iteration, stacked along a leading axis of this length (per example)."""

    param: int
    structure: Structure
    theta_shape: tuple[int, ...]
    stack: int | None = None


@dataclass(frozen=True)
class SideInfo:
    """Static facts about one side (``x1`` or ``x2``) of the kernel."""

    uses: tuple[UseInfo, ...]
    out_shapes: tuple[tuple[int, ...], ...]  # per output leaf, per example when batched
    out_dtypes: tuple[Any, ...]
    out_treedef: Any


class RolledScanUnsupported(Exception):
    """A scan takes parameters otherwise than one slice per iteration of a parameter it alone reads: unroll it."""


def _is_relabeling(program: Program, eqn_index: int) -> bool:
    eqn = program.eqns[eqn_index]
    if eqn.name in _RELABELINGS and len(eqn.inputs) == 1:
        return True
    # broadcast_in_dim that only inserts size-1 axes is a reshape.
    return (
        eqn.name == "broadcast_in_dim"
        and len(eqn.inputs) == 1
        and isinstance(eqn.inputs[0], int)
        and math.prod(program.shapes[eqn.inputs[0]]) == math.prod(program.shapes[eqn.outputs[0]])
    )


def find_uses(
    program: Program, carriers: dict[int, int] | None = None, new_param: Iterator[int] | None = None
) -> tuple[list[Use], list[tuple], set[int]]:
    """Return the uses, the perturbation sites (``("eqn", index, out)``, ``("output", position, 0)`` or, inside the
    body of scan ``s``, ``("body", s, (index, out))``) and the indices of alias equations (relabelings followed).

    ``carriers`` maps the values that carry a parameter to its number (default: input leaf ``i`` carries parameter
    ``i``). Stacking or concatenating parameters that nothing else reads makes one new parameter (numbered by
    ``new_param``, shared with the scan bodies': numbers are never reused): the NTK sums over parameters, and a
    concatenation is a bijective relabeling of their union. A scan that takes such a parameter as an ``x`` (one
    slice per iteration) keeps it there: the slices are its body's parameters, and their uses are found in the
    body (:class:`RolledScanUnsupported` for any other way).
    """
    consumers = Counter(a for eqn in program.eqns for a in eqn.inputs if isinstance(a, int))
    consumers.update(a for a in program.outputs if isinstance(a, int))
    carrier_of = dict(carriers) if carriers is not None else {var: leaf for leaf, var in enumerate(program.inputs)}
    new_param = new_param if new_param is not None else itertools.count(len(program.inputs))
    uses: list[Use] = []
    sites: list[tuple] = []
    aliases: set[int] = set()
    for index, eqn in enumerate(program.eqns):
        slots = [i for i, a in enumerate(eqn.inputs) if isinstance(a, int) and a in carrier_of]
        if not slots:
            continue
        source = eqn.inputs[slots[0]]
        if _is_relabeling(program, index) and consumers[source] == 1:
            carrier_of[eqn.outputs[0]] = carrier_of.pop(source)
            aliases.add(index)
            continue
        if _joins_parameters(program, index, carrier_of, consumers):
            for a in eqn.inputs:
                carrier_of.pop(a)
            carrier_of[eqn.outputs[0]] = next(new_param)
            aliases.add(index)
            continue
        if eqn.body is not None:
            body_carriers = _sliced_parameters(eqn, slots, carrier_of, consumers)
            body_uses, body_sites, _ = find_uses(eqn.body, body_carriers, new_param)
            if any(kind != "eqn" for kind, *_ in body_sites):
                raise RolledScanUnsupported("a scan's body returns one of its parameters as it is")
            first_site = len(sites)
            sites += [("body", index, (body_index, out)) for _, body_index, out in body_sites]
            uses += [Use(u.param, first_site + u.site, u.eqn, u.arg, u.out, index) for u in body_uses]
            continue
        first_site = len(sites)
        sites += [("eqn", index, out) for out in range(len(eqn.outputs))]
        for arg in slots:
            for out in range(len(eqn.outputs)):
                uses.append(Use(carrier_of[eqn.inputs[arg]], first_site + out, index, arg, out))
    for position, atom in enumerate(program.outputs):
        if isinstance(atom, int) and atom in carrier_of:
            sites.append(("output", position, 0))
            uses.append(Use(carrier_of[atom], len(sites) - 1, None, 0, position))
    return uses, sites, aliases


def _joins_parameters(program: Program, index: int, carrier_of: dict[int, int], consumers: Counter) -> bool:
    """Whether equation ``index`` stacks or concatenates parameters that nothing else reads (each input once)."""
    eqn = program.eqns[index]
    inputs = eqn.inputs
    return (
        eqn.name in ("stack", "concatenate")
        and len(eqn.outputs) == 1
        and all(isinstance(a, int) and a in carrier_of and consumers[a] == 1 for a in inputs)
        and len(set(inputs)) == len(inputs)
    )


def _sliced_parameters(eqn: Any, slots: list[int], carrier_of: dict[int, int], consumers: Counter) -> dict[int, int]:
    """The body values of a scan that carry a parameter: the x slices of parameters only this scan reads."""
    fixed = eqn.params["num_consts"] + eqn.params["num_carry"]
    body_carriers = {}
    for slot in slots:
        value = eqn.inputs[slot]
        if slot < fixed or consumers[value] != 1:
            raise RolledScanUnsupported("a scan reads a parameter whole in every iteration (a const or carry)")
        body_carriers[eqn.body.inputs[slot]] = carrier_of[value]
    return body_carriers


def _identity_use(shape: tuple[int, ...], dtype: Any) -> tuple[Structure, Any]:
    """θ is itself an output: identity structure, no pullback."""
    return Structure.identity(len(shape)), jnp.ones((), dtype)


@dataclass(frozen=True)
class OutputBlock:
    """Rows ``start .. start+size`` of output leaf ``leaf`` along its axis ``axis`` (per example); rows past the
    axis' end are zero (a last block need not fit). ``start`` may be a traced integer (a loop over blocks)."""

    leaf: int
    axis: int
    start: Any
    size: int


def rows_shape(shape: tuple[int, ...], block: OutputBlock | None) -> tuple[int, ...]:
    """Shape of the cotangent rows of an output leaf of ``shape``: ``shape`` with the blocked axis of size ``b``."""
    if block is None:
        return tuple(shape)
    return tuple(block.size if axis == block.axis else n for axis, n in enumerate(shape))


def block_basis(shape: tuple[int, ...], dtype: Any, block: OutputBlock | None) -> Any:
    """The basis rows of one output leaf: ``-> Array[R, *shape]``, ``R = prod(rows_shape(shape, block))``.

    Each row is a one-hot output (``block=None``: the whole identity). Built by comparing index grids, which XLA
    fuses: only the ``R × O`` block itself exists, never the ``O × O`` identity of all outputs.
    """
    rows = rows_shape(shape, block)
    ndim = len(shape)
    hot = jnp.ones((), bool)
    for axis, size in enumerate(shape):
        row_index = jnp.arange(rows[axis]) + (block.start if block is not None and axis == block.axis else 0)
        hot = hot & (
            row_index.reshape([-1 if j == axis else 1 for j in range(2 * ndim)])
            == jnp.arange(size).reshape([-1 if j == ndim + axis else 1 for j in range(2 * ndim)])
        )
    return jnp.broadcast_to(hot, (*rows, *shape)).astype(dtype).reshape(math.prod(rows), *shape)


def per_example_ingredients(
    fun: Callable[[Any], Any], params: Any, block: OutputBlock | None = None
) -> tuple[SideInfo, list[Any], list[list[Any]]]:
    """For ``fun(params) -> outputs`` (one example), return static info, one sub-array per use, and per use one
    cotangent per output leaf, of shape ``(*out_leaf_shape, *y')`` (``y'``: pulled back, tiled axes summed).

    With ``block``, only the rows of :func:`block_basis` of leaf ``block.leaf`` are pulled back: that leaf's
    cotangents have shape ``(*rows_shape(out_leaf_shape, block), *y')`` and every other leaf's entry is ``None``.
    """
    primal_out, linear_fn = jax.linearize(fun, params)
    out_leaves, out_treedef = jax.tree.flatten(primal_out)
    for leaf in out_leaves:
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            raise TypeError(f"f returned an output of dtype {leaf.dtype}; the NTK needs floating outputs.")
    program, uses, sites = _uses_of(fun, linear_fn, params)

    def site_shape(site: tuple) -> tuple[tuple[int, ...], Any]:
        kind, index, out = site
        if kind == "body":  # one slice per iteration
            scan = program.eqns[index]
            var = scan.body.eqns[out[0]].outputs[out[1]]
            return (scan.params["length"], *scan.body.shapes[var]), scan.body.dtypes[var]
        var = program.eqns[index].outputs[out] if kind == "eqn" else program.outputs[index]
        return program.shapes[var], program.dtypes[var]

    eqn_sites = {(index, out): s for s, (kind, index, out) in enumerate(sites) if kind == "eqn"}
    output_sites = {index: s for s, (kind, index, _) in enumerate(sites) if kind == "output"}
    body_sites: dict[int, dict[tuple[int, int], int]] = {}
    for s, (kind, index, out) in enumerate(sites):
        if kind == "body":
            body_sites.setdefault(index, {})[out] = s
    needed = {
        a
        for u in uses
        if u.eqn is not None and u.scan is None
        for a in program.eqns[u.eqn].inputs
        if isinstance(a, int)
    }
    needed_in = {
        scan: rolled_scans.needed_values(program.eqns[scan], [u.eqn for u in uses if u.scan == scan])
        for scan in body_sites
    }
    zeros = [jnp.zeros(program.shapes[v], program.dtypes[v]) for v in program.inputs]

    def perturbed(deltas: list[Any]) -> tuple[list[Any], tuple[dict[int, Any], dict[int, dict[int, Any]]]]:
        def add_delta(index: int, outs: list[Any]) -> list[Any]:
            return [o + deltas[eqn_sites[(index, j)]] if (index, j) in eqn_sites else o for j, o in enumerate(outs)]

        kept: dict[int, dict[int, Any]] = {}

        def rolled(scan: int) -> Callable[[list[Any]], list[Any]]:
            def run(args: list[Any]) -> list[Any]:
                where = {key: deltas[s] for key, s in body_sites[scan].items()}
                outs, kept[scan] = rolled_scans.run_perturbed(program.eqns[scan], args, where, needed_in[scan])
                return outs

            return run

        outs, env = evaluate(program, zeros, add_delta, {scan: rolled(scan) for scan in body_sites})
        outs = [o + deltas[output_sites[p]] if p in output_sites else o for p, o in enumerate(outs)]
        outs = [
            jnp.broadcast_to(jnp.asarray(o, leaf.dtype), leaf.shape) for o, leaf in zip(outs, out_leaves, strict=True)
        ]
        return outs, ({v: env[v] for v in needed}, kept)

    deltas = [jnp.zeros(*site_shape(site)) for site in sites]
    _, vjp_fn, (values, kept) = jax.vjp(perturbed, deltas, has_aux=True)
    # Each leaf's own basis rows, stacked over the leaves: a leaf's cotangent rows are zero on the others' rows.
    own_rows = [
        block_basis(tuple(leaf.shape), leaf.dtype, block) if block is None or block.leaf == i else None
        for i, leaf in enumerate(out_leaves)
    ]
    row_counts = [0 if rows is None else rows.shape[0] for rows in own_rows]
    # What rules may size their choice by: every output row, whatever the block, so that the blocks of one side
    # (each a call of this function) and its sub-arrays share one structure.
    all_rows = sum(math.prod(leaf.shape) for leaf in out_leaves)
    offsets = [sum(row_counts[:i]) for i in range(len(row_counts))]
    basis_leaves = [
        jnp.concatenate([rows if i == j else jnp.zeros((n, *leaf.shape), leaf.dtype) for j, n in enumerate(row_counts)])
        if rows is not None
        else jnp.zeros((sum(row_counts), *leaf.shape), leaf.dtype)
        for i, (rows, leaf) in enumerate(zip(own_rows, out_leaves, strict=True))
    ]
    (site_cts,) = jax.vmap(vjp_fn)(basis_leaves)

    in_scans = {
        scan: rolled_scans.body_uses(
            program.eqns[scan],
            [(u.eqn, u.arg, u.out) for u in uses if u.scan == scan],
            kept[scan],
            [site_cts[u.site] for u in uses if u.scan == scan],
            all_rows,
        )
        for scan in body_sites
    }
    infos, subs, cts = [], [], []
    for use in uses:
        stack = None
        if use.scan is not None:  # one slice of θ per iteration: stacked ingredients, iterations leading
            stack = program.eqns[use.scan].params["length"]
            structure, theta_shape, sub, ct = in_scans[use.scan].pop(0)
        else:
            site = site_shape(sites[use.site])
            structure, theta_shape, sub, ct = _use(program, use, site, values, site_cts[use.site], all_rows)
        infos.append(UseInfo(use.param, structure, theta_shape, stack))
        subs.append(sub)
        lead = () if stack is None else (stack,)
        rows_axis = len(lead)
        cts.append(
            [
                jax.lax.slice_in_dim(ct, off, off + n, axis=rows_axis).reshape(
                    *lead, *rows_shape(tuple(leaf.shape), block), *ct.shape[rows_axis + 1 :]
                )
                if rows is not None
                else None
                for off, n, leaf, rows in zip(offsets, row_counts, out_leaves, own_rows, strict=True)
            ]
        )
    shapes = tuple(tuple(leaf.shape) for leaf in out_leaves)
    info = SideInfo(tuple(infos), shapes, tuple(leaf.dtype for leaf in out_leaves), out_treedef)
    return info, subs, cts


def _uses_of(fun: Callable[[Any], Any], linear_fn: Callable, params: Any) -> tuple[Program, list[Use], list[tuple]]:
    """The flat linear program of ``fun`` at ``params`` and its uses and sites; scans kept rolled where
    :func:`find_uses` can follow their parameters, else every scan unrolled."""
    for unroll in (False, True):
        try:
            program = trace_program(linear_fn, params, unroll_scans=unroll)
        except UnevaluableError:
            # A jax.custom_vjp rule has no forward linear map: differentiate the primal computation instead.
            _, linear_fn = jax.linearize(without_custom_rules(fun, params), params)
            program = trace_program(linear_fn, params, unroll_scans=unroll)
        try:
            uses, sites, _ = find_uses(program)
        except RolledScanUnsupported:
            continue
        return program, uses, sites
    raise AssertionError("unreachable: an unrolled program has no scan")


def _use(
    program: Program, use: Use, site: tuple[tuple[int, ...], Any], values: dict[int, Any], ct: Any, rows: int
) -> tuple[Structure, tuple[int, ...], Any, Any]:
    """Structure, θ's shape, sub-array and pulled-back cotangents ``[R, *y']`` of one use outside any scan (``site``:
    the shape and dtype of its perturbation site, θ's own where θ is an output)."""
    if use.eqn is None:
        structure, sub = _identity_use(*site)
        return structure, site[0], sub, ct
    inputs = tuple(a.value if isinstance(a, Const) else values[a] for a in program.eqns[use.eqn].inputs)
    return use_ingredients(program, use.eqn, inputs, use.arg, use.out, ct, rows)
