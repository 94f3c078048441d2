"""Where a kernel is written tile by tile, and a journal of finished tiles that cannot lie.

``out=`` of :func:`torchntk.ntk` selects the store (:func:`open_store`):

- ``None``, a tensor, or a numpy array in memory: the kernel is written there; nothing to resume.
- a file-backed ``np.memmap`` (opened ``"w+"`` or ``"r+"``): written through the array; finished tiles are journaled
  in ``<file>.torchntk/``. A journal written for another problem is *discarded* (its tiles are recomputed).
- a path ``"*.npy"``: a ``.npy`` file created when missing (sparse), written with ``pwrite`` at exact byte ranges
  (never whole pages, so writers on several machines of a shared file system do not clobber each other's tiles),
  journal in ``<path>.torchntk/``. A store written for another problem is *refused* with a clear error.
- a path or fsspec URL ``"*.zarr"``: a Zarr group with the array ``kernel`` (one chunk per tile, NaN where not
  written), the array ``tiles`` (each tile's checksum: one object per tile) and the header in its attributes.
  Refused like ``.npy`` when written for another problem.

Why the journal cannot lie: a finished tile is recorded with the checksum of its values *after* they are written
and synced, and a tile counts as done only when the values read back from the store now have that checksum. A file
zeroed by ``open_memmap(path, "w+")``, truncated, or partly overwritten therefore has its tiles recomputed. Which
problem a store belongs to is its key (:func:`store_key`): the architecture fingerprint
(:mod:`torchntk._fingerprint`), every parameter and buffer value, the parameter selection, the inputs, the kernel
layout and dtype. The method and the tile size are not in it: tiles of one kernel computed by different methods are
the same kernel to rounding; a resumed run adopts the store's tile size.

Several processes may write one ``.npy`` or Zarr store at once (``is_done`` / ``write`` per tile): ``.npy`` tiles are
written under a per-tile ``flock`` and the second writer of a tile finds it done; Zarr chunk writes replace whole
objects (atomic rename on a local disk, one PUT on object storage).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import mmap
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from torchntk._axes import swap_kernel_sides
from torchntk._fingerprint import Fingerprint, architecture, tensor_digest, values_digest
from torchntk._model_projections import output_projections, same_outputs
from torchntk._precision import float32_settings
from torchntk._problem import NTKProblem

FORMAT = 3  # 2: the header holds projections of the model's outputs (output_projections); 3: of its J too
JOURNAL_SUFFIX = ".torchntk"
Index = tuple[slice, ...]


def store_key(problem: NTKProblem, fingerprint: Fingerprint | None = None) -> dict[str, str]:
    """What the kernel's values depend on, one digest per part (so that a refusal can name the part that differs).

    ``fingerprint``: the model's :func:`~torchntk._fingerprint.architecture`, when already computed."""
    model = problem.model
    fingerprint = fingerprint or architecture(model)
    unselected = [(n, p) for n, p in model.named_parameters() if n not in problem.params]
    inputs = hashlib.sha256()
    for batch in (problem.x1, problem.x2):
        inputs.update(("none" if batch is None else ",".join(tensor_digest(x) for x in batch)).encode() + b"|")
    layout = [list(problem.kernel_shape()), list(problem.trace_axes), list(problem.diagonal_axes), problem.x2 is None]
    return {
        "architecture": fingerprint.digest,  # its uncertain parts: see KernelStore.uncertain
        "parameter values": values_digest([*sorted(problem.params.items()), *unselected, *model.named_buffers()]),
        "parameter selection": hashlib.sha256(json.dumps(sorted(problem.params)).encode()).hexdigest(),
        "inputs": inputs.hexdigest(),
        "layout": json.dumps(layout),
        "dtype": str(problem.out_dtype),
        # float32 tiles taken under set_float32_matmul_precision("high"/"medium") (TF32, bfloat16 products) or with
        # cuDNN's TF32 convolutions differ from full-precision ones by ~1e-3: a resume under other settings would mix
        # them (the settings as the call runs: all float32 unless the user asked torch for less, _precision).
        "float32 products": float32_settings() if problem.out_dtype == torch.float32 else "exact",
    }


