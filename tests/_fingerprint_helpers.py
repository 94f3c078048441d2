"""A user's helper module read by a model's forward through the module object (``helpers.SCALE``)."""

import torch

SCALE = 1.0


def act(x):
    return torch.tanh(x) * SCALE
