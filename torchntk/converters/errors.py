"""The one exception every converter raises when a model cannot be turned into a JAX function."""

from __future__ import annotations


class ConversionError(RuntimeError):
    """A PyTorch model (or one of its ops) cannot be converted to JAX on the requested route.

    The message names the problem (ONNX op, torch module where known) and what to do instead.
    """


class NonFiniteCheckError(ConversionError):
    """The conversion cannot be checked against torch: NaN/Inf in the weights, buffers or the first example.

    It depends on values, not on the architecture: the same model with finite weights converts (so it is never
    remembered as the architecture's failure).
    """

    depends_on_values = True


class TrainingFlagError(ConversionError):
    """Modules in training mode read a ``training`` flag: the eval-mode conversion may be another function. It
    depends on the modes, not on the architecture (after ``model.eval()`` the model converts), so auto never
    remembers it as the architecture's failure."""

    depends_on_values = True


class RouteFellBack(ConversionError):
    """A conversion checked beside the caller's work (``to_jax_while_checking``) was refused, and the next route's
    passed and is cached: what the caller built from the refused function is void; convert again."""
