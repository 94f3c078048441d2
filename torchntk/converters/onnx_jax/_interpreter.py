"""The ONNX graph walker: turns a ``ModelProto`` into a pure JAX function of the graph inputs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import onnx

from ._core import (
    HANDLERS,
    Node,
    UnsupportedOnnxOp,
    Value,
    constant_weights,
    exact_candidates,
    exact_numbers,
    exact_value,
    is_static,
    tensor_to_array,
    values_digest,
)
from ._rewrites import drop_precision_casts, fuse_clamp_by_tensors, fuse_transposed_matmul
from ._rolling import RollPlan, input_key, plan_rolls, value_facts, walk_rolled

_DEFAULT_DOMAINS = ("", "ai.onnx")


def default_opset(model: onnx.ModelProto) -> int:
    """The opset version of the default ONNX domain that the model was exported with."""
    for entry in model.opset_import:
        if entry.domain in _DEFAULT_DOMAINS:
            return entry.version
    raise UnsupportedOnnxOp("<model>", model.graph.name, "the model imports no default-domain ONNX opset")


def _inline_functions(
    protos: Iterable[onnx.NodeProto], functions: dict[tuple[str, str], onnx.FunctionProto], prefix: str = ""
) -> list[onnx.NodeProto]:
    """Replace calls of model-local functions by their bodies (values renamed per call site)."""
    flat: list[onnx.NodeProto] = []
    for index, proto in enumerate(protos):
        function = functions.get((proto.domain, proto.op_type))
        if function is None:
            flat.append(proto)
            continue
        site = f"{prefix}{proto.name or proto.op_type}_{index}/"
        rename = dict(zip(function.input, proto.input, strict=False)) | dict(
            zip(function.output, proto.output, strict=False)
        )
        caller_attrs = {a.name: a for a in proto.attribute} | {
            a.name: a for a in function.attribute_proto if a.name not in {b.name for b in proto.attribute}
        }
        body = []
        for inner in function.node:
            node = onnx.NodeProto()
            node.CopyFrom(inner)
            node.name = site + (inner.name or inner.op_type)
            node.input[:] = [rename.get(n, site + n) if n else "" for n in inner.input]
            node.output[:] = [rename.get(n, site + n) if n else "" for n in inner.output]
            attributes = []
            for attribute in inner.attribute:
                if attribute.ref_attr_name:  # an attribute forwarded from the call site
                    if attribute.ref_attr_name not in caller_attrs:
                        continue
                    resolved = onnx.AttributeProto()
                    resolved.CopyFrom(caller_attrs[attribute.ref_attr_name])
                    resolved.name = attribute.name
                    attributes.append(resolved)
                else:
                    attributes.append(attribute)
            del node.attribute[:]
            node.attribute.extend(attributes)
            body.append(node)
        flat.extend(_inline_functions(body, functions, site))
    return flat


def _check_supported(nodes: Sequence[Node], domains: Sequence[str]) -> None:
    unsupported = [
        (n, d) for n, d in zip(nodes, domains, strict=True) if d not in _DEFAULT_DOMAINS or n.op_type not in HANDLERS
    ]
    if not unsupported:
        return
    node, domain = unsupported[0]
    kinds = sorted({f"{d}::{n.op_type}" if d not in _DEFAULT_DOMAINS else n.op_type for n, d in unsupported})
    where = f" from domain {domain!r}" if domain not in _DEFAULT_DOMAINS else ""
    sources = sorted({n.aten for n, _ in unsupported if n.aten})  # what the user's model called
    exported = f" (exported from {', '.join(sources[:3])})" if sources else ""
    raise UnsupportedOnnxOp(
        node.op_type,
        node.name,
        f"no onnx-jax handler for this op{where}; unsupported ops in this graph: {', '.join(kinds)}{exported}. "
        "Use implementation='jacobian_contraction' or 'ntk_vector_products' (auto falls back to them), the "
        "onnx-tf route for a float32 model, or replace the torch module that produced it by standard layers.",
    )


def _check_dataflow(nodes: Sequence[Node], known: Iterable[str], outputs: Sequence[str]) -> None:
    """Every value must be defined (graph input, initializer or an earlier node's output) before it is used."""
    defined = set(known)
    for node in nodes:
        missing = [name for name in node.inputs if name and name not in defined]
        if missing:
            raise ValueError(
                f"ONNX node {node.name!r} ({node.op_type}) reads {missing}, which no graph input, initializer or "
                "earlier node defines: the graph is not topologically sorted or is missing inputs (onnx.checker)."
            )
        defined.update(node.outputs)
    if undefined := [name for name in outputs if name not in defined]:
        raise ValueError(f"ONNX graph outputs {undefined} are never computed")


def _refuse_float32_rounded(
    constants: dict[str, np.ndarray], nodes: Sequence[Node], weights: frozenset[str] = frozenset()
) -> None:
    """Refuse a float64 constant the export rounded to float32: ``torch.full_like(h, 1/3)``, ``torch.linspace(0,
    1/3, n)`` are folded into float64 initializers holding 0.3333333432674408. Met on a small part of the Jacobian
    (a branch the first example does not take, a first layer's), it left a float64 kernel 5e-9 off with no check able
    to see it. The model's own buffers (``model.*``) are kept as they are: a float32 model's, made ``.double()``,
    hold such values by right, and so do the copies the export folds of its constant weights (``weights``: the
    digests of the unselected parameters; a frozen Linear's weight, transposed, was refused). Binary fractions
    (0.5, 0.25) are exact either way, and a value a number of its reader's aten call restores
    (:func:`exact_numbers`: hardtanh's bounds) is kept."""
    for name, array in constants.items():
        if array.dtype != np.float64 or name.startswith("model.") or not array.size:
            continue
        values = array[np.isfinite(array)].ravel()
        if not np.array_equal(values.astype(np.float32).astype(np.float64), values):
            continue  # a genuine float64 constant
        if weights and len(np.unique(values)) > 1 and values_digest(array) in weights:
            continue  # a constant weight of the model, folded (transposed) by the export; one value repeated: unsure
        rounded = [v for v in values[values != np.round(values)] if float(str(np.float32(v))) != v]
        if not rounded:
            continue
        # a number of the aten call that reads it restores it (exact_numbers: hardtanh's bounds -0.3, 0.3)
        readers = [exact_candidates(n.numbers) for n in nodes if name in n.inputs and n.numbers]
        rounded = [v for v in rounded if not any(exact_value(float(v), c) != float(v) for c in readers)]
        if rounded:
            raise UnsupportedOnnxOp(
                "initializer",
                name,
                f"this float64 constant holds {float(rounded[0])!r}, the float32 rounding of another number (the ONNX "
                "export folded a constant such as torch.full_like(x, 1/3) or torch.linspace in float32); its "
                "derivative would be ~1e-8 off. Register the constant as a float64 buffer of the model, or use "
                "implementation='jacobian_contraction' or 'ntk_vector_products'",
            )


def _input_specs(graph: onnx.GraphProto, names: Sequence[str]) -> list[jax.ShapeDtypeStruct] | None:
    """The graph inputs' declared shapes and dtypes (``None`` where one is not fully static)."""
    declared = {v.name: v.type.tensor_type for v in graph.input}
    specs = []
    for name in names:
        tensor = declared[name]
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        if None in dims or not tensor.elem_type:
            return None
        specs.append(jax.ShapeDtypeStruct(tuple(dims), onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)))
    return specs


