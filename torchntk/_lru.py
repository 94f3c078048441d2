"""A bounded, thread-safe least-recently-used map: what torchntk keeps in memory between calls.

Everything torchntk keeps per process — converted functions, the check's programs, compiled structured programs —
holds XLA executables, and each executable holds its machine code in memory maps of its own (about 50 for a small
program, thousands for a deep model's). A process that computes kernels of many models or shapes must not keep them
all: Linux allows 65,530 maps per process (``vm.max_map_count``), and XLA:CPU's compiler dies with a segmentation
fault, not an error, when it cannot map more (the full test suite did, after about 1,200 tests). Dropping the last
reference to an executable unmaps its code, so a bound on the number kept is a bound on the maps.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterator, MutableMapping
from typing import Generic, TypeVar

V = TypeVar("V")


class LRUCache(MutableMapping[Hashable, V], Generic[V]):
    """At most ``capacity`` items; reading (``[]``, ``get``) or writing one makes it the most recent, and a write
    beyond ``capacity`` drops the least recent. ``in`` and iteration do not change the order."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"an LRUCache keeps at least one item, not capacity={capacity}")
        self.capacity = capacity
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()

    def __getitem__(self, key: Hashable) -> V:
        with self._lock:
            value = self._items[key]
            self._items.move_to_end(key)
            return value

    def __setitem__(self, key: Hashable, value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __delitem__(self, key: Hashable) -> None:
        with self._lock:
            del self._items[key]

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __iter__(self) -> Iterator[Hashable]:
        with self._lock:
            return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
