"""torch.func's derivatives checked against plain ``torch.autograd``.

The torch-native methods differentiate the model through torch.func: ``vmap`` over examples, ``jacrev`` (itself a
``vmap`` over the output basis) and ``jvp``. Each op then runs through its batching rule and, for ``jvp``, its
forward-mode formula. Where one of those is wrong the kernel is wrong with no error: ``torch.cdist``'s batched
backward gave Jacobian contraction (and auto) a kernel 1.39 off. The NTK's J is what torch's own backward computes
(the explicit-Jacobian oracle), so:

- Jacobian contraction: its first Jacobians ``u·J(x_n)`` against ``∂(u·f(x_n))/∂θ`` on up to :data:`EXAMPLES`
  examples one by one (:func:`check_jacobians`), then every chunk of examples as a whole
  (:func:`check_jacobians_summed`: one batched backward of ``Σ_n d_n·f(x_n)`` along random directions ``d_n``,
  against one pass over the chunk's Jacobians along a random θ-direction);
- NTK-vector products: forward mode along the tangents each tile pushes (:func:`check_forward_mode_along`: the
  tile's rows of ``J(x2)ᵀ`` combined at random, against one batched backward of the x1 chunk). Where torch's
  backward is not the derivative of the forward on some inputs (a ``scatter`` with duplicate indices, a clipped
  straight-through estimator whose ``jvp`` forgot the clip), forward mode disagreed on later examples alone, or
  off x1's own rows, and the kernel was 0.09-0.35 off.

Each example is weighed by its own size (:mod:`torchntk._example_weights`). A disagreement raises
:class:`UnsupportedModelError` naming the method (auto falls back to the next method).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from torchntk._example_weights import example_weights
from torchntk._float64_dot import dot64
from torchntk._problem import NTKProblem
from torchntk.torch_native._errors import UnsupportedModelError

#: Examples of the first chunk of ``x1`` checked.
EXAMPLES = 2
#: Relative tolerance by the output's dtype: gross disagreements only below float64 (a deep network's summation
#: orders differ; float32's is the conversion check's derivative tolerance; float16's agreed to 1.8e-2).
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-2}
TOLERANCE_16_BITS = 1e-1


def _direction(shape: tuple[int, ...], like: Tensor, seed: int) -> Tensor:
    """Fixed random normal entries in ``like``'s dtype (drawn in float32 for 16-bit ones), on its device. Drawn in
    the dtype itself, not in float64 and cast: a θ-direction of 38M float32 entries took 0.87 s so, 0.21 s now."""
    generator = torch.Generator().manual_seed(seed)
    drawn = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
    return torch.randn(shape, generator=generator, dtype=drawn).to(dtype=like.dtype, device=like.device)


def _output_direction(problem: NTKProblem) -> Tensor:
    any_param = next(iter(problem.params.values()))
    return _direction(problem.out_shape, any_param.new_empty((), dtype=problem.out_dtype), seed=0)


def _backward_rows(problem: NTKProblem, inputs: tuple[Tensor, ...], u: Tensor, count: int) -> list[dict[str, Tensor]]:
    """``∂(u·f(x_n))/∂θ`` for the first ``count`` examples, each by its own backward (no torch.func transform)."""
    return [_summed_backward(problem, tuple(x[n : n + 1] for x in inputs), u[None]) for n in range(count)]


def _relative(got: Tensor, want: Tensor, scale: Tensor) -> float:
    """``max|got - want| / max(scale)`` over the finite scale; a NaN or infinity where both have it agrees (a model
    whose derivative is NaN at an example, ``sqrt(h**2)`` at 0, has it by either route: it was blamed on torch.func),
    one where only one has it does not (``inf``). θ-sized comparisons take :func:`_largest_finite_relative` first."""
    same = (got.isnan() & want.isnan()) | (got.isinf() & (got == want))
    difference = torch.where(same, 0.0, (got - want).abs())
    finite = scale[scale.isfinite()]
    largest = float(finite.max()) if finite.numel() else 0.0
    return float(torch.nan_to_num(difference.max(), nan=torch.inf)) / (largest + 1e-300)


def _largest_finite_relative(got: dict[str, Tensor], want: dict[str, Tensor]) -> float | None:
    """``max|got - want| / max|want|`` over every parameter, without concatenating θ-sized tensors; ``None`` where
    a NaN or infinity is in either (:func:`_relative` then says where both have one). Two passes over θ: the
    NaN-aware comparison of the concatenations took 0.75 s on 38M entries, this 0.15 s."""
    difference = max((float((got[name] - w).abs().max()) for name, w in want.items() if w.numel()), default=0.0)
    scale = max((float(w.abs().max()) for w in want.values() if w.numel()), default=0.0)
    if not (math.isfinite(difference) and math.isfinite(scale)):
        return None
    return difference / (scale + 1e-300)


def _refuse(problem: NTKProblem, method: str, what: str, where: str, error: float) -> None:
    # the least precise of the output's, weights' and computed dtypes (a float32 body under a float64 head rounds as
    # float32; a float32 model's bfloat16 step as bfloat16: its check was 1.5e-2 off, its kernel 5.6e-8)
    dtypes = {problem.out_dtype, *(p.dtype for p in problem.params.values()), *problem.computes_in}
    if error <= max(TOLERANCE.get(dtype, TOLERANCE_16_BITS) for dtype in dtypes):
        return
    others = [m for m in ("jacobian_contraction", "ntk_vector_products", "structured_derivatives") if m != method]
    low = sorted(str(d).removeprefix("torch.") for d in dtypes if d in (torch.float16, torch.bfloat16))
    hint = (
        f" The model computes in {' and '.join(low)}, whose rounding can exceed this check's tolerance: for the NTK, "
        "run it in float32 (model.float())."
        if low
        else ""
    )
    raise UnsupportedModelError(
        f"torchntk {method}: torch.func's {what} of this model disagrees with torch.autograd's backward on {where} "
        f"(relative error {error:.2e}): an op of the model has a wrong batching rule or forward-mode formula in "
        "torch.func (torch.cdist is one), a derivative at a kink that forward mode takes otherwise (prelu at 0), or "
        "a backward that is not its forward's derivative on some inputs (a scatter with duplicate indices), so its "
        f"kernel would be wrong. Use implementation='{others[0]}' or '{others[1]}' (auto falls back).{hint}"
    )


def check_jacobians(problem: NTKProblem, inputs: tuple[Tensor, ...], jacobians: dict[str, Tensor]) -> None:
    """Raise :class:`UnsupportedModelError` unless ``jacobians`` (``{name: Tensor[c, *out, *param]}``, built by
    torch.func for ``inputs``) agree with torch's backward on the first examples."""
    u = _output_direction(problem)
    count = min(EXAMPLES, inputs[0].shape[0])
    for n, want in enumerate(_backward_rows(problem, inputs, u, count)):
        got = {name: torch.tensordot(u.to(jacobians[name].dtype), jacobians[name][n], dims=u.ndim) for name in want}
        error = _largest_finite_relative(got, want)
        if error is None:  # a NaN or infinity somewhere: the comparison that knows where both have one
            flat = torch.cat([w.reshape(-1) for w in want.values()])
            error = _relative(torch.cat([g.reshape(-1) for g in got.values()]), flat, flat.abs())
        _refuse(problem, "jacobian_contraction", "Jacobian (vmap of jacrev)", f"example {n}", error)


