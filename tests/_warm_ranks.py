"""Preloaded into the forkserver that starts the test ranks: torch.func's first-use costs (seconds: vmap, jacrev,
forward-mode AD's decompositions) are paid once there, not again in every rank forked from it.

One torch thread first, so that no OpenMP thread pool exists in the server when ranks are forked from it.
"""

import torch
from torch import nn

import torchntk

torch.set_num_threads(1)
_model = nn.Sequential(
    nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2, 2)
)
_model = _model.double().eval()
for _method in ("jacobian_contraction", "ntk_vector_products"):
    torchntk.ntk(_model, torch.zeros(2, 1, 2, 2, dtype=torch.float64), implementation=_method, distributed=False)
