"""What a process keeps in memory between calls is bounded: compiled programs hold their machine code in memory maps,
and a process that kept every one it compiled died in XLA:CPU's compiler (segmentation fault) once Linux's
65,530 maps per process were used up — the full test suite did, after about 1,200 tests."""

from __future__ import annotations

import gc
import os
import threading

import pytest
import torch
from _oracle import oracle_ntk

import torchntk
from torchntk._lru import LRUCache
from torchntk.bridge import reuse_check, torch_glue
from torchntk.converters import api, check


def test_lru_cache_keeps_the_most_recent_items():
    kept = LRUCache(2)
    kept["a"], kept["b"] = 1, 2
    assert kept["a"] == 1  # read: "a" is now the most recent
    kept["c"] = 3
    assert set(kept) == {"a", "c"} and len(kept) == 2
    assert "b" not in kept and kept.get("b") is None and kept.get("b", 7) == 7
    assert "a" in kept  # `in` does not reorder: "a" was read before "c" was written
    kept["d"] = 4
    assert set(kept) == {"c", "d"}
    assert kept.pop("c") == 3 and kept.pop("c", None) is None
    kept.clear()
    assert len(kept) == 0
    with pytest.raises(KeyError):
        kept["d"]
    with pytest.raises(ValueError, match="at least one"):
        LRUCache(0)


def test_lru_cache_is_bounded_under_threads():
    kept = LRUCache(5)

    def writer(offset):
        for i in range(500):
            kept[offset + i] = i
            kept.get(offset + i - 3)

    threads = [threading.Thread(target=writer, args=(k * 1000,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(kept) == 5 and len(list(kept)) == 5


def test_the_process_wide_stores_are_bounded():
    assert isinstance(torch_glue._COMPILED, LRUCache) and torch_glue._COMPILED.capacity == torch_glue.KEPT_PROGRAMS
    assert isinstance(api._MEMORY, LRUCache) and isinstance(check._PROGRAMS, LRUCache)
    assert isinstance(reuse_check._VALUE_AND_JVPS, LRUCache)


def _maps() -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for _ in maps)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_structured_programs_beyond_the_bound_are_dropped_and_their_maps_freed(monkeypatch):
    """Kernels of many input shapes: the compiled programs kept stay at the bound, the process's memory maps stop
    growing with the number of shapes, and a shape whose program was dropped is compiled again, correctly."""
    monkeypatch.setattr(torch_glue, "_COMPILED", LRUCache(2))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()

    def kernel(n):
        x = torch.randn(n, 3, dtype=torch.float64)
        return torchntk.ntk(model, x, None, implementation="structured_derivatives"), x

    kernel(1)
    kernel(2)
    gc.collect()
    before = _maps()
    for n in range(3, 15):  # each shape compiles its own program(s)
        kernel(n)
        assert len(torch_glue._COMPILED) <= 2
    gc.collect()
    grown = _maps() - before
    # 12 small programs kept would add ~600 maps or more (about 50 each, measured); two kept: a few dozen at most
    assert grown < 300, f"{grown} memory maps more after 12 shapes with 2 programs kept"
    again, x = kernel(1)
    torch.testing.assert_close(again, oracle_ntk(model, (x,), None), rtol=1e-10, atol=1e-12)
