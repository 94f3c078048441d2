"""NTK-vector products (paper §3.3, eq. 7-9): Θ v = JVP_{x1}(VJP_{x2}(v)), never contracting Jacobians.

The full kernel applies Θ to the identity basis of the ``x2`` outputs: the VJPs give the rows of ``J2``
(``O`` per example), then one JVP of ``f(θ, x1)`` per row. Costs ``N1·N2·O·[FP]`` time; best for large O, small N.
"""

from __future__ import annotations

import warnings
from functools import partial

import torch
from torch import Tensor
from tqdm.auto import tqdm

from torchntk._axes import full_kernel_subscripts, trace_size
from torchntk._problem import NTKProblem
from torchntk._tiles import TileOptions, per_example_fn, show_progress, tiled_kernel
from torchntk.torch_native._attention import differentiable_attention
from torchntk.torch_native._errors import translated_errors
from torchntk.torch_native.jacobian_contraction import batch_jacobians


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


def _block(problem: NTKProblem, inputs1: tuple[Tensor, ...], jac2: dict[str, Tensor], paired: bool) -> Tensor:
    fn = per_example_fn(problem)
    k = len(problem.out_shape)
    if paired:
        # Example n of x1 against example n of x2 only: one JVP per output of example n.
        rows = {name: j.reshape(j.shape[0], problem.out_size, *j.shape[1 + k :]) for name, j in jac2.items()}
        in_dims = ({name: 0 for name in rows}, *(0,) * len(inputs1))
        per_pair = torch.func.vmap(lambda r, *x: _jvp_rows(fn, problem.params, x, r), in_dims=in_dims)
        full = per_pair(rows, *inputs1).reshape(-1, *problem.out_shape, *problem.out_shape)
    else:
        c2 = next(iter(jac2.values())).shape[0]
        rows = {name: j.reshape(c2 * problem.out_size, *j.shape[1 + k :]) for name, j in jac2.items()}
        batched = torch.func.vmap(fn, in_dims=(None,) + (0,) * len(inputs1))
        full = _jvp_rows(batched, problem.params, inputs1, rows)
        full = full.reshape(c2, *problem.out_shape, -1, *problem.out_shape)
    expr = full_kernel_subscripts(problem.ndim, problem.trace_axes, problem.diagonal_axes, paired_batch=paired)
    kernel = torch.einsum(expr, full.permute(_interleave(k, paired)))
    return kernel / trace_size((problem.n1, *problem.out_shape), problem.trace_axes)


def bytes_per_example(problem: NTKProblem) -> float:
    """The rows of J2 (O·P per example), and as many tangents in flight in the vmapped JVP."""
    return 2 * problem.out_size * problem.num_params * torch.empty((), dtype=problem.out_dtype).element_size()


def ntk_vector_products(problem: NTKProblem, options: TileOptions | None = None) -> Tensor:
    """The NTK by NTK-vector products, tiled over the batch. ``-> Tensor[kernel_shape]`` (see :func:`torchntk.ntk`)."""
    with torch.no_grad(), translated_errors(problem.model, "ntk_vector_products"), differentiable_attention():
        return tiled_kernel(
            problem,
            lambda inputs: inputs,
            partial(batch_jacobians, problem),
            lambda inputs1, jac2, paired: _block(problem, inputs1, jac2, paired),
            options=options or TileOptions(),
            bytes_per_example=bytes_per_example(problem),
            work=problem.n1 * problem.n2 * problem.out_size * 2 * problem.num_params,
            desc="NTK (NTK-vector products)",
            tag="ntk_vector_products",
        )


def ntk_vector_product(
    problem: NTKProblem, v: Tensor, *, chunk_size: int | None = None, progress: bool | None = None
) -> Tensor:
    """Θ(x1, x2) · v without building Θ: ``v: Tensor[(K,) N2, *out] -> Tensor[(K,) N1, *out]``.

    Σ_{m, b} Θ[n, m, a, b] v[m, b] over the full kernel (``trace_axes``/``diagonal_axes`` do not apply). The VJP is
    accumulated over chunks of ``x2``, then the JVP runs chunk by chunk over ``x1``: memory is bounded by the chunk.
    """
    x2 = problem.x1 if problem.x2 is None else problem.x2
    expected = (problem.n2, *problem.out_shape)
    if not isinstance(v, Tensor):
        raise TypeError(f"v must be a torch.Tensor of shape {expected}, got {type(v).__name__}.")
    if tuple(v.shape) != expected and tuple(v.shape[1:]) != expected:
        raise ValueError(f"v has shape {tuple(v.shape)}; expected {expected} or (K, {', '.join(map(str, expected))}).")
    several = v.ndim == len(expected) + 1
    vs = (v if several else v.unsqueeze(0)).to(dtype=problem.out_dtype, device=problem.device)
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
    with torch.no_grad(), bar, translated_errors(problem.model, "ntk_vp"), differentiable_attention():
        weights = {
            name: torch.zeros(vs.shape[0], *p.shape, dtype=p.dtype, device=p.device)
            for name, p in problem.params.items()
        }
        for start in starts2:
            inputs = tuple(x[start : start + chunk] for x in x2)
            batched = torch.func.vmap(fn, in_dims=(None,) + (0,) * len(inputs))
            _, vjp_fn = torch.func.vjp(lambda p, inputs=inputs, batched=batched: batched(p, *inputs), problem.params)
            pulled = torch.func.vmap(vjp_fn)(vs[:, start : start + chunk])[0]
            for name in weights:
                weights[name] += pulled[name]
            bar.update()
        outputs = []
        for start in starts1:
            inputs = tuple(x[start : start + chunk] for x in problem.x1)
            batched = torch.func.vmap(fn, in_dims=(None,) + (0,) * len(inputs))
            outputs.append(_jvp_rows(batched, problem.params, inputs, weights))
            bar.update()
    result = torch.cat(outputs, dim=1)
    return result if several else result[0]