def unit_tangent(tangent: dict[str, Tensor]) -> dict[str, Tensor]:
    """``tangent`` scaled to a largest entry of 1 (a row of Jᵀ still): a float16 model's rows pushed forward
    overflowed."""
    largest = max((float(t.abs().max()) for t in tangent.values() if t.numel()), default=0.0)
    if not 0.0 < largest < float("inf"):
        return tangent
    return {name: (t.float() / largest).to(t.dtype) for name, t in tangent.items()}


def _summed_backward(problem: NTKProblem, inputs: tuple[Tensor, ...], directions: Tensor) -> dict[str, Tensor]:
    """``∂(Σ_n d_n·f(x_n))/∂θ`` by plain ``torch.autograd.grad`` through the batched forward (the probe found the
    examples independent); one example at a time where the backward counts over the batch (``scale_grad_by_freq``)."""
    count = inputs[0].shape[0]
    if not problem.lookups_scaled_by_count:  # one backward: its gradient, with no θ-sized sum beside it
        return problem.pulled_back(inputs, lambda out: [directions])[1][0]
    parts = [(tuple(x[n : n + 1] for x in inputs), directions[n : n + 1]) for n in range(count)]
    total = {name: torch.zeros_like(p) for name, p in problem.params.items()}
    for part, d in parts:
        _, (gradient,) = problem.pulled_back(part, lambda out, d=d: [d])
        for name, g in gradient.items():
            total[name] += g
    return total


