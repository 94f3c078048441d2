"""``torchntk.ntk(..., implementation="structured_derivatives")``: from an ``nn.Module`` to a ``torch.Tensor``.

The model is converted once per architecture (:func:`torchntk.converters.to_jax`), the structured NTK function is
jitted once per conversion and kernel layout, and tensors cross torch ↔ JAX by DLPack (zero-copy where the
devices match). float64 runs inside ``jax.enable_x64(True)`` so the rest of the user's process keeps JAX's default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from torchntk._problem import NTKProblem
from torchntk._tiles import TileOptions, tiled_kernel

# (id of the converted per-example function, trace axes, diagonal axes) -> (converted fn, jitted ntk_fn). The
# converted function is kept alive in the value, so its id cannot be reused while the entry exists.
_JITTED: dict[tuple[int, tuple[int, ...], tuple[int, ...]], tuple[Callable, Callable]] = {}


def jax_backend_for(device: torch.device) -> str:
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


def _jitted_ntk_fn(converted_fn: Callable, problem: NTKProblem) -> Callable:
    import jax

    from torchntk.bridge import structured_ntk_fn

    key = (id(converted_fn), problem.trace_axes, problem.diagonal_axes)
    if key not in _JITTED:

        def batched(params: dict[str, Any], inputs: tuple[Any, ...]) -> Any:
            return jax.vmap(lambda *example: converted_fn(params, *example))(*inputs)

        ntk_fn = structured_ntk_fn(
            batched, trace_axes=problem.trace_axes, diagonal_axes=problem.diagonal_axes, vmap_axes=0
        )
        _JITTED[key] = (converted_fn, jax.jit(ntk_fn))
    return _JITTED[key][1]


def structured_derivatives(problem: NTKProblem, options: TileOptions | None = None) -> Tensor:
    """The NTK by structured derivatives (paper §3.4) through JAX. ``-> Tensor[kernel_shape]`` (see ``torchntk.ntk``).

    Raises :class:`torchntk.converters.ConversionError` when the model cannot be converted.
    """
    import jax

    from torchntk.converters import to_jax

    converted = to_jax(problem.model, problem.x1, params=list(problem.params))
    platform = jax_backend_for(problem.device)
    itemsize = torch.empty((), dtype=problem.out_dtype).element_size()
    with jax.enable_x64(problem.out_dtype == torch.float64), jax.default_device(jax.devices(platform)[0]):
        ntk_fn = _jitted_ntk_fn(converted.fn, problem)
        params = {name: to_jax_array(value, platform) for name, value in problem.params.items()}

        def block(inputs1: tuple[Any, ...], inputs2: tuple[Any, ...], paired: bool) -> Tensor:
            return to_torch(ntk_fn(inputs1, inputs2, params), problem.device).to(problem.out_dtype)

        def features(inputs: tuple[Tensor, ...]) -> tuple[Any, ...]:
            return tuple(to_jax_array(x, platform) for x in inputs)

        return tiled_kernel(
            problem,
            features,
            features,
            block,
            options=options or TileOptions(),
            # Output cotangents of every parameter-consuming primitive, O·Y^k per example, bounded by O·P.
            bytes_per_example=problem.out_size * problem.num_params * itemsize,
            work=problem.n1 * problem.n2 * problem.out_size**2 * problem.num_params / 100,
            desc="NTK (structured derivatives)",
            tag="structured_derivatives",
        )
