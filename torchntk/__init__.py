"""torchntk: the finite-width Neural Tangent Kernel of PyTorch models (Novak, Sohl-Dickstein, Schoenholz, 2022)."""

import contextlib
import os
import sys

# JAX's GPU backend takes 75 % of the device when it starts; torch shares the GPU with it here, so let XLA allocate as
# it needs instead, unless the user chose how JAX takes GPU memory. Read when JAX's GPU backend starts (the first JAX
# computation), so it holds unless JAX ran before torchntk was imported. See README "GPU".
if not any(name in os.environ for name in ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION")):
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"

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
from torchntk.torch_native._errors import UnsupportedModelError

__all__ = [
    "IMPLEMENTATIONS",
    "DatasetInputs",
    "Estimate",
    "Explanation",
    "UnsupportedModelError",
    "condition_number",
    "eigvalsh",
    "explain",
    "kernel_regression",
    "ntk",
    "ntk_vp",
]
__version__ = "0.1.0"
