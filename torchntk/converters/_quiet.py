"""Import TensorFlow, onnx2tf and tf2jax without their console noise, and without changing the user's environment.

TensorFlow's native libraries print oneDNN / CUDA-stub lines through absl before any Python logging is set up
(``TF_CPP_MIN_LOG_LEVEL`` does not reach every copy of them once jax is loaded), and onnx2tf sets
``TF_CPP_MIN_LOG_LEVEL`` and ``TF_USE_LEGACY_KERAS`` in ``os.environ`` at import time. Here the imports run with
file descriptor 2 redirected to a temporary file (re-emitted if the import fails, so real errors stay visible)
and the environment variables are restored afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import tempfile
from collections.abc import Iterator
from types import ModuleType

_ENV_DEFAULTS = {"TF_CPP_MIN_LOG_LEVEL": "3"}
_ENV_TOUCHED = ("TF_CPP_MIN_LOG_LEVEL", "TF_USE_LEGACY_KERAS")


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[list[str]]:
    """Redirect the process-level stderr (fd 2) into a buffer; on an exception, write what was captured back.

    Yields a list that receives the captured text on exit. Not thread-safe (fd 2 is process-wide).
    """
    captured: list[str] = []
    try:
        sys.stderr.flush()
        saved_fd = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (embedded interpreters): nothing to silence
        yield captured
        return
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        failed = False
        try:
            yield captured
        except BaseException:
            failed = True
            raise
        finally:
            with contextlib.suppress(ValueError, OSError):
                sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            sink.seek(0)
            captured.append(sink.read().decode(errors="replace"))
            if failed and captured[0]:
                sys.stderr.write(captured[0])


@contextlib.contextmanager
def quiet_tf_env() -> Iterator[None]:
    """Quiet defaults for TF's log level during the block; every touched variable gets its old value back."""
    saved = {k: os.environ.get(k) for k in _ENV_TOUCHED}
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def import_quietly(name: str) -> ModuleType:
    """``importlib.import_module(name)`` for TensorFlow-based modules, silenced as described in the module doc."""
    if name in sys.modules:
        return sys.modules[name]
    with quiet_tf_env(), native_stderr_captured():
        return importlib.import_module(name)
