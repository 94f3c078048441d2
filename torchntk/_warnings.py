"""Warnings attributed to the caller's line: torchntk's decorators add frames, so a fixed ``stacklevel`` pointed into
torchntk's own wrappers (``warnings.filterwarnings(module=...)`` and ``-W`` filters then missed the user's module)."""

from __future__ import annotations

import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn`` at the first frame outside the torchntk package."""
    frame, level = sys._getframe(0), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
