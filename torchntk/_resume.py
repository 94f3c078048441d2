"""Resuming a kernel written into a numpy memmap: a JSON journal of finished tiles beside the file.

The journal is data only (JSON), rewritten atomically after each tile, and trusted only when its version and its
key — a SHA-256 of everything the kernel depends on (inputs, θ, layout, method, chunking) — match this run;
otherwise it is discarded and every tile is recomputed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from typing import Any

import numpy as np
import torch
from torch import Tensor

from torchntk._problem import NTKProblem

_VERSION = 1


def _digest_tensor(digest: Any, tensor: Tensor) -> None:
    if hasattr(tensor, "digest_into"):  # inputs read from a dataset (torchntk._data.DatasetColumn)
        tensor.digest_into(digest)
        return
    data = tensor.detach().cpu().contiguous().reshape(-1)
    digest.update(f"{tuple(data.shape)}{data.dtype}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")


def problem_key(problem: NTKProblem, chunk: int, tag: str) -> str:
    """SHA-256 of what the kernel's values and tiling depend on."""
    digest = hashlib.sha256()
    header = [tag, chunk, problem.kernel_shape(), str(problem.out_dtype), problem.trace_axes, problem.diagonal_axes]
    digest.update(json.dumps(header, default=str).encode())
    for name in sorted(problem.params):
        digest.update(name.encode())
        _digest_tensor(digest, problem.params[name])
    for name, buffer in problem.model.named_buffers():
        digest.update(name.encode())
        _digest_tensor(digest, buffer)
    for inputs in (problem.x1, problem.x2 or ()):
        for x in inputs:
            _digest_tensor(digest, x)
        digest.update(b"|")
    return digest.hexdigest()


class TileJournal:
    """The set of finished tiles ``(row start, column start)`` of one kernel, persisted at ``path``."""

    def __init__(self, path: str, key: str) -> None:
        self.path, self.key = path, key
        self.done: set[tuple[int, int]] = self._read()

    def _read(self) -> set[tuple[int, int]]:
        try:
            with open(self.path, encoding="utf-8") as file:
                saved = json.load(file)
            if saved.get("version") == _VERSION and saved.get("key") == self.key:
                return {(int(r), int(c)) for r, c in saved["done"]}
        except (OSError, ValueError, KeyError, TypeError):
            pass  # missing, corrupt or foreign journal: recompute everything
        return set()

    def __contains__(self, tile: tuple[int, int]) -> bool:
        return tile in self.done

    def mark(self, tile: tuple[int, int]) -> None:
        # Several processes (torch.distributed ranks) may mark tiles of one journal: merge with what the file holds,
        # under an exclusive lock, so that no writer drops another's tiles.
        with open(f"{self.path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.done |= self._read() | {tile}
            record = {"version": _VERSION, "key": self.key, "done": sorted(self.done)}
            directory = os.path.dirname(os.path.abspath(self.path))
            handle, temporary = tempfile.mkstemp(dir=directory, prefix=".torchntk-journal-")
            try:
                with os.fdopen(handle, "w", encoding="utf-8") as file:
                    json.dump(record, file)
                os.replace(temporary, self.path)
            except BaseException:
                os.unlink(temporary)
                raise


def journal_path(memmap_path: str) -> str:
    return f"{memmap_path}.torchntk-tiles.json"


def journal_for(out: Any, problem: NTKProblem, chunk: int, tag: str) -> TileJournal | None:
    """A journal when ``out`` is a memmap backed by a file, else ``None`` (nothing to resume)."""
    if not isinstance(out, np.memmap) or not getattr(out, "filename", None):
        return None
    return TileJournal(journal_path(out.filename), problem_key(problem, chunk, tag))
