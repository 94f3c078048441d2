"""XLA executables persisted across processes: JAX's persistent compilation cache, for torchntk's own compilations.

A second process on the same architecture and shapes loads the compiled structured NTK function (and the compiled
check against torch) instead of compiling it again: XLA's compilation of a deep model's structured program takes
seconds to minutes, its executable loads in milliseconds. :func:`compile_persisted` also stores the traced program
(``jax.export``), so that the second process does not trace the structured interpreter either.

Inside :func:`persistent_compilation` JAX's persistent cache is this module's :class:`ValidatedCache`, a directory
``<torchntk cache dir>/xla/<jax>-<jaxlib>-<torchntk>/`` (a new set of versions starts an empty one: stale entries
are never read). Same rules as the conversion cache (``converters/cache.py``): every entry is one file, a one-line
JSON header (magic, format, producer, versions, JAX's key, byte count, sha256) then the bytes JAX asked to store;
writes are atomic (temporary file + ``os.replace``); a read checks every header field and the hash, and an entry
that fails — corrupt, truncated, written by another tool or version — is deleted and reported missing, so JAX
compiles again and stores a good one. What is stored is XLA's serialized executable (JAX's own format, no pickle);
as JAX warns, a compilation cache must not be writable by anyone you do not trust.

Scope: JAX has one process-wide cache. When the user configured their own (``jax_compilation_cache_dir`` set, or
``jax_enable_compilation_cache`` off), torchntk leaves it alone and its compilations follow the user's settings.
Otherwise torchntk installs its cache only for the duration of its own compile calls and restores JAX's state
afterwards; a compilation another thread of the user's starts during those seconds may be stored in torchntk's
directory (harmless: it is validated like any entry). ``TORCHNTK_COMPILE_CACHE=0`` turns the persistence off.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from torchntk._shared_override import SharedOverride

from .cache import cache_dir, publish_entry

logger = logging.getLogger("torchntk")

FORMAT = 1
_MAGIC = "torchntk-xla-cache"
_SUFFIX = ".xlaentry"
_PRODUCER = "torchntk.converters.compile_cache"


_THREAD_HITS = threading.local()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def versions() -> dict[str, str]:
    """The versions an executable depends on (JAX's key covers the program, options, backend and devices)."""
    return {name: _version(name) for name in ("jax", "jaxlib", "torchntk")}


def directory() -> Path:
    """Where executables of this jax/jaxlib/torchntk combination are stored."""
    v = versions()
    return cache_dir() / "xla" / f"jax{v['jax']}-jaxlib{v['jaxlib']}-torchntk{v['torchntk']}"


def enabled() -> bool:
    """Off when ``TORCHNTK_COMPILE_CACHE=0``."""
    return os.environ.get("TORCHNTK_COMPILE_CACHE", "1") != "0"


def _interface() -> type:
    from jax._src.compilation_cache_interface import CacheInterface

    return CacheInterface


class ValidatedCache:
    """JAX's ``CacheInterface`` over validated, atomically written entry files (see the module docstring).

    ``hits``, ``misses``, ``writes`` and ``rejected`` count this process's lookups, for tests and ``explain``;
    :meth:`thread_hits` this thread's hits (compilations of other threads run beside it).
    """

    hits = misses = writes = rejected = 0

    def __init__(self, path: Path) -> None:
        self._path = path
        self._header = {"magic": _MAGIC, "format": FORMAT, "producer": _PRODUCER, "versions": versions()}

    def _entry(self, key: str) -> Path:
        return self._path / f"{hashlib.sha256(key.encode()).hexdigest()}{_SUFFIX}"

    def get(self, key: str) -> bytes | None:
        path = self._entry(key)
        try:
            raw = path.read_bytes()
        except OSError:
            ValidatedCache.misses += 1
            return None
        line, sep, payload = raw.partition(b"\n")
        try:
            header = json.loads(line)
        except ValueError:
            header = None
        expected = self._header | {"key": key, "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        if not sep or header != expected:
            # Corrupt, truncated, foreign or from other versions: never handed to XLA; JAX recompiles and stores anew.
            logger.debug("torchntk compile cache: ignoring invalid entry %s", path.name)
            ValidatedCache.rejected += 1
            ValidatedCache.misses += 1
            path.unlink(missing_ok=True)
            return None
        ValidatedCache.hits += 1
        _THREAD_HITS.count = ValidatedCache.thread_hits() + 1
        return payload

    @staticmethod
    def thread_hits() -> int:
        """Entries this thread was answered from (whether a compile call of its found its executable)."""
        return getattr(_THREAD_HITS, "count", 0)

    def put(self, key: str, value: bytes) -> None:
        header = self._header | {"key": key, "size": len(value), "sha256": hashlib.sha256(value).hexdigest()}
        path = self._entry(key)
        try:
            publish_entry(path, header, value)
        except OSError as error:  # the cache is an optimisation: a read-only home must not break the computation
            logger.debug("torchntk compile cache: cannot write %s (%s)", path, error)
            return
        ValidatedCache.writes += 1


def _user_configured(jax_config) -> bool:
    return jax_config.jax_compilation_cache_dir is not None or not jax_config.jax_enable_compilation_cache


@contextlib.contextmanager
def persistent_compilation() -> Iterator[bool]:
    """Compilations inside this scope are looked up in, and stored to, torchntk's validated persistent cache.

    Yields whether torchntk's cache is in use (False: the user's own JAX cache settings apply, or it is disabled,
    or this JAX has no persistent-cache hook torchntk recognises).
    """
    if not enabled():
        yield False
        return
    import jax

    try:
        from jax._src import compilation_cache as jax_cache
    except ImportError:
        yield False
        return
    with contextlib.ExitStack() as scope:
        with _TORCHNTK_CACHE.lock:  # decided and opened at once: no other scope closes in between
            ours = _TORCHNTK_CACHE.active or not (_user_configured(jax.config) or not hasattr(jax_cache, "_cache"))
            if ours:
                scope.enter_context(_TORCHNTK_CACHE.scope())
        yield ours


def _use_torchntk_cache() -> tuple:
    """JAX's persistent cache replaced by torchntk's validated one; returns what it replaced."""
    import jax
    from jax._src import compilation_cache as jax_cache

    saved = (jax_cache._cache, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax_cache._cache = type("TorchntkCache", (ValidatedCache, _interface()), {})(directory())
    # Every torchntk compilation is worth keeping: small ones add up over a model zoo, and a second process should
    # compile nothing at all.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return saved


def _restore_jax_cache(saved: tuple) -> None:
    import jax
    from jax._src import compilation_cache as jax_cache

    jax_cache._cache, min_time = saved
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)


# JAX's cache and config are process-wide: scopes open at once (threads compiling concurrently: a conversion's check
# beside a structured program) share one replacement, restored when the last one closes.
_TORCHNTK_CACHE = SharedOverride(_use_torchntk_cache, _restore_jax_cache)


@functools.cache
def source_digest() -> str:
    """sha256 of torchntk's own source: a stored program is torchntk's tracing of a function, so an edited torchntk
    (an editable install between releases) must not reuse programs traced by the old code."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


#: XLA:CPU's loop fusions emitted by its classic (elemental) IR emitter instead of the MLIR fusion emitters: a
#: program that runs once or twice compiles in roughly half the time for about the same run
#: (``benchmarks/results/compile_levels.json``: efficientnet_b0 at N = 2, 11.5-12.9 s → 6.7 s at O0; resnet18 at
#: N = 16, 4.9-6.1 → 2.6-3.1 s at O1).
CLASSIC_FUSION_EMITTERS = {"xla_cpu_use_fusion_emitters": False}
#: XLA:CPU options for a program that runs once or twice (the check's; a short structured call's): no LLVM
#: optimisation passes, classic fusion emitters. Compiling dominates such a call: mnasnet0_5's structured program
#: 38.9 → 23.9 s, efficientnet_b3's 61.0 → 41.5 s at O0 (runs 0.42 → 0.70 s and 3.39 → 2.67 s).
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0, **CLASSIC_FUSION_EMITTERS}


def compile_persisted(name: str, fn, args: tuple, options=None):
    """``jax.jit(fn).lower(*args).compile()`` that a second process answers from disk without tracing nor compiling.

    ``options`` are XLA compiler options (part of the executable's cache key), or a function of the lowered program
    returning them (it sees the same program in every process, so a second one finds the same executable).
    ``name`` must determine ``fn``
    completely (e.g. the converted function's key and the kernel layout): the traced program is stored under ``name``
    plus the arguments' tree, shapes, dtypes, the platform and the default matmul precision, as JAX's serialized
    export (``jax.export``: StableHLO bytes, data only) in a validated entry, and the executable in the persistent
    compilation cache. A stored program that does not deserialize is traced again and replaced.
    """
    import jax

    leaves, tree = jax.tree_util.tree_flatten(args)
    platforms = sorted({d.platform for x in leaves for d in getattr(x, "devices", lambda: ())()})
    x64 = str(jax.dtypes.canonicalize_dtype(np.float64))
    precision = str(jax.config.jax_default_matmul_precision)  # baked into the traced products (TF32 on a GPU)
    shapes = [(tuple(x.shape), str(x.dtype)) for x in leaves]
    signature = [str(tree), shapes, platforms, x64, precision, source_digest()]
    key = "program:" + json.dumps([name, signature], default=str)
    with persistent_compilation() as ours:
        if not ours:
            return compile_lowered(jax.jit(fn).lower(*args), options)
        store = type("TorchntkCache", (ValidatedCache, _interface()), {})(directory())
        blob, exported = store.get(key), None
        if blob is not None:
            try:
                exported = jax.export.deserialize(bytearray(blob))
            except Exception as error:  # noqa: BLE001 - a stored program this JAX cannot read: trace it again
                logger.debug("torchntk compile cache: stored program unreadable (%s); tracing again", error)
        if exported is None:
            exported = jax.export.export(jax.jit(fn))(*args)
            store.put(key, bytes(exported.serialize()))
        lowered = jax.jit(exported.call).lower(*args)
        return lowered.compile(_stored_options(store, key, lowered, options))


def _stored_options(store, key: str, lowered, options):
    """``options``; where they are a function of the lowered program, its answer for this program, stored beside
    it (JSON data, in a validated entry) so that a later process does not ask again: XLA's cost analysis of a deep
    program takes about a second (convnext_small's structured program: 0.9 s), on a call that otherwise only loads."""
    if not callable(options):
        return options
    blob = store.get(key + ":options")
    try:
        chosen = json.loads(blob) if blob is not None else None
    except ValueError:
        chosen = None
    plain = (bool, int, float, str)
    if isinstance(chosen, dict) and all(isinstance(k, str) and isinstance(v, plain) for k, v in chosen.items()):
        return chosen
    chosen = options(lowered)
    store.put(key + ":options", json.dumps(chosen).encode())
    return chosen


def compile_lowered(lowered, options):
    """``lowered.compile`` with XLA ``options``: a dict, ``None``, or a function of ``lowered`` returning them."""
    return lowered.compile(options(lowered) if callable(options) else options)


_MARK = ".compiled"


def _mark_path(tag: str) -> Path:
    return directory() / f"{hashlib.sha256(tag.encode()).hexdigest()}{_MARK}"


def remember(tag: str, seconds: float | None = None) -> None:
    """Note that the program ``tag`` names (a conversion key and kernel layout) was compiled into this cache, and
    (``seconds``) how long that took: hints for estimates and compile tiers, never trusted for results."""
    if not enabled():
        return
    path = _mark_path(tag)
    header = {"magic": _MAGIC, "format": FORMAT, "producer": _PRODUCER, "versions": versions()}
    if seconds is not None:
        header["seconds"] = float(seconds)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=_MARK)
        with os.fdopen(fd, "w") as f:
            json.dump(header, f)
        os.replace(tmp, path)
    except OSError:
        pass


def remembered_seconds(tag: str) -> float | None:
    """The compile seconds :func:`remember` noted for ``tag`` (``None``: none noted, or the note is not ours)."""
    if not enabled():
        return None
    try:
        note = json.loads(_mark_path(tag).read_text())
    except (OSError, ValueError):
        return None
    ours = isinstance(note, dict) and (note.get("magic"), note.get("format")) == (_MAGIC, FORMAT)
    seconds = note.get("seconds") if ours and note.get("versions") == versions() else None
    return float(seconds) if isinstance(seconds, (int, float)) and 0 <= seconds < float("inf") else None


def remembered(tag: str) -> bool:
    """Whether :func:`remember` noted ``tag`` in this cache (and persistence is on and torchntk's own)."""
    return enabled() and _mark_path(tag).exists()
