"""The kernel computed tile by tile over the batch: bounded memory, a progress bar, output into ``out=``.

A method supplies per-chunk features (what it needs of a chunk of examples: Jacobians, or the inputs), a ``block``
that turns the features of an ``x1`` chunk and an ``x2`` chunk into that tile of the kernel, and its memory per
example; :func:`tiled_kernel` sizes the chunks to ``max_memory`` and writes each tile into the store for ``out=``
(:mod:`torchntk._store`: a tensor, a numpy memmap, a ``.npy`` or Zarr path), skipping tiles the store has finished.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from torchntk._distributed import tile_schedule
from torchntk._model_projections import output_projections, same_outputs
from torchntk._problem import NTKProblem
from torchntk._store import KernelStore, TensorStore, open_store, output_kind, store_key

# Work (in multiply-adds) above which an unspecified ``progress`` shows a bar: about a couple of seconds here.
_PROGRESS_WORK = 2e10
# Fraction of the free memory that a tile's intermediates may take when ``max_memory`` is not given.
_FREE_MEMORY_FRACTION = 0.5


@dataclass(frozen=True)
class TileOptions:
    """How to tile: ``chunk_size`` (examples per tile side) wins over ``max_memory`` (bytes for one tile)."""

    chunk_size: int | None = None
    max_memory: int | None = None
    progress: bool | None = None
    out: Any = None
    distributed: bool | None = None  # share the tiles among torch.distributed ranks (None: when a group exists)
    # A chunk_size chosen for memory by the method (structured derivatives' fitted tile), not by the caller: a
    # resumed store's smaller tiles are taken instead of refused.
    chunk_from_memory: bool = False


def per_example_fn(problem: NTKProblem) -> Callable[..., Tensor]:
    """``fn(params, *inputs) -> Tensor[*out]`` for ONE example (no batch axis), via ``functional_call``.

    Buffers and unselected parameters are the module's own; ``params`` replaces the selected ones.
    """

    def fn(params: dict[str, Tensor], *inputs: Tensor) -> Tensor:
        return problem.forward(params, tuple(x.unsqueeze(0) for x in inputs)).squeeze(0)

    return fn


def slice_inputs(inputs: tuple[Tensor, ...], chunk: slice) -> tuple[Tensor, ...]:
    return tuple(x[chunk] for x in inputs)


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now (the host's available RAM for the CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def memory_budget(problem: NTKProblem, max_memory: int | None) -> int:
    """Bytes one tile's intermediates may take: ``max_memory``, or a fraction of the device's free memory."""
    return max_memory if max_memory is not None else int(_FREE_MEMORY_FRACTION * free_memory(problem.device))


def host_memory_budget(device: torch.device, max_memory: int | None) -> int:
    """Bytes host-side work (a model's conversion) may take: ``max_memory`` when the call runs on the CPU, else a
    fraction of the host's available RAM (``max_memory`` then bounds the accelerator's memory)."""
    if max_memory is not None and device.type == "cpu":
        return max_memory
    return int(_FREE_MEMORY_FRACTION * free_memory(torch.device("cpu")))


def tile_bytes(problem: NTKProblem, bytes_per_example: float, chunk: int, fixed_bytes: float = 0.0) -> float:
    """Memory of a tile of ``chunk`` examples per side: ``chunk·bytes_per_example``, its slice of the kernel, and
    ``fixed_bytes`` the method's tile holds whatever its size (θ-sized buffers)."""
    itemsize = torch.empty((), dtype=problem.out_dtype).element_size()
    per_pair = int(np.prod(problem.kernel_shape()[1 if problem.paired else 2 :], dtype=np.int64)) * itemsize
    return chunk * bytes_per_example + (chunk if problem.paired else chunk * chunk) * per_pair + fixed_bytes


def chunk_for_memory(
    problem: NTKProblem, bytes_per_example: float, max_memory: int | None, fixed_bytes: float = 0.0
) -> int:
    """Largest chunk whose tile fits the memory budget (:func:`memory_budget`)."""
    budget = memory_budget(problem, max_memory)
    need = int(tile_bytes(problem, bytes_per_example, 1, fixed_bytes))
    if need > budget:
        raise ValueError(
            f"max_memory={budget:,} bytes is too small for even one tile (one example pair needs about {need:,} "
            "bytes with this method); raise max_memory to at least that, select fewer parameters (params=...), "
            "trace output axes (trace_axes=(-1,)), or use implementation='auto' to pick a method that fits."
        )
    low, high = 1, max(problem.n1, problem.n2)
    while low < high:  # largest c whose tile fits
        mid = (low + high + 1) // 2
        fits = tile_bytes(problem, bytes_per_example, mid, fixed_bytes) <= budget
        low, high = (mid, high) if fits else (low, mid - 1)
    return low


def show_progress(progress: bool | None, num_tiles: int, work: float) -> bool:
    return bool(progress) if progress is not None else (num_tiles > 1 and work > _PROGRESS_WORK)


