"""Process-wide state that overlapping scopes override together (threads: a conversion's check beside a compile,
two ``torchntk.ntk`` calls at once)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any


class SharedOverride:
    """An override of process-wide state shared by the scopes open at once: the first to enter saves what
    ``replace()`` replaces (its return value) and applies the override; the last to leave calls ``restore(saved)``.
    Each scope restoring its own copy would undo the override under another scope still inside, or leave it on for
    good."""

    def __init__(self, replace: Callable[[], Any], restore: Callable[[Any], None]) -> None:
        self._replace, self._restore = replace, restore
        self.lock = threading.RLock()  # held while scopes open and close; a caller may hold it to decide on one
        self._depth = 0
        self._saved: Any = None

    @property
    def active(self) -> bool:
        """Whether a scope is open now."""
        return self._depth > 0

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        with self.lock:
            if self._depth == 0:
                self._saved = self._replace()
            self._depth += 1
        try:
            yield
        finally:
            with self.lock:
                self._depth -= 1
                if self._depth == 0:
                    self._restore(self._saved)
                    self._saved = None
