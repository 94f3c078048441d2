"""Structure rules: for a linear primitive and the input θ it is differentiated by, the structure of ∂y/∂θ and its
smallest sub-array (paper App. C, E, G).

A registry keyed by primitive name, in the style of ``jax/experimental/jet.py``: each rule is a short pure function
``rule(ctx) -> StructuredJacobian | None`` (``None``: no structure applies, use the plain Jacobian). Small
registrars cover families: :func:`defidentity` (``y = c θ`` elementwise), :func:`defpullback` (the primitive is
expressed through its transpose applied to the cotangent). :func:`structured_jacobian` applies the rule or the
plain-Jacobian fallback (``jacfwd`` or ``jacrev``, whichever needs fewer passes), which is always correct.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from torchntk.bridge.jaxpr_tools import Program
from torchntk.bridge.structure import FREE, TILED, Structure, StructuredJacobian


@dataclass(frozen=True)
class RuleContext:
    """One use of θ: ``y = primitive.bind(*inputs, **params)[out]`` differentiated by ``inputs[arg]``.

    ``inputs`` hold values (the θ slot and any other tangent-dependent slot hold zeros: the program is linear).
    """

    name: str
    params: dict[str, Any]
    inputs: tuple[Any, ...]
    arg: int
    out: int
    y_shape: tuple[int, ...]
    y_dtype: Any
    bind: Callable[..., list[Any]]
    rows: int | None = None  # output rows per example (all of them, not a block's; None: unknown)

    @property
    def theta(self) -> Any:
        return self.inputs[self.arg]

    @property
    def theta_shape(self) -> tuple[int, ...]:
        return tuple(np.shape(self.theta))

    def other(self, index: int) -> Any:
        return self.inputs[index]

    def as_function_of_theta(self, **param_overrides: Any) -> Callable[[Any], Any]:
        """``θ ↦ y`` with the other inputs fixed (and the primitive's parameters optionally overridden)."""

        def fun(theta: Any) -> Any:
            args = list(self.inputs)
            args[self.arg] = theta
            return self.bind(*args, **param_overrides)[self.out]

        return fun

    def scalar(self, value: Any) -> Any:
        return jnp.asarray(value, dtype=self.y_dtype)


Rule = Callable[[RuleContext], StructuredJacobian | None]
STRUCTURE_RULES: dict[str, Rule] = {}


def register(*names: str) -> Callable[[Rule], Rule]:
    def decorate(rule: Rule) -> Rule:
        for name in names:
            STRUCTURE_RULES[name] = rule
        return rule

    return decorate


# ----------------------------------------------------------------------------------------------------------------
# Fallback and the entry point.


def plain_jacobian(ctx: RuleContext) -> StructuredJacobian:
    """The whole Jacobian ``(*y, *θ)``: forward mode when θ is smaller than y, else reverse mode."""
    fun = ctx.as_function_of_theta()
    jac_fn = jax.jacfwd if math.prod(ctx.theta_shape) <= math.prod(ctx.y_shape) else jax.jacrev
    sub = jac_fn(fun)(jnp.zeros(ctx.theta_shape, ctx.theta.dtype))
    return StructuredJacobian(Structure.dense(len(ctx.y_shape), len(ctx.theta_shape)), sub)


def structured_jacobian(ctx: RuleContext) -> StructuredJacobian:
    """Apply the rule registered for ``ctx.name``, or fall back to :func:`plain_jacobian`."""
    rule = STRUCTURE_RULES.get(ctx.name)
    result = rule(ctx) if rule is not None else None
    return result if result is not None else plain_jacobian(ctx)


def use_ingredients(
    program: Program, index: int, inputs: tuple[Any, ...], arg: int, out: int, ct_rows: Any, rows: int
) -> tuple[Structure, tuple[int, ...], Any, Any]:
    """One use: input ``arg`` of ``program``'s equation ``index`` (applied to ``inputs``), its output ``out``. Returns
    the structure, θ's shape, the sub-array and the cotangent rows ``ct_rows`` (``[R, *y]``) pulled back, output
    block-tiled axes summed (``[R, *y']``)."""
    eqn = program.eqns[index]
    y = eqn.outputs[out]
    ctx = RuleContext(eqn.name, eqn.params, inputs, arg, out, program.shapes[y], program.dtypes[y], eqn.bind, rows=rows)
    jac = structured_jacobian(ctx)
    back = ct_rows if jac.pullback is None else jax.vmap(jac.pullback)(ct_rows)
    tiled = tuple(1 + a for a in jac.structure.tiled_y)
    return jac.structure, ctx.theta_shape, jnp.asarray(jac.sub), back.sum(tiled) if tiled else back


# ----------------------------------------------------------------------------------------------------------------
# Elementwise families.


def elementwise(ctx: RuleContext, factor: Any) -> StructuredJacobian | None:
    """``y = factor ⊙ θ``, with θ and ``factor`` each a scalar or of y's rank with sizes 1 or y's (lax broadcasts
    size-1 axes: a bias ``(1, C, 1, 1)`` added to ``(N, C, H, W)``, BatchNorm's scale times the activations).

    Per y axis: where θ runs along it, diagonal with θ's axis, block-diagonal if ``factor`` varies along it; where
    θ is repeated along it, output block-tiled if ``factor`` is constant there, else FREE. The sub-array is
    ``factor`` without its size-1 axes (never larger than ``factor``): a per-channel bias costs C entries, not the
    dense ``Y × C`` Jacobian.
    """
    factor = jnp.asarray(factor, dtype=ctx.y_dtype)
    y, theta, ndim = ctx.y_shape, ctx.theta_shape, len(ctx.y_shape)
    if len(theta) not in (0, ndim) or factor.ndim not in (0, ndim):
        return None
    factor = factor.reshape((1,) * ndim) if factor.ndim == 0 else factor
    if any(n not in (1, m) for shape in (theta or y, factor.shape) for n, m in zip(shape, y, strict=True)):
        return None
    y_axes: list[Any] = []
    carried = [False] * len(theta)
    for a in range(ndim):
        varies = factor.shape[a] != 1
        if theta and theta[a] == y[a]:
            y_axes.append(a)
            carried[a] = varies
        else:
            y_axes.append(FREE if varies else TILED)
    free = [a for a in range(ndim) if y_axes[a] == FREE]
    kept = free + [a for a, is_carried in enumerate(carried) if is_carried]
    rest = [a for a in range(ndim) if a not in kept]
    sub = jnp.transpose(factor, kept + rest).reshape([factor.shape[a] for a in kept])
    return StructuredJacobian(Structure(tuple(y_axes), tuple(carried)), sub)


def defidentity(name: str, sign: Callable[[RuleContext], Any] = lambda ctx: 1) -> None:
    """``y = sign(ctx) · θ`` (shapes equal, or θ a broadcast scalar)."""
    register(name)(lambda ctx: elementwise(ctx, sign(ctx)))


for _name in ("convert_element_type", "copy", "reduce_precision", "add", "add_any", "real", "conj"):
    defidentity(_name)
defidentity("neg", lambda ctx: -1)
defidentity("sub", lambda ctx: 1 if ctx.arg == 0 else -1)


@register("device_put")
def _device_put(ctx: RuleContext) -> StructuredJacobian | None:
    return elementwise(ctx, 1 if ctx.arg == ctx.out else 0)


@register("mul")
def _mul(ctx: RuleContext) -> StructuredJacobian | None:
    return elementwise(ctx, ctx.other(1 - ctx.arg))


@register("div")
def _div(ctx: RuleContext) -> StructuredJacobian | None:
    if ctx.arg != 0:
        return None  # not linear in the denominator
    return elementwise(ctx, 1 / ctx.other(1))


@register("select_n")
def _select_n(ctx: RuleContext) -> StructuredJacobian | None:
    if ctx.arg == 0:
        return None
    return elementwise(ctx, ctx.other(0) == ctx.arg - 1)


# ----------------------------------------------------------------------------------------------------------------
# Pure relabelings of θ's axes.


@register("transpose")
def _transpose(ctx: RuleContext) -> StructuredJacobian:
    perm = tuple(ctx.params["permutation"])
    return StructuredJacobian(Structure(perm, (False,) * len(perm)), ctx.scalar(1))


@register("squeeze")
def _squeeze(ctx: RuleContext) -> StructuredJacobian:
    ndim = len(ctx.theta_shape)
    dropped = {d % ndim for d in ctx.params["dimensions"]}
    kept = tuple(b for b in range(ndim) if b not in dropped)
    return StructuredJacobian(Structure(kept, (False,) * ndim), ctx.scalar(1))


@register("broadcast_in_dim")
def _broadcast_in_dim(ctx: RuleContext) -> StructuredJacobian | None:
    if ctx.arg != 0:
        return None  # a dynamic-shape operand
    y_axes: list[Any] = [TILED] * len(ctx.y_shape)
    for b, a in enumerate(ctx.params["broadcast_dimensions"]):
        if ctx.theta_shape[b] == ctx.y_shape[a]:
            y_axes[a] = b  # a θ axis of size 1 broadcast to more is tiled; θ's size-1 axis then sums trivially
    return StructuredJacobian(Structure(tuple(y_axes), (False,) * len(ctx.theta_shape)), ctx.scalar(1))


@register("reduce_sum")
def _reduce_sum(ctx: RuleContext) -> StructuredJacobian:
    reduced = set(ctx.params["axes"])
    kept = tuple(b for b in range(len(ctx.theta_shape)) if b not in reduced)
    return StructuredJacobian(Structure(kept, (False,) * len(ctx.theta_shape)), ctx.scalar(1))


def defpullback(name: str, arg: int | None = 0) -> None:
    """Express ``y = L(θ)`` through ``Lᵀ`` applied to the cotangent (``jax.linear_transpose``, public API).

    The Jacobian is then the identity on θ's axes (constant-block-diagonal everywhere). Worth it for selections and
    relabelings (reshape, pad, rev, concatenate, slices, max-pool's gather, …): the cotangent grows at most to θ's
    size. ``arg`` restricts the rule to one input slot (``None``: any slot).
    """

    def rule(ctx: RuleContext) -> StructuredJacobian | None:
        return _pullback(ctx) if arg is None or ctx.arg == arg else None

    register(name)(rule)


def _pullback(ctx: RuleContext) -> StructuredJacobian:
    theta_aval = jax.ShapeDtypeStruct(ctx.theta_shape, ctx.theta.dtype)
    transposed = jax.linear_transpose(ctx.as_function_of_theta(), theta_aval)
    return StructuredJacobian(Structure.identity(len(ctx.theta_shape)), ctx.scalar(1), lambda ct: transposed(ct)[0])


for _name in ("reshape", "pad", "rev", "slice", "dynamic_slice", "select_and_gather_add", "cumsum"):
    defpullback(_name)
for _name in ("concatenate", "split"):
    defpullback(_name, arg=None)
defpullback("dynamic_update_slice", arg=None)


# ----------------------------------------------------------------------------------------------------------------
# Windowed sums: constant-block-diagonal on the axes the window leaves alone.


@register("reduce_window_sum")
def _reduce_window_sum(ctx: RuleContext) -> StructuredJacobian:
    p = ctx.params
    untouched = {
        b: b
        for b in range(len(ctx.theta_shape))
        if p["window_dimensions"][b] == 1
        and p["window_strides"][b] == 1
        and tuple(p["padding"][b]) == (0, 0)
        and p["base_dilation"][b] == 1
        and p["window_dilation"][b] == 1
    }
    return trimmed_jacobian(ctx, untouched)


@register("gather")
def _gather(ctx: RuleContext) -> StructuredJacobian | None:
    """Operand axes sliced whole (e.g. an embedding's feature axis) are constant-block-diagonal with their offset
    axis in y; the sub-array is the small selection Jacobian over the rest (e.g. tokens × vocabulary)."""
    if ctx.arg != 0:
        return None
    dn, sizes = ctx.params["dimension_numbers"], ctx.params["slice_sizes"]
    excluded = set(dn.collapsed_slice_dims) | set(getattr(dn, "operand_batching_dims", ()))
    offset_operand_axes = [b for b in range(len(ctx.theta_shape)) if b not in excluded]
    whole = {
        b: a
        for b, a in zip(offset_operand_axes, dn.offset_dims, strict=True)
        if sizes[b] == ctx.theta_shape[b] and b not in dn.start_index_map
    }
    if not whole:
        return _pullback(ctx)
    looked_up = _looked_up_rows(ctx, whole)
    if looked_up is not None:
        return looked_up
    trimmed_sizes = tuple(1 if b in whole else n for b, n in enumerate(sizes))
    return trimmed_jacobian(ctx, whole, slice_sizes=trimmed_sizes)


def _looked_up_rows(ctx: RuleContext, whole: dict[int, int]) -> StructuredJacobian | None:
    """A lookup of whole rows along one θ axis ``b`` (an embedding: ``W[ids]``): its Jacobian is one-hot along ``b``,
    stored by the indices (an indexed structure, :mod:`.structure`): tokens × vocabulary would be built otherwise,
    and a pair of uses contracted over the vocabulary (30,522 ids: 14.5× NTK-vector products' time)."""
    dn = ctx.params["dimension_numbers"]
    rest = [b for b in range(len(ctx.theta_shape)) if b not in whole]
    indices = ctx.inputs[1]
    if len(rest) != 1 or tuple(dn.start_index_map) != tuple(rest) or tuple(dn.collapsed_slice_dims) != tuple(rest):
        return None
    if getattr(dn, "operand_batching_dims", ()) or indices.shape[-1] != 1:
        return None
    (b,) = rest
    size = ctx.theta_shape[b]
    position = indices[..., 0]
    if ctx.params.get("mode") == lax.GatherScatterMode.FILL_OR_DROP:  # out of range: a row of zeros, equal to none
        position = jnp.where((position >= 0) & (position < size), position, -1)
    else:  # clipped into range, as the gather reads it
        position = jnp.clip(position, 0, size - 1)
    y_axes = [FREE] * len(ctx.y_shape)
    for theta_axis, y_axis in whole.items():
        y_axes[y_axis] = theta_axis
    theta_in_sub = tuple(axis == b for axis in range(len(ctx.theta_shape)))
    return StructuredJacobian(Structure(tuple(y_axes), theta_in_sub, indexed=b), position)


def trimmed_jacobian(ctx: RuleContext, pairs: dict[int, int], **param_overrides: Any) -> StructuredJacobian:
    """Constant-block-diagonal on the pairs ``{θ axis: y axis}`` (same size), dense elsewhere.

    θ is trimmed to size 1 along the paired axes, and so is y (``param_overrides`` adjust the primitive's
    parameters where they encode those sizes); the small Jacobian is taken there (App. G).
    """
    trimmed_shape = tuple(1 if b in pairs else n for b, n in enumerate(ctx.theta_shape))
    fun = ctx.as_function_of_theta(**param_overrides)
    trimmed_y = jax.eval_shape(fun, jax.ShapeDtypeStruct(trimmed_shape, ctx.theta.dtype)).shape
    jac_fn = jax.jacfwd if math.prod(trimmed_shape) <= math.prod(trimmed_y) else jax.jacrev
    full = jac_fn(fun)(jnp.zeros(trimmed_shape, ctx.theta.dtype))
    y_ndim = len(ctx.y_shape)
    squeeze = tuple(sorted(pairs.values())) + tuple(y_ndim + b for b in sorted(pairs))
    y_axes: list[Any] = [FREE] * y_ndim
    for b, a in pairs.items():
        y_axes[a] = b
    structure = Structure(tuple(y_axes), tuple(b not in pairs for b in range(len(ctx.theta_shape))))
    return StructuredJacobian(structure, jnp.squeeze(full, squeeze))


# ----------------------------------------------------------------------------------------------------------------
# Contractions.


def _arrange(array: Any, labels: list[Any], wanted: list[Any]) -> Any:
    """Transpose ``array`` (axes named ``labels``) to the order ``wanted``."""
    return jnp.transpose(array, [labels.index(label) for label in wanted])


@register("dot_general")
def _dot_general(ctx: RuleContext) -> StructuredJacobian:
    """``y = [batch, lhs free, rhs free]``: θ's free axes are constant-block-diagonal with y's, batch axes
    block-diagonal; the sub-array is the other operand, ``(other free, θ batch & contracting)``."""
    (contract_l, contract_r), (batch_l, batch_r) = ctx.params["dimension_numbers"]
    theta_contract, other_contract = (contract_l, contract_r) if ctx.arg == 0 else (contract_r, contract_l)
    theta_batch, other_batch = (batch_l, batch_r) if ctx.arg == 0 else (batch_r, batch_l)
    other = ctx.other(1 - ctx.arg)
    theta_free = [b for b in range(len(ctx.theta_shape)) if b not in theta_contract and b not in theta_batch]
    other_free = [c for c in range(other.ndim) if c not in other_contract and c not in other_batch]
    n_batch = len(theta_batch)
    # y's axes: batch, then lhs free, then rhs free.
    y_axes: list[Any] = list(theta_batch)
    own_free: list[Any] = list(theta_free)
    y_axes += own_free + [FREE] * len(other_free) if ctx.arg == 0 else [FREE] * len(other_free) + own_free
    assert len(y_axes) == len(ctx.y_shape) and n_batch + len(theta_free) + len(other_free) == len(ctx.y_shape)
    carried = [b not in theta_free for b in range(len(ctx.theta_shape))]
    # Sub-array axes: the other operand's free axes, then θ's batch and contracting axes in θ's order, each
    # read from the other operand's matching axis.
    partner = dict(zip(theta_contract, other_contract, strict=True)) | dict(zip(theta_batch, other_batch, strict=True))
    order = other_free + [partner[b] for b in range(len(ctx.theta_shape)) if carried[b]]
    sub = jnp.transpose(other, order).astype(ctx.y_dtype)
    return StructuredJacobian(Structure(tuple(y_axes), tuple(carried)), sub)


@register("conv_general_dilated")
def _conv_general_dilated(ctx: RuleContext) -> StructuredJacobian | None:
    """θ = the kernel: output features constant-block-diagonal with θ's (block-diagonal with grouped
    convolutions); the sub-array is the input's patches ``(N, *out spatial, [O], I, *filter)``."""
    if ctx.arg != 1:
        return None
    if _patches_outweigh_rows(ctx):
        return _pullback(ctx)
    p = ctx.params
    lhs = ctx.other(0)
    dn = p["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    n_spatial = len(rhs_spec) - 2
    filter_shape = [ctx.theta_shape[d] for d in rhs_spec[2:]]
    patches = lax.conv_general_dilated_patches(
        lhs,
        filter_shape,
        p["window_strides"],
        p["padding"],
        p["lhs_dilation"],
        p["rhs_dilation"],
        dn,
        # the input's precision: the patches' own filter is exact (ones); a pair is (input, filter) precisions
        precision=p["precision"][0] if isinstance(p["precision"], tuple) else p["precision"],
        preferred_element_type=p["preferred_element_type"],
    )
    # patches: out layout, feature axis = (lhs channels, *filter) flattened.
    channels = lhs.shape[lhs_spec[1]]
    out_labels = [None] * (n_spatial + 2)
    out_labels[out_spec[0]] = "N"
    for i, d in enumerate(out_spec[2:]):
        out_labels[d] = ("s", i)
    out_labels[out_spec[1]] = "P"
    patches = _arrange(patches, out_labels, ["N"] + [("s", i) for i in range(n_spatial)] + ["P"])
    n, spatial = patches.shape[0], patches.shape[1:-1]
    patches = patches.reshape(n, *spatial, channels, *filter_shape)  # (N, *S, C, *k)
    groups, batch_groups = p["feature_group_count"], p["batch_group_count"]
    out_features = ctx.theta_shape[rhs_spec[0]]
    per_group = channels // groups
    # (G_batch, N', *S, G, C/G, *k)
    patches = patches.reshape(batch_groups, n // batch_groups, *spatial, groups, per_group, *filter_shape)
    grouped = groups > 1 or batch_groups > 1
    if grouped:  # each output feature reads its own group: block-diagonal along the feature axis
        o = jnp.arange(out_features)
        feature_group = o // (out_features // groups) if groups > 1 else jnp.zeros_like(o)
        batch_group = o // (out_features // batch_groups) if batch_groups > 1 else jnp.zeros_like(o)
        moved = jnp.moveaxis(patches, (0, 2 + n_spatial), (0, 1))  # (Gb, G, N', *S, C/G, *k)
        sub = moved[batch_group, feature_group]  # (O, N', *S, C/G, *k)
        sub_labels = ["O", "N"] + [("s", i) for i in range(n_spatial)] + ["I"] + [("k", i) for i in range(n_spatial)]
    else:
        sub = patches.reshape(n, *spatial, channels, *filter_shape)
        sub_labels = ["N"] + [("s", i) for i in range(n_spatial)] + ["I"] + [("k", i) for i in range(n_spatial)]
    # y axes: batch and spatial FREE, features diagonal with θ's output-feature axis.
    y_axes: list[Any] = [FREE] * (n_spatial + 2)
    y_axes[out_spec[1]] = rhs_spec[0]
    theta_labels: list[Any] = [None] * (n_spatial + 2)
    theta_labels[rhs_spec[0]], theta_labels[rhs_spec[1]] = "O", "I"
    for i, d in enumerate(rhs_spec[2:]):
        theta_labels[d] = ("k", i)
    carried = tuple(label != "O" or grouped for label in theta_labels)
    y_labels: list[Any] = [None] * (n_spatial + 2)
    y_labels[out_spec[0]] = "N"
    for i, d in enumerate(out_spec[2:]):
        y_labels[d] = ("s", i)
    wanted = [y_labels[a] for a in range(n_spatial + 2) if y_axes[a] == FREE]
    wanted += [theta_labels[b] for b in range(n_spatial + 2) if carried[b]]
    sub = _arrange(sub, sub_labels, wanted).astype(ctx.y_dtype)
    return StructuredJacobian(Structure(tuple(y_axes), carried), sub)


def _patches_outweigh_rows(ctx: RuleContext) -> bool:
    """Whether to pull each cotangent row back to θ (a weight gradient per row, by XLA's backward-filter
    convolution) instead of materialising the input patches (``|y| / O_features · I · |filter|`` entries, 9–49× the
    input). Both do the same multiply-adds; the patches cost their memory traffic once, the pullback is the less
    efficient kernel per row. Measured on resnet18 at 224×224 (N = 1): with one row the pullback takes 547 ms
    against 699, with ten rows everywhere 2,297 against 2,108; so only where ``rows · |θ|`` is under an eighth of
    the patches (the first layers, depthwise convolutions)."""
    if ctx.rows is None:
        return False
    dn = ctx.params["dimension_numbers"]
    features = ctx.y_shape[dn.out_spec[1]]
    in_channels, *filter_shape = (ctx.theta_shape[d] for d in dn.rhs_spec[1:])
    patches = math.prod(ctx.y_shape) // features * in_channels * ctx.params["feature_group_count"]
    patches *= math.prod(filter_shape)
    return 8 * ctx.rows * math.prod(ctx.theta_shape) <= patches
