"""The caller's process-wide torch state that a kernel must not inherit, set aside at each public entry point.

- **A torch.func transform around the call** (``vmap``, ``grad``, ``jacrev`` of a function calling ``torchntk.ntk``):
  torchntk's own ``torch.func`` calls would nest inside it, and its probes read tensor data that a transform hides
  (torch's messages: "data-dependent control flow", "Cannot access data pointer"). Refused by name.
- **``torch.inference_mode()``**: tensors made there track no version counter and cannot be saved for backward.
  The call runs with inference mode off; inputs made under it are copied (:func:`torchntk._problem.as_inputs`),
  and weights made under it are refused by name (:func:`refuse_inference_weights`), with the fix.
- **A default device other than the model's** (``torch.set_default_device("cuda")`` with a CPU model, or "meta"):
  torchntk's own tensors (and the forward's factory calls, as the model's device has them) are made on the model's
  device; before, a CPU model under a "meta" default failed with "Cannot copy out of meta tensor".
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

F = TypeVar("F", bound=Callable[..., Any])


def inside_transform() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jvp, vjp, jacrev, jacfwd, functionalize) is running."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def refuse_inside_transform(name: str) -> None:
    if inside_transform():
        raise RuntimeError(
            f"torchntk.{name} was called inside a torch.func transform (vmap, grad, jacrev, ...): it takes its own "
            "derivatives with torch.func and reads the data of its inputs, which a transform hides. Call it outside "
            "the transform (for kernels of several inputs, call it once per input and stack the results)."
        )


def _model_device(model: Any) -> torch.device | None:
    if not isinstance(model, nn.Module):
        return None
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return None


@contextlib.contextmanager
def set_aside(name: str, model: Any) -> Iterator[None]:
    """Within: no inference mode, and the model's device as the default one (where the caller set another)."""
    refuse_inside_transform(name)
    device = _model_device(model)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        if device is not None and device.type != "meta" and torch.get_default_device() != device:
            stack.enter_context(torch.device(device))
        yield


def caller_state_set_aside(fn: F) -> F:
    """Decorate a public entry point whose first argument is the model: it runs under :func:`set_aside`."""

    @functools.wraps(fn)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
        with set_aside(fn.__name__, model):
            return fn(model, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def refuse_inference_weights(model: nn.Module) -> None:
    """``ValueError`` for parameters or buffers made under ``torch.inference_mode()``: autograd cannot save them for
    backward (torch's "Inference tensors cannot be saved for backward")."""
    made = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_inference()]
    if made:
        raise ValueError(
            f"the model's weights {made[:3]}{' ...' if len(made) > 3 else ''} were made under torch.inference_mode(), "
            "and autograd cannot differentiate through such tensors. Build or load the model outside inference mode, "
            "or copy it there: model = copy.deepcopy(model)."
        )
