"""Export a PyTorch model to ONNX with the selected parameters as graph inputs (shared by every JAX route).

A plain ``torch.onnx.export`` bakes weights into initializers, which later stages fold into constants (and fold
eval-mode BatchNorm into convolutions), so the NTK could not differentiate with respect to them. Here a wrapper
``forward(*params, *inputs)`` calls ``torch.func.functional_call`` and is exported with the dynamo exporter: the
graph inputs are ``p0 .. p{P-1}`` (the selected parameters, torch layout, in ``param_names`` order) followed by
``x0 .. x{I-1}`` (the model inputs at batch size 1). Buffers (BatchNorm running statistics) and unselected
parameters stay initializers. Outputs are ``y0 .. y{O-1}``.

ONNX has no stop-gradient, and the exporter inlines custom ``torch.autograd.Function`` forwards, dropping their
hand-written backward: both would silently change the gradients, so both are refused here.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import torch

from torchntk._backward_conventions import EMBEDDING_OPS, schema_arguments
from torchntk._module_state import kept_as_it_was
from torchntk._problem import functional_forward, hookable_modules, parameter_aliases
from torchntk.converters.onnx_jax._core import CONSTANT_WEIGHTS_KEY, values_digest

from .errors import ConversionError

PARAM_PREFIX = "p"
INPUT_PREFIX = "x"
OUTPUT_PREFIX = "y"
METADATA_KEY = "torchntk.export"  # JSON: {"param_names": [...], "n_inputs": I, "n_outputs": O}


class _ParamsAsInputs(torch.nn.Module):
    """``forward(*params, *inputs) = model(*inputs)`` with the named parameters replaced by the given tensors."""

    def __init__(self, model: torch.nn.Module, param_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.param_names = tuple(param_names)
        # Every (module, attribute) holding a selected parameter, swapped once each: functional_call's own
        # tie_weights corrupts a module registered under two names (see torchntk._problem.parameter_aliases).
        self.aliases = parameter_aliases(model)

    def forward(self, *args: torch.Tensor):
        n = len(self.param_names)
        params = dict(zip(self.param_names, args[:n], strict=True))
        return functional_forward(self.model, self.aliases, params, tuple(args[n:]))


def check_eval_mode(model: torch.nn.Module) -> None:
    """Refuse a model with any submodule in training mode (dropout, batch statistics) before exporting it."""
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ConversionError(
            f"The model is in training mode (modules {training[:3]}{' ...' if len(training) > 3 else ''}): the NTK "
            "is taken of the deterministic eval-mode function. Call model.eval() before converting."
        )


def batch_one(example_inputs: Sequence[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Validate ``example_inputs`` (tensors with a leading batch axis, N >= 1) and keep the first example of each."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs:
        raise ConversionError("example_inputs is empty: pass a tuple of example tensors, each with a batch axis.")
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise ConversionError(f"example_inputs[{i}] is a {type(x).__name__}; only tensors are supported.")
        if x.ndim == 0 or x.shape[0] < 1:
            raise ConversionError(
                f"example_inputs[{i}] has shape {tuple(x.shape)}: each input needs a leading batch axis with at "
                "least one example, e.g. x[None] for a single example."
            )
    return tuple(x[:1].detach() for x in inputs)


def _module_owning(model: torch.nn.Module):
    """Forward hooks that remember, for each autograd node, the innermost module whose output first reached it."""
    owner: dict[torch.autograd.graph.Node, str] = {}

    def hook(name):
        def record(_module, _args, output):
            stack = [t.grad_fn for t in _flatten(output) if t.grad_fn is not None]
            while stack:
                node = stack.pop()
                if node is None or node in owner:
                    continue
                owner[node] = name or type(model).__name__
                stack.extend(next_fn for next_fn, _ in node.next_functions)

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in hookable_modules(model)]
    return owner, handles


def _flatten(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _flatten(o)]
    if isinstance(output, dict):
        return [t for o in output.values() for t in _flatten(o)]
    return []


def check_not_scripted(model: torch.nn.Module) -> None:
    """Refuse scripted submodules (``torch.jit.script``): torch.export does not trace into them (it failed with
    ``Linear.forward() takes 2 positional arguments but 3 were given``)."""
    scripted = [
        name or type(model).__name__ for name, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)
    ]
    if scripted:
        raise ConversionError(
            f"{scripted[:3]} {'is a' if len(scripted) == 1 else 'are'} scripted module{'s' * (len(scripted) > 1)} "
            "(torch.jit.script), which torch.export cannot trace: build the model without scripting them for "
            "structured derivatives, or use implementation='jacobian_contraction' or 'ntk_vector_products'."
        )


def check_custom_autograd(model: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> None:
    """Refuse custom ``torch.autograd.Function``: ONNX keeps its forward but not its hand-written backward.

    One eager forward with floating inputs requiring grad records the autograd graph, whose custom-Function nodes
    are found and attributed to the innermost module that produced them. (Not through ``functional_call``: in
    torch 2.14 an eager ``functional_call`` on a model with tied weights swaps Parameters for plain tensors.)
    """
    owner, handles = _module_owning(model)
    try:
        with torch.enable_grad(), kept_as_it_was(model):  # a cache it fills must not reach the export as a constant
            model(*(x.detach().requires_grad_() if x.is_floating_point() else x for x in inputs))
    finally:
        for h in handles:
            h.remove()
    for node, module in owner.items():
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            fn = type(node).__name__.removesuffix("Backward")
            raise ConversionError(
                f"Module {module!r} calls the custom autograd Function {fn!r}. Its custom backward cannot be "
                "expressed in ONNX (the exporter would keep only its forward, giving silently different gradients). "
                "Rewrite it with differentiable torch ops, or compute this NTK with torchntk's torch-native methods."
            )


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<top level>"
    path, cls = list(stack.values())[-1]
    name = path.removeprefix("model").removeprefix(".") or "<top level>"
    return f"{name!r} ({getattr(cls, '__qualname__', cls)})"


_STOP_GRADIENT = {torch.ops.aten.detach.default, torch.ops.higher_order.wrap_with_set_grad_enabled}


def _exporter_reason(error: BaseException) -> str:
    """What failed, from the exporter's chain of errors: its innermost message (the outer ones are generic "next
    steps") and the torch ops they name, without the terminal's colour codes."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen and len(chain) < 8:
        seen.add(id(error))
        chain.append(re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip())
        error = error.__cause__ or error.__context__
    ops = sorted(set(re.findall(r"(?:aten|prims)\.\w+(?:\.\w+)?", " ".join(chain))))
    innermost = next((text for text in reversed(chain) if text), "")
    return f"{innermost.splitlines()[0][:300] if innermost else 'no message'}" + (
        f" (ops: {', '.join(ops[:5])})" if ops else ""
    )


