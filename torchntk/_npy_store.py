"""``out="kernel.npy"``: a kernel in a ``.npy`` file that several processes (and machines) write tile by tile.

Tiles go to the file with ``pwrite`` at their exact byte ranges and are read back with ``pread``: no shared memory
map, whose page-sized write-back could return another machine's stale bytes around a tile on a network file
system. The journal is ``<path>.torchntk/`` (:class:`torchntk._store.FileJournal`); see :mod:`torchntk._store`.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
from torch import Tensor

from torchntk._problem import NTKProblem
from torchntk._store import JOURNAL_SUFFIX, FileJournal, FileJournaledStore, Index, new_header, numpy_dtype, user_file


def _create(path: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """A sparse ``.npy`` of zeros, published by link: concurrent creators agree on one file."""
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = user_file(".tmp-", directory, ".npy")
    os.close(handle)
    try:
        created = np.lib.format.open_memmap(temporary, "w+", dtype, shape)
        created.flush()
        del created
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        os.unlink(temporary)


def _layout(path: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a C-ordered ``.npy``; a clear error for anything else."""
    try:
        with open(path, "rb") as file:
            version = np.lib.format.read_magic(file)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(file)
            offset = file.tell()
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(
            f"out={path!r} is not a readable .npy file ({error}); pass another path, or delete it to start over."
        ) from error
    if fortran:
        raise ValueError(f"out={path!r} is Fortran-ordered; torchntk writes C-ordered .npy files: use another path.")
    return tuple(shape), dtype, offset


class NpyStore(FileJournaledStore):
    """A ``.npy`` file at ``path``, created when missing (with its journal first); refused when written for another
    problem, or by someone else (a file without a journal)."""

    def __init__(self, problem: NTKProblem, chunk: int, path: str, tag: str, chunk_is_explicit: bool) -> None:
        super().__init__(problem, chunk)
        self.path, self.dtype = path, numpy_dtype(problem.out_dtype)
        journal = f"{path}{JOURNAL_SUFFIX}"
        if os.path.isdir(path):
            raise IsADirectoryError(f"out={path!r} is a directory; pass the path of a .npy file to create or resume.")
        # The journal is created before the file (below), so a file without one is someone else's: never overwrite
        # a user's array (np.save overwrites; an out= that resumes must not). Ranks opening the path together see
        # the file only after its creator made the journal.
        if os.path.exists(path) and not os.path.isdir(journal):
            raise FileExistsError(
                f"out={path!r} exists and was not written by torchntk (it has no tile journal {journal}): refusing "
                f"to overwrite it. Pass another path, delete it, or pass np.load({path!r}, mmap_mode='r+') to have "
                f"the kernel written into that array."
            )
        header = new_header(problem, chunk, tag)
        self.uncertain = tuple(header["uncertain"])
        self.journal = FileJournal(journal, header, chunk_is_explicit, refuse=repr(path))
        self.chunk = self.journal.chunk
        if not os.path.exists(path):
            _create(path, self.shape, self.dtype)
        shape, dtype, self.offset = _layout(path)
        if shape != self.shape or dtype != self.dtype:
            raise ValueError(
                f"out={path!r} holds an array of shape {shape} and dtype {dtype}; this kernel needs shape "
                f"{self.shape} and dtype {self.dtype}. Pass another path, or delete it (and {path}{JOURNAL_SUFFIX})."
            )
        need = self.offset + int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        size = os.path.getsize(path)
        if size != need:
            raise ValueError(
                f"out={path!r} is truncated or damaged: {size:,} bytes, but a {self.shape} {self.dtype} .npy needs "
                f"{need:,}. Delete it (and {path}{JOURNAL_SUFFIX}) to start over."
            )
        self.writable = os.access(path, os.W_OK)
        self.fd = os.open(path, os.O_RDWR if self.writable else os.O_RDONLY)
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._pair_bytes = int(np.prod(self.shape[2:], dtype=np.int64)) * self.dtype.itemsize

    def __del__(self) -> None:
        with contextlib.suppress(AttributeError, OSError):
            os.close(self.fd)

    def foreign(self, why: str) -> None:
        raise ValueError(
            f"out={self.path!r} holds a kernel of another problem ({why}): refusing to mix it with this one. Pass "
            f"another path, or delete it and {self.path}{JOURNAL_SUFFIX} to start over."
        )

    def check_writable(self) -> None:
        journal = [os.path.join(self.journal.directory, sub) for sub in ("tiles", "locks")]
        if self.writable and not all(os.access(d, os.W_OK | os.X_OK) for d in journal):
            raise PermissionError(
                f"out={self.path!r}: its tile journal {self.journal.directory} is read-only and tiles of the kernel "
                "are missing; make it writable (chmod -R u+w) or pass another path."
            )
        if not self.writable:
            raise PermissionError(
                f"out={self.path!r} is read-only and tiles of the kernel are missing; make it writable "
                f"(chmod u+w) or pass another path."
            )

    def _runs(self, index: Index) -> list[tuple[int, int]]:
        """``(file offset, bytes)`` of each contiguous run of ``kernel[index]``, in C order."""
        rows = index[0]
        if len(index) == 1 or (index[1].start == 0 and index[1].stop == self.shape[1]):
            return [(self.offset + rows.start * self._row_bytes, (rows.stop - rows.start) * self._row_bytes)]
        cols = index[1]
        width = (cols.stop - cols.start) * self._pair_bytes
        start = self.offset + cols.start * self._pair_bytes
        return [(start + i * self._row_bytes, width) for i in range(rows.start, rows.stop)]

    def _piece_shape(self, index: Index) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in index) + self.shape[len(index) :]

    def read(self, index: Index) -> np.ndarray:
        data = bytearray()
        for offset, size in self._runs(index):
            chunk = os.pread(self.fd, size, offset)
            if len(chunk) != size:
                raise ValueError(f"{self.path} is shorter than its header says")
            data += chunk
        return np.frombuffer(data, dtype=self.dtype).reshape(self._piece_shape(index))

    def store(self, index: Index, values: np.ndarray) -> None:
        view = memoryview(np.ascontiguousarray(values, dtype=self.dtype)).cast("B")
        position = 0
        for offset, size in self._runs(index):
            written = 0
            while written < size:
                written += os.pwrite(self.fd, view[position + written : position + size], offset + written)
            position += size

    def sync(self) -> None:
        os.fsync(self.fd)

    def result(self) -> Tensor:
        """The kernel as a tensor over a memory map of the file (copy-on-write when the file is read-only)."""
        return torch.from_numpy(np.load(self.path, mmap_mode="r+" if self.writable else "c"))
