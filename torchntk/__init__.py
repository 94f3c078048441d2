"""torchntk: the finite-width Neural Tangent Kernel of PyTorch models (Novak, Sohl-Dickstein, Schoenholz, 2022)."""

from torchntk._api import IMPLEMENTATIONS, ntk, ntk_vp

__all__ = ["IMPLEMENTATIONS", "ntk", "ntk_vp"]
__version__ = "0.1.0"