def tile_check_bytes(problem: NTKProblem) -> float:
    """What a tile holds for its derivative check whatever its size: the θ-direction it checks along (Jacobian
    contraction's random one, or NTK-vector products' rows combined into one tangent) and its backward gradient."""
    return 2 * problem.num_params * torch.empty((), dtype=problem.out_dtype).element_size()


def _chunk_directions(problem: NTKProblem, count: int, seed: int) -> Tensor:
    any_param = next(iter(problem.params.values()))
    return _direction((count, *problem.out_shape), any_param.new_empty((), dtype=problem.out_dtype), seed)


def parameter_direction(problem: NTKProblem) -> dict[str, Tensor]:
    """A random θ-direction for :func:`check_jacobians_summed` (made once per call: it is θ's size)."""
    return {name: _direction(tuple(p.shape), p, seed=5 + i) for i, (name, p) in enumerate(problem.params.items())}


def check_jacobians_summed(
    problem: NTKProblem, inputs: tuple[Tensor, ...], jacobians: dict[str, Tensor], r: dict[str, Tensor]
) -> None:
    """Raise :class:`UnsupportedModelError` unless ``Σ_n c_n d_n·J(x_n)·r`` from ``jacobians`` (``{name: Tensor[c,
    *out, *param]}``) agrees with one backward of the batched forward along a random θ-direction ``r``
    (:func:`parameter_direction`), over every example of the chunk (:func:`check_row_projections`). One pass over
    the Jacobians into ``c·O`` numbers: per-example θ-vectors, or a product of the Jacobians' size, took a fifth of
    a call."""
    count = inputs[0].shape[0]
    projections = sum(
        torch.einsum("nop,p->no", jacobians[name].reshape(count, problem.out_size, -1), r[name].reshape(-1)).double()
        for name in problem.params
    )
    check_row_projections(problem, inputs, projections, r, f"a chunk of {count} examples")


def row_projections(rows: dict[str, Tensor], r: dict[str, Tensor]) -> Tensor:
    """``J_{n,o}·r`` for Jacobian rows ``rows = {name: Tensor[c, b, *param]}`` (a block of ``b`` outputs of each of
    ``c`` examples): ``Tensor[c, b]`` in float64, for :func:`check_row_projections`."""
    return sum(
        torch.einsum("nbp,p->nb", j.reshape(*j.shape[:2], -1), r[name].reshape(-1)).double() for name, j in rows.items()
    )


