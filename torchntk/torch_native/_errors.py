"""torch.func failures translated into torchntk messages that name the cause and what to do.

The torch-native methods run the model under ``vmap``, ``jacrev`` and ``jvp``; what a model does that these
transforms cannot (an RNN's fused kernel, Python control flow on a tensor's value, a custom autograd Function
without the torch.func methods, an operator without a forward-mode derivative) surfaces as a torch-internal error
that points at torch, not at the model. :func:`translated_errors` maps each known failure, by a registry of
``(pattern, explanation)`` pairs, to an :class:`UnsupportedModelError` chained to the original; an unknown one
passes through untouched.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn


class UnsupportedModelError(RuntimeError):
    """A torch-native NTK method cannot differentiate this model; the message says why and what to do instead."""


@dataclass(frozen=True)
class _Context:
    model: nn.Module
    method: str  # "jacobian_contraction" or "ntk_vector_products"
    error: BaseException
    text: str  # the error's message and the files of its traceback


Explain = Callable[[_Context], str | None]
_TRANSLATIONS: list[tuple[re.Pattern[str], Explain]] = []


def translation(pattern: str) -> Callable[[Explain], Explain]:
    """Register ``explain(context) -> message or None`` for failures whose text matches ``pattern``."""

    def register(explain: Explain) -> Explain:
        _TRANSLATIONS.append((re.compile(pattern, re.DOTALL), explain))
        return explain

    return register


def _instead(context: _Context) -> str:
    """What runs where vmap over the examples or forward-mode AD fails: Jacobian contraction, which takes the
    examples one at a time when vmap cannot batch them."""
    if context.method == "ntk_vp":
        return (
            "Compute the kernel with torchntk.ntk(..., implementation='jacobian_contraction') and contract it with v "
            "instead."
        )
    return "Use implementation='jacobian_contraction' (or 'auto'), which runs one example at a time if it must."


def _rnns(model: nn.Module) -> list[str]:
    recurrent = (nn.RNNBase, nn.RNNCellBase)
    return [f"{name or 'model'} ({type(m).__name__})" for name, m in model.named_modules() if isinstance(m, recurrent)]


@translation(r"doesn't match the broadcast shape|_cudnn_rnn|lstm|gru|rnn_tanh|rnn_relu")
def _recurrent(context: _Context) -> str | None:
    rnns = _rnns(context.model)
    if not rnns:
        return None
    return (
        f"torch.func.vmap cannot batch the recurrent layers {', '.join(rnns[:3])}: torch's fused RNN kernels write "
        f"each step into an unbatched hidden state. {_instead(context)}"
    )


@translation(r"data-dependent control flow|calling \.item\(\)|Tensor in some data-dependent")
def _data_dependent(context: _Context) -> str:
    return (
        "the model's forward uses a tensor's value in Python (if x.sum() > 0:, x.item(), int(x), a while loop on a "
        f"tensor), which torch.func.vmap cannot batch. {_instead(context)} Or rewrite it with tensor operations "
        "(torch.where(cond, a, b), masks)."
    )


@translation(r"dynamic shape|aten::nonzero|aten::masked_select|aten::unique")
def _dynamic_shape(context: _Context) -> str:
    return (
        "the model's forward calls an operator whose output shape depends on the values (nonzero, masked_select, "
        f"boolean-mask indexing x[x > 0], unique), which torch.func.vmap cannot batch. {_instead(context)} Or use a "
        "fixed-shape form (torch.where, multiplying by a mask)."
    )


@translation(r"support saved tensor hooks")
def _saved_tensor_hooks(context: _Context) -> str:
    return (
        "the model's forward, or the caller's context around torchntk, uses saved-tensor hooks "
        "(torch.utils.checkpoint with use_reentrant=False, torch.autograd.graph.saved_tensors_hooks or "
        "save_on_cpu), which torch.func's transforms do not support. Use implementation='jacobian_contraction' "
        "(or 'auto'), which takes them by torch's backward, or call torchntk outside such a context."
    )


@translation(r"use_reentrant=True, torch.utils.checkpoint is incompatible with \.grad\(\)")
def _reentrant_checkpoint(context: _Context) -> str:
    return (
        "the model uses torch.utils.checkpoint with use_reentrant=True, which neither torch.func nor "
        "torch.autograd.grad can differentiate (torch's own limitation). Pass use_reentrant=False (the same function, "
        "which every torch-native method takes), or call torchntk without activation checkpointing."
    )


@translation(r"NYI: (Tensor.clone\(memory_format\)|querying is_contiguous) inside (of )?vmap")
def _memory_format(context: _Context) -> str:
    return (
        "the model's forward asks for a memory format (x.contiguous(memory_format=torch.channels_last), "
        "x.clone(memory_format=...), or x.is_contiguous(...)), which torch.func.vmap does not support. Drop the call "
        "from forward (the memory format changes speed, not values; set it on the inputs and weights instead), or use "
        "implementation='structured_derivatives' (auto falls back to it)."
    )


@translation(r"'Sparse(CPU|CUDA)' backend|SparseCPU|SparseCUDA")
def _sparse_gradient(context: _Context) -> str:
    return (
        "the model's backward makes a sparse gradient (an Embedding or EmbeddingBag with sparse=True, or "
        "F.embedding(..., sparse=True)), which torch.func's dense Jacobians cannot hold. The lookup and its NTK "
        "are the same with sparse=False: build the layer with it (or call torchntk on a copy, copy.deepcopy(model), "
        "whose layers have .sparse = False), or use implementation='structured_derivatives' (auto falls back to it)."
    )


@translation(r"randomness")
def _random(context: _Context) -> str:
    return (
        "the model's forward draws random numbers under torch.func.vmap (dropout in training mode, e.g. "
        "F.dropout(x, training=True), or noise drawn in forward). The NTK of a random function is not defined: call "
        "model.eval(), pass training=self.training to F.dropout, or make the noise a fixed input."
    )


def _full_backward_hooks(model: nn.Module) -> list[str]:
    """Modules with a full backward hook (``register_full_backward_hook``/``_pre_hook``), and torch's global ones:
    torch runs them through an autograd Function of its own (``BackwardHookFunction``) that torch.func cannot take."""
    from torch.nn.modules import module as torch_module

    hooked = [name or "model" for name, m in model.named_modules() if m._backward_hooks or m._backward_pre_hooks]
    if torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks:
        hooked.append("every module (torch.nn.modules.module.register_module_full_backward_hook)")
    return hooked


@translation(r"setup_context|does not have vmap support|vmap staticmethod|generate_vmap_rule")
def _autograd_function_without_func_support(context: _Context) -> str:
    # Jacobian contraction takes these by torch's own backward (func_cannot_transform): only forward mode refuses
    hooked = _full_backward_hooks(context.model)
    if hooked:
        return (
            f"{', '.join(hooked[:3])} has a full backward hook (register_full_backward_hook), which torch runs as an "
            "autograd Function that forward mode cannot take. Use implementation='jacobian_contraction' (or "
            "'auto'), which takes it by torch's backward, hook included."
        )
    return (
        "the model calls a custom torch.autograd.Function that torch.func cannot transform. Use "
        "implementation='jacobian_contraction' (or 'auto'), which takes it by torch's backward; or write it in "
        "the torch.func style with a jvp staticmethod (https://pytorch.org/docs/stable/notes/extending.func.html)."
    )


@translation(r"flat_bdims must not be None|jvp")
def _autograd_function_without_jvp(context: _Context) -> str | None:
    if "autograd_function" not in context.text:  # raised from torch._functorch.autograd_function
        return None
    return (
        "the model calls a custom torch.autograd.Function without a jvp staticmethod (with ctx.save_for_forward in "
        f"setup_context), which forward-mode AD, and so {context.method}, needs. Add one. {_instead(context)}"
    )


@translation(r"Trying to use forward AD with (\S+)")
def _no_forward_derivative(context: _Context) -> str:
    match = re.search(r"Trying to use forward AD with (\S+)", context.text)
    op = match.group(1) if match else "an operator"
    return (
        f"torch has no forward-mode derivative for {op}, which the model calls, so {context.method} (built on "
        f"torch.func.jvp) cannot run on it. {_instead(context)}"
    )


@translation(r"mutate a captured Tensor|in-place operation .* captured")
def _mutates_captured(context: _Context) -> str:
    return (
        "the model's forward writes in place into a tensor it did not create while being differentiated (a buffer "
        "updated in forward, a module attribute or a global tensor, e.g. self.count += 1 or self.buf.copy_(x)). "
        "Write it out of place, or keep that state out of the forward that torchntk differentiates."
    )


# Last: an op whose batching rule fails inside torch.func.vmap (a shape error raised from torch's functorch, where the
# model's own forward ran fine in the probe): PReLU's backward under vmap(jacrev) (its weight's shape met the batch
# size), RNN cells, rrelu in eval mode, linalg.solve with an unbatched right-hand side, a new tensor written in place
# with batched values (y = torch.empty(n, 3); y[:, 0] = h[:, 0]; scatter_ into torch.zeros), an op vmap runs example
# by example whose results differ in shape (pack_padded_sequence with a lengths input), a fused kernel reading a
# data pointer that vmap's tensors lack (a GRU over a packed sequence), a backward reading .data (scatter_reduce's
# "prod" with a zero among repeated indices).
@translation(
    r"must match the size of tensor b|doesn't match the broadcast shape|Batching rule not implemented|"
    r"we do not yet support|contracted dimensions need to match|shapes cannot be multiplied|"
    r"is not possible because there exists a Tensor `other`|stack expects each tensor to be equal size|"
    r"Cannot access data pointer of Tensor that doesn't have storage|accessing .data. under vmap transform"
)
def _batching_rule(context: _Context) -> str | None:
    if "_functorch" not in context.text:
        return None
    first = str(context.error).strip().splitlines()[0][:160] if str(context.error).strip() else "?"
    return (
        f"torch.func.vmap cannot batch an op of this model (its batching rule fails: {first!r}; PReLU, RNN cells and "
        f"rrelu are known cases). {_instead(context)}"
    )


def _match(model: nn.Module, method: str, error: BaseException) -> tuple[Explain, str] | None:
    files = "".join(frame.filename for frame in traceback.extract_tb(error.__traceback__))
    context = _Context(model, method, error, f"{error}\n{files}")
    for pattern, explain in _TRANSLATIONS:
        if pattern.search(context.text):
            message = explain(context)
            if message is not None:
                return explain, message
    return None


def explain_failure(model: nn.Module, method: str, error: BaseException) -> str | None:
    """torchntk's message for ``error`` raised while ``method`` ran on ``model``, or ``None`` when unknown."""
    match = _match(model, method, error)
    return None if match is None else match[1]


