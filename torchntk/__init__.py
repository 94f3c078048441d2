"""torchntk: the finite-width Neural Tangent Kernel of PyTorch models (Novak, Sohl-Dickstein, Schoenholz, 2022)."""

import sys

if "tensorflow" in sys.modules and "triton" not in sys.modules:
    # Loading libtriton after TensorFlow crashes the process (segfault; torch 2.14 with TF 2.21 wheels), and torch
    # imports triton lazily (e.g. torch.utils.flop_counter). Marked absent, torch takes its paths without triton,
    # which CPU work uses anyway; GPU kernels compiled by triton (torch.compile) are then unavailable in this process.
    sys.modules["triton"] = None

from torchntk._api import IMPLEMENTATIONS, explain, ntk, ntk_vp
from torchntk._auto import Estimate, Explanation
from torchntk.linalg import condition_number, eigvalsh, kernel_regression

__all__ = [
    "IMPLEMENTATIONS",
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
