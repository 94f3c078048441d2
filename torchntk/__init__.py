"""torchntk: the finite-width Neural Tangent Kernel for PyTorch models."""
