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

import functools
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
# Public calls begun by this process that may be distributed (:func:`begin_call`), and the schedules made within the
# current one (auto may try a second method): they number the store namespaces, the same on every rank.
_calls = 0
_schedules = 0
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

    def agree_on_outputs(self, outputs: Callable[[], dict[str, Any]], same: Callable[[Any, Any], bool]) -> None:
        """Check that every rank's model gives the same outputs on the examples (here: nothing to compare)."""

    def begin(self, pending: Sequence[Tile], kernel: Tensor | None, shared: bool) -> None:
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

    def finish(self, kernel: Tensor | None, shared: bool) -> None:
        """Called once this process has no tile left: returns when the whole kernel is in ``kernel`` (or shared)."""


class RanksNotReached(TimeoutError, ValueError):
    """Other ranks did not reach a step of this distributed call within the group's timeout (a ``ValueError`` too,
    as the step's refusal was before)."""


def _store() -> Any:
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


class DistributedSchedule(LocalSchedule):
    """Tiles claimed one at a time by the ranks of the default process group (see the module docstring)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        global _schedules
        super().__init__()
        _schedules += 1
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.store = dist.PrefixStore(f"torchntk/ntk/{_calls}/{_schedules}/", _store())
        self.call_store = _call_store()

    def exchange(self, name: str, value: str) -> list[str]:
        """Post ``value`` under ``name`` and return every rank's (waits for all: a barrier). A rank that does not
        post within the store's timeout is named in a ``ValueError`` (torch's own error named only a store key)."""
        self.store.set(f"{name}/{self.rank}", value)
        keys = [f"{name}/{rank}" for rank in range(self.world_size)]

        def missing() -> list[int]:
            return [rank for rank, key in enumerate(keys) if not self.store.check([key])]

        self._wait_until(lambda: self.store.check(keys), f"step {name!r}", missing)
        return [self.store.get(key).decode() for key in keys]

    def _wait_until(self, done: Callable[[], bool], step: str, missing: Callable[[], list[int]] | None = None) -> None:
        """Poll ``done()`` until it holds, another rank reports this call failed (:func:`call_failed`: raised here
        at once, instead of waiting out the group's timeout and falling a timeout behind on every later call), or the
        store's timeout passes."""
        deadline = time.monotonic() + self.store.timeout.total_seconds()
        while not done():
            if int(self.call_store.add("failed", 0)):
                failed = [r for r in range(self.world_size) if r != self.rank and self.call_store.check([f"{r}"])]
                if failed:
                    why = self.call_store.get(f"{failed[0]}").decode()
                    raise RuntimeError(
                        f"torch.distributed rank {failed[0]} failed this torchntk call (call {_calls}), so this rank "
                        f"stops too: {why}"
                    )
            if time.monotonic() > deadline:
                ranks = f" {missing()}" if missing else ""
                raise RanksNotReached(
                    f"torch.distributed ranks{ranks} did not reach this distributed torchntk call (call {_calls} of "
                    f"this process, {step}) within the process group's timeout "
                    f"({self.store.timeout.total_seconds():.0f} s): every rank must call torchntk.ntk with the same "
                    "arguments, in the same order. A rank that passed distributed=False, skipped the call or died "
                    "leaves the others waiting; a kernel with a file-backed out= resumes where it stopped."
                )
            time.sleep(_POLL_SECONDS)

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

    def agree_on_outputs(self, outputs: Callable[[], dict[str, Any]], same: Callable[[Any, Any], bool]) -> None:
        """``outputs()``: a few projections of the model's outputs on the examples (``_store.output_projections``),
        compared across ranks by ``same(rank's, rank 0's)``. The digests of :meth:`agree` read code statically: ranks
        whose models differ where they cannot see (a constant read through ``globals()[name]``, state in a C
        object) summed tiles of two functions into one kernel, on every rank (off by 10-25)."""
        values = [json.loads(value) for value in self.exchange("outputs", json.dumps(outputs()))]
        different = [rank for rank, theirs in enumerate(values) if not same(theirs, values[0])]
        if different:
            raise ValueError(
                f"torch.distributed ranks {different} compute a different kernel than rank 0: their models give "
                "other outputs on the same examples, although code, weights and inputs hash the same (a value the "
                "model reads in a way torchntk cannot see: a global looked up by name, an environment variable, "
                "state in a C extension's object). Give every rank the same model; pass distributed=False to "
                "compute a kernel in one process only."
            )

    def begin(self, pending: Sequence[Tile], kernel: Tensor | None, shared: bool) -> None:
        listing = json.dumps([[r.start, r.stop, c.start, c.stop] for r, c in pending])
        self._check_same(
            "list of tiles still to compute",
            self.exchange("pending", listing),
            "with out=, every rank must open the same file (its journal tells which tiles are done).",
        )

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
            # Rank 0 leaves last: under torchrun it hosts the store (a TCPStore), and a rank still polling it when
            # rank 0's script ended got "Connection reset by peer" from a finished kernel.
            self.store.add("left", 1)
            if self.rank == 0:
                self._wait_for_all("left", arrive=False)
            bar.n = len(pending)
            bar.refresh()

    def _wait_for_all(self, name: str, arrive: bool = True) -> None:
        """A barrier through the store (no collective: any backend, and no tensor on the accelerator)."""
        if arrive:
            self.store.add(name, 1)
        self._wait_until(lambda: int(self.store.add(name, 0)) >= self.world_size, f"waiting for every rank's {name!r}")

    def finish(self, kernel: Tensor | None, shared: bool) -> None:
        if kernel is not None and not shared:
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


def _distributes(distributed: bool | None) -> bool:
    """Whether a call with this ``distributed=`` shares its tiles among ranks (``True``: even before the group is
    initialised from the environment)."""
    if distributed is not None:
        return bool(distributed)
    available = torch.distributed.is_available()
    return available and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def _call_store() -> Any:
    import torch.distributed as dist

    return dist.PrefixStore(f"torchntk/ntk/{_calls}/failed/", _store())


def begin_call(distributed: bool | None) -> bool:
    """Number a public call at its entry, before anything can fail; whether it may be distributed. A rank whose call
    raised before its schedule (a bad argument, too little free memory on its node) kept its number, and every later
    call of the ranks was matched with the wrong one (a misleading "ranks compute a different kernel")."""
    global _calls, _schedules
    if _distributes(distributed):
        _calls, _schedules = _calls + 1, 0
        return True
    return False


def call_failed(error: BaseException) -> None:
    """Tell the other ranks that this rank's current call failed, so that they stop at once (see ``_wait_until``)."""
    try:
        store = _call_store()
        store.set(str(torch.distributed.get_rank()), f"{type(error).__name__}: {error}"[:1000])
        store.add("failed", 1)
    except Exception:  # noqa: BLE001 - the group or its store is gone: nobody is left waiting on it
        pass


def numbered_call(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Decorate a public entry point taking ``distributed=`` (keyword): :func:`begin_call` at entry,
    :func:`call_failed` when it raises."""

    @functools.wraps(fn)
    def wrapper(*args: Any, distributed: bool | None = None, **kwargs: Any) -> Tensor:
        counted = begin_call(distributed)
        try:
            return fn(*args, distributed=distributed, **kwargs)
        except BaseException as error:
            if counted:
                call_failed(error)
            if counted and isinstance(error, getattr(torch.distributed, "DistNetworkError", ())):
                raise RuntimeError(
                    f"torchntk: the torch.distributed store became unreachable during this call ({error}): the rank "
                    "that hosts it (rank 0 under torchrun) died or left. Re-run the job; with a file-backed out= "
                    "(.npy or .zarr) it computes only the tiles not yet written."
                ) from error
            raise

    return wrapper


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