def _scalar_tensor_exact(s: float, dtype: int = -1, layout: str = "", device: str = "", pin_memory: bool = False):
    """``aten.scalar_tensor`` (how the exporter makes tensors of the Python numbers in ``h >= 0.7``, ``x * 0.1``,
    ``clamp(x, min=0.3)``) as a constant of its own dtype. The exporter's translation made a float32 constant and
    cast it: a float64 model compared with 0.699999988, so inputs between the two took the other branch and their
    kernel rows were wrong (0.49 off) while the check on the first example passed."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    kind = ir.DataType.FLOAT if dtype == -1 else ir.DataType(dtype)
    return op.Constant(value=ir.tensor(np.array(s, dtype=kind.numpy())))


_ADAPTIVE_MAX_POOLS = tuple(getattr(torch.ops.aten, f"adaptive_max_pool{d}d").default for d in (1, 2, 3))


def _adaptive_max_pool_to_one(x: torch.Tensor, output_size: Sequence[int]) -> Any:
    """Adaptive max pooling to one value per channel as ``max(dim)`` over the flattened window: its derivative goes
    to the first maximum, as torch's own backward (the exporter's decomposition, ``amax``, splits it evenly among
    tied maxima: a ReLU's all-zero channel is a tie; kernels were 3% off). Other sizes: the exporter's."""
    if any(size != 1 for size in output_size):
        return NotImplemented
    spatial = len(output_size)
    values, indices = x.flatten(-spatial).max(-1, keepdim=True)
    shape = (*x.shape[:-spatial], *([1] * spatial))
    return values.reshape(shape), indices.reshape(shape)


def _with_torch_conventions(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` with the ops whose exported form loses torch's derivative convention rewritten (a retrace: only
    when the program holds one)."""
    if not any(node.target in _ADAPTIVE_MAX_POOLS for node in program.graph.nodes):
        return program
    return program.run_decompositions({op: _adaptive_max_pool_to_one for op in _ADAPTIVE_MAX_POOLS})


