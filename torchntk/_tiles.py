"""The batch split into tiles, shared by the torch-native methods: bounded memory and a progress bar.

A method supplies per-chunk ``features`` (what it needs of a chunk of examples: Jacobians, or the inputs) and a
``block`` that turns the features of an ``x1`` chunk and an ``x2`` chunk into that tile of the kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from torchntk._axes import swap_kernel_sides
from torchntk._problem import NTKProblem

# Work (in multiply-adds) above which an unspecified ``progress`` shows a bar: about a couple of seconds here.
_PROGRESS_WORK = 2e10
# Memory for one tile's intermediates when ``chunk_size`` is not given.
_DEFAULT_TILE_BYTES = 1 << 30


def per_example_fn(problem: NTKProblem) -> Callable[..., Tensor]:
    """``fn(params, *inputs) -> Tensor[*out]`` for ONE example (no batch axis), via ``functional_call``.

    Buffers and unselected parameters are the module's own; ``params`` replaces the selected ones.
    """

    def fn(params: dict[str, Tensor], *inputs: Tensor) -> Tensor:
        return problem.forward(params, tuple(x.unsqueeze(0) for x in inputs)).squeeze(0)

    return fn


def slice_inputs(inputs: tuple[Tensor, ...], chunk: slice) -> tuple[Tensor, ...]:
    return tuple(x[chunk] for x in inputs)


def default_chunk_size(problem: NTKProblem, bytes_per_example: int) -> int:
    """Examples per chunk so that one tile's intermediates stay near 1 GiB."""
    return max(1, min(max(problem.n1, problem.n2), _DEFAULT_TILE_BYTES // max(bytes_per_example, 1)))


def show_progress(progress: bool | None, num_tiles: int, work: float) -> bool:
    return bool(progress) if progress is not None else (num_tiles > 1 and work > _PROGRESS_WORK)


def tiled_kernel(
    problem: NTKProblem,
    left_features: Callable[[tuple[Tensor, ...]], Any],
    right_features: Callable[[tuple[Tensor, ...]], Any],
    block: Callable[[Any, Any, bool], Tensor],
    *,
    chunk_size: int,
    progress: bool,
    desc: str,
) -> Tensor:
    """Assemble the kernel tile by tile.

    ``left_features`` / ``right_features`` map a chunk of ``x1`` / ``x2`` inputs to what ``block`` needs (the
    same callable for both sides lets a diagonal tile of ``x2=None`` reuse them).
    ``block(features1, features2, paired)`` returns the tile: kernel axes with the two batch axes of sizes
    ``(c1, c2)`` first, or one batch axis ``c`` when ``paired`` (batch axis diagonal). For ``x2=None`` only the
    upper tiles are computed and the lower ones are their mirror.
    """
    x2 = problem.x1 if problem.x2 is None else problem.x2
    rows = [slice(i, min(i + chunk_size, problem.n1)) for i in range(0, problem.n1, chunk_size)]
    cols = [slice(j, min(j + chunk_size, problem.n2)) for j in range(0, problem.n2, chunk_size)]
    kernel = torch.empty(problem.kernel_shape(), dtype=problem.out_dtype, device=problem.device)
    symmetric = problem.x2 is None
    if problem.paired:
        tiles = [(r, r) for r in rows]
    else:
        tiles = [(r, c) for ri, r in enumerate(rows) for ci, c in enumerate(cols) if not (symmetric and ci < ri)]
    mirror = swap_kernel_sides(problem.ndim, problem.trace_axes, problem.diagonal_axes)
    cached_rows: tuple[slice, Any] | None = None
    for r, c in tqdm(tiles, desc=desc, disable=not progress, leave=False):
        if cached_rows is None or cached_rows[0] != r:
            cached_rows = (r, left_features(slice_inputs(problem.x1, r)))
        f1 = cached_rows[1]
        reuse = symmetric and r == c and left_features is right_features
        f2 = f1 if reuse else right_features(slice_inputs(x2, c))
        tile = block(f1, f2, problem.paired)
        if problem.paired:
            kernel[r] = tile
        else:
            kernel[r, c] = tile
            if symmetric and r != c:
                kernel[c, r] = tile.permute(mirror)
    return kernel
