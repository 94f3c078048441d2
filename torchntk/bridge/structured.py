"""``structured_ntk_fn``: the empirical NTK of a pure JAX function by structured derivatives (paper §3.4).

The work splits in two (:func:`structured_ntk_parts`): per-example *ingredients* (output cotangents and Jacobian
sub-arrays, ``N1 + N2`` work) and their *contraction* per pair (``N1·N2`` work), so that a tiled kernel can compute
each example's ingredients once per row of tiles and reuse them along it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from torchntk._axes import canonicalize_axes, swap_kernel_sides, trace_size
from torchntk.bridge import example_blocks
from torchntk.bridge.cotangents import OutputBlock, SideInfo, per_example_ingredients
from torchntk.bridge.mjjmp import pair_contraction
from torchntk.bridge.output_blocks import BlockPlan, blocked_kernel, plan_blocks

Array = Any


def _side(
    f: Callable, params: Any, x: Any, batched: bool, block: OutputBlock | None = None
) -> tuple[SideInfo, list[Array], list[list[Array]]]:
    """Ingredients for one input batch; per example (vmapped over axis 0 of every leaf of ``x``) when batched."""
    if not batched:
        return per_example_ingredients(lambda p: f(p, x), params, block)

    captured: list[SideInfo] = []

    def one_example(example: Any) -> tuple[list[Array], list[list[Array]]]:
        def fun(p: Any) -> Any:
            out = f(p, jax.tree.map(lambda leaf: leaf[None], example))
            for leaf in jax.tree.leaves(out):
                if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != 1:
                    raise ValueError(
                        f"with vmap_axes=0, every output of f must keep the batch axis 0 of x; got an output of "
                        f"shape {jnp.shape(leaf)} for one example. Pass vmap_axes=None if f mixes examples."
                    )
            return jax.tree.map(lambda leaf: leaf[0], out)

        info, subs, cts = per_example_ingredients(fun, params, block)
        captured.append(info)
        return subs, cts

    subs, cts = jax.vmap(one_example)(x)
    return captured[0], subs, cts


def _returning_arrays(f: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """``f`` with Python numbers in its output made floating arrays: a constant ``f`` (``lambda p, x: 1.0``, as in
    neural-tangents' tests) has an all-zero kernel of the output's shape."""

    def as_array(leaf: Any) -> Any:
        return jnp.asarray(leaf, dtype=float) if isinstance(leaf, (bool, int, float)) else leaf

    return lambda params, x: jax.tree.map(as_array, f(params, x))


def _balanced(subs: list[Array], batched: bool) -> tuple[list[Array], list[Array]]:
    """``([sub / s], [s])`` with each ``s`` the power of two at or just below ``max |sub|`` (per example when
    batched; 1 where that maximum is 0, subnormal, inf or NaN).

    Contracting ``sub1 · sub2`` first (opt_einsum's choice when it is cheapest) overflows float32 for large inputs
    (|x|² > 3e38) while the cotangents are tiny or exactly zero (saturated units): inf · 0 = NaN where the
    Jacobians are finite. Moving each sub-array's scale onto its cotangent (``ct · s``) keeps every intermediate
    near the size of a Jacobian entry; a power of two makes the rescaling exact.

    The peaks of all sub-arrays of one dtype are stacked and their scales found in one go: a deep network has
    hundreds of sub-arrays, and the dozen operations per sub-array of doing it apart were a fifth of the
    ingredients program (densenet121: 18,281 StableHLO operations).
    """
    subs = [jnp.asarray(sub) for sub in subs]
    peaks = [jnp.max(jnp.abs(sub), axis=tuple(range(1 if batched else 0, sub.ndim))) for sub in subs]
    scales: list[Array] = [None] * len(subs)
    for k, peak in enumerate(peaks):  # an indexed sub-array's indices (.structure): ones, of an integer dtype that
        if not jnp.issubdtype(peak.dtype, jnp.inexact):  # leaves the cotangent's dtype as it is
            scales[k] = jnp.ones_like(peak)
    for dtype in dict.fromkeys(peak.dtype for peak in peaks if jnp.issubdtype(peak.dtype, jnp.inexact)):
        which = [k for k, peak in enumerate(peaks) if peak.dtype == dtype]
        stacked = jnp.stack([peaks[k] for k in which])
        found = _exponent_only(stacked)
        found = jnp.where(jnp.isfinite(stacked) & (found > 0), found, jnp.ones_like(found))
        for row, k in enumerate(which):
            scales[k] = found[row]
    balanced = [
        sub if not jnp.issubdtype(sub.dtype, jnp.inexact) else sub / _expand(scale, sub.ndim)
        for sub, scale in zip(subs, scales, strict=True)
    ]
    return balanced, scales


def _exponent_only(x: Array) -> Array:
    """``2^floor(log2 x)`` for positive normal ``x`` — ``x`` with its mantissa bits cleared (0 for zeros and
    subnormals, inf for inf and NaN). Three operations, where ``frexp``/``ldexp`` take about thirty per sub-array:
    a quarter of the ingredients program of a ResNet."""
    info = jnp.finfo(x.dtype)
    as_int = jnp.dtype(f"int{info.bits}")
    mask = ((1 << info.nexp) - 1) << info.nmant
    bits = jax.lax.bitcast_convert_type(x, as_int)
    return jax.lax.bitcast_convert_type(bits & jnp.asarray(mask, as_int), x.dtype)


def _expand(scale: Array, ndim: int) -> Array:
    return scale.reshape(scale.shape + (1,) * (ndim - scale.ndim))


@jax.tree_util.register_pytree_node_class
@dataclass
class Ingredients:
    """One side's per-example ingredients: sub-arrays divided by ``scales``, cotangents multiplied by them (one
    per use, per output leaf; ``None`` for leaves not computed), and the static ``info`` and example ``count``."""

    info: SideInfo
    count: int | None  # examples along axis 0 (None: unbatched)
    subs: list[Array]
    scales: list[Array]
    cts: list[list[Array | None]]

    def tree_flatten(self) -> tuple[tuple, tuple]:
        return (self.subs, self.scales, self.cts), (self.info, self.count)

    @classmethod
    def tree_unflatten(cls, aux: tuple, children: tuple) -> Ingredients:
        return cls(*aux, *children)

    def out_shape(self, leaf: int) -> tuple[int, ...]:
        """Shape of output leaf ``leaf`` of the whole side (with the batch axis when batched)."""
        shape = self.info.out_shapes[leaf]
        return shape if self.count is None else (self.count, *shape)

    def take(self, start: int, size: int) -> Ingredients:
        """Examples ``start .. start+size`` of batched ingredients."""

        def part(a: Array) -> Array:
            return a[start : start + size]

        cts = [[None if ct is None else part(ct) for ct in per_leaf] for per_leaf in self.cts]
        return Ingredients(self.info, size, [part(a) for a in self.subs], [part(a) for a in self.scales], cts)

    def cotangents(self, f: Callable, params: Any, x: Any, block: OutputBlock) -> list[Array]:
        """The scaled cotangents of output leaf ``block.leaf`` for ``block`` (recomputed from ``x``)."""
        info, _, cts = _side(f, params, x, self.count is not None, block)
        if info.uses != self.info.uses:  # the block's cotangents must have the structures of these sub-arrays
            raise RuntimeError(
                "torchntk internal error: an output block's cotangents were computed with other structures than "
                "the sub-arrays they are contracted with; please report it."
            )
        return [ct[block.leaf] * _expand(s, ct[block.leaf].ndim) for ct, s in zip(cts, self.scales, strict=True)]


def ingredients(f: Callable, params: Any, x: Any, batched: bool, block: OutputBlock | None = None) -> Ingredients:
    """:class:`Ingredients` of ``f(params, x)``; with ``block``, cotangents only for that block (see
    :func:`torchntk.bridge.cotangents.per_example_ingredients`)."""
    info, subs, cts = _side(f, params, x, batched, block)
    subs, scales = _balanced(subs, batched)
    scaled = [
        [None if ct is None else ct * _expand(scale, ct.ndim) for ct in per_leaf]
        for per_leaf, scale in zip(cts, scales, strict=True)
    ]
    count = jax.tree.leaves(x)[0].shape[0] if batched else None
    return Ingredients(info, count, subs, scales, scaled)


def contract(
    side1: Ingredients,
    side2: Ingredients,
    cts1: list[Array],
    cts2: list[Array],
    *,
    out_ndim: int,
    trace_axes: tuple[int, ...],
    diagonal_axes: tuple[int, ...],
    dtype: Any,
    shape: tuple[int, ...],
) -> Array:
    """Σ over pairs of uses of one parameter of the MJJMP: the kernel (of ``shape``, traced axes *summed*) between
    cotangents ``cts1``/``cts2`` (one per use, of one output leaf or of a block of it).

    Pairs with the same structures and operand shapes (a network's repeated blocks) are stacked and contracted
    together (:func:`same_contractions`): the program holds one contraction per distinct shape, not one per layer,
    so its compile time stops growing with depth. Stacking copies those operands once. A rolled scan's uses
    (:mod:`.rolled_scans`) come stacked over its iterations already.
    """
    kernel = jnp.zeros(shape, dtype)
    batched = side1.count is not None
    for pairs in same_contractions(side1, side2, cts1, cts2):
        use1, use2 = side1.info.uses[pairs[0][0]], side2.info.uses[pairs[0][1]]
        each = [(cts1[u1], side1.subs[u1], side2.subs[u2], cts2[u2]) for u1, u2 in pairs]
        stacked = len(each) > 1 or use1.stack is not None
        if use1.stack is not None:  # a scan's uses: one pair per iteration already, along the axis after examples
            each = [tuple(jnp.moveaxis(a, 1 if batched else 0, 0) for a in parts) for parts in each]
        elif stacked:
            each = [tuple(a[None] for a in parts) for parts in each]
        operands = tuple(jnp.concatenate(parts) for parts in zip(*each, strict=True)) if stacked else each[0]
        kernel = kernel + pair_contraction(
            use1,
            use2,
            operands,
            out_ndim=out_ndim,
            trace_axes=trace_axes,
            diagonal_axes=diagonal_axes,
            batched=batched,
            stacked=stacked,
        )
    return kernel


def same_contractions(
    side1: Ingredients, side2: Ingredients, cts1: list[Array], cts2: list[Array]
) -> list[list[tuple[int, int]]]:
    """The pairs ``(u1, u2)`` of uses of one parameter, grouped by everything their contraction depends on apart
    from the values: both structures, θ's shape, and each operand's shape and dtype."""
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for u1, use1 in enumerate(side1.info.uses):
        for u2, use2 in enumerate(side2.info.uses):
            if use1.param == use2.param:
                operands = (cts1[u1], side1.subs[u1], side2.subs[u2], cts2[u2])
                key = (use1.structure, use2.structure, use1.theta_shape, use1.stack, use2.stack)
                key += tuple((jnp.shape(a), jnp.result_type(a)) for a in operands)
                groups.setdefault(key, []).append((u1, u2))
    return list(groups.values())


def structured_ntk_parts(
    f: Callable[[Any, Any], Any],
    *,
    trace_axes: int | Iterable[int] = (),
    diagonal_axes: int | Iterable[int] = (),
    vmap_axes: int | None = 0,
) -> tuple[Callable[[Any, Any], Ingredients], Callable[..., Any]]:
    """``(ingredients_fn(x, params) -> Ingredients, contract_fn(ingredients1, ingredients2=None) -> kernel)``,
    both unjitted, with ``contract_fn(ingredients_fn(x1, p), ingredients_fn(x2, p)) ==
    structured_ntk_fn(f)(x1, x2, p)`` (arguments as there; no output blocking). ``ingredients2=None``: the kernel
    of ``x1`` with itself, from the upper triangle of blocks of examples (:mod:`.example_blocks`).
    Ingredients hold every output's cotangents: ``rows · Y`` entries per example."""
    if vmap_axes not in (0, None):
        raise ValueError(f"vmap_axes={vmap_axes!r} is not supported; use 0 (batch axis 0 of x) or None.")
    batched = vmap_axes == 0

    def ingredients_fn(x: Any, params: Any) -> Ingredients:
        return ingredients(f, params, x, batched)

    def leaf_kernels(side1: Ingredients, side2: Ingredients) -> list[Array]:
        kernels = []
        for leaf in range(len(side1.info.out_shapes)):
            shape1, shape2 = side1.out_shape(leaf), side2.out_shape(leaf)
            trace, diag = canonicalize_axes(len(shape1), trace_axes, diagonal_axes, batch_axis=batched)
            plan = plan_blocks(shape1, shape2, trace, diag, batched, None)
            cts1 = [ct[leaf] for ct in side1.cts]
            cts2 = [ct[leaf] for ct in side2.cts]
            kernel = contract(
                side1,
                side2,
                cts1,
                cts2,
                out_ndim=plan.ndim,
                trace_axes=trace,
                diagonal_axes=diag,
                dtype=side1.info.out_dtypes[leaf],
                shape=plan.block_kernel_shape,
            )
            kernels.append(kernel / trace_size(shape1, trace))
        return kernels

    def contract_fn(side1: Ingredients, side2: Ingredients | None = None) -> Any:
        kernels = symmetric_kernels(side1) if side2 is None else leaf_kernels(side1, side2)
        return jax.tree.unflatten(side1.info.out_treedef, kernels)

    def symmetric_kernels(side: Ingredients) -> list[Array]:
        """x2 = x1: the upper triangle of example blocks, mirrored (:mod:`.example_blocks`), when the batch axis
        is a free kernel axis of every output leaf (batched, and not diagonal: not paired)."""
        mirrors = []
        for shape in side.info.out_shapes:
            trace, diag = canonicalize_axes(len(shape) + 1, trace_axes, diagonal_axes, batch_axis=batched)
            mirrors.append(swap_kernel_sides(len(shape) + 1, trace, diag))
        if not batched or any(perm[:2] != (1, 0) for perm in mirrors):
            return leaf_kernels(side, side)
        leaves = range(len(side.info.out_shapes))
        per_pair = sum(len(same_contractions(side, side, *[[ct[leaf] for ct in side.cts]] * 2)) for leaf in leaves)
        blocks = example_blocks.block_count(side.count, per_pair)
        return example_blocks.symmetric_kernels(side.count, blocks, side.take, leaf_kernels, mirrors)

    return ingredients_fn, contract_fn


def structured_ntk_fn(
    f: Callable[[Any, Any], Any],
    *,
    trace_axes: int | Iterable[int] = (),
    diagonal_axes: int | Iterable[int] = (),
    vmap_axes: int | None = 0,
    output_block: int | None = None,
) -> Callable[[Any, Any, Any], Any]:
    """Return ``ntk_fn(x1, x2, params)``, the empirical NTK of ``f(params, x)`` by structured derivatives.

    Args:
      f: a pure JAX function of a parameter pytree (floating leaves) and inputs ``x`` (an array or a pytree of
        arrays), returning an array or a pytree of arrays. The NTK sums over all parameter leaves.
      trace_axes: output axes contracted and *averaged* (divided by their size). The default ``()`` keeps every
        output axis, unlike neural-tangents' ``empirical_ntk_fn`` whose default is ``(-1,)``.
      diagonal_axes: output axes of which only the diagonal ``Θ[..., a, a, ...]`` is kept (one kernel axis). The
        batch axis 0 may be diagonal when ``N1 == N2``.
      vmap_axes: ``0`` (default): axis 0 of every leaf of ``x`` is a batch axis along which ``f`` is independent;
        cotangents and Jacobian sub-arrays are then computed once per example (``N1 + N2`` work) and only the
        contractions per pair. ``None``: no batch assumption; ``x1`` and ``x2`` are each one "example" and every
        output axis (axis 0 included, which may then also be traced) is an ordinary output axis.
      output_block: at most this many output cotangent rows per example exist at once (``None``: all of them).
        The cotangents of every parameter-consuming primitive take ``rows · Y`` entries per example (``Y``: the
        size of those primitives' outputs), the bulk of the memory. Blocks run along one output axis (see
        :mod:`torchntk.bridge.output_blocks`): along a traced or diagonal axis only matching blocks of the two sides
        are contracted (each block's cotangents computed once, plus one forward pass per block); along another
        axis each ``x2`` block is recomputed once per ``x1`` block, ``⌈d/b⌉`` times the cotangent work of ``x2``.

    Returns:
      ``ntk_fn(x1, x2=None, params) -> kernel`` with one kernel per output leaf (same pytree structure).
      ``x2=None`` means ``x2 = x1``. For outputs ``(N, O)`` the kernel is ``Array[N1, N2, O, O]``; for ``(N, d1,
      d2)`` it is ``Array[N1, N2, d1, d1, d2, d2]``; traced axes are absent and diagonal axes appear once (layout
      of :mod:`torchntk._axes`, as neural-tangents).

    ``ntk_fn`` is jitted internally (wrapping it in ``jax.jit`` again is harmless). Float64 works under
    ``with jax.enable_x64(True):`` with float64 inputs and parameters.
    """
    if output_block is not None and (not isinstance(output_block, int) or output_block < 1):
        raise ValueError(f"output_block must be a positive integer or None, got {output_block!r}.")
    f = _returning_arrays(f)
    ingredients_fn, contract_fn = structured_ntk_parts(
        f, trace_axes=trace_axes, diagonal_axes=diagonal_axes, vmap_axes=vmap_axes
    )
    batched = vmap_axes == 0

    def unblocked(x1: Any, x2: Any, params: Any) -> Any:
        if x2 is None:
            return contract_fn(ingredients_fn(x1, params))
        return contract_fn(*_both_sides(ingredients_fn, x1, x2, params, batched))

    def ntk_fn(x1: Any, x2: Any, params: Any) -> Any:
        if output_block is None:  # no plan needed: f is traced once, not also for its output shapes
            return unblocked(x1, x2, params)
        out1 = jax.eval_shape(f, params, x1)
        out2 = out1 if x2 is None else jax.eval_shape(f, params, x2)
        leaves1, treedef = jax.tree.flatten(out1)
        leaves2 = jax.tree.leaves(out2)
        plans = []
        for a, b in zip(leaves1, leaves2, strict=True):
            trace, diag = canonicalize_axes(a.ndim, trace_axes, diagonal_axes, batch_axis=batched)
            plans.append(plan_blocks(tuple(a.shape), tuple(b.shape), trace, diag, batched, output_block))
        if not any(plan.blocked for plan in plans):
            return unblocked(x1, x2, params)
        # Sub-arrays once per side; the cotangents come one block at a time (a 1-row block here, unused: dropped).
        probe = next(OutputBlock(leaf, p.example_axis, 0, 1) for leaf, p in enumerate(plans) if p.blocked)
        side1 = ingredients(f, params, x1, batched, probe)
        side2 = side1 if x2 is None else ingredients(f, params, x2, batched, probe)
        kernels = []
        for leaf, plan in enumerate(plans):
            kernel = blocked_kernel(
                plan,
                _block_source(f, params, x1, side1, leaf, plan),
                None if x2 is None else _block_source(f, params, x2, side2, leaf, plan),
                _block_contraction(side1, side2, plan, leaves1[leaf].dtype),
                leaves1[leaf].dtype,
            )
            kernels.append(kernel / trace_size(plan.shape1, plan.trace))
        return jax.tree.unflatten(treedef, kernels)

    jitted = jax.jit(ntk_fn)

    def ntk(x1: Any, x2: Any = None, params: Any = None) -> Any:
        if params is None:
            raise TypeError("ntk_fn(x1, x2, params) needs params; pass x2=None to use x1 for both sides.")
        return jitted(x1, x2, params)

    ntk.__doc__ = structured_ntk_fn.__doc__
    return ntk


def _both_sides(ingredients_fn: Callable, x1: Any, x2: Any, params: Any, batched: bool) -> tuple[Ingredients, ...]:
    """Both sides' ingredients, from one traced computation over the examples of ``x1`` then ``x2`` where they
    stack (batched, one pytree structure, equal shapes but axis 0, equal dtypes). The work is the same as two
    sides apart; the program holds the ingredients once instead of twice, so XLA compiles about half as much
    (a deep model's first call with ``x2`` given: densenet121 at 32×32, 39k StableHLO operations before)."""
    leaves1, tree1 = jax.tree.flatten(x1)
    leaves2, tree2 = jax.tree.flatten(x2)
    stackable = batched and tree1 == tree2 and leaves1
    stackable = stackable and all(
        jnp.ndim(a) >= 1
        and jnp.shape(a)[1:] == jnp.shape(b)[1:]
        and jnp.ndim(a) == jnp.ndim(b)
        and jnp.result_type(a) == jnp.result_type(b)
        for a, b in zip(leaves1, leaves2, strict=True)
    )
    if not stackable:
        return ingredients_fn(x1, params), ingredients_fn(x2, params)
    n1, n2 = jnp.shape(leaves1[0])[0], jnp.shape(leaves2[0])[0]
    both = ingredients_fn(
        jax.tree.unflatten(tree1, [jnp.concatenate([a, b]) for a, b in zip(leaves1, leaves2, strict=True)]), params
    )
    return both.take(0, n1), both.take(n1, n2)


def _block_source(f: Callable, params: Any, x: Any, side: Ingredients, leaf: int, plan: BlockPlan) -> Callable:
    return lambda start: side.cotangents(f, params, x, OutputBlock(leaf, plan.example_axis, start, plan.size))


def _block_contraction(side1: Ingredients, side2: Ingredients, plan: BlockPlan, dtype: Any) -> Callable:
    def run(cts1: list[Array], cts2: list[Array]) -> Array:
        return contract(
            side1,
            side2,
            cts1,
            cts2,
            out_ndim=plan.ndim,
            trace_axes=plan.trace,
            diagonal_axes=plan.diag,
            dtype=dtype,
            shape=plan.block_kernel_shape,
        )

    return run
