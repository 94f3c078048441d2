"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest

from torchntk.converters import clear_memory_cache


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """An empty conversion cache on disk (under tmp_path) and in memory, for the test only."""
    monkeypatch.setenv("TORCHNTK_CACHE_DIR", str(tmp_path / "cache"))
    clear_memory_cache()
    yield
    clear_memory_cache()
