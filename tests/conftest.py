"""Fixtures shared by the test modules."""

from __future__ import annotations

import gc

import jax
import pytest

from torchntk.converters import clear_memory_cache


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """An empty conversion cache on disk (under tmp_path) and in memory, for the test only."""
    monkeypatch.setenv("TORCHNTK_CACHE_DIR", str(tmp_path / "cache"))
    clear_memory_cache()
    yield
    clear_memory_cache()


@pytest.fixture(autouse=True, scope="module")
def _jax_programs_of_the_module_dropped():
    """After each test module, JAX's caches of what its tests compiled are dropped. Every eager JAX operation and
    jitted function a test runs keeps its executable, and every executable holds memory maps of its own: the suite
    ran out of Linux's 65,530 maps per process after about 1,200 tests (test_patch_convolutions.py alone left 11,700)
    and XLA:CPU's compiler died with a segmentation fault. torchntk bounds what it keeps itself (torchntk._lru)."""
    yield
    jax.clear_caches()
    gc.collect()
