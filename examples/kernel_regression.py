"""NTK ridge regression and the kernel's condition number without building the full kernel twice.

Run: ``python examples/kernel_regression.py``
"""

import torch
from torch import nn

import torchntk


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 256), nn.Tanh(), nn.Linear(256, 1)).double()
    x_train = torch.rand(24, 2, dtype=torch.float64) * 4 - 2
    y_train = torch.sin(x_train.sum(1, keepdim=True))
    x_test = torch.rand(16, 2, dtype=torch.float64) * 4 - 2

    prediction = torchntk.kernel_regression(model, x_train, y_train, x_test, ridge=1e-3)
    error = (prediction - torch.sin(x_test.sum(1, keepdim=True))).abs().mean()
    print(f"mean absolute error of NTK regression on sin(x1 + x2): {error:.3f}")
    print(f"largest eigenvalues of Θ(x_train, x_train): {torchntk.eigvalsh(model, x_train, k=3).tolist()}")
    print(f"condition number: {torchntk.condition_number(model, x_train):.3e}")


if __name__ == "__main__":
    main()
