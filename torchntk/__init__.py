"""torchntk: the finite-width Neural Tangent Kernel of PyTorch models (Novak, Sohl-Dickstein, Schoenholz, 2022)."""

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
