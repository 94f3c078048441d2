"""``structured_ntk_fn``: the empirical NTK of a pure JAX function by structured derivatives (paper §3.4)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from torchntk._axes import canonicalize_axes, kernel_shape, trace_size
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


def _balanced(sub: Array, batched: bool) -> tuple[Array, Array]:
    """``(sub / s, s)`` with ``s`` the power of two just above ``max |sub|`` (per example when batched).

    Contracting ``sub1 · sub2`` first (opt_einsum's choice when it is cheapest) overflows float32 for large inputs
    (|x|² > 3e38) while the cotangents are tiny or exactly zero (saturated units): inf · 0 = NaN where the
    Jacobians are finite. Moving each sub-array's scale onto its cotangent (``ct · s``) keeps every intermediate
    near the size of a Jacobian entry; a power of two makes the rescaling exact.
    """
    sub = jnp.asarray(sub)
    reduce = tuple(range(1 if batched else 0, sub.ndim))
    peak = jnp.max(jnp.abs(sub), axis=reduce) if reduce else jnp.abs(sub)
    _, exponent = jnp.frexp(peak)
    scale = jnp.where(jnp.isfinite(peak) & (peak > 0), jnp.ldexp(jnp.ones_like(peak), exponent), 1)
    return sub / scale.reshape(scale.shape + (1,) * (sub.ndim - scale.ndim)), scale


def _scaled(ct: Array, scale: Array) -> Array:
    return ct * scale.reshape(scale.shape + (1,) * (ct.ndim - scale.ndim))


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
    if vmap_axes not in (0, None):
        raise ValueError(f"vmap_axes={vmap_axes!r} is not supported; use 0 (batch axis 0 of x) or None.")
    if output_block is not None and (not isinstance(output_block, int) or output_block < 1):
        raise ValueError(f"output_block must be a positive integer or None, got {output_block!r}.")
    batched = vmap_axes == 0

    def ntk_fn(x1: Any, x2: Any, params: Any) -> Any:
        out1 = jax.eval_shape(f, params, x1)
        out2 = out1 if x2 is None else jax.eval_shape(f, params, x2)
        leaves1, treedef = jax.tree.flatten(out1)
        leaves2 = jax.tree.leaves(out2)
        axes = []
        for shape1 in (tuple(leaf.shape) for leaf in leaves1):
            axes.append(canonicalize_axes(len(shape1), trace_axes, diagonal_axes, batch_axis=batched))
        plans = [
            plan_blocks(tuple(a.shape), tuple(b.shape), trace, diag, batched, output_block)
            for a, b, (trace, diag) in zip(leaves1, leaves2, axes, strict=True)
        ]
        blocked = any(plan.blocked for plan in plans)
        # Sub-arrays once per side; with blocks the cotangents come later, one block at a time (a 1-row block here
        # lets XLA drop its unused cotangents).
        probe = next((OutputBlock(leaf, p.example_axis, 0, 1) for leaf, p in enumerate(plans) if p.blocked), None)
        info1, subs1, cts1 = _side(f, params, x1, batched, probe)
        info2, subs2, cts2 = (info1, subs1, cts1) if x2 is None else _side(f, params, x2, batched, probe)
        subs1, scales1 = zip(*(_balanced(s, batched) for s in subs1), strict=True) if subs1 else ((), ())
        subs2, scales2 = (
            (subs1, scales1)
            if x2 is None
            else (zip(*(_balanced(s, batched) for s in subs2), strict=True) if subs2 else ((), ()))
        )
        pairs = [
            (u1, u2)
            for u1, use1 in enumerate(info1.uses)
            for u2, use2 in enumerate(info2.uses)
            if use1.param == use2.param
        ]

        def contract(leaf: int, plan: BlockPlan, leaf_cts1: list[Array], leaf_cts2: list[Array]) -> Array:
            """The kernel of output leaf ``leaf`` between two blocks of scaled cotangents (one per use)."""
            kernel = jnp.zeros(plan.block_kernel_shape, leaves1[leaf].dtype)
            for u1, u2 in pairs:
                operands = (leaf_cts1[u1], subs1[u1], subs2[u2], leaf_cts2[u2])
                kernel = kernel + pair_contraction(
                    info1.uses[u1],
                    info2.uses[u2],
                    operands,
                    out_ndim=plan.ndim,
                    trace_axes=plan.trace,
                    diagonal_axes=plan.diag,
                    batched=batched,
                )
            return kernel

        def block_cts(leaf: int, plan: BlockPlan, side: int, start: Any) -> list[Array]:
            x, scales = (x1, scales1) if side == 1 else (x2, scales2)
            block = OutputBlock(leaf, plan.example_axis, start, plan.size)
            _, _, cts = _side(f, params, x, batched, block)
            return [_scaled(ct[leaf], s) for ct, s in zip(cts, scales, strict=True)]

        kernels = []
        for leaf, plan in enumerate(plans):
            if not blocked:
                whole1 = [_scaled(ct[leaf], s) for ct, s in zip(cts1, scales1, strict=True)]
                whole2 = whole1 if x2 is None else [_scaled(ct[leaf], s) for ct, s in zip(cts2, scales2, strict=True)]
                kernel = contract(leaf, plan, whole1, whole2)
            else:
                kernel = blocked_kernel(
                    plan,
                    lambda start, leaf=leaf, plan=plan: block_cts(leaf, plan, 1, start),
                    (lambda start, leaf=leaf, plan=plan: block_cts(leaf, plan, 2, start)) if x2 is not None else None,
                    lambda c1, c2, leaf=leaf, plan=plan: contract(leaf, plan, c1, c2),
                    leaves1[leaf].dtype,
                )
            shape1, shape2 = tuple(leaves1[leaf].shape), tuple(leaves2[leaf].shape)
            assert kernel.shape == kernel_shape(shape1, shape2, plan.trace, plan.diag), (kernel.shape, plan)
            kernels.append(kernel / trace_size(shape1, plan.trace))
        return jax.tree.unflatten(treedef, kernels)

    jitted = jax.jit(ntk_fn)

    def ntk(x1: Any, x2: Any = None, params: Any = None) -> Any:
        if params is None:
            raise TypeError("ntk_fn(x1, x2, params) needs params; pass x2=None to use x1 for both sides.")
        return jitted(x1, x2, params)

    ntk.__doc__ = structured_ntk_fn.__doc__
    return ntk
