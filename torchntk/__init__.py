"""torchntk: the finite-width Neural Tangent Kernel of PyTorch models (Novak, Sohl-Dickstein, Schoenholz, 2022)."""

import contextlib
import sys

if "triton" not in sys.modules:
    # libtriton crashes the process when it is loaded after TensorFlow (segfault; torch 2.14 with TF 2.21 wheels), and
    # torch imports triton lazily (a second torch.export, torch.utils.flop_counter) — possibly after the onnx-tf route
    # or the user has imported TensorFlow. So load it now (0.1 s); if TensorFlow came first, mark it absent instead:
    # torch then takes its paths without triton, which CPU work uses anyway (torch.compile's GPU kernels are lost).
    if "tensorflow" in sys.modules:
        sys.modules["triton"] = None
    else:
        with contextlib.suppress(Exception):  # not installed, or unusable here: torch runs without it
            import triton  # noqa: F401

from torchntk._api import IMPLEMENTATIONS, explain, ntk, ntk_vp
from torchntk._auto import Estimate, Explanation
from torchntk._data import DatasetInputs
from torchntk.linalg import condition_number, eigvalsh, kernel_regression

__all__ = [
    "IMPLEMENTATIONS",
    "DatasetInputs",
    "Estimate",
    "Explanation",
    "condition_number",
    "eigvalsh",
    "explain",
    "kernel_regression",
    "ntk",
    "ntk_vp",
]
__version__ = "0.1.0"