def check_row_projections(
    problem: NTKProblem,
    inputs: tuple[Tensor, ...],
    projections: Tensor,
    r: dict[str, Tensor],
    where: str,
    method: str = "jacobian_contraction",
    what: str = "Jacobian (vmap of jacrev)",
) -> None:
    """Raise :class:`UnsupportedModelError` unless torch.func's rows of the Jacobians of ``inputs``, projected on the
    θ-direction ``r`` (``projections``: ``Tensor[c, O]``, ``J_{n,o}·r``; built at once or a block of outputs at a
    time), give ``Σ_n c_n d_n·J(x_n)·r`` as one backward of the batched forward along random output directions
    ``d_n`` does; ``c_n`` weighs each example by its own size (:mod:`torchntk._example_weights`: one example's error
    is not diluted)."""
    count = inputs[0].shape[0]
    d = _chunk_directions(problem, count, seed=2).reshape(count, -1)
    per_example = (d.double() * projections).sum(1)  # d_n·J(x_n)·r
    weights = example_weights(per_example)
    want = _summed_backward(problem, inputs, (d * weights.to(d).reshape(count, 1)).reshape(count, *problem.out_shape))
    terms = sum(dot64(want[name], r[name]) for name in problem.params)
    weighed_terms = weights * per_example
    error = _relative(weighed_terms.sum(), torch.as_tensor(terms, dtype=torch.float64), weighed_terms.abs())
    _refuse(problem, method, what, where, error)


def check_forward_mode_along(
    problem: NTKProblem, inputs: tuple[Tensor, ...], tangent: dict[str, Tensor], pushed: Tensor, where: str
) -> None:
    """Raise :class:`UnsupportedModelError` unless ``Σ_n c_n d_n·pushed_n`` (``pushed``: ``J(x_n)·t`` by forward
    mode for every example of the chunk, ``Tensor[c, *out]``) agrees with ``∂(Σ_n c_n d_n·f(x_n))/∂θ · t`` by one
    backward; ``c_n`` weighs each example by its own size (:mod:`torchntk._example_weights`: a tie in one example of
    40 hid in float32). Along the tangents a kernel pushes (a combination of ``x2``'s rows of Jᵀ), forward mode
    must agree where the chunk's own rows cannot tell: a clipped straight-through estimator whose ``jvp`` forgot the
    clip has backward rows of 0 on the clipped units of ``x1``, not of ``x2`` (0.09-0.32 off)."""
    count = inputs[0].shape[0]
    d = _chunk_directions(problem, count, seed=2)
    per_example = (d * pushed).reshape(count, -1).double().sum(1)
    weights = example_weights(per_example)
    want = _summed_backward(problem, inputs, d * weights.to(d).reshape(count, *[1] * (d.ndim - 1)))
    weighed = weights * per_example
    terms = sum(dot64(want[name], t) for name, t in tangent.items())
    error = _relative(weighed.sum(), torch.as_tensor(terms, dtype=torch.float64), weighed.abs())
    _refuse(problem, "ntk_vector_products", "forward-mode derivative (jvp)", where, error)


def row_weights(problem: NTKProblem, count: int, rows: int) -> Tensor:
    """Random weights ``Tensor[count, rows]`` of a kernel's tangents (``rows`` of Jᵀ for each of ``count``
    examples), combined into the one tangent :func:`check_forward_mode_along` checks."""
    any_param = next(iter(problem.params.values()))
    return _direction((count, rows), any_param.new_empty((), dtype=problem.out_dtype), seed=6)


def combined_rows(rows: dict[str, Tensor], weights: Tensor) -> dict[str, Tensor]:
    """``Σ_{n,r} weights[n, r] rows[name][n, r]`` for ``rows = {name: Tensor[c, b, *param]}``; scaled to a largest
    entry of 1 by the caller where it is pushed forward (:func:`unit_tangent`)."""
    return {name: torch.einsum("nr...,nr->...", r, weights.to(r.dtype)) for name, r in rows.items()}


def chunk_key(inputs: tuple[Tensor, ...]) -> str:
    """Which examples ``inputs`` are, by content (a dataset's chunk is read afresh for each tile, and may land where
    another chunk was): a chunk read again for another tile is checked once."""
    digest = hashlib.sha256()
    for t in inputs:
        digest.update(f"{tuple(t.shape)} {t.dtype}".encode())
        digest.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
