"""Inputs read tile by tile from a map-style ``torch.utils.data.Dataset``: for inputs that do not fit in memory.

``torchntk.ntk(model, dataset)`` (or ``DatasetInputs(dataset, input_key=0, num_workers=4)`` for the options) gives
the NTK problem one :class:`DatasetColumn` per model input instead of a tensor. A column answers what the NTK
methods ask of an input batch — ``shape`` ``(N, *example)``, ``dtype``, ``device``, ``ndim`` and indexing by an
int or a slice, which returns a real tensor — and reads the examples asked for through a ``DataLoader`` whose
persistent workers load them in parallel. Only the examples of the tiles in flight are in memory.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

InputKey = int | str | Sequence[int | str] | None

# Examples read per DataLoader pass when every example is read once (the fingerprint of the inputs).
_SCAN_CHUNK = 256
# Bytes of the hash of one example's content, kept per example to tell a second read from the first.
_EXAMPLE_DIGEST = 16


class DatasetInputs:
    """A map-style ``Dataset`` as ``x1``/``x2`` of :func:`torchntk.ntk`, with how to read it.

    Args:
        dataset: a map-style ``torch.utils.data.Dataset`` (``__len__`` and ``__getitem__``; not an
            ``IterableDataset``) whose item is a tensor, a tuple of tensors (a multi-input model), or a record such
            as ``(inputs, target)`` of which ``input_key`` selects the inputs.
        input_key: which part of an item the model takes: ``None`` (the whole item), an index or a dict key
            (``0`` for ``(image, label)`` items), or a tuple of them (several inputs).
        num_workers: ``DataLoader`` worker processes reading the examples of a tile in parallel (0: this process).
        dtype: cast the floating inputs to this floating dtype (e.g. ``torch.float64`` for a float64 model); integer
            and boolean inputs (token ids, masks) are kept as they are. ``None`` keeps the dataset's dtypes.
    """

    def __init__(
        self, dataset: Dataset, *, input_key: InputKey = None, num_workers: int = 0, dtype: torch.dtype | None = None
    ) -> None:
        if isinstance(dataset, IterableDataset) or not isinstance(dataset, Dataset):
            raise TypeError(
                f"DatasetInputs needs a map-style torch.utils.data.Dataset (with __len__ and __getitem__), got "
                f"{type(dataset).__name__}; an IterableDataset cannot be read tile by tile: materialise it, or wrap "
                "it in a map-style Dataset."
            )
        if not hasattr(dataset, "__len__"):
            raise TypeError(f"the dataset {type(dataset).__name__} has no __len__: torchntk needs its size N.")
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}.")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.float64) or None, got {dtype!r}.")
        self.dataset, self.input_key, self.num_workers, self.dtype = dataset, input_key, num_workers, dtype


def is_dataset(x: Any) -> bool:
    return isinstance(x, DatasetInputs | Dataset) and not isinstance(x, Tensor)


def _as_tensor(value: Any, where: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, bool | int | float | np.number):  # a label as torchvision's datasets give it (default_collate)
        return torch.as_tensor(value)
    raise TypeError(
        f"{where} is a {type(value).__name__}, not a tensor: an item must be a tensor, a tuple of tensors, or a "
        "record whose inputs DatasetInputs(dataset, input_key=...) selects (e.g. input_key=0 for (image, label))."
    )


def select_inputs(item: Any, input_key: InputKey, where: str) -> tuple[Tensor, ...]:
    """The model inputs of one dataset item (see :class:`DatasetInputs`)."""
    if input_key is None:
        parts = item if isinstance(item, tuple | list) else (item,)
        return tuple(_as_tensor(part, f"{where}[{i}]") for i, part in enumerate(parts))
    keys = input_key if isinstance(input_key, tuple | list) else (input_key,)
    selected = []
    for key in keys:
        try:
            selected.append(_as_tensor(item[key], f"{where}[{key!r}]"))
        except (KeyError, IndexError, TypeError) as error:
            if isinstance(error, TypeError) and "not a tensor" in str(error):
                raise
            raise ValueError(
                f"input_key={input_key!r} does not select from {where} ({type(item).__name__}): {error}."
            ) from None
    return tuple(selected)


class _SelectedInputs(Dataset):
    """The dataset's items reduced to the model inputs (in the DataLoader's workers)."""

    def __init__(self, dataset: Dataset, input_key: InputKey, dtype: torch.dtype | None) -> None:
        self.dataset, self.input_key, self.dtype = dataset, input_key, dtype

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        inputs = select_inputs(self.dataset[index], self.input_key, f"dataset item {index}")
        return tuple(x.to(self.dtype) if self.dtype is not None and x.is_floating_point() else x for x in inputs)


class _NextBatches(Sampler):
    """A batch sampler whose batches are set before each pass (the sampler runs in the main process)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _stack(items: list[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    return tuple(torch.stack(column) for column in zip(*items, strict=True))


class DatasetSource:
    """Reads examples ``[start, stop)`` of a dataset as batched tensors on ``device`` (the last read is kept)."""

    def __init__(self, inputs: DatasetInputs, name: str) -> None:
        self.inputs, self.name = inputs, name
        self.selected = _SelectedInputs(inputs.dataset, inputs.input_key, inputs.dtype)
        self.size = len(inputs.dataset)
        if self.size == 0:
            raise ValueError(f"{name} is an empty dataset; pass at least one example.")
        self.device = torch.device("cpu")
        self.sampler = _NextBatches()
        self.loader: DataLoader | None = None
        self.last: tuple[tuple[int, int], tuple[Tensor, ...]] | None = None
        self.digests: list[str] | None = None
        # Each example's content at its first read (16 bytes each), checked at every later read (see _same_as_before)
        self.seen = np.zeros(self.size, dtype=bool)
        self.contents = np.zeros((self.size, _EXAMPLE_DIGEST), dtype=np.uint8)
        first = self.selected[0]
        self.example_shapes = [tuple(x.shape) for x in first]
        self.dtypes = [x.dtype for x in first]
        self._same_as_before(0, tuple(x[None] for x in first))

    def read(self, start: int, stop: int) -> tuple[Tensor, ...]:
        """Examples ``start:stop`` of every input: ``(Tensor[stop - start, *example_i], ...)``."""
        if self.last is not None and self.last[0] == (start, stop):
            return self.last[1]
        workers = self.inputs.num_workers
        per_batch = max(1, math.ceil((stop - start) / max(workers, 1)))
        self.sampler.batches = [list(range(i, min(i + per_batch, stop))) for i in range(start, stop, per_batch)]
        if self.loader is None:
            self.loader = DataLoader(
                self.selected,
                batch_sampler=self.sampler,
                num_workers=workers,
                collate_fn=_stack,
                persistent_workers=workers > 0,
            )
        parts = list(self.loader)
        batch = tuple(torch.cat(column) for column in zip(*parts, strict=True))
        for i, x in enumerate(batch):
            if tuple(x.shape[1:]) != self.example_shapes[i] or x.dtype != self.dtypes[i]:
                raise ValueError(
                    f"{self.name}: examples {start}..{stop - 1} have input {i} of shape {tuple(x.shape[1:])} and dtype "
                    f"{x.dtype}, but example 0 has {self.example_shapes[i]}, {self.dtypes[i]}; every item must have "
                    "inputs of one shape and dtype."
                )
        self._same_as_before(start, batch)
        batch = tuple(x.to(self.device) for x in batch)
        self.last = ((start, stop), batch)
        return batch

    def _same_as_before(self, start: int, batch: tuple[Tensor, ...]) -> None:
        """Record examples ``start...`` at their first read; a later read that differs raises. Tiles read an example
        several times (its row and its column of tiles): a dataset with random items (augmentations) gave each tile
        another version of it, and a kernel of mixed draws came back without a word."""
        for offset in range(batch[0].shape[0]):
            digest = hashlib.blake2b(digest_size=_EXAMPLE_DIGEST)
            for x in batch:
                digest.update(x[offset].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            content = np.frombuffer(digest.digest(), dtype=np.uint8)
            index = start + offset
            if not self.seen[index]:
                self.seen[index], self.contents[index] = True, content
            elif not np.array_equal(self.contents[index], content):
                raise ValueError(
                    f"{self.name}: the dataset gave example {index} other values on a later read: its items are random "
                    "(a random transform such as RandomCrop or RandomHorizontalFlip, added noise), so the tiles of "
                    "the kernel would each see another version of it. Give torchntk a dataset with deterministic items "
                    "(evaluation transforms), or draw once and pass the tensor (torch.stack of the items)."
                )

    def digest(self, position: int) -> str:
        """SHA-256 of input ``position`` over every example (read once, for all inputs together)."""
        if self.digests is None:
            hashes = [hashlib.sha256() for _ in self.example_shapes]
            for start in range(0, self.size, _SCAN_CHUNK):
                for digest, x in zip(hashes, self.read(start, min(start + _SCAN_CHUNK, self.size)), strict=True):
                    digest.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            header = f"dataset {self.size} {self.example_shapes} {self.dtypes}"
            self.digests = [hashlib.sha256(header.encode() + h.digest()).hexdigest() for h in hashes]
        return self.digests[position]


class DatasetColumn:
    """One model input of a dataset, indexable like a ``Tensor[N, *example]`` (each index reads the examples)."""

    def __init__(self, source: DatasetSource, position: int) -> None:
        self.source, self.position = source, position

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.source.size, *self.source.example_shapes[self.position]))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.source.dtypes[self.position]

    @property
    def device(self) -> torch.device:
        return self.source.device

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def is_complex(self) -> bool:
        return self.dtype.is_complex

    def __len__(self) -> int:
        return self.source.size

    def __getitem__(self, index: int | slice) -> Tensor:
        if isinstance(index, slice):
            start, stop, step = index.indices(self.source.size)
            if step != 1:
                raise IndexError("dataset inputs are read in contiguous ranges only (slice step 1).")
            return self.source.read(start, max(start, stop))[self.position]
        if isinstance(index, int):
            position = index % self.source.size
            return self.source.read(position, position + 1)[self.position][0]
        raise IndexError(f"dataset inputs take an int or a slice, got {type(index).__name__}.")

    def digest_into(self, digest: Any) -> None:
        """Feed this input's content (every example) to a hashlib ``digest``."""
        digest.update(self.source.digest(self.position).encode())

    def __repr__(self) -> str:
        return f"DatasetColumn({self.source.name}, input {self.position}, shape {tuple(self.shape)}, {self.dtype})"


def dataset_columns(x: Dataset | DatasetInputs, name: str) -> tuple[DatasetColumn, ...]:
    """The model inputs of a dataset ``x``, one column each (see the module docstring)."""
    inputs = x if isinstance(x, DatasetInputs) else DatasetInputs(x)
    source = DatasetSource(inputs, name)
    for i, dtype in enumerate(source.dtypes):
        if dtype.is_complex:
            raise TypeError(
                f"{name}: input {i} of the dataset's items is complex ({dtype}); the NTK here is of real functions of "
                "real inputs. Return the real and imaginary parts as a real tensor (torch.view_as_real), and adapt "
                "the model."
            )
    return tuple(DatasetColumn(source, i) for i in range(len(source.example_shapes)))


def place(inputs: tuple[Any, ...], device: torch.device) -> None:
    """Read dataset inputs onto ``device`` (the parameters' device); tensors are left as they are."""
    for x in inputs:
        if isinstance(x, DatasetColumn):
            x.source.device = device