def _producer() -> str:
    try:
        return f"torchntk {importlib.metadata.version('torchntk')}"
    except importlib.metadata.PackageNotFoundError:
        return "torchntk"


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    try:
        return torch.empty((), dtype=dtype).numpy().dtype
    except TypeError:
        raise TypeError(
            f"out= as a numpy array or a file cannot hold {dtype} (numpy has no such dtype); compute in float32 or "
            "float64 (model.float()), or pass out= as a torch tensor."
        ) from None


class KernelStore:
    """The kernel's destination. ``write(rows, cols, tile)`` stores one tile (and its mirror for ``x2=None``);
    ``is_done(rows, cols)`` says whether a tile is finished (always ``False`` where nothing is journaled);
    ``result()`` is the kernel as a tensor. ``chunk`` is the tile size to use (a resumed store's own)."""

    #: What the architecture fingerprint could not see (then a finished tile is recomputed before trusting the rest).
    uncertain: tuple[str, ...] = ()

    def __init__(self, problem: NTKProblem, chunk: int) -> None:
        self.problem, self.chunk = problem, chunk
        self.shape = problem.kernel_shape()
        self._mirror = swap_kernel_sides(problem.ndim, problem.trace_axes, problem.diagonal_axes)

    def pieces(self, rows: slice, cols: slice, tile: Tensor | None = None) -> list[tuple[Index, Tensor | None]]:
        """Where a tile lands: ``[(index, values)]``; the mirror too for an off-diagonal tile of ``x2=None``."""
        if self.problem.paired:
            return [((rows,), tile)]
        if self.problem.x2 is None and rows != cols:
            return [((rows, cols), tile), ((cols, rows), None if tile is None else tile.permute(self._mirror))]
        return [((rows, cols), tile)]

    def is_done(self, rows: slice, cols: slice) -> bool:
        return False

    def check_writable(self) -> None:
        """Raise before any work when tiles are missing and the store cannot take them."""

    def write(self, rows: slice, cols: slice, tile: Tensor) -> None:
        raise NotImplementedError

    def result(self) -> Tensor:
        raise NotImplementedError


class TensorStore(KernelStore):
    """A new tensor, the caller's tensor, or a tensor view of the caller's in-memory numpy array."""

    def __init__(self, problem: NTKProblem, chunk: int, kernel: Tensor, callers: bool = True) -> None:
        super().__init__(problem, chunk)
        self.kernel, self.callers = kernel, callers
        self.destination: Tensor | None = None

    def summed_by_ranks(self) -> Tensor:
        """The zeroed tensor this rank writes its tiles into, which the ranks' ``all_reduce`` then sums. For the
        caller's ``out=`` it is a private one, copied into ``out`` by :meth:`result`: an ``out`` whose memory the
        ranks share (a slot of a memmap, shared memory handed to spawned ranks) was added to itself (2× the kernel),
        and one laid out otherwise on another rank (a transposed view) was reduced entry by wrong entry."""
        if self.callers:
            self.destination = self.kernel
            self.kernel = torch.zeros(self.shape, dtype=self.kernel.dtype, device=self.kernel.device)
        else:
            self.kernel.zero_()
        return self.kernel

    def write(self, rows: slice, cols: slice, tile: Tensor) -> None:
        for index, values in self.pieces(rows, cols, tile):
            self.kernel[index] = values

    def result(self) -> Tensor:
        if self.destination is None:
            return self.kernel
        self.destination.copy_(self.kernel)  # every rank writes the same values: shared memory takes them twice
        self.kernel, self.destination = self.destination, None
        return self.kernel


