"""torchntk: the finite-width Neural Tangent Kernel of PyTorch models (Novak, Sohl-Dickstein, Schoenholz, 2022)."""

from torchntk._api import IMPLEMENTATIONS, ntk, ntk_vp
from torchntk.linalg import condition_number, eigvalsh, kernel_regression

__all__ = ["IMPLEMENTATIONS", "condition_number", "eigvalsh", "kernel_regression", "ntk", "ntk_vp"]
__version__ = "0.1.0"
