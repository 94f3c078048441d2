"""Jacobian rows a block of outputs at a time: the torch-native methods within ``max_memory`` where one example's
Jacobian (``O·P`` numbers: 47 GB for resnet18 with 1000 classes) does not fit.

- NTK-vector products build the rows of ``J(x2)`` ``b`` outputs at a time (:func:`jacobian_rows`) and push each
  block forward through ``x1``: any kernel, at ``N1·N2·O`` example-JVPs.
- Jacobian contraction builds both sides' rows a block at a time where the kernel pairs each output only with
  itself, every output axis traced or diagonal (``trace_axes=(-1,)``, the usual setting for 1000 classes):
  ``Θ[n, m] = Σ_o J_o(x_n)·J_o(x_m)`` needs block ``s`` of one side against block ``s`` of the other alone
  (:func:`blocked_contraction`). A tile of ``c1 + c2`` examples costs ``(c1 + c2)·O`` VJPs (``c·O`` on a diagonal
  tile of ``x2=None``) and ``c1·c2·O·P`` multiply-adds in ``(c1 + c2)·b·P`` numbers; no JVP. The block is sized to
  keep the whole batch in one tile (:func:`contraction_block`), since a chunk's rows are rebuilt in every tile it
  is part of.

Rows built this way are checked against torch's backward like Jacobian contraction's Jacobians (:class:`RowCheck`):
their projections on a random θ-direction, gathered block by block, against one backward of each chunk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from torchntk._activations import activation_numel
from torchntk._axes import trace_size
from torchntk._precision import accumulation_dtype
from torchntk._problem import NTKProblem
from torchntk._tiles import TileOptions, memory_budget, per_example_fn, tile_bytes
from torchntk.torch_native._autograd_check import (
    check_row_projections,
    chunk_key,
    parameter_direction,
    row_projections,
    tile_check_bytes,
)
from torchntk.torch_native._errors import UnsupportedModelError, func_cannot_transform, vmap_cannot_batch

logger = logging.getLogger("torchntk")


class RowsDisagree(UnsupportedModelError):
    """torch.func's rows of a block disagree with torch's backward (:class:`RowCheck`): build them by autograd."""


def jacobian_rows(
    problem: NTKProblem, inputs: tuple[Tensor, ...], outputs: slice, by_autograd: bool = False
) -> dict[str, Tensor]:
    """Rows ``outputs`` (flat output indices) of each example's Jacobian: ``{name: Tensor[c, b, *param_shape]}``.

    One VJP per example, pulled back through the ``b`` basis vectors of the block (vmapped; one backward per output
    by ``torch.autograd`` where torch.func cannot batch or transform the model, or ``by_autograd``: after
    :class:`RowsDisagree`); examples one at a time, since this path runs where even one example's full Jacobian does
    not fit.
    """
    fn = per_example_fn(problem)
    eye = torch.eye(problem.out_size, dtype=problem.out_dtype, device=problem.device)[outputs]
    basis = eye.reshape(-1, *problem.out_shape)
    count, rows = len(inputs[0]), None
    for i in range(count):
        example = tuple(x[i] for x in inputs)
        pulled = _example_rows(problem, fn, example, basis, by_autograd)
        if rows is None:  # filled in place: a stack of the examples' rows would hold them twice
            rows = {name: r.new_empty((count, *r.shape)) for name, r in pulled.items()}
        for name, r in pulled.items():
            rows[name][i] = r
        del pulled
    return rows


def _example_rows(
    problem: NTKProblem, fn, example: tuple[Tensor, ...], basis: Tensor, by_autograd: bool
) -> dict[str, Tensor]:
    try:
        if not by_autograd:
            _, vjp_fn = torch.func.vjp(lambda p: fn(p, *example), problem.params)
            return torch.func.vmap(vjp_fn)(basis)[0]
    except (RuntimeError, NotImplementedError) as error:
        if not (vmap_cannot_batch(problem.model, error) or func_cannot_transform(problem.model, error)):
            raise
    one = tuple(x.unsqueeze(0) for x in example)
    _, rows = problem.pulled_back(one, lambda out: (u.reshape(out.shape) for u in basis))
    return {name: torch.stack([row[name] for row in rows]) for name in problem.params}


def output_spans(problem: NTKProblem, block: int) -> list[slice]:
    """The flat output indices of each block of ``block`` outputs (the last one shorter where ``block`` does not
    divide ``O``)."""
    return [slice(o, min(o + block, problem.out_size)) for o in range(0, problem.out_size, block)]


class RowCheck:
    """The Jacobian rows of a call checked chunk by chunk, each chunk once
    (:func:`~torchntk.torch_native._autograd_check.check_row_projections`): ``begin`` a chunk (``None`` when it was
    checked already), ``add`` each block of its rows, ``finish`` (raises on a disagreement). The θ-direction is made
    once per call (θ's size)."""

    def __init__(self, problem: NTKProblem, method: str, what: str) -> None:
        self.problem, self.method, self.what = problem, method, what
        self.direction: dict[str, Tensor] = {}
        self.checked: set[str] = set()

    def begin(self, inputs: tuple[Tensor, ...]) -> Tensor | None:
        if chunk_key(inputs) in self.checked:
            return None
        if not self.direction:
            self.direction.update(parameter_direction(self.problem))
        return torch.zeros((len(inputs[0]), self.problem.out_size), dtype=torch.float64, device=self.problem.device)

    def add(self, projections: Tensor | None, span: slice, rows: dict[str, Tensor]) -> None:
        if projections is not None:
            projections[:, span] += row_projections(rows, self.direction)

    def finish(self, inputs: tuple[Tensor, ...], projections: Tensor | None) -> None:
        """Raises :class:`RowsDisagree` where the chunk's rows disagree with torch's backward."""
        if projections is None:
            return
        where = f"a chunk of {len(inputs[0])} examples"
        try:
            check_row_projections(self.problem, inputs, projections, self.direction, where, self.method, self.what)
        except UnsupportedModelError as error:
            raise RowsDisagree(str(error)) from error
        self.checked.add(chunk_key(inputs))


def retried_by_autograd(tile: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``tile(*args, by_autograd)`` computed again with rows by ``torch.autograd`` (one backward per output) where
    torch.func's disagreed (:class:`RowsDisagree`: a wrong batching rule, ``torch.cdist``'s), and so for every later
    tile of the call (one wrapper per call), as Jacobian contraction's whole Jacobians fall back; a disagreement then
    is raised."""
    by_autograd = False

    def retried(*args: Any) -> Tensor:
        nonlocal by_autograd
        try:
            return tile(*args, by_autograd)
        except RowsDisagree:
            if by_autograd:
                raise
            by_autograd = True
            logger.info(
                "torch.func's Jacobian rows disagree with torch's backward; by torch.autograd, output by output"
            )
            return tile(*args, True)

    return retried


def pairs_outputs_with_themselves(problem: NTKProblem) -> bool:
    """Whether every output axis is traced or diagonal: the kernel then pairs each output of ``x1`` with the same
    output of ``x2`` only."""
    return all(axis in problem.trace_axes or axis in problem.diagonal_axes for axis in range(1, problem.ndim))


def _row_bytes(problem: NTKProblem) -> int:
    return problem.num_params * torch.empty((), dtype=problem.out_dtype).element_size()


def row_check_bytes(problem: NTKProblem) -> float:
    """What :class:`RowCheck` adds to a tile of NTK-vector products: its θ-direction (Jacobian contraction's check
    has one already, in :func:`~torchntk.torch_native._autograd_check.tile_check_bytes`)."""
    return _row_bytes(problem)


def contraction_bytes_per_example(problem: NTKProblem, block: int) -> float:
    """A tile's rows of one block per example of each side: ``2·b·P`` numbers for a chunk of ``c`` per side."""
    return 2 * block * _row_bytes(problem)


def _in_flight_bytes(problem: NTKProblem) -> float:
    """Per output of a block, while one example's rows are pulled back: the row (``P``) and its cotangents through
    the model (``Y``, :func:`torchntk._activations.activation_numel`: resnet18's 20-output blocks at 224×224 went
    0.38 GB over a budget that counted the rows alone)."""
    itemsize = torch.empty((), dtype=problem.out_dtype).element_size()
    return _row_bytes(problem) + activation_numel(problem) * itemsize


def contraction_fixed_bytes(problem: NTKProblem, block: int) -> float:
    """What a blocked tile holds whatever its size: one example's block in flight (``b·(P + Y)``) and the check's
    θ-direction and backward gradient."""
    return block * _in_flight_bytes(problem) + tile_check_bytes(problem)


def contraction_block(problem: NTKProblem, options: TileOptions, whole_bytes_per_example: float) -> int | None:
    """Outputs per block for Jacobian contraction: ``None`` (whole Jacobians, ``whole_bytes_per_example``) where one
    example pair of them fits the memory budget, where ``chunk_size`` is forced, or where the kernel pairs outputs
    with other outputs; else the most whose rows for every example of the call fit one tile, and at least 1 (the
    tile then shrinks: :func:`torchntk._tiles.chunk_for_memory` refuses what even one pair cannot fit)."""
    if options.chunk_size is not None or not pairs_outputs_with_themselves(problem):
        return None
    budget = memory_budget(problem, options.max_memory)
    if tile_bytes(problem, whole_bytes_per_example, 1, tile_check_bytes(problem)) <= budget:
        return None
    examples = max(problem.n1, problem.n2)
    spare = budget - tile_bytes(problem, 0.0, examples, tile_check_bytes(problem))
    fits = int(spare // (2 * examples * _row_bytes(problem) + _in_flight_bytes(problem)))
    return max(1, min(fits, problem.out_size))


def blocked_contraction(
    problem: NTKProblem,
    inputs1: tuple[Tensor, ...],
    inputs2: tuple[Tensor, ...],
    paired: bool,
    block: int,
    check: RowCheck,
    by_autograd: bool = False,
) -> Tensor:
    """One tile of Jacobian contraction from both sides' rows ``block`` outputs at a time, for a kernel that pairs
    each output with itself only (:func:`pairs_outputs_with_themselves`). ``inputs2 is inputs1``: a diagonal tile
    of ``x2=None``, its rows built once. ``-> Tensor[c1, c2, *diagonal output axes]`` (``Tensor[c, ...]`` when
    ``paired``), traced axes averaged, as :func:`~torchntk.torch_native.jacobian_contraction.contract_jacobians`.
    """
    same = inputs2 is inputs1
    c1, c2 = len(inputs1[0]), len(inputs2[0])
    accumulate = accumulation_dtype(problem.out_dtype)
    lead = (c1,) if paired else (c1, c2)
    flat = torch.zeros((*lead, problem.out_size), dtype=accumulate, device=problem.device)
    expr = "nbp,nbp->nb" if paired else "nbp,mbp->nmb"
    sides = (inputs1,) if same else (inputs1, inputs2)
    projections = [check.begin(inputs) for inputs in sides]
    for span, rows in _blocks(problem, sides, block, by_autograd):
        for side, side_rows in zip(projections, rows, strict=True):
            check.add(side, span, side_rows)
        left, right = rows[0], rows[-1]
        for name, j1 in left.items():
            j2 = right[name]
            flat[..., span] += torch.einsum(
                expr, j1.reshape(*j1.shape[:2], -1).to(accumulate), j2.reshape(*j2.shape[:2], -1).to(accumulate)
            )
        del rows, left, right  # before the next block's rows are built
    for inputs, side in zip(sides, projections, strict=True):
        check.finish(inputs, side)
    kernel = flat.reshape(*lead, *problem.out_shape)
    traced = [len(lead) + axis - 1 for axis in problem.trace_axes]
    if traced:
        kernel = kernel.sum(dim=traced)
    return (kernel / trace_size((problem.n1, *problem.out_shape), problem.trace_axes)).to(problem.out_dtype)


def _blocks(
    problem: NTKProblem, sides: tuple[tuple[Tensor, ...], ...], block: int, by_autograd: bool
) -> Iterator[tuple[slice, list[dict[str, Tensor]]]]:
    for span in output_spans(problem, block):
        yield span, [jacobian_rows(problem, inputs, span, by_autograd) for inputs in sides]