def vmap_cannot_batch(model: nn.Module, error: BaseException) -> bool:
    """Whether ``error`` is vmap failing to batch ``model`` (recurrent layers, control flow on values, value-dependent
    shapes): the model is fine one example at a time."""
    match = _match(model, "jacobian_contraction", error)
    return match is not None and match[0] in (_recurrent, _data_dependent, _dynamic_shape, _batching_rule)


def func_cannot_transform(model: nn.Module, error: BaseException) -> bool:
    """Whether ``error`` is torch.func refusing an autograd construct it cannot transform (an old-style
    ``autograd.Function``, a full backward hook, saved-tensor hooks): torch's own backward takes them."""
    match = _match(model, "jacobian_contraction", error)
    return match is not None and match[0] in (_saved_tensor_hooks, _autograd_function_without_func_support)


@contextmanager
def translated_errors(model: nn.Module, method: str) -> Iterator[None]:
    """Re-raise a known torch.func failure inside the block as an :class:`UnsupportedModelError`."""
    try:
        yield
    except (RuntimeError, NotImplementedError, AssertionError) as error:
        if isinstance(error, UnsupportedModelError):
            raise
        message = explain_failure(model, method, error)
        if message is None:
            raise
        first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise UnsupportedModelError(
            f"torchntk {method}: {message} (torch said: {type(error).__name__}: {first_line})"
        ) from error
