"""Which tiles of a kernel this process computes: a tile scheduler for :func:`torchntk._tiles.tiled_kernel`.

:class:`LocalSchedule` computes every tile, in order. :class:`DistributedSchedule` shares them among the ranks of
torch.distributed's default process group: each rank claims the next tile from an atomic counter in the group's
store (``store.add``), so a fast rank takes more tiles and a slow one fewer. Before the first claim the ranks agree,
through the store, on the tiling (the smallest chunk any rank's memory allows) and check that they compute the same
kernel (a SHA-256 of θ, buffers, inputs and layout; a mismatch is an error, not a wrong kernel). Only counters and
these small records go through the store; kernel values never do, except when the output is not shared between
the ranks (no file-backed ``out=``): then each rank writes its tiles into a zeroed kernel and one ``all_reduce``
(sum) at the end gives every rank the whole kernel — exact, as every entry is non-zero on one rank only.

The ranks must call :func:`torchntk.ntk` in the same order (SPMD, as under ``torchrun``): each distributed call
takes the next namespace ``torchntk/ntk/<n>/`` of the store.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

Tile = tuple[slice, slice]

# Seconds between two looks at the store while waiting for the other ranks at the end of a kernel.
_POLL_SECONDS = 0.05
# Distributed kernels computed by this process so far: numbers the store namespaces (the same on every rank).
_calls = 0
# The schedule of the last kernel this process computed (tests and benchmarks read ``claimed`` and ``seconds``).
last_schedule: LocalSchedule | DistributedSchedule | None = None


class LocalSchedule:
    """Every tile, in order, in this process; a tqdm bar when ``show``."""

    rank, world_size = 0, 1

    def __init__(self) -> None:
        self.claimed: list[Tile] = []
        self.tile_seconds: list[float] = []  # per claimed tile: from handing it out to being asked for the next
        self.seconds = 0.0

    def agree(self, chunk: int, fingerprint: Callable[[], str]) -> int:
        """The chunk every rank uses (here: ``chunk``)."""
        return chunk

    def begin(self, pending: Sequence[Tile], kernel: Tensor, shared: bool) -> None:
        """Called with the tiles still to compute, before the first one."""

    def tiles(self, pending: Sequence[Tile], *, desc: str, show: bool) -> Iterator[Tile]:
        """The tiles this process computes; the next one is asked for once the previous one is written."""
        start = time.perf_counter()
        for tile in tqdm(pending, desc=desc, disable=not show, leave=False):
            self.claimed.append(tile)
            handed = time.perf_counter()
            yield tile
            self.tile_seconds.append(time.perf_counter() - handed)
        self.seconds = time.perf_counter() - start

    def finish(self, kernel: Tensor, shared: bool) -> None:
        """Called once this process has no tile left: returns when the whole kernel is in ``kernel`` (or shared)."""


def _store() -> Any:
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


class DistributedSchedule(LocalSchedule):
    """Tiles claimed one at a time by the ranks of the default process group (see the module docstring)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        global _calls
        super().__init__()
        _calls += 1
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.store = dist.PrefixStore(f"torchntk/ntk/{_calls}/", _store())

    def exchange(self, name: str, value: str) -> list[str]:
        """Post ``value`` under ``name`` and return every rank's (waits for all: a barrier). A rank that does not
        post within the store's timeout is named in a ``ValueError`` (torch's own error named only a store key)."""
        self.store.set(f"{name}/{self.rank}", value)
        try:
            return [self.store.get(f"{name}/{rank}").decode() for rank in range(self.world_size)]
        except RuntimeError as error:  # torch.distributed.DistStoreError: a wait timeout
            missing = [rank for rank in range(self.world_size) if not self.store.check([f"{name}/{rank}"])]
            raise ValueError(
                f"torch.distributed ranks {missing} did not reach this distributed torchntk call (call {_calls} of "
                f"this process, step {name!r}) within the process group's timeout: every rank must call "
                "torchntk.ntk with the same arguments, in the same order. A rank that passed distributed=False, "
                "raised before, or skipped the call leaves the others waiting."
            ) from error

    def _check_same(self, name: str, values: list[str], fix: str) -> None:
        different = [rank for rank, value in enumerate(values) if value != values[0]]
        if different:
            raise ValueError(
                f"torch.distributed ranks {different} compute a different kernel than rank 0 (their {name} differs: "
                f"{values[different[0]][:200]} vs {values[0][:200]}); {fix}"
            )

    def agree(self, chunk: int, fingerprint: Callable[[], str]) -> int:
        """The smallest chunk of all ranks (free memory differs), after checking they compute the same kernel.
        ``fingerprint()``: JSON of ``{part: digest}`` (``_store.store_key``), so that a refusal names the parts."""
        parts = [json.loads(value) for value in self.exchange("fingerprint", fingerprint())]
        differing = {
            rank: sorted(k for k in {*theirs, *parts[0]} if theirs.get(k) != parts[0].get(k))
            for rank, theirs in enumerate(parts)
            if theirs != parts[0]
        }
        if differing:
            which = "; ".join(f"rank {rank}: {', '.join(names)}" for rank, names in differing.items())
            raise ValueError(
                f"torch.distributed ranks {sorted(differing)} compute a different kernel than rank 0 (what differs "
                f"from rank 0's — {which}): every rank must call torchntk.ntk with the same model, θ, inputs and "
                "options (seed the initialisation and the data; load the same files), in the same order. Pass "
                "distributed=False to compute a kernel in one process only."
            )
        return min(int(value) for value in self.exchange("chunk", str(chunk)))

    def begin(self, pending: Sequence[Tile], kernel: Tensor, shared: bool) -> None:
        listing = json.dumps([[r.start, r.stop, c.start, c.stop] for r, c in pending])
        self._check_same(
            "list of tiles still to compute",
            self.exchange("pending", listing),
            "with out=, every rank must open the same file (its journal tells which tiles are done).",
        )
        if not shared:
            kernel.zero_()  # the all_reduce in finish() adds the ranks' kernels: tiles of other ranks must be 0

    def tiles(self, pending: Sequence[Tile], *, desc: str, show: bool) -> Iterator[Tile]:
        """Tiles claimed from the store's counter until none is left; rank 0's bar shows every rank's progress."""
        start = time.perf_counter()
        bar = tqdm(total=len(pending), desc=f"{desc}, {self.world_size} ranks", disable=not show or self.rank != 0)
        with bar:
            while (index := self.store.add("next", 1) - 1) < len(pending):
                self.claimed.append(pending[index])
                handed = time.perf_counter()
                yield pending[index]
                self.tile_seconds.append(time.perf_counter() - handed)
                bar.n = self.store.add("done", 1)
                bar.refresh()
            self.seconds = time.perf_counter() - start
            self._wait_for_all("finished")
            bar.n = len(pending)
            bar.refresh()

    def _wait_for_all(self, name: str) -> None:
        """A barrier through the store (no collective: any backend, and no tensor on the accelerator)."""
        self.store.add(name, 1)
        timeout = self.store.timeout.total_seconds()
        deadline = time.monotonic() + timeout
        while int(self.store.add(name, 0)) < self.world_size:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"torchntk: rank {self.rank} waited {timeout:.0f} s for the other ranks to finish their tiles; "
                    "a rank died or stopped calling torchntk.ntk. Re-run with a file-backed out= to resume."
                )
            time.sleep(_POLL_SECONDS)

    def finish(self, kernel: Tensor, shared: bool) -> None:
        if not shared:
            import torch.distributed as dist

            dist.all_reduce(kernel, op=dist.ReduceOp.SUM)


def _initialise_from_environment() -> None:
    """``init_process_group`` from torchrun's environment variables, or an error that says how to get them."""
    import torch.distributed as dist

    needed = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")
    missing = [name for name in needed if name not in os.environ]
    if missing:
        raise ValueError(
            f"distributed=True but no torch.distributed process group is initialised and {', '.join(missing)} "
            "are not set: launch with `torchrun --nproc-per-node K script.py`, or call "
            "torch.distributed.init_process_group(...) before torchntk.ntk."
        )
    dist.init_process_group()


def tile_schedule(distributed: bool | None) -> LocalSchedule:
    """The schedule for one kernel: distributed when asked, or (``None``) when a group of several ranks exists."""
    global last_schedule
    available = torch.distributed.is_available()
    initialised = available and torch.distributed.is_initialized()
    if distributed and not available:
        raise ValueError("distributed=True but this torch build has no torch.distributed.")
    if distributed and not initialised:
        _initialise_from_environment()
        initialised = True
    several = initialised and torch.distributed.get_world_size() > 1
    use = several if distributed is None else bool(distributed) and initialised
    last_schedule = DistributedSchedule() if use else LocalSchedule()
    return last_schedule