def _checksum(pieces: list[tuple[Index, np.ndarray]]) -> str:
    digest = hashlib.sha256()
    for index, values in pieces:
        digest.update(repr([(s.start, s.stop) for s in index]).encode())
        digest.update(np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()[:32]


class JournaledStore(KernelStore):
    """A store that records finished tiles by checksum (see the module docstring); subclasses move the bytes."""

    def tile_name(self, rows: slice, cols: slice) -> str:
        return f"{rows.start}" if self.problem.paired else f"{rows.start}-{cols.start}"

    def is_done(self, rows: slice, cols: slice) -> bool:
        recorded = self.recorded(rows, cols)
        if recorded is None:
            return False
        try:
            stored = _checksum([(index, self.read(index)) for index, _ in self.pieces(rows, cols)])
        except ValueError:  # an unreadable (corrupt, short) piece is not done
            return False
        return stored == recorded

    def refuse_unseen(self) -> None:
        """Finished tiles of a model whose fingerprint could not see everything (``uncertain``) are another model's
        as far as anyone can tell: a path store raises, a memmap's journal is forgotten (all recomputed). Recomputing
        one tile to compare did not tell: two models may differ on other examples only."""
        self.foreign(
            f"or may: the model holds attributes the fingerprint cannot see ({', '.join(self.uncertain[:3])}), so "
            "tiles finished earlier cannot be told from another model's. Hold such settings as numbers, tensors or "
            "objects of your own classes, or start a new store"
        )

    def foreign(self, why: str) -> None:
        """A store found to belong to another problem: path stores raise; a memmap's journal is forgotten."""

    def write(self, rows: slice, cols: slice, tile: Tensor) -> None:
        self.check_writable()
        dtype = numpy_dtype(self.problem.out_dtype)
        pieces = [
            (index, v.detach().cpu().numpy().astype(dtype, copy=False)) for index, v in self.pieces(rows, cols, tile)
        ]
        with self.lock(rows, cols):
            if self.is_done(rows, cols):  # another writer finished it meanwhile: leave its bytes alone
                return
            for index, values in pieces:
                self.store(index, values)
            self.sync()
            self.record(rows, cols, _checksum(pieces))  # only after the values are on the store

    @contextlib.contextmanager
    def lock(self, rows: slice, cols: slice) -> Iterator[None]:
        yield

    # What subclasses implement.
    def read(self, index: Index) -> np.ndarray:
        raise NotImplementedError

    def store(self, index: Index, values: np.ndarray) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        pass

    def recorded(self, rows: slice, cols: slice) -> str | None:
        raise NotImplementedError

    def record(self, rows: slice, cols: slice, checksum: str) -> None:
        raise NotImplementedError


def new_header(problem: NTKProblem, chunk: int, tag: str) -> dict[str, Any]:
    """The header of a store for ``problem``; ``"uncertain"`` (not compared) lists what the fingerprint missed."""
    fingerprint = architecture(problem.model)
    return {
        "uncertain": list(fingerprint.uncertain),
        "format": FORMAT,
        "producer": _producer(),
        "key": store_key(problem, fingerprint),
        "outputs": output_projections(problem),
        "shape": list(problem.kernel_shape()),
        "dtype": numpy_dtype(problem.out_dtype).str,
        "chunk": chunk,
        "method": tag,
    }


def mismatch(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The parts of a saved header that differ from this problem's (empty when it is this problem's store)."""
    if not isinstance(saved, dict) or saved.get("format") != wanted["format"]:
        return [f"the store format ({saved.get('format') if isinstance(saved, dict) else saved!r})"]
    key = saved.get("key") if isinstance(saved.get("key"), dict) else {}
    differ = [part for part in wanted["key"] if key.get(part) != wanted["key"][part]]
    differ += [part for part in ("shape", "dtype") if saved.get(part) != wanted[part]]
    dtype = getattr(torch, str(wanted["key"].get("dtype", "")).removeprefix("torch."), torch.float32)
    if not differ and not same_outputs(saved.get("outputs"), wanted["outputs"], dtype):
        differ.append("the model's outputs or gradients on these examples (a change the fingerprint cannot see)")
    return differ


def adopt_chunk(saved: int, chunk: int, chunk_is_explicit: bool) -> int | None:
    """The tile size of a resumed store: its own, unless the caller asked for another one or memory cannot take it."""
    if saved == chunk or (not chunk_is_explicit and isinstance(saved, int) and 0 < saved <= chunk):
        return saved
    return None


def _umask() -> int:
    """The process's umask, read without setting it (``os.umask`` sets it: other threads would create files under
    the value set meanwhile)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def user_file(prefix: str, directory: str, suffix: str = "") -> tuple[int, str]:
    """``tempfile.mkstemp``, with the permissions an ``open()`` would give (mkstemp's are 0600: other users, or
    ranks under another account, could not read the kernel)."""
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=suffix)
    os.fchmod(handle, 0o666 & ~_umask())
    return handle, temporary


