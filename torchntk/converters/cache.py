"""Conversion cache: an architecture fingerprint, an in-memory LRU of converted functions, and ONNX files on disk.

The key covers everything baked into a conversion and nothing that is passed in at call time: module classes,
the source of their ``forward`` methods, their hyperparameters, parameter names/shapes/dtypes, the *values* of
buffers and of unselected parameters (both become graph constants: a changed BatchNorm ``running_mean`` must not
reuse a stale conversion), per-example input shapes and dtypes, the parameter selection, the route, and the
versions of the tools. Selected parameter values are not in the key: new weights never trigger a conversion.

On disk (``$TORCHNTK_CACHE_DIR``, else ``$XDG_CACHE_HOME/torchntk``, else ``~/.cache/torchntk``) each entry is
one file ``<key>.onnxentry``: a one-line JSON header (format, key, byte count, sha256) followed by the ONNX bytes.
Data only, no pickle. Writes go to a temporary file in the same directory and are published with ``os.replace``;
reads check every header field and the hash, and a bad entry is reported as missing (the caller rebuilds it).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import inspect
import json
import os
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

FORMAT = 1
_MAGIC = "torchntk-onnx-cache"
_SUFFIX = ".onnxentry"
_TOOLS = ("torchntk", "torch", "onnx", "onnxscript", "onnx2tf", "tf2jax", "tensorflow", "jax")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


@functools.cache  # reading package metadata costs ~10 ms; versions cannot change within a process
def tool_versions() -> dict[str, str]:
    """Versions of every tool whose output a cache entry depends on."""
    return {name: _version(name) for name in _TOOLS}


@functools.cache
def _forward_source_hash(cls: type) -> str:
    forward = getattr(cls, "forward", None)
    try:
        text = inspect.getsource(forward)
    except (OSError, TypeError):  # classes defined in a REPL or generated at run time: hash the bytecode
        code = getattr(forward, "__code__", None)
        text = repr((code.co_code, code.co_consts, code.co_names)) if code else repr(forward)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_PLAIN = (int, float, bool, str, type(None))


def _hyperparameters(module: torch.nn.Module) -> str:
    """``extra_repr`` plus plain Python attributes: strides, eps, flags... all shape the exported graph."""
    plain = {k: repr(v) for k, v in vars(module).items() if isinstance(v, _PLAIN) or _is_plain_tuple(v)}
    plain.pop("training", None)
    return module.extra_repr() + json.dumps(plain, sort_keys=True)


def _is_plain_tuple(v) -> bool:
    return isinstance(v, (tuple, list)) and all(isinstance(x, _PLAIN) or _is_plain_tuple(x) for x in v)


def _tensor_digest(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous()
    if data.dtype == torch.bfloat16:
        data = data.view(torch.int16)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()[:32]


def fingerprint(
    model: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    param_names: Sequence[str],
    route: str,
) -> str:
    """The cache key (hex sha256) of converting ``model`` at ``inputs`` (batch axis included, size ignored)."""
    selected = set(param_names)
    h = hashlib.sha256()

    def add(*items) -> None:
        h.update(json.dumps(items, default=str).encode())
        h.update(b"\0")

    add("format", FORMAT, tool_versions(), route, list(param_names))
    for name, module in model.named_modules():
        cls = type(module)
        add("module", name, f"{cls.__module__}.{cls.__qualname__}", _forward_source_hash(cls), _hyperparameters(module))
    for name, p in model.named_parameters(remove_duplicate=False):
        value = None if name in selected else _tensor_digest(p)  # unselected parameters are baked as constants
        add("param", name, tuple(p.shape), str(p.dtype), value)
    for name, b in model.named_buffers():
        add("buffer", name, tuple(b.shape), str(b.dtype), _tensor_digest(b))
    for x in inputs:
        add("input", tuple(x.shape[1:]), str(x.dtype))
    return h.hexdigest()


class MemoryCache:
    """A small least-recently-used map from key to converted route function (and its metadata)."""

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, object] = OrderedDict()

    def get(self, key: str):
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: str, value) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def cache_dir() -> Path:
    """``$TORCHNTK_CACHE_DIR``, else ``$XDG_CACHE_HOME/torchntk``, else ``~/.cache/torchntk`` (read every call)."""
    explicit = os.environ.get("TORCHNTK_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "torchntk"


def entry_path(key: str) -> Path:
    return cache_dir() / f"{key}{_SUFFIX}"


def write_entry(key: str, onnx_bytes: bytes) -> Path | None:
    """Store ``onnx_bytes`` under ``key`` atomically. Returns the path, or None when the directory is unwritable
    (the cache is an optimisation: a read-only home must not break conversion)."""
    header = {
        "magic": _MAGIC,
        "format": FORMAT,
        "key": key,
        "size": len(onnx_bytes),
        "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
    }
    path = entry_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(header).encode() + b"\n")
                f.write(onnx_bytes)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        return None
    return path


def read_entry(key: str) -> bytes | None:
    """The ONNX bytes stored under ``key``, or None when the entry is missing, truncated, corrupt or stale."""
    path = entry_path(key)
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    line, sep, payload = raw.partition(b"\n")
    try:
        header = json.loads(line)
    except ValueError:
        return None
    valid = (
        sep
        and isinstance(header, dict)
        and header.get("magic") == _MAGIC
        and header.get("format") == FORMAT
        and header.get("key") == key
        and header.get("size") == len(payload)
        and header.get("sha256") == hashlib.sha256(payload).hexdigest()
    )
    return payload if valid else None
