"""NTK-vector products (paper §3.3, eq. 7-9): Θ v = JVP_{x1}(VJP_{x2}(v)), never contracting Jacobians.

The full kernel applies Θ to the identity basis of the ``x2`` outputs: the VJPs give the rows of ``J2``
(``O`` per example), then one JVP of ``f(θ, x1)`` per row. Costs ``N1·N2·O·[FP]`` time; best for large O, small N.

Memory is ``2·O·P`` per example (the rows and as many tangents in flight). Where one example pair does not fit
``max_memory`` (a 130M-parameter VGG with 10 outputs: 10 GB), the rows are built ``b`` outputs at a time
(:func:`output_block`): ``2·b·P`` per example, the same products, one more forward pass of ``x2`` per block.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from torchntk._axes import full_kernel_subscripts, trace_size
from torchntk._code_reading import backward_only_code
from torchntk._precision import accumulation_dtype
from torchntk._problem import NTKProblem
from torchntk._tiles import TileOptions, memory_budget, per_example_fn, show_progress, tile_bytes, tiled_kernel
from torchntk.torch_native._attention import differentiable_attention
from torchntk.torch_native._autograd_check import (
    check_forward_mode_along,
    combined_rows,
    row_weights,
    tile_check_bytes,
    unit_tangent,
)
from torchntk.torch_native._errors import UnsupportedModelError, translated_errors
from torchntk.torch_native.jacobian_contraction import checked_jacobians
from torchntk.torch_native.output_blocks import (
    RowCheck,
    jacobian_rows,
    output_spans,
    retried_by_autograd,
    row_check_bytes,
)

logger = logging.getLogger("torchntk")


def _interleave(k: int, paired: bool) -> list[int]:
    """Permutation from ``(m, *out2, n, *out1)`` (or ``(n, *out2, *out1)`` paired) to the interleaved layout."""
    if paired:
        return [0] + [axis for i in range(k) for axis in (1 + k + i, 1 + i)]
    return [k + 1, 0] + [axis for i in range(k) for axis in (k + 2 + i, 1 + i)]


def _jvp_rows(fn, params: dict[str, Tensor], inputs: tuple[Tensor, ...], rows: dict[str, Tensor]) -> Tensor:
    """``J(inputs) · t`` for every row ``t`` of ``rows`` (leading axis): ``Tensor[R, *f(inputs).shape]``."""

    def one(tangent: dict[str, Tensor]) -> Tensor:
        return torch.func.jvp(lambda p: fn(p, *inputs), (params,), (tangent,))[1]

    with warnings.catch_warnings():
        # torch's forward-mode AD loads its decompositions with torch.jit.script on first use, which warns.
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)
        return torch.func.vmap(one)(rows)


def _products(problem: NTKProblem, inputs1: tuple[Tensor, ...], rows: dict[str, Tensor], paired: bool) -> Tensor:
    """``J(x1) · r`` for rows ``r = {name: Tensor[c2, b, *param]}`` of ``J(x2)``: ``Tensor[c2, b, c1, *out]``
    (``Tensor[c, b, *out]`` when ``paired``: example ``n`` of ``x1`` against the rows of example ``n``)."""
    fn = per_example_fn(problem)
    c2, b = next(iter(rows.values())).shape[:2]
    if paired:
        in_dims = ({name: 0 for name in rows}, *(0,) * len(inputs1))
        per_pair = torch.func.vmap(lambda r, *x: _jvp_rows(fn, problem.params, x, r), in_dims=in_dims)
        return per_pair(rows, *inputs1)
    flat = {name: r.reshape(c2 * b, *r.shape[2:]) for name, r in rows.items()}
    batched = torch.func.vmap(fn, in_dims=(None,) + (0,) * len(inputs1))
    products = _jvp_rows(batched, problem.params, inputs1, flat)
    return products.reshape(c2, b, *products.shape[1:])


def _block(
    problem: NTKProblem,
    inputs1: tuple[Tensor, ...],
    features2: Any,
    paired: bool,
    block: int | None,
    rows_check: RowCheck | None = None,
    rows_by_autograd: bool = False,
) -> Tensor:
    """One tile. ``features2`` is ``J(x2)`` (``{name: Tensor[c2, *out, *param]}``) when ``block`` is None, else the
    ``x2`` inputs, whose Jacobian rows are built ``block`` outputs at a time (and checked by ``rows_check``: the
    forward-mode check takes the rows as given)."""
    k = len(problem.out_shape)
    if block is None:
        rows = {name: j.reshape(j.shape[0], problem.out_size, *j.shape[1 + k :]) for name, j in features2.items()}
        blocks = iter([(slice(None), rows)])
        count2 = next(iter(rows.values())).shape[0]
    else:
        spans = output_spans(problem, block)
        blocks = ((span, jacobian_rows(problem, features2, span, rows_by_autograd)) for span in spans)
        count2 = features2[0].shape[0]
    projections = None if rows_check is None else rows_check.begin(features2)
    weights = row_weights(problem, count2, problem.out_size)  # the tile's tangents, combined into one checked
    parts, tangent = [], {name: torch.zeros_like(p) for name, p in problem.params.items()}
    for span, rows in blocks:
        if rows_check is not None:
            rows_check.add(projections, span, rows)
        parts.append(_products(problem, inputs1, rows, paired))
        for name, t in combined_rows(rows, weights[:, span]).items():
            tangent[name] += t
        del rows  # before the next block's rows are built
    if rows_check is not None:
        rows_check.finish(features2, projections)
    products = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    _check_tile(problem, inputs1, products, weights, tangent, paired)
    lead = (-1,) if paired else (products.shape[0],)
    full = products.reshape(*lead, *problem.out_shape, *products.shape[2:])
    expr = full_kernel_subscripts(problem.ndim, problem.trace_axes, problem.diagonal_axes, paired_batch=paired)
    kernel = torch.einsum(expr, full.permute(_interleave(k, paired)).to(accumulation_dtype(full.dtype)))
    return (kernel / trace_size((problem.n1, *problem.out_shape), problem.trace_axes)).to(full.dtype)


def _check_tile(
    problem: NTKProblem, inputs1: tuple[Tensor, ...], products: Tensor, weights: Tensor, tangent: dict, paired: bool
) -> None:
    """Forward mode against torch's backward along the tile's own tangents (``tangent``: its rows of ``J(x2)ᵀ``
    combined by ``weights``, :func:`~torchntk.torch_native._autograd_check.check_forward_mode_along`). Unpaired,
    ``J(x1)·tangent`` is the same combination of the tile's products; paired (each example against its own rows),
    one more JVP."""
    count = inputs1[0].shape[0]
    if paired:
        tangent = unit_tangent(tangent)
        pushed = _products(problem, inputs1, {name: t[None, None] for name, t in tangent.items()}, False)[0, 0]
    else:
        accumulate = accumulation_dtype(products.dtype)
        pushed = torch.einsum("mb...,mb->...", products.to(accumulate), weights.to(accumulate))
    check_forward_mode_along(problem, inputs1, tangent, pushed, f"a tile of {count} examples")


def bytes_per_example(problem: NTKProblem, outputs: int | None = None) -> float:
    """The rows of J2 (``outputs``·P per example, all O by default), and as many tangents in flight in the JVP."""
    rows = problem.out_size if outputs is None else outputs
    return 2 * rows * problem.num_params * torch.empty((), dtype=problem.out_dtype).element_size()


def minimum_bytes_per_example(problem: NTKProblem) -> float:
    """One example pair's tile with the smallest output block (one output at a time), less its slice of the kernel:
    what must fit at the least (all rows at once where that is less: one output, whose block adds the rows' check)."""
    whole = bytes_per_example(problem) + tile_check_bytes(problem)
    return min(whole, bytes_per_example(problem, 1) + _blocked_fixed_bytes(problem))


def _blocked_fixed_bytes(problem: NTKProblem) -> float:
    return tile_check_bytes(problem) + row_check_bytes(problem)


def output_block(problem: NTKProblem, options: TileOptions) -> int | None:
    """Outputs whose Jacobian rows are built at once: None (all, in one batched ``jacrev``) when one example pair
    fits the memory budget or ``chunk_size`` is forced, else the most that fit (at least 1; if even one output does
    not fit, tiling refuses with its clear error)."""
    if options.chunk_size is not None:
        return None
    budget = memory_budget(problem, options.max_memory)
    if tile_bytes(problem, bytes_per_example(problem), 1, tile_check_bytes(problem)) <= budget:
        return None
    fixed = _blocked_fixed_bytes(problem)
    fits = int((budget - tile_bytes(problem, 0.0, 1, fixed)) // bytes_per_example(problem, 1))  # tile_bytes is linear
    return max(1, min(fits, problem.out_size - 1))


def refuse_backward_only_code(problem: NTKProblem) -> None:
    """NTK-vector products take J·v by forward mode, which neither ``torch.no_grad()`` inside a forward, a backward
    hook (``tensor.register_hook``) nor ops whose backward is not their forward's derivative
    (:mod:`torchntk._backward_conventions`) affect: their kernels were of another function (0.15-1.1 off, and
    auto's when only this method fitted). Such models are refused, naming the modules or ops; the other methods
    follow torch's backward."""
    if torch.autograd.forward_ad._current_level >= 0:  # torch's own "Nested forward mode AD is not supported"
        raise UnsupportedModelError(
            "torchntk ntk_vector_products: called inside torch.autograd.forward_ad.dual_level(), and forward-mode AD "
            "does not nest. Call torchntk outside it, or use implementation='jacobian_contraction' (or 'auto')."
        )
    if problem.forward_mode_differs:
        raise UnsupportedModelError(
            f"torchntk ntk_vector_products: the model's forward has {'; and '.join(problem.forward_mode_differs)}. "
            "torch's backward is not the forward's derivative there on some inputs, and this method's forward mode "
            "follows the forward, so its kernel would be of another J than torch's. Use "
            "implementation='jacobian_contraction' (or 'auto')."
        )
    modules = backward_only_code(problem.model)
    if modules:
        raise UnsupportedModelError(
            f"torchntk ntk_vector_products: modules {modules[:3]}{' ...' if len(modules) > 3 else ''} may switch grad "
            "mode (torch.no_grad / set_grad_enabled / inference_mode) or hook the backward pass (register_hook) in "
            "their code, which forward-mode derivatives do not follow. Use implementation='jacobian_contraction' or "
            "'structured_derivatives' (or 'auto'), or write the forward with .detach() where gradients must stop."
        )


def ntk_vector_products(problem: NTKProblem, options: TileOptions | None = None) -> Tensor:
    """The NTK by NTK-vector products, tiled over the batch. ``-> Tensor[kernel_shape]`` (see :func:`torchntk.ntk`).

    Where one example pair's ``2·O·P`` does not fit ``max_memory``, the Jacobian rows of ``x2`` are built a block of
    outputs at a time (:func:`output_block`): the same kernel, one extra forward pass of ``x2`` per block.
    """
    refuse_backward_only_code(problem)
    options = options or TileOptions()
    block = output_block(problem, options)
    rows_check, fixed = None, tile_check_bytes(problem)
    if block is None:
        right, per_example = checked_jacobians(problem), bytes_per_example(problem)
    else:
        right, per_example = (lambda inputs: inputs), bytes_per_example(problem, block)
        rows_check = RowCheck(problem, "ntk_vector_products", "Jacobian rows (vmap of vjp)")
        fixed = _blocked_fixed_bytes(problem)
        logger.info("NTK-vector products: Jacobian rows %d outputs at a time (max_memory)", block)
    # grad mode: see jacobian_contraction (torch.func's derivatives of torch.linalg ops are wrong under no_grad)
    with torch.enable_grad(), translated_errors(problem.model, "ntk_vector_products"), differentiable_attention():
        return tiled_kernel(
            problem,
            lambda inputs1: inputs1,  # forward mode is checked on each tile, along its own tangents (_check_tile)
            right,
            retried_by_autograd(
                lambda inputs1, features2, paired, rows_by_autograd: _block(
                    problem, inputs1, features2, paired, block, rows_check, rows_by_autograd
                ),
            ),
            options=options,
            bytes_per_example=per_example,
            fixed_bytes=fixed,
            work=problem.n1 * problem.n2 * problem.out_size * 2 * problem.num_params,
            desc="NTK (NTK-vector products)",
            tag="ntk_vector_products",
        )


def _pulled_back(problem: NTKProblem, fn: Callable, inputs: tuple[Tensor, ...], vs: Tensor) -> dict[str, Tensor]:
    """``J(inputs)ᵀ v`` for each of the ``K`` vectors ``vs`` (``Tensor[K, c, *out]``): ``{name: Tensor[K, *param]}``,
    by a vmap of one VJP; where torch.func cannot batch that (a custom Function saving its input for forward mode:
    "flat_bdims must not be None", refused as "no jvp staticmethod"), by torch's plain backward, vector by vector."""
    batched = torch.func.vmap(fn, in_dims=(None,) + (0,) * len(inputs))
    try:
        _, vjp_fn = torch.func.vjp(lambda p: batched(p, *inputs), problem.params)
        return torch.func.vmap(vjp_fn)(vs)[0]
    except (RuntimeError, NotImplementedError, AssertionError) as error:  # torch.func's own assertion, too
        logger.info("torch.func cannot batch the VJP of this model (%s); torch.autograd, vector by vector", error)
    _, rows = problem.pulled_back(inputs, lambda out: vs)
    return {name: torch.stack([row[name] for row in rows]) for name in problem.params}


def ntk_vector_product(
    problem: NTKProblem, v: Tensor, *, chunk_size: int | None = None, progress: bool | None = None
) -> Tensor:
    """Θ(x1, x2) · v without building Θ: ``v: Tensor[(K,) N2, *out] -> Tensor[(K,) N1, *out]``.

    Σ_{m, b} Θ[n, m, a, b] v[m, b] over the full kernel (``trace_axes``/``diagonal_axes`` do not apply). The VJP is
    accumulated over chunks of ``x2``, then the JVP runs chunk by chunk over ``x1``: memory is bounded by the chunk.
    """
    refuse_backward_only_code(problem)
    x2 = problem.x1 if problem.x2 is None else problem.x2
    expected = (problem.n2, *problem.out_shape)
    if not isinstance(v, Tensor):
        raise TypeError(f"v must be a torch.Tensor of shape {expected}, got {type(v).__name__}.")
    if tuple(v.shape) != expected and tuple(v.shape[1:]) != expected:
        raise ValueError(f"v has shape {tuple(v.shape)}; expected {expected} or (K, {', '.join(map(str, expected))}).")
    if v.is_complex() or not (v.is_floating_point() or v.dtype in (torch.int32, torch.int64)):
        # a complex v lost its imaginary part to the cast (only torch's warning said so)
        raise TypeError(
            f"v has dtype {v.dtype}; Θ·v takes a real vector (for a complex one, pass its real and imaginary parts "
            "in two calls, or stacked as K = 2 vectors)."
        )
    if v.is_meta:
        raise ValueError("v is on the meta device (it holds no values); pass a tensor with values.")
    several = v.ndim == len(expected) + 1
    vs = (v if several else v.unsqueeze(0)).detach().to(dtype=problem.out_dtype, device=problem.device)
    fn = per_example_fn(problem)
    chunk = chunk_size or max(problem.n1, problem.n2)
    starts1, starts2 = range(0, problem.n1, chunk), range(0, problem.n2, chunk)
    work = problem.n1 * problem.n2 * vs.shape[0] * problem.num_params
    bar = tqdm(
        total=len(starts1) + len(starts2),
        desc="NTK-vector product",
        disable=not show_progress(progress, len(starts1) + len(starts2), work),
        leave=False,
    )
    with torch.enable_grad(), bar, translated_errors(problem.model, "ntk_vp"), differentiable_attention():
        weights = {
            name: torch.zeros(vs.shape[0], *p.shape, dtype=p.dtype, device=p.device)
            for name, p in problem.params.items()
        }
        for start in starts2:
            inputs = tuple(x[start : start + chunk] for x in x2)
            pulled = _pulled_back(problem, fn, inputs, vs[:, start : start + chunk])
            for name in weights:
                weights[name] += pulled[name]
            bar.update()
        outputs = []
        for start in starts1:
            inputs = tuple(x[start : start + chunk] for x in problem.x1)
            batched = torch.func.vmap(fn, in_dims=(None,) + (0,) * len(inputs))
            pushed = _jvp_rows(batched, problem.params, inputs, weights)  # Tensor[K, c, *out]
            # checked as a tile whose K tangents are one example's rows (_check_tile)
            mix = row_weights(problem, 1, vs.shape[0])
            tangent = combined_rows({name: w[None] for name, w in weights.items()}, mix)
            _check_tile(problem, inputs, pushed[None], mix, tangent, False)
            outputs.append(pushed)
            bar.update()
    result = torch.cat(outputs, dim=1)
    return result if several else result[0]