def _write_json_atomic(path: str, record: Any, exclusive: bool = False) -> bool:
    """Publish ``record`` at ``path`` by rename (or, ``exclusive``, by link: False when ``path`` already exists)."""
    directory = os.path.dirname(path)
    handle, temporary = user_file(".tmp-", directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(record, file)
            file.flush()
            os.fsync(file.fileno())
        if not exclusive:
            os.replace(temporary, path)
            return True
        try:
            os.link(temporary, path)
            return True
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError:
        return None
    except ValueError:
        return {"format": "unreadable"}


class FileJournal:
    """``<directory>/store.json`` (the header), ``tiles/<tile>`` (one checksum per finished tile, written by rename),
    ``locks/<tile>`` (per-tile ``flock``). Per-tile files: concurrent writers never lose each other's records."""

    def __init__(self, directory: str, header: dict[str, Any], chunk_is_explicit: bool, refuse: str | None) -> None:
        """Open or create the journal; ``refuse`` names the store in the error for a foreign header, or ``None`` to
        discard a foreign journal instead."""
        self.directory = directory
        try:
            for sub in ("tiles", "locks"):
                os.makedirs(os.path.join(directory, sub), exist_ok=True)
        except OSError as error:
            raise PermissionError(
                f"cannot create the tile journal {directory}: {error}. out= needs a writable directory beside it."
            ) from error
        path = os.path.join(directory, "store.json")
        saved = _read_json(path)
        if saved is None:
            # No header: tile records left from another problem (the header deleted by hand) would be trusted as this
            # one's, their checksums matching the old values (0.34 off). Forgotten before the header is published:
            # a concurrent creator's first records are at worst recomputed.
            self.forget()
            if _write_json_atomic(path, header, exclusive=True):
                saved = header
        saved = saved if saved is not None else _read_json(path)
        differ = mismatch(saved, header)
        chunk = adopt_chunk(saved.get("chunk"), header["chunk"], chunk_is_explicit) if not differ else None
        if chunk is None and refuse is not None:
            if differ:
                raise ValueError(
                    f"{refuse} holds a kernel of another problem ({', '.join(differ)} differ): refusing to mix it "
                    f"with this one. Pass another path, or delete {refuse} and {directory} to start over."
                )
            raise ValueError(
                f"{refuse} was written in tiles of {saved.get('chunk')} examples, this call uses {header['chunk']} "
                f"(chunk_size or max_memory): pass chunk_size={saved.get('chunk')} (with enough max_memory) to "
                f"resume it, or delete {refuse} and {directory} to start over."
            )
        if chunk is None:  # an anonymous memmap's foreign journal: forget its tiles
            self.forget()
            _write_json_atomic(path, header)
            chunk = header["chunk"]
        self.chunk: int = chunk

    def forget(self) -> None:
        """Drop every finished-tile record."""
        for name in os.listdir(os.path.join(self.directory, "tiles")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.directory, "tiles", name))

    def recorded(self, name: str) -> str | None:
        checksum = _read_json(os.path.join(self.directory, "tiles", name))
        return checksum if isinstance(checksum, str) else None

    def record(self, name: str, checksum: str) -> None:
        _write_json_atomic(os.path.join(self.directory, "tiles", name), checksum)

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        with open(os.path.join(self.directory, "locks", name), "a") as file:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(file.fileno(), fcntl.LOCK_UN)


class FileJournaledStore(JournaledStore):
    journal: FileJournal

    def recorded(self, rows: slice, cols: slice) -> str | None:
        return self.journal.recorded(self.tile_name(rows, cols))

    def record(self, rows: slice, cols: slice, checksum: str) -> None:
        self.journal.record(self.tile_name(rows, cols), checksum)

    def lock(self, rows: slice, cols: slice) -> contextlib.AbstractContextManager[None]:
        return self.journal.lock(self.tile_name(rows, cols))