def check_stop_gradient(program: torch.export.ExportedProgram) -> None:
    """Refuse ``.detach()`` / ``torch.no_grad()`` on tensors that depend on inputs: ONNX would differentiate them."""
    placeholders = {n for n in program.graph.nodes if n.op == "placeholder"}
    depends = set(placeholders)
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        if any(a in depends for a in node.all_input_nodes):
            depends.add(node)
            if node.target in _STOP_GRADIENT:
                what = "x.detach()" if node.target is torch.ops.aten.detach.default else "torch.no_grad()"
                raise ConversionError(
                    f"Module {_module_path(node)} uses {what} on a tensor that depends on the inputs or weights. "
                    "ONNX has no stop-gradient, so the converted function would differentiate through it and give a "
                    "different NTK. Remove the stop-gradient, or use torchntk's torch-native methods."
                )


def check_embedding_gradients(program: torch.export.ExportedProgram, n_params: int) -> None:
    """Refuse a parameter looked up with ``padding_idx`` or ``scale_grad_by_freq``: torch's backward leaves the
    padding row out of the gradient (it is never trained) and scales each row's gradient by its count in the
    example, so torch's NTK (the torch-native methods') does too, while ONNX's ``Gather`` keeps only the lookup and
    the converted function would differentiate it plainly (0.14 off on a small model, refused late by the check)."""
    weights = {n.name for n in program.graph.nodes if n.op == "placeholder"}
    weights &= set(program.graph_signature.user_inputs[:n_params])
    depends = {n for n in program.graph.nodes if n.name in weights}
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        if any(a in depends for a in node.all_input_nodes):
            depends.add(node)
        packet = getattr(node.target, "_overloadpacket", None)
        if packet is None or packet.__name__ not in EMBEDDING_OPS:
            continue
        arguments = schema_arguments(node.target, node.args, node.kwargs)
        if arguments.get("weight") not in depends:
            continue
        padding, by_frequency = arguments.get("padding_idx"), arguments.get("scale_grad_by_freq")
        if by_frequency:
            what, why = "scale_grad_by_freq=True", "scales each row's gradient by its count in the example"
        elif padding is not None and padding >= 0:
            what, why = f"padding_idx={padding}", "leaves the padding row out of the gradient (it is never trained)"
        else:
            continue
        raise ConversionError(
            f"Module {_module_path(node)} looks up a parameter with {what}: torch's backward {why}, which is not "
            "the derivative of the lookup, and torch's NTK follows its backward. ONNX keeps only the lookup, so "
            "structured derivatives would differentiate it plainly. Use implementation='jacobian_contraction' or "
            "'ntk_vector_products' (auto falls back to them)."
        )


#: aten arguments torch's ONNX exporter drops (the exported op computes another function): op -> argument name.
DROPPED_ARGUMENTS = {
    "avg_pool1d": "divisor_override",
    "avg_pool2d": "divisor_override",
    "avg_pool3d": "divisor_override",
}


def check_dropped_arguments(program: torch.export.ExportedProgram) -> None:
    """Refuse an op whose argument the ONNX export drops: ``avg_pool2d(divisor_override=5)`` became a plain average
    (0.42-0.69 off, refused by the check as "Please report this")."""
    for node in program.graph.nodes:
        packet = getattr(node.target, "_overloadpacket", None) if node.op == "call_function" else None
        argument = DROPPED_ARGUMENTS.get(getattr(packet, "__name__", ""))
        if argument and schema_arguments(node.target, node.args, node.kwargs).get(argument) is not None:
            raise ConversionError(
                f"Module {_module_path(node)} calls {packet.__name__} with {argument}, which torch's ONNX export "
                "drops, so the converted function would be another one. Use implementation='jacobian_contraction' "
                "or 'ntk_vector_products' (auto falls back to them)."
            )


