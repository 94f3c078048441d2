"""Jacobian contraction (paper §3.2): per-example Jacobians by ``vmap(jacrev)``, contracted parameter by parameter.

Costs ``N·O·[FP] + N1·N2·O²·P`` time (``N1·N2·O·P`` for the contraction where every output axis is traced or
diagonal) and ``N·O·P`` memory per chunk; best when P < Y and O is small. Where one example pair's Jacobians do not
fit ``max_memory`` and every output axis is traced or diagonal, both sides' rows are built a block of outputs at a
time (:mod:`torchntk.torch_native.output_blocks`): ``2·b·P`` per example.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from torchntk._axes import kernel_subscripts, spare_letters, trace_size
from torchntk._precision import accumulation_dtype
from torchntk._problem import NTKProblem
from torchntk._tiles import TileOptions, chunk_for_memory, kernel_tiles, per_example_fn, tiled_kernel
from torchntk.torch_native._attention import differentiable_attention
from torchntk.torch_native._autograd_check import (
    check_jacobians,
    check_jacobians_summed,
    chunk_key,
    parameter_direction,
    tile_check_bytes,
)
from torchntk.torch_native._errors import (
    UnsupportedModelError,
    func_cannot_transform,
    translated_errors,
    vmap_cannot_batch,
)
from torchntk.torch_native.output_blocks import (
    RowCheck,
    blocked_contraction,
    contraction_block,
    contraction_bytes_per_example,
    contraction_fixed_bytes,
    pairs_outputs_with_themselves,
    retried_by_autograd,
)

logger = logging.getLogger("torchntk")


#: How :func:`batch_jacobians` takes the Jacobians, each slower and more plainly torch's backward than the last.
BATCHED, ONE_AT_A_TIME, BY_AUTOGRAD = range(3)


def batch_jacobians(problem: NTKProblem, inputs: tuple[Tensor, ...], level: int = BATCHED) -> dict[str, Tensor]:
    """∂f/∂θ for each example of ``inputs``: ``{name: Tensor[c, *out, *param_shape]}``.

    By ``vmap(jacrev)``; a model that vmap cannot batch (an RNN, Python control flow on a tensor's value, a
    value-dependent shape) is differentiated one example at a time instead: the same Jacobians, slower.
    ``level`` starts lower: ``ONE_AT_A_TIME`` (``jacrev`` per example), ``BY_AUTOGRAD`` (one
    ``torch.autograd.grad`` per example and output: no torch.func transform at all).
    """
    fn = per_example_fn(problem)
    in_dims = (None,) + (0,) * len(inputs)
    if level != BATCHED:
        return _one_at_a_time(problem, fn, inputs, by_autograd=level == BY_AUTOGRAD)
    try:
        batched = torch.func.vmap(torch.func.jacrev(fn), in_dims=in_dims)(problem.params, *inputs)
        wrong = _misshapen(problem, batched, len(inputs[0]))
        if not wrong:
            return batched
        # vmap's batching rule for an op went wrong without an error (linalg.solve with an unbatched right-hand
        # side: Jacobians of another shape, whose contraction could broadcast into a kernel): one at a time
        logger.info("torch.func.vmap gave Jacobians of the wrong shape (%s); one example at a time", wrong)
    except (RuntimeError, NotImplementedError) as error:
        if func_cannot_transform(problem.model, error):
            # an old-style autograd.Function, a full backward hook, saved-tensor hooks (activation checkpointing):
            # torch's own backward takes them, one example and one output at a time
            logger.info("torch.func cannot transform this model (%s); Jacobians by torch.autograd", error)
            return _one_at_a_time(problem, fn, inputs, by_autograd=True)
        if not vmap_cannot_batch(problem.model, error):
            raise
        logger.info("torch.func.vmap cannot batch this model (%s); Jacobians one example at a time", error)
    return _one_at_a_time(problem, fn, inputs)


def _one_at_a_time(
    problem: NTKProblem, fn: Callable, inputs: tuple[Tensor, ...], by_autograd: bool = False
) -> dict[str, Tensor]:
    per_example = [
        _example_jacobian(problem, fn, tuple(x[i] for x in inputs), by_autograd) for i in range(len(inputs[0]))
    ]
    return {name: torch.stack([j[name] for j in per_example]) for name in problem.params}


def _example_jacobian(
    problem: NTKProblem, fn: Callable, example: tuple[Tensor, ...], by_autograd: bool = False
) -> dict[str, Tensor]:
    """One example's ``{name: Tensor[*out, *param]}`` by ``jacrev``, whose rows are a ``vmap`` over the output basis;
    where even that cannot batch the model (a GRU over ``pack_padded_sequence``: its fused kernel reads a data
    pointer that vmap's tensors lack), or ``by_autograd``, one backward per output, ``torch.autograd.grad`` alone."""
    try:
        if not by_autograd:
            return torch.func.jacrev(fn)(problem.params, *example)
    except (RuntimeError, NotImplementedError) as error:
        if not (vmap_cannot_batch(problem.model, error) or func_cannot_transform(problem.model, error)):
            raise
    _, rows = problem.pulled_back(tuple(x.unsqueeze(0) for x in example), _output_basis)
    return {
        name: torch.stack([row[name] for row in rows]).reshape(*problem.out_shape, *p.shape)
        for name, p in problem.params.items()
    }


def _output_basis(out: Tensor) -> Iterator[Tensor]:
    """One-hot cotangents of ``out``, one per output entry, made one at a time."""
    for i in range(out.numel()):
        yield (
            torch.zeros(out.numel(), dtype=out.dtype, device=out.device)
            .index_fill_(0, torch.tensor(i), 1)
            .reshape(out.shape)
        )


def _misshapen(problem: NTKProblem, jacobians: dict[str, Tensor], count: int) -> str:
    """The first Jacobian whose shape is not ``(count, *out, *param)``, described; ``""`` when all are right."""
    for name, p in problem.params.items():
        want = (count, *problem.out_shape, *p.shape)
        if tuple(jacobians[name].shape) != want:
            return f"{name}: {tuple(jacobians[name].shape)} instead of {want}"
    return ""


def checked_jacobians(problem: NTKProblem) -> Callable[[tuple[Tensor, ...]], dict[str, Tensor]]:
    """:func:`batch_jacobians`, checked against torch's backward: the first two examples of a call one by one
    (:func:`~torchntk.torch_native._autograd_check.check_jacobians`), every chunk as a whole
    (:func:`~torchntk.torch_native._autograd_check.check_jacobians_summed`)."""
    level, chunks, direction = [BATCHED], set(), {}

    def check(inputs: tuple[Tensor, ...], jac: dict[str, Tensor]) -> None:
        if not chunks:  # the call's first chunk
            check_jacobians(problem, inputs, jac)
        if (key := chunk_key(inputs)) not in chunks:  # every tile of a row reads its chunk again
            if not direction:  # θ's size: once per call
                direction.update(parameter_direction(problem))
            check_jacobians_summed(problem, inputs, jac, direction)
            chunks.add(key)

    def jacobians(inputs: tuple[Tensor, ...]) -> dict[str, Tensor]:
        while True:
            jac = batch_jacobians(problem, inputs, level=level[0])
            try:
                check(inputs, jac)
                return jac
            except UnsupportedModelError:
                if level[0] == BY_AUTOGRAD:
                    raise
                # vmap's batching rule of an op may be wrong where jacrev alone is right (PReLU's backward when
                # the batch size equals its weight's: no shape error, wrong values): one example at a time; where
                # jacrev is wrong too (torch.cdist, torch.quantile at ties), one backward per output: torch's own
                level[0] += 1
                how = "one example at a time" if level[0] == ONE_AT_A_TIME else "by torch.autograd, output by output"
                logger.info("torch.func's Jacobians disagree with torch's backward; %s", how)

    return jacobians


def _flat(problem: NTKProblem, jacobians: dict[str, Tensor]) -> list[Tensor]:
    """Jacobians with every parameter's axes flattened: ``[Tensor[c, *out, P_l]]``."""
    lead = 1 + len(problem.out_shape)
    return [j.reshape(*j.shape[:lead], -1) for j in jacobians.values()]


def contract_jacobians(problem: NTKProblem, jac1: list[Tensor], jac2: list[Tensor]) -> Tensor:
    """Σ_l J1_l J2_lᵀ in the kernel layout (traced axes averaged): one einsum per parameter.

    Traced axes are first kept like diagonal ones and summed afterwards: folding them into the contraction would
    make float32 dot products of O·P terms, which lose about 1e-3 relative accuracy at O·P ~ 1e7.
    """
    trace = problem.trace_axes
    first, second, result = kernel_subscripts(problem.ndim, (), problem.diagonal_axes + trace)
    p = spare_letters(problem.ndim, 1)
    expr = f"{first}{p},{second}{p}->{result}"
    accumulate = accumulation_dtype(jac1[0].dtype)
    kernel = sum(torch.einsum(expr, j1.to(accumulate), j2.to(accumulate)) for j1, j2 in zip(jac1, jac2, strict=True))
    if trace:
        traced = [result.index(first[axis]) for axis in trace]
        kernel = kernel.sum(dim=traced)
    return (kernel / trace_size((problem.n1, *problem.out_shape), trace)).to(jac1[0].dtype)


def bytes_per_example(problem: NTKProblem) -> float:
    """Both chunks' Jacobians, and jacrev's cotangents of the same size while one is built: 3·O·P per example."""
    return 3 * problem.out_size * problem.num_params * torch.empty((), dtype=problem.out_dtype).element_size()


def minimum_bytes_per_example(problem: NTKProblem) -> float:
    """One example pair's tile, less its slice of the kernel: what must fit at the least (rows one output at a time
    where every output axis is traced or diagonal)."""
    whole = bytes_per_example(problem) + tile_check_bytes(problem)
    if not pairs_outputs_with_themselves(problem):
        return whole
    return min(whole, contraction_bytes_per_example(problem, 1) + contraction_fixed_bytes(problem, 1))


def examples_differentiated(problem: NTKProblem, options: TileOptions) -> int:
    """Examples whose Jacobians (all ``O`` rows each) a call builds: each of ``x1`` and ``x2`` once (``x2=None``:
    ``x1``'s), as the time model counts unblocked tiles; with output blocks, each tile's two sides anew (a diagonal
    tile of ``x2=None`` once), as many times as a chunk meets others."""
    n2 = 0 if problem.x2 is None else problem.n2
    block = contraction_block(problem, options, bytes_per_example(problem))
    if block is None:
        return problem.n1 + n2
    per_example, fixed = contraction_bytes_per_example(problem, block), contraction_fixed_bytes(problem, block)
    chunk = chunk_for_memory(problem, per_example, options.max_memory, fixed)
    built = 0
    for rows, columns in kernel_tiles(problem, chunk):
        built += rows.stop - rows.start
        if not (problem.x2 is None and rows == columns):
            built += columns.stop - columns.start
    return built


def jacobian_contraction(problem: NTKProblem, options: TileOptions | None = None) -> Tensor:
    """The NTK by Jacobian contraction, tiled over the batch. ``-> Tensor[kernel_shape]`` (see :func:`torchntk.ntk`).

    Where one example pair's Jacobians do not fit ``max_memory`` and the kernel pairs each output with itself only
    (every output axis traced or diagonal), both sides' Jacobian rows are built ``b`` outputs at a time
    (:func:`~torchntk.torch_native.output_blocks.contraction_block`): the same kernel, in ``2·b·P`` per example.
    """
    options = options or TileOptions()
    block = contraction_block(problem, options, bytes_per_example(problem))
    if block is not None:
        logger.info("Jacobian contraction: Jacobian rows %d outputs at a time (max_memory)", block)
        return _in_output_blocks(problem, options, block)
    checked = checked_jacobians(problem)

    def jacobians(inputs: tuple[Tensor, ...]) -> list[Tensor]:
        return _flat(problem, checked(inputs))

    # Attention by the math backend here too: vmap has no batching rule for the fused CPU kernels and loops over
    # the examples (2-3x slower, benchmarks/results/reliability_overhead.json).
    # Grad mode, not no_grad: vmap(jacrev(f)) is wrong under no_grad for torch.linalg's det, slogdet, logdet and
    # solve (0.9-244 off, torch's bug). θ and the inputs are detached: no graph is recorded outside torch.func.
    with torch.enable_grad(), translated_errors(problem.model, "jacobian_contraction"), differentiable_attention():
        return tiled_kernel(
            problem,
            jacobians,
            jacobians,  # the same callable: a diagonal tile of x2=None builds its Jacobians once
            lambda j1, j2, paired: contract_jacobians(problem, j1, j2),
            options=options,
            bytes_per_example=bytes_per_example(problem),
            fixed_bytes=tile_check_bytes(problem),
            work=problem.n1 * problem.n2 * problem.out_size**2 * problem.num_params,
            desc="NTK (Jacobian contraction)",
            tag="jacobian_contraction",
        )


def _in_output_blocks(problem: NTKProblem, options: TileOptions, block: int) -> Tensor:
    check = RowCheck(problem, "jacobian_contraction", "Jacobian rows (vmap of vjp)")

    def inputs(chunk: tuple[Tensor, ...]) -> tuple[Tensor, ...]:  # one callable: a diagonal tile's rows once
        return chunk

    with torch.enable_grad(), translated_errors(problem.model, "jacobian_contraction"), differentiable_attention():
        return tiled_kernel(
            problem,
            inputs,
            inputs,
            retried_by_autograd(
                lambda inputs1, inputs2, paired, rows_by_autograd: blocked_contraction(
                    problem, inputs1, inputs2, paired, block, check, rows_by_autograd
                ),
            ),
            options=options,
            bytes_per_example=contraction_bytes_per_example(problem, block),
            fixed_bytes=contraction_fixed_bytes(problem, block),
            work=problem.n1 * problem.n2 * problem.out_size * problem.num_params,
            desc="NTK (Jacobian contraction, output blocks)",
            tag="jacobian_contraction",
        )