class MemmapStore(FileJournaledStore):
    """The caller's file-backed ``np.memmap``; journal in ``<file>.torchntk/``, discarded when foreign."""

    def __init__(self, problem: NTKProblem, chunk: int, out: np.memmap, tag: str, chunk_is_explicit: bool) -> None:
        super().__init__(problem, chunk)
        self.out, self.kernel = out, torch.from_numpy(out)
        header = new_header(problem, chunk, tag)
        self.uncertain = tuple(header["uncertain"])
        self.journal = FileJournal(f"{out.filename}{JOURNAL_SUFFIX}", header, chunk_is_explicit, refuse=None)
        self.chunk = self.journal.chunk

    def foreign(self, why: str) -> None:
        self.journal.forget()

    def read(self, index: Index) -> np.ndarray:
        return np.array(self.out[index])

    def store(self, index: Index, values: np.ndarray) -> None:
        self.out[index] = values

    def sync(self) -> None:
        self.out.flush()

    def result(self) -> Tensor:
        return self.kernel


def _check_array(out: np.ndarray, problem: NTKProblem) -> None:
    shape, expected = problem.kernel_shape(), numpy_dtype(problem.out_dtype)
    if out.shape != shape or out.dtype != expected:
        raise ValueError(
            f"out= is a numpy array of shape {out.shape} and dtype {out.dtype}; this kernel needs shape {shape} "
            f"and dtype {expected}, e.g. np.lib.format.open_memmap(path, 'w+', {expected.name}, {shape})."
        )
    mode = getattr(out, "mode", None)
    if mode in ("c", "copyonwrite"):
        raise ValueError(
            "out= is a copy-on-write memmap (mmap_mode='c'): its values never reach the file, so a resumed run "
            "would find nothing. Open it with mmap_mode='r+' (np.load(path, mmap_mode='r+')), or pass out='k.npy'."
        )
    if mode in ("r", "readonly") or not out.flags.writeable:
        raise ValueError(
            "out= is read-only (a memmap opened with mode 'r', or a non-writeable array); open it with "
            "mmap_mode='r+' (or np.lib.format.open_memmap(path, 'r+')) so that the kernel can be written into it."
        )
    if not out.flags.c_contiguous:
        raise ValueError("out= must be a writeable, C-contiguous numpy array or memmap.")


def _may_overlap(out: Tensor) -> bool:
    """Whether two elements of ``out`` may share memory: stride 0 (an expanded tensor) or strides that overlap
    (``as_strided``). Sorted by stride, each axis must step past the whole of the axes below it; where it does not,
    the offsets are counted (up to 2**24 elements; more are taken to overlap)."""
    axes = sorted((stride, size) for stride, size in zip(out.stride(), out.shape, strict=True) if size > 1)
    span = 1
    for stride, size in axes:
        if stride < span:
            break
        span = stride * size
    else:
        return False
    if out.numel() > 2**24:
        return True
    offsets = sum(
        torch.arange(size).reshape([-1 if i == axis else 1 for i in range(out.ndim)]) * stride
        for axis, (stride, size) in enumerate(zip(out.stride(), out.shape, strict=True))
    )
    return int(torch.as_tensor(offsets).reshape(-1).unique().numel()) < out.numel()


