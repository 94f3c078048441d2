"""Multiply-adds of a forward pass, counted at the ``__torch_function__`` level.

``torch.utils.flop_counter.FlopCounterMode`` counts at the dispatcher level, but its first use imports
``torch._dynamo`` (about a second on this machine), more than a small model's whole NTK takes. Here a
``TorchFunctionMode`` sees the calls a model's Python code makes — ``F.linear``, convolutions, ``matmul`` / ``@``,
``einsum``, attention — and counts each from its shapes. Calls inside another intercepted call are not seen; every
function that hides multiply-adds in a Python body (attention, ``einsum``, ``tensordot``) has its own rule, and
elementwise work is not counted (it is negligible next to the contractions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch.overrides import TorchFunctionMode


def _linear(output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    return output.numel() * weight.shape[-1]


def _conv(output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    return output.numel() * weight[0].numel()  # each output entry: in_channels/groups × kernel


def _conv_transpose(output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    return input.numel() * weight[0].numel()  # each input entry scatters into out_channels/groups × kernel


def _matmul(output: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    return output.numel() * a.shape[-1]


def _addmm(output: torch.Tensor, bias: torch.Tensor, a: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    return output.numel() * a.shape[-1]


def _einsum(output: torch.Tensor, equation: str, *operands: Any, **kwargs: Any) -> int:
    """Two or more operands: the product of every index's size (the naive loop nest) times the ``...`` batch."""
    tensors = operands[0] if len(operands) == 1 and isinstance(operands[0], (list, tuple)) else operands
    if len(tensors) < 2:
        return 0
    inputs, _, result = equation.replace(" ", "").partition("->")
    sizes: dict[str, int] = {}
    for subscripts, tensor in zip(inputs.split(","), tensors, strict=True):
        letters = subscripts.replace("...", "")
        shape = tensor.shape[tensor.dim() - len(letters) :] if "..." in subscripts else tensor.shape
        sizes.update(zip(letters, shape, strict=True))
    named_output = math.prod(sizes[c] for c in result.replace("...", "")) if result else 1
    return math.prod(sizes.values()) * max(output.numel() // max(named_output, 1), 1)


def _tensordot(output: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    # a = free_a × K, b = K × free_b, output = free_a × free_b: a·b·output = (free_a·K·free_b)².
    return math.isqrt(a.numel() * b.numel() * output.numel())


def _attention(output: torch.Tensor, query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    keys = key.shape[-2]
    return query.numel() * keys + output.numel() * keys  # Q·Kᵀ, then the weights times V


def _multi_head_attention(output: Any, query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    # query (L, [N,] E), key (S, [N,] E): four E×E projections (q, k, v, out), then Q·Kᵀ and the weights times V.
    embed = query.shape[-1]
    query_tokens, key_tokens = query.numel() // embed, key.numel() // embed
    return 2 * (query_tokens + key_tokens) * embed * embed + 2 * query_tokens * key.shape[0] * embed


_RULES: dict[Callable, Callable[..., int]] = {
    F.linear: _linear,
    F.conv1d: _conv,
    F.conv2d: _conv,
    F.conv3d: _conv,
    F.conv_transpose1d: _conv_transpose,
    F.conv_transpose2d: _conv_transpose,
    F.conv_transpose3d: _conv_transpose,
    torch.matmul: _matmul,
    torch.Tensor.matmul: _matmul,
    torch.Tensor.__matmul__: _matmul,
    torch.mm: _matmul,
    torch.Tensor.mm: _matmul,
    torch.bmm: _matmul,
    torch.Tensor.bmm: _matmul,
    torch.mv: _matmul,
    torch.addmm: _addmm,
    torch.baddbmm: _addmm,
    torch.einsum: _einsum,
    torch.tensordot: _tensordot,
    F.scaled_dot_product_attention: _attention,
    F.multi_head_attention_forward: _multi_head_attention,
}


class _Counter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.macs = 0

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        rule = _RULES.get(func)
        if rule is not None:
            self.macs += int(rule(output, *args, **kwargs))
        return output


def forward_macs(fn: Callable[..., Any], *args: Any) -> int:
    """Multiply-adds of ``fn(*args)`` (run once, under ``torch.no_grad()``)."""
    with torch.no_grad(), _Counter() as counter:
        fn(*args)
    return counter.macs
