"""``structured_ntk_fn``: the empirical NTK of a pure JAX function by structured derivatives (paper §3.4)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from torchntk._axes import canonicalize_axes, kernel_shape, trace_size
from torchntk.bridge.cotangents import SideInfo, per_example_ingredients
from torchntk.bridge.mjjmp import pair_contraction

Array = Any


def _side(f: Callable, params: Any, x: Any, batched: bool) -> tuple[SideInfo, list[Array], list[list[Array]]]:
    """Ingredients for one input batch; per example (vmapped over axis 0 of every leaf of ``x``) when batched."""
    if not batched:
        return per_example_ingredients(lambda p: f(p, x), params)

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

        info, subs, cts = per_example_ingredients(fun, params)
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


def structured_ntk_fn(
    f: Callable[[Any, Any], Any],
    *,
    trace_axes: int | Iterable[int] = (),
    diagonal_axes: int | Iterable[int] = (),
    vmap_axes: int | None = 0,
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
    batched = vmap_axes == 0
    f = _returning_arrays(f)

    def ntk_fn(x1: Any, x2: Any, params: Any) -> Any:
        side1 = _side(f, params, x1, batched)
        side2 = side1 if x2 is None else _side(f, params, x2, batched)
        (info1, subs1, cts1), (info2, subs2, cts2) = side1, side2
        kernels = []
        for leaf, (shape1, shape2) in enumerate(zip(info1.out_shapes, info2.out_shapes, strict=True)):
            if batched:
                n1 = jax.tree.leaves(x1)[0].shape[0]
                n2 = n1 if x2 is None else jax.tree.leaves(x2)[0].shape[0]
                shape1, shape2 = (n1, *shape1), (n2, *shape2)
            ndim = len(shape1)
            trace, diag = canonicalize_axes(ndim, trace_axes, diagonal_axes, batch_axis=batched)
            kernel = jnp.zeros(kernel_shape(shape1, shape2, trace, diag), info1.out_dtypes[leaf])
            for u1, use1 in enumerate(info1.uses):
                for u2, use2 in enumerate(info2.uses):
                    if use1.param != use2.param:
                        continue
                    operands = (cts1[u1][leaf], subs1[u1], subs2[u2], cts2[u2][leaf])
                    kernel = kernel + pair_contraction(
                        use1, use2, operands, out_ndim=ndim, trace_axes=trace, diagonal_axes=diag, batched=batched
                    )
            kernels.append(kernel / trace_size(shape1, trace))
        return jax.tree.unflatten(info1.out_treedef, kernels)

    jitted = jax.jit(ntk_fn)

    def ntk(x1: Any, x2: Any = None, params: Any = None) -> Any:
        if params is None:
            raise TypeError("ntk_fn(x1, x2, params) needs params; pass x2=None to use x1 for both sides.")
        return jitted(x1, x2, params)

    ntk.__doc__ = structured_ntk_fn.__doc__
    return ntk
