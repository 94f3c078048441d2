"""``torchntk.ntk(..., implementation="structured_derivatives")``: from an ``nn.Module`` to a ``torch.Tensor``.

The model is converted once per architecture (:func:`torchntk.converters.to_jax`), the structured NTK function is
compiled once per conversion, kernel layout and tile shape, and tensors cross torch ↔ JAX by DLPack (zero-copy
where the devices match). float64 runs inside ``jax.enable_x64(True)`` so the rest of the user's process keeps
JAX's default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

from torchntk._problem import NTKProblem
from torchntk._tiles import TileOptions, chunk_for_memory, memory_budget, slice_inputs, tile_bytes, tiled_kernel

# Compiled structured NTK functions, keyed by (conversion key, trace axes, diagonal axes, argument signature).
_COMPILED: dict[tuple, Any] = {}


def jax_platform_for(device: torch.device) -> str:
    """The JAX platform to compute on for tensors on ``device``: the GPU when both sides have one, else the CPU."""
    import jax

    if device.type == "cuda":
        try:
            if jax.devices("gpu"):
                return "gpu"
        except RuntimeError:  # JAX was installed without a GPU backend
            pass
    return "cpu"


def to_jax_array(tensor: Tensor, platform: str) -> Any:
    """A torch tensor as a JAX array by DLPack on ``platform`` (copied to the CPU first when JAX has no GPU)."""
    import jax

    if platform == "cpu" and tensor.device.type != "cpu":
        tensor = tensor.cpu()
    return jax.dlpack.from_dlpack(tensor.detach().contiguous())


def to_torch(array: Any, device: torch.device) -> Tensor:
    """A JAX array as a torch tensor on ``device`` (DLPack, zero-copy when the devices match)."""
    return torch.from_dlpack(array).to(device)


@contextlib.contextmanager
def jax_scope(problem: NTKProblem) -> Iterator[str]:
    """x64 for float64 problems and the platform matching the model's device, for this computation only."""
    import jax

    platform = jax_platform_for(problem.device)
    with jax.enable_x64(problem.out_dtype == torch.float64), jax.default_device(jax.devices(platform)[0]):
        yield platform


def convert(problem: NTKProblem) -> Any:
    """Convert the model; one in training mode is converted in eval mode, its flags restored afterwards.

    ``prepare`` already refused training mode where it changes the function (BatchNorm, Dropout); nn.Module starts in
    training mode, so a plain MLP would otherwise never reach this route.
    """
    from torchntk.converters import to_jax

    modes = {module: module.training for module in problem.model.modules()}
    try:
        problem.model.eval()
        return to_jax(problem.model, tuple(x[:1] for x in problem.x1), params=list(problem.params), copy_params=False)
    finally:
        for module, training in modes.items():
            module.training = training


def _signature(args: Any) -> tuple:
    import jax

    return tuple((tuple(leaf.shape), str(leaf.dtype)) for leaf in jax.tree_util.tree_leaves(args))


def compiled_ntk_fn(problem: NTKProblem, converted: Any, args: tuple[Any, Any, Any]) -> Any:
    """The structured NTK function of ``converted`` compiled for ``args = (inputs1, inputs2, params)``."""
    import jax

    from torchntk.bridge import structured_ntk_fn

    # The conversion's own cache key covers architecture, forward source, buffer and unselected-parameter values.
    key = (converted.key, problem.trace_axes, problem.diagonal_axes, _signature(args))
    if key not in _COMPILED:
        fn = converted.fn

        def batched(params: dict[str, Any], inputs: tuple[Any, ...]) -> Any:
            return jax.vmap(lambda *example: fn(params, *example))(*inputs)

        ntk_fn = structured_ntk_fn(
            batched, trace_axes=problem.trace_axes, diagonal_axes=problem.diagonal_axes, vmap_axes=0
        )
        _COMPILED[key] = jax.jit(ntk_fn).lower(*args).compile()
    return _COMPILED[key]


