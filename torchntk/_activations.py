"""Y, the size of a model's intermediates for one example: what the derivative of one output row holds in flight.

Structured derivatives hold a few copies per cotangent row (``bridge.memory_plan``); the torch-native methods' rows
built a block of outputs at a time hold one per row of the block while its backward runs
(``torch_native.output_blocks``). No JAX here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from torchntk._problem import NTKProblem, hookable_modules


def activation_numel(problem: NTKProblem) -> int:
    """Entries of every leaf module's output for one example: Y, the size of the forward's intermediates.

    It runs a forward pass; the count is kept on ``problem`` (one call asks several times: the memory check, the
    choice of blocks)."""
    known = problem.__dict__.get("_activation_numel")
    if known is None:
        known = _count_activations(problem)
        object.__setattr__(problem, "_activation_numel", known)  # a frozen dataclass: a memo, not a field
    return known


def _count_activations(problem: NTKProblem) -> int:
    total = [0]

    def count(module: torch.nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            total[0] += output.numel()

    # A scripted submodule takes no hook: its outputs go uncounted, an underestimate that the check of the compiled
    # tile against XLA's memory plan (fit_to_memory) still catches.
    leaves = [m for _, m in hookable_modules(problem.model) if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            problem.forward(problem.params, tuple(x[:1] for x in problem.x1))
    finally:
        for handle in handles:
            handle.remove()
    return max(total[0], problem.out_size)
