"""``out="kernel.zarr"`` (a local path or an fsspec URL such as ``s3://bucket/kernel.zarr``): a Zarr group.

``kernel``: the kernel, one chunk per tile, NaN where no tile was written. ``tiles``: per tile the checksum of its
values (two uint64, zero when not finished), one chunk (one object) per tile, so that concurrent writers never
overwrite each other's records. The group's attribute ``torchntk`` is the header (format, producer, key, shape,
dtype, tile size); see :mod:`torchntk._store` for what makes the journal trustworthy. Zarr writes whole chunk
objects (a rename on a local disk, one PUT on object storage), so a tile is never half written.
"""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import torch
import zarr
from torch import Tensor

from torchntk._problem import NTKProblem
from torchntk._store import Index, JournaledStore, adopt_chunk, mismatch, new_header, numpy_dtype

_ATTRIBUTE = "torchntk"
_ARRAYS = {"kernel", "tiles"}


def _open_group(url: str) -> tuple[zarr.Group, bool]:
    """The group at ``url`` (created when missing) and whether it is writable. Writers opening one new store at
    once all get the group that the first of them created, never an error."""
    try:
        return zarr.open_group(url, mode="a"), True
    except zarr.errors.ContainsGroupError:  # created by another writer between zarr's look and its create
        return zarr.open_group(url, mode="r+"), True
    except (PermissionError, OSError):
        return zarr.open_group(url, mode="r"), False


def _writable_tree(path: str) -> bool:
    """Whether this process may create files in ``path`` and every directory below it."""
    return all(os.access(root, os.W_OK | os.X_OK) for root, _, _ in os.walk(path))


def _member_names(group: zarr.Group) -> set[str]:
    """The group's arrays and groups (without zarr's warnings about a concurrent writer's temporary files)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
        return set(group.keys())


class ZarrStore(JournaledStore):
    """A Zarr group at ``url``, created when missing; refused when written for another problem."""

    def __init__(self, problem: NTKProblem, chunk: int, url: str, tag: str, chunk_is_explicit: bool) -> None:
        super().__init__(problem, chunk)
        self.url, self.dtype = url, numpy_dtype(problem.out_dtype)
        header = new_header(problem, chunk, tag)
        self.uncertain = tuple(header["uncertain"])
        group, self.writable = _open_group(url)
        saved = group.attrs.get(_ATTRIBUTE)
        if saved is None:
            names = _member_names(group)
            if names - _ARRAYS:
                raise ValueError(
                    f"out={url!r} is a Zarr group that torchntk did not write ({sorted(names)[:4]}); pass another path."
                )
            if names:  # another writer is creating this store: its header follows its arrays
                saved = self._await_header()
            elif not self.writable:
                raise PermissionError(f"out={url!r} is read-only and empty; pass a writable path.")
            else:
                saved = self._create(group, header)
        differ = mismatch(saved, header)
        if differ:
            raise ValueError(
                f"out={url!r} holds a kernel of another problem ({', '.join(differ)} differ): refusing to mix it "
                "with this one. Pass another path, or delete it to start over."
            )
        adopted = adopt_chunk(saved.get("chunk"), chunk, chunk_is_explicit)
        if adopted is None:
            raise ValueError(
                f"out={url!r} was written in tiles of {saved.get('chunk')} examples, this call uses {chunk} "
                f"(chunk_size or max_memory): pass chunk_size={saved.get('chunk')} (with enough max_memory) to resume "
                "it, or delete it to start over."
            )
        self.chunk = adopted
        self.kernel, self.tiles = group["kernel"], group["tiles"]

    def _create(self, group: zarr.Group, header: dict) -> dict:
        """Create the arrays and then the header; the header found when another process created them first."""
        tile = (self.chunk,) if self.problem.paired else (self.chunk, self.chunk)
        grid = tuple(-(-n // self.chunk) for n in self.shape[: len(tile)])
        try:  # never overwrite: a concurrent creator may already be writing tiles into them
            group.create_array(
                "kernel", shape=self.shape, chunks=tile + self.shape[len(tile) :], dtype=self.dtype, fill_value=np.nan
            )
            group.create_array("tiles", shape=(*grid, 2), chunks=(1,) * len(grid) + (2,), dtype="uint64", fill_value=0)
        except zarr.errors.ContainsArrayError:
            return self._await_header()
        group.attrs[_ATTRIBUTE] = header  # last: a group with the header is complete
        return header

    def _await_header(self) -> dict:
        """The header that a concurrent creator writes right after its arrays; refused when it never comes."""
        for _ in range(600):
            saved = zarr.open_group(self.url, mode="r").attrs.get(_ATTRIBUTE)
            if saved is not None:
                return saved
            time.sleep(0.05)
        raise ValueError(f"out={self.url!r} has arrays but no torchntk header; delete it to start over.")

    def foreign(self, why: str) -> None:
        raise ValueError(
            f"out={self.url!r} holds a kernel of another problem ({why}): refusing to mix it with this one. Pass "
            "another path, or delete it to start over."
        )

    def check_writable(self) -> None:
        # zarr opens an existing read-only local group for appending without complaint: its chunk directories say
        local = None if "://" in self.url else self.url
        if not self.writable or (local is not None and os.path.isdir(local) and not _writable_tree(local)):
            raise PermissionError(
                f"out={self.url!r} is read-only and tiles of the kernel are missing; make it writable (chmod -R u+w) "
                "or pass another path."
            )

    def _cell(self, rows: slice, cols: slice) -> tuple[int, ...]:
        if self.problem.paired:
            return (rows.start // self.chunk,)
        return (rows.start // self.chunk, cols.start // self.chunk)

    def read(self, index: Index) -> np.ndarray:
        try:
            return np.asarray(self.kernel[index])
        except Exception as error:  # noqa: BLE001 - a damaged chunk object is a tile to recompute
            raise ValueError(f"tile {index} of {self.url} is unreadable: {error}") from error

    def store(self, index: Index, values: np.ndarray) -> None:
        self.kernel[index] = values

    def recorded(self, rows: slice, cols: slice) -> str | None:
        words = np.asarray(self.tiles[self._cell(rows, cols)], dtype=np.uint64)
        return None if not words.any() else f"{int(words[0]):016x}{int(words[1]):016x}"

    def record(self, rows: slice, cols: slice, checksum: str) -> None:
        words = np.array([int(checksum[:16], 16), int(checksum[16:32], 16)], dtype=np.uint64)
        self.tiles[self._cell(rows, cols)] = words

    def result(self) -> Tensor:
        """The whole kernel, read into memory (for one larger than memory, read ``kernel`` by slices with zarr)."""
        return torch.from_numpy(np.asarray(self.kernel[...]))