def activation_numel(problem: NTKProblem) -> int:
    """Entries of every leaf module's output for one example: Y, the size of the forward's intermediates."""
    total = [0]

    def count(module: torch.nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            total[0] += output.numel()

    leaves = [m for m in problem.model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            problem.forward(problem.params, tuple(x[:1] for x in problem.x1))
    finally:
        for handle in handles:
            handle.remove()
    return max(total[0], problem.out_size)


def bytes_per_example(problem: NTKProblem) -> float:
    # Output cotangents of the parameter-consuming primitives, O·Y^k per example (a few copies while XLA runs).
    itemsize = torch.empty((), dtype=problem.out_dtype).element_size()
    return 4 * problem.out_size * activation_numel(problem) * itemsize


class StructuredCost(NamedTuple):
    """XLA's cost analysis of structured derivatives, scaled from the first tile to the whole kernel."""

    macs: float  # multiply-adds
    bytes_accessed: float  # bytes read and written by the compiled kernel function
    one_pair_bytes: float  # intermediates of a one-example-pair tile (the memory the method needs at least)
    route: str  # the converter route that produced the JAX function


def structured_cost(problem: NTKProblem, options: TileOptions) -> StructuredCost:
    """XLA's estimate for the whole kernel (see :class:`StructuredCost`).

    Converts and compiles the first tile (both cached, so a run that follows reuses them).
    """
    converted = convert(problem)
    per_example = bytes_per_example(problem)  # one forward pass: measured once
    one_pair = tile_bytes(problem, per_example, 1)
    if options.chunk_size:
        chunk = options.chunk_size
    elif one_pair > memory_budget(problem, options.max_memory):
        chunk = 1  # does not fit: the run will say so; the cost of one pair is still worth knowing
    else:
        chunk = chunk_for_memory(problem, per_example, options.max_memory)
    c1, c2 = min(chunk, problem.n1), min(chunk, problem.n2)
    x2 = problem.x1 if problem.x2 is None else problem.x2
    with jax_scope(problem) as platform:
        args = (
            tuple(to_jax_array(x, platform) for x in slice_inputs(problem.x1, slice(0, c1))),
            tuple(to_jax_array(x, platform) for x in slice_inputs(x2, slice(0, c2))),
            {name: to_jax_array(value, platform) for name, value in problem.params.items()},
        )
        compiled = compiled_ntk_fn(problem, converted, args)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    pairs_per_tile = c1 if problem.paired else c1 * c2
    tiles = (problem.n1 if problem.paired else problem.n1 * problem.n2) / pairs_per_tile
    return StructuredCost(
        float(cost.get("flops", 0.0)) / 2 * tiles,
        float(cost.get("bytes accessed", 0.0)) * tiles,
        one_pair,
        converted.route,
    )


def structured_derivatives(problem: NTKProblem, options: TileOptions | None = None) -> Tensor:
    """The NTK by structured derivatives (paper §3.4) through JAX. ``-> Tensor[kernel_shape]`` (see ``torchntk.ntk``).

    Raises :class:`torchntk.converters.ConversionError` when the model cannot be converted.
    """
    converted = convert(problem)
    with jax_scope(problem) as platform:
        params = {name: to_jax_array(value, platform) for name, value in problem.params.items()}

        def features(inputs: tuple[Tensor, ...]) -> tuple[Any, ...]:
            return tuple(to_jax_array(x, platform) for x in inputs)

        def block(inputs1: tuple[Any, ...], inputs2: tuple[Any, ...], paired: bool) -> Tensor:
            run: Callable = compiled_ntk_fn(problem, converted, (inputs1, inputs2, params))
            return to_torch(run(inputs1, inputs2, params), problem.device).to(problem.out_dtype)

        return tiled_kernel(
            problem,
            features,
            features,
            block,
            options=options or TileOptions(),
            bytes_per_example=bytes_per_example(problem),
            work=problem.n1 * problem.n2 * problem.out_size**2 * problem.num_params / 100,
            desc="NTK (structured derivatives)",
            tag="structured_derivatives",
        )
