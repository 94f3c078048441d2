"""Conversion cache: an architecture fingerprint, an in-memory LRU of converted functions, and ONNX files on disk.

The key covers everything baked into a conversion and nothing that is passed in at call time: the architecture
fingerprint (:mod:`torchntk._fingerprint`: module classes and their code, hyperparameters, function-valued and
tensor attributes, module-level constants the code reads, parameter names/shapes/dtypes), the *values* of buffers
and of unselected parameters (both become graph constants: a changed BatchNorm ``running_mean`` must not reuse a
stale conversion), per-example input shapes and dtypes, the parameter selection, the route, and the versions of
the tools. Selected parameter values are not in the key: new weights never trigger a conversion. A key whose
fingerprint is not certain (an attribute the fingerprint cannot see into) makes ``to_jax`` re-check a cached
function against torch before reusing it.

On disk (``$TORCHNTK_CACHE_DIR``, else ``$XDG_CACHE_HOME/torchntk``, else ``~/.cache/torchntk``) each entry is
one file ``<key>.onnxentry``: a one-line JSON header (format, key, byte count, sha256, the routes whose derivative
was checked and those of them whose function runs loops) followed by the ONNX bytes, written only after the
conversion passed the check against torch (a refused graph is never served to another process). Data only, no
pickle. Writes go to a temporary file in the same directory and are published with ``os.replace``; reads check
every header field and the hash, and a bad entry is reported as missing (the caller rebuilds it).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from torchntk._fingerprint import Fingerprint, architecture, values_digest

# Of an entry file; keys of another fingerprint simply never match. 2: written only after the check against torch
# passed, with the routes whose derivative was checked (format 1 entries were written before any check). 3: Python
# numbers of float64 models exported exactly (format 2 graphs hold them rounded to float32: onnx_export). 4: the
# checked routes whose function runs repeated blocks as loops (learning it walks the whole graph: 0.18 s on resnet18).
FORMAT = 4
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
    """Versions of every tool whose output a cache entry depends on, and a digest of torchntk's own source: an entry
    exported by other torchntk code (before an export-time refusal or a metadata entry existed) is another key. A
    graph exported before float64 constants' digests were recorded was served, and refused a model it converts."""
    return {name: _version(name) for name in _TOOLS} | {"torchntk source": _source_digest()}


def _source_digest() -> str:
    """sha256 of torchntk's Python files (about 1 MB, read once per process: a few ms)."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:32]


def fingerprint(
    model: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    param_names: Sequence[str],
    route: str,
) -> str:
    """The cache key (hex sha256) of converting ``model`` at ``inputs`` (batch axis included, size ignored)."""
    return conversion_key(model, inputs, param_names, route).digest


def conversion_key(
    model: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    param_names: Sequence[str],
    route: str,
) -> Fingerprint:
    """The cache key of converting ``model`` at ``inputs``, and whether it is certain (:mod:`torchntk._fingerprint`).

    :func:`torchntk._fingerprint.architecture` plus the values of buffers and unselected parameters (both become
    graph constants), per-example input shapes and dtypes, the selection, the route and the tool versions.
    """
    selected = set(param_names)
    arch = architecture(model, modes=False)  # converted in eval mode, whatever the flags when asked
    baked = [(n, p) for n, p in model.named_parameters(remove_duplicate=False) if n not in selected]
    header = [FORMAT, tool_versions(), route, list(param_names), arch.digest]
    header += [values_digest([*baked, *model.named_buffers()])]
    header += [[list(x.shape[1:]), str(x.dtype)] for x in inputs]
    digest = hashlib.sha256(json.dumps(header, default=str).encode()).hexdigest()
    return Fingerprint(digest, arch.uncertain + active_modes())


def active_modes() -> tuple[str, ...]:
    """The caller's torch function and dispatch modes (a default device's apart): they may change what the model
    computes (``tanh`` → ``2·tanh``), which no key holds, so a conversion made under one is never reused."""
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._device import DeviceContext
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    modes = [m for m in _get_current_function_mode_stack() if not isinstance(m, DeviceContext)]
    modes += _get_current_dispatch_mode_stack()
    return tuple(f"an active {type(m).__name__}" for m in modes)


def cache_dir() -> Path:
    """``$TORCHNTK_CACHE_DIR``, else ``$XDG_CACHE_HOME/torchntk``, else ``~/.cache/torchntk`` (read every call)."""
    explicit = os.environ.get("TORCHNTK_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "torchntk"


def entry_path(key: str) -> Path:
    return cache_dir() / f"{key}{_SUFFIX}"


class Entry(NamedTuple):
    """A valid disk-cache entry: the ONNX bytes, the routes whose converted function's derivative was checked
    against torch's when it was stored (a route not listed is checked in full again), and those of them whose
    function runs repeated blocks as loops (``JaxModel.loops``; known for the checked routes only)."""

    onnx_bytes: bytes
    derivative_checked: tuple[str, ...]
    looped: tuple[str, ...] = ()


def write_entry(
    key: str, onnx_bytes: bytes, derivative_checked: Sequence[str] = (), looped: Sequence[str] = ()
) -> Path | None:
    """Store ``onnx_bytes`` under ``key`` atomically, with the routes whose derivative passed the check and those of
    them that run loops (``looped`` ⊆ ``derivative_checked``). Returns the path, or None when the directory is
    unwritable (the cache is an optimisation: a read-only home must not break conversion). Callers store a graph
    only after its conversion passed the check against torch."""
    if not set(looped) <= set(derivative_checked):
        raise ValueError(f"looped routes {sorted(looped)} must be among the checked ones {sorted(derivative_checked)}.")
    header = {
        "magic": _MAGIC,
        "format": FORMAT,
        "key": key,
        "size": len(onnx_bytes),
        "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "derivative_checked": sorted(derivative_checked),
        "looped": sorted(looped),
    }
    path = entry_path(key)
    try:
        publish_entry(path, header, onnx_bytes)
    except OSError:
        return None
    return path


def publish_entry(path: Path, header: dict, payload: bytes) -> None:
    """Write ``path`` = a one-line JSON ``header`` then ``payload``, atomically: a temporary file in the same
    directory, synced, then ``os.replace`` (readers see the old entry or the whole new one). Raises ``OSError``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(header).encode() + b"\n")
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_entry(key: str) -> Entry | None:
    """The entry stored under ``key``, or None when it is missing, truncated, corrupt or stale."""
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
        and isinstance(header.get("derivative_checked"), list)
        and all(isinstance(route, str) for route in header["derivative_checked"])
        and isinstance(header.get("looped"), list)
        and set(header["looped"]) <= set(header["derivative_checked"])
    )
    return Entry(payload, tuple(header["derivative_checked"]), tuple(header["looped"])) if valid else None