def _agreed_parts(problem: NTKProblem, out: Any) -> dict[str, str]:
    """What the ranks of a distributed kernel must agree on: the kernel (:func:`store_key`) and where it goes."""
    return {**store_key(problem), "output": output_kind(out)}


def tiled_kernel(
    problem: NTKProblem,
    left_features: Callable[[tuple[Tensor, ...]], Any],
    right_features: Callable[[tuple[Tensor, ...]], Any],
    block: Callable[[Any, Any, bool], Tensor],
    *,
    options: TileOptions,
    bytes_per_example: float,
    work: float,
    desc: str,
    tag: str,
    fixed_bytes: float = 0.0,
) -> Tensor:
    """Assemble the kernel tile by tile.

    ``left_features`` / ``right_features`` map a chunk of ``x1`` / ``x2`` inputs to what ``block`` needs (the
    same callable for both sides lets a diagonal tile of ``x2=None`` reuse them). ``block(features1, features2,
    paired)`` returns the tile: kernel axes with the two batch axes of sizes ``(c1, c2)`` first, or one batch axis
    ``c`` when ``paired`` (batch axis diagonal). For ``x2=None`` only the upper tiles are computed and the lower
    ones are their mirror. ``bytes_per_example`` (and a tile's ``fixed_bytes``) size the chunks; ``tag`` names the
    method in a new store's header.
    """
    schedule = tile_schedule(options.distributed)
    chunk = options.chunk_size or chunk_for_memory(problem, bytes_per_example, options.max_memory, fixed_bytes)
    # Ranks agree on one tile size (and that they compute the same kernel) before the store is opened or created.
    chunk = schedule.agree(chunk, lambda: json.dumps(_agreed_parts(problem, options.out), sort_keys=True))
    schedule.agree_on_outputs(lambda: output_projections(problem), lambda a, b: same_outputs(a, b, problem.out_dtype))
    explicit = options.chunk_size is not None and not options.chunk_from_memory
    store = open_store(options.out, problem, chunk, tag, chunk_is_explicit=explicit)
    chunk = store.chunk  # a resumed store keeps its own tiles
    x2 = problem.x1 if problem.x2 is None else problem.x2
    symmetric = problem.x2 is None
    every = kernel_tiles(problem, chunk)
    tiles = [(r, c) for r, c in every if not store.is_done(r, c)]
    if store.uncertain and len(tiles) < len(every):  # the fingerprint missed something: nothing finished is trusted
        store.refuse_unseen()
        tiles = every  # a memmap's journal forgotten (a path store raised)
    if tiles:
        store.check_writable()
    # A file every rank writes into; otherwise (a tensor) the ranks add up their kernels at the end.
    shared = not isinstance(store, TensorStore)
    kernel = None if shared or schedule.world_size == 1 else store.summed_by_ranks()
    schedule.begin(tiles, kernel, shared)
    bar = show_progress(options.progress, len(tiles), work)
    cached_rows: tuple[slice, Any] | None = None
    for r, c in schedule.tiles(tiles, desc=desc, show=bar):
        if cached_rows is None or cached_rows[0] != r:
            cached_rows = (r, left_features(slice_inputs(problem.x1, r)))
        f1 = cached_rows[1]
        reuse = symmetric and r == c and left_features is right_features
        f2 = f1 if reuse else right_features(slice_inputs(x2, c))
        store.write(r, c, block(f1, f2, problem.paired))  # the mirror tile too, for x2=None
    schedule.finish(kernel, shared)
    if shared and schedule.world_size > 1:
        check_all_written(store, every)
    return store.result()


def kernel_tiles(problem: NTKProblem, chunk: int) -> list[tuple[slice, slice]]:
    """Every tile ``(rows, columns)`` in order: the upper triangle only for ``x2=None``, the diagonal when paired."""
    rows = [slice(i, min(i + chunk, problem.n1)) for i in range(0, problem.n1, chunk)]
    cols = [slice(j, min(j + chunk, problem.n2)) for j in range(0, problem.n2, chunk)]
    if problem.paired:
        return [(r, r) for r in rows]
    symmetric = problem.x2 is None
    return [(r, c) for ri, r in enumerate(rows) for ci, c in enumerate(cols) if not (symmetric and ci < ri)]


def check_all_written(store: KernelStore, tiles: list[tuple[slice, slice]]) -> None:
    """After every rank finished: the shared store must hold every tile, or ``out=`` was not one shared store."""
    missing = [(r.start, c.start) for r, c in tiles if not store.is_done(r, c)]
    if missing:
        raise RuntimeError(
            f"out= was written by several torch.distributed ranks, but {len(missing)} of {len(tiles)} tiles written "
            "by other ranks are not in the store on this rank: every rank must open the same store on a file "
            "system (or object store) they share, or pass no out= to get the kernel by one all_reduce."
        )