def _check_destination(problem: NTKProblem, out: Tensor) -> None:
    """``out=`` must be memory of its own: tiles are written while later tiles still read the inputs and weights (an
    ``out`` sharing memory with ``x1`` or a weight gave kernels 0.2-1.7 off, and wrote into the weights)."""
    if out.requires_grad:
        raise ValueError(
            "out= requires grad; the kernel is written into it in place: pass a plain tensor (torch.empty)."
        )
    if _may_overlap(out):
        raise ValueError(
            "out= has elements that share memory (an expanded tensor, stride 0, or overlapping strides); pass "
            "torch.empty(...)."
        )
    start = out.untyped_storage().data_ptr()
    stop = start + out.untyped_storage().nbytes()
    model = problem.model
    others = [
        *((f"x1[{i}]", t) for i, t in enumerate(problem.x1)),
        *((f"x2[{i}]", t) for i, t in enumerate(problem.x2 or ())),
        *((f"parameter {n!r}", t) for n, t in [*model.named_parameters(), *problem.params.items()]),
        *((f"buffer {n!r}", t) for n, t in model.named_buffers()),
    ]
    for name, tensor in others:
        if not isinstance(tensor, Tensor) or tensor.device != out.device:
            continue  # a dataset's column, or memory of another device
        begin = tensor.untyped_storage().data_ptr()
        if begin < stop and start < begin + tensor.untyped_storage().nbytes():
            raise ValueError(
                f"out= shares memory with {name}: writing the kernel into it would change {name} while later tiles "
                "still read it. Pass a tensor of its own, e.g. torch.empty(...)."
            )


def _output_tensor(problem: NTKProblem, out: Tensor | np.ndarray | None) -> Tensor:
    """The in-memory destination: a new tensor, ``out`` itself, or a tensor view of a numpy array."""
    shape = problem.kernel_shape()
    if out is None:
        return torch.empty(shape, dtype=problem.out_dtype, device=problem.device)
    if isinstance(out, np.ndarray):
        return torch.from_numpy(out)
    if tuple(out.shape) != shape or out.dtype != problem.out_dtype or out.device != problem.device:
        raise ValueError(
            f"out= is a tensor of shape {tuple(out.shape)}, {out.dtype} on {out.device}; this kernel needs shape "
            f"{shape}, {problem.out_dtype} on {problem.device}: torch.empty({shape}, dtype={problem.out_dtype})."
        )
    _check_destination(problem, out)
    return out


def output_kind(out: Any) -> str:
    """Where ``out=`` puts a kernel, as ranks must agree on: a file every rank writes into, or a tensor per rank
    that one ``all_reduce`` completes (a rank with a file and one without waited on each other until a timeout)."""
    if isinstance(out, str | os.PathLike):
        return "a file store every rank opens"
    if isinstance(out, np.memmap) and out.filename and isinstance(out.base, mmap.mmap):
        return "a memory-mapped file every rank opens"
    return "a tensor per rank"


def open_store(out: Any, problem: NTKProblem, chunk: int, tag: str, chunk_is_explicit: bool = False) -> KernelStore:
    """The store for ``out=`` (see the module docstring), validated before any tile is computed.

    ``chunk`` is the tile size this call would use and ``chunk_is_explicit`` whether the caller fixed it; a store
    being resumed may answer with its own tile size (``store.chunk``). ``tag`` names the method in new headers.
    """
    if isinstance(out, os.PathLike):
        out = os.fspath(out)
    if isinstance(out, str):
        if out.rstrip("/").endswith(".zarr"):
            from torchntk._zarr_store import ZarrStore  # imports zarr: only when asked for

            return ZarrStore(problem, chunk, out, tag, chunk_is_explicit)
        if out.endswith(".npy"):
            from torchntk._npy_store import NpyStore

            return NpyStore(problem, chunk, out, tag, chunk_is_explicit)
        raise ValueError(f"out={out!r} is a path of unknown kind; use a name ending in .npy or .zarr.")
    if isinstance(out, np.ndarray):
        _check_array(out, problem)
        _check_destination(problem, torch.from_numpy(out))
        if isinstance(out, np.memmap) and out.filename and isinstance(out.base, mmap.mmap):
            return MemmapStore(problem, chunk, out, tag, chunk_is_explicit)
        return TensorStore(problem, chunk, _output_tensor(problem, out))  # in memory, or a view of a memmap
    if isinstance(out, Tensor) or out is None:
        return TensorStore(problem, chunk, _output_tensor(problem, out), callers=out is not None)
    raise TypeError(
        f"out= must be a torch.Tensor, a numpy array/memmap, or a path ending in .npy or .zarr; "
        f"got {type(out).__name__}."
    )