class OnnxJaxFunction:
    """A JAX function interpreting one ONNX graph; call it with the graph inputs in order.

    Initializers are constants of the function. Every call re-walks the graph, so wrap it in ``jax.jit``
    (or call it under ``jax.linearize``/``jax.vjp``/``jax.vmap``) to trace it once. With ``roll=True``, runs of
    repeated blocks are traced as one ``jax.lax.scan`` each (:mod:`._rolling`; planned per input shapes).
    """

    def __init__(self, model: onnx.ModelProto, roll: bool = False) -> None:
        graph = model.graph
        self.opset = default_opset(model)
        self.constants: dict[str, np.ndarray] = {t.name: tensor_to_array(t) for t in graph.initializer}
        for sparse in graph.sparse_initializer:
            self.constants[sparse.values.name] = tensor_to_array(sparse)
        # Older exporters also list initializers among the graph inputs; those stay constants here.
        self.input_names = [v.name for v in graph.input if v.name not in self.constants]
        self.input_specs = _input_specs(graph, self.input_names)
        self.output_names = [v.name for v in graph.output]
        functions = {(f.domain, f.name): f for f in model.functions}
        protos = _inline_functions(graph.node, functions)
        nodes = [Node.from_proto(p, self.opset, i) for i, p in enumerate(protos)]
        _refuse_float32_rounded(self.constants, nodes, constant_weights(model))
        _check_supported(nodes, [p.domain for p in protos])
        _check_dataflow(nodes, [*self.constants, *self.input_names], self.output_names)
        nodes = fuse_clamp_by_tensors(drop_precision_casts(nodes), self.output_names)
        self.nodes = fuse_transposed_matmul(nodes, self.output_names)
        self.roll = roll
        self._plans: dict[tuple, RollPlan] = {}

    def __call__(self, *inputs: jax.typing.ArrayLike) -> list[jax.Array]:
        env = self._env(inputs)
        if self.roll:
            walk_rolled(self.nodes, self.roll_plan(*inputs), env, self._walk)
        else:
            self._walk(self.nodes, env)
        return [jnp.asarray(env[name]) if is_static(env[name]) else env[name] for name in self.output_names]

    def roll_plan(self, *inputs: jax.typing.ArrayLike) -> RollPlan:
        """The runs of repeated blocks scanned at these inputs' shapes and dtypes (one abstract walk, cached)."""
        key = input_key(inputs)
        if key not in self._plans:
            facts = value_facts(lambda *args: self._walk(self.nodes, self._env(args)), inputs)
            self._plans[key] = plan_rolls(self.nodes, self.input_names, self.output_names, facts)
        return self._plans[key]

    def has_loops(self) -> bool:
        """Whether ``roll=True`` scans any run at the graph's own input shapes (where the graph declares them all)."""
        return self.roll and self.input_specs is not None and bool(self.rolled_runs(*self.input_specs))

    def rolled_runs(self, *inputs: jax.typing.ArrayLike) -> list[tuple[int, int, int]]:
        """``(first node index, period in segments, repetitions)`` of each run ``roll=True`` scans at these inputs."""
        return self.roll_plan(*inputs).summary()

    def _env(self, inputs: Sequence[jax.typing.ArrayLike]) -> dict[str, Value]:
        if len(inputs) != len(self.input_names):
            raise TypeError(
                f"the ONNX graph takes {len(self.input_names)} inputs ({', '.join(self.input_names[:5])}"
                f"{', ...' if len(self.input_names) > 5 else ''}), got {len(inputs)}"
            )
        env: dict[str, Value] = dict(self.constants)
        # Graph inputs are always traced values, even when given as numpy arrays.
        env.update(zip(self.input_names, (jnp.asarray(v) for v in inputs), strict=True))
        return env

    def _walk(self, nodes: Sequence[Node], env: dict[str, Value]) -> dict[str, Value]:
        """Interpret ``nodes`` in order, reading and writing values in ``env`` (returned)."""
        for node in nodes:
            try:
                args = exact_numbers(node, [env[name] if name else None for name in node.inputs])
                result = HANDLERS[node.op_type](node, *args)
            except UnsupportedOnnxOp:
                raise
            except Exception as error:
                error.add_note(f"while interpreting ONNX node {node.name!r} ({node.op_type}, opset {node.opset})")
                raise
            results = list(result) if isinstance(result, tuple | list) else [result]
            for name, value in zip(node.outputs, results, strict=False):
                if name:
                    env[name] = value
            if len(results) < len(node.outputs) and any(node.outputs[len(results) :]):
                raise node.unsupported(f"output #{len(results)} ({node.outputs[len(results)]!r}) is not supported")
        return env

    def __repr__(self) -> str:
        return f"OnnxJaxFunction({len(self.nodes)} nodes, opset {self.opset}, inputs={len(self.input_names)})"


def onnx_to_jax(model: onnx.ModelProto, roll: bool = False) -> OnnxJaxFunction:
    """Convert an ONNX model into a JAX function ``g(*graph_inputs) -> list of graph outputs``.

    Inputs are positional in graph-input order (initializers are baked-in constants); dtypes follow the
    graph (float64 graphs need ``jax.enable_x64(True)`` at call time). Raises
    :class:`UnsupportedOnnxOp` at conversion time for any op without a handler. ``roll=True`` traces runs of
    repeated blocks as ``jax.lax.scan`` (same values and derivatives, a jaxpr that does not grow with depth).
    """
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"onnx_to_jax expects an onnx.ModelProto, got {type(model).__name__}")
    return OnnxJaxFunction(model, roll=roll)