def export_onnx(
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    param_names: Sequence[str],
) -> onnx.ModelProto:
    """Export ``model`` with the parameters ``param_names`` as ONNX graph inputs, at batch size 1.

    Args:
        model: an ``nn.Module`` in eval mode whose forward returns a tensor (or a tuple of tensors).
        example_inputs: tensors with a leading batch axis ``(N, *in_shape_i)``; only the first example is used.
        param_names: names from ``model.named_parameters()`` (tied parameters once), the order of the graph inputs.

    Returns:
        A ``ModelProto`` whose graph inputs are ``p0..p{P-1}`` (parameter ``k`` in torch layout) then
        ``x0..x{I-1}`` of shape ``(1, *in_shape_i)``, and whose outputs are ``y0..``. Its metadata entry
        ``torchntk.export`` (JSON) records ``param_names``, ``n_inputs`` and ``n_outputs``.

    Raises:
        ConversionError: training mode, custom autograd Functions, stop-gradients, or a torch.export failure.
    """
    check_eval_mode(model)
    check_not_scripted(model)
    inputs = batch_one(example_inputs)
    own = dict(model.named_parameters())
    missing = [n for n in param_names if n not in own]
    if missing:
        raise ConversionError(f"{missing} are not parameters of {type(model).__name__} (see model.named_parameters()).")
    params = tuple(own[n].detach() for n in param_names)
    check_custom_autograd(model, inputs)

    wrapper = _ParamsAsInputs(model, param_names).eval()
    args = params + inputs
    try:
        program = torch.export.export(wrapper, args, strict=False)
    except Exception as err:  # torch.export raises many types; all mean "this forward cannot be captured"
        raise ConversionError(
            f"torch.export could not capture {type(model).__name__}.forward ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}). Data-dependent Python control flow "
            "and non-tensor outputs are the usual causes; rewrite that part with tensor ops."
        ) from err
    check_stop_gradient(program)
    check_embedding_gradients(program, len(params))
    check_dropped_arguments(program)
    program = _with_torch_conventions(program)
    n_out = len(program.graph_signature.user_outputs)
    names = [f"{PARAM_PREFIX}{i}" for i in range(len(params))] + [f"{INPUT_PREFIX}{i}" for i in range(len(inputs))]
    try:
        # The exporter prints progress lines and warns about things we already handle; keep the user's console clean.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(
                program,
                dynamo=True,
                custom_translation_table={torch.ops.aten.scalar_tensor.default: _scalar_tensor_exact},
                input_names=names,
                output_names=[f"{OUTPUT_PREFIX}{i}" for i in range(n_out)],
                verbose=False,
            )
    except Exception as err:
        raise ConversionError(
            f"torch.onnx.export failed on {type(model).__name__}: {_exporter_reason(err)}. An op without an ONNX "
            "translation is the usual cause: replace it, or use implementation='jacobian_contraction' or "
            "'ntk_vector_products' (auto falls back to them)."
        ) from err
    proto = onnx_program.model_proto
    meta = {"param_names": list(param_names), "n_inputs": len(inputs), "n_outputs": n_out}
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta))
    constant = [  # float64 weights held constant, which the export may fold into initializers of its own
        p for name, p in model.named_parameters() if name not in param_names and p.dtype == torch.float64
    ]
    arrays = [p.detach().cpu().numpy() for p in constant]
    digests = sorted({values_digest(a) for a in arrays} | {values_digest(a.T) for a in arrays if a.ndim == 2})
    proto.metadata_props.add(key=CONSTANT_WEIGHTS_KEY, value=json.dumps(digests))
    return proto


def computes_in_float64(proto: onnx.ModelProto) -> bool:
    """Whether the graph holds a float64 tensor anywhere: a cast to double, a constant, an input or intermediate."""
    double = onnx.TensorProto.DOUBLE
    graph = proto.graph
    typed = [*graph.input, *graph.output, *graph.value_info]
    if any(v.type.tensor_type.elem_type == double for v in typed):
        return True
    if any(t.data_type == double for t in graph.initializer):
        return True
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.name == "to" and attribute.i == double:
                return True
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == double:
                return True
    return False
