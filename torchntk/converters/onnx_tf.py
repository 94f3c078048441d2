"""Route "onnx-tf": ONNX graph -> TensorFlow (onnx2tf, in memory) -> pure JAX function (tf2jax).

The ONNX graph comes from :func:`~torchntk.converters.onnx_export.export_onnx`: its graph inputs (weights then
model inputs, batch size 1) all keep their torch layout, so the JAX function takes exactly the torch tensors.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import time
from collections.abc import Callable

import numpy as np
import onnx

from . import onnx2tf_compat
from ._quiet import import_quietly, native_stderr_captured, quiet_tf_env
from .errors import ConversionError
from .kink_rewrites import with_torch_kinks

ROUTE_NAME = "onnx-tf"


def torch_origin(node: onnx.NodeProto) -> str:
    """The torch module an ONNX node came from, as recorded by the dynamo exporter ("" when unknown)."""
    meta = {p.key: p.value for p in node.metadata_props}
    scopes = meta.get("pkg.torch.onnx.name_scopes")
    classes = meta.get("pkg.torch.onnx.class_hierarchy")
    try:
        scope = [s for s in json.loads(scopes.replace("'", '"'))[:-1] if s][-1] if scopes else ""
        cls = json.loads(classes.replace("'", '"'))[-2] if classes else ""
    except (ValueError, IndexError):
        return ""
    scope = scope.removeprefix("model").removeprefix(".")
    return f"torch module {scope or '<top level>'!r} ({cls})" if cls else ""


def _check_ops_supported(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        if importlib.util.find_spec(f"onnx2tf.ops.{node.op_type}") is None:
            origin = torch_origin(node)
            raise ConversionError(
                f"onnx2tf has no converter for the ONNX op {node.op_type!r} (node {node.name!r}"
                f"{', from ' + origin if origin else ''}). Replace that torch op, or use route='onnx-jax'."
            )


def _check_dtypes(model: onnx.ModelProto) -> None:
    for value in [*model.graph.input, *model.graph.output]:
        if value.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE:
            raise ConversionError(
                f"Route 'onnx-tf' does not support float64 (graph value {value.name!r}): onnx2tf builds float32 "
                "TensorFlow ops in several places. Use route='onnx-jax' for float64 models, or model.float()."
            )


def _node_named(model: onnx.ModelProto, name: str | None) -> onnx.NodeProto | None:
    for node in model.graph.node:
        if name and node.name.replace(":", "_") == name.replace(":", "_"):
            return node
    return None


def onnx_tf_to_jax(model: onnx.ModelProto) -> Callable[..., list]:
    """Convert a params-as-inputs ONNX graph to ``g(*graph_inputs) -> list of jax arrays``.

    ``graph_inputs`` are the ONNX graph inputs in graph order, in torch layout, at the exported (batch-1) shapes;
    the list holds the graph outputs in ONNX layout. ``g.timings`` records ``onnx2tf`` and ``tf2jax`` seconds.

    Raises:
        ConversionError: float64 graphs, ops onnx2tf lacks, or any onnx2tf / tf2jax failure (with the ONNX op and
            the torch module it came from, when known).
    """
    _check_dtypes(model)
    onnx2tf = import_quietly("onnx2tf")  # before find_spec("onnx2tf.ops.X"), which would import it noisily
    _check_ops_supported(model)
    tf = import_quietly("tensorflow")
    tf2jax = import_quietly("tf2jax")

    graph_model = with_torch_kinks(model)  # torch's derivatives at kinks, which onnx2tf + tf2jax do not keep
    initializers = {i.name for i in graph_model.graph.initializer}
    inputs = [v for v in graph_model.graph.input if v.name not in initializers]
    # Every graph input keeps its torch layout: onnx2tf marks such inputs "not transposed" and the ops that read
    # them directly convert axes accordingly; after the first op it works channel-last as usual.
    keep = [v.name for v in inputs]
    t0 = time.perf_counter()
    with (
        quiet_tf_env(),
        native_stderr_captured(),
        contextlib.redirect_stdout(io.StringIO()),  # onnx2tf prints its errors and progress to stdout
        onnx2tf_compat.patched_onnx2tf() as tmp,
    ):
        try:
            keras_model = onnx2tf.convert(
                onnx_graph=graph_model,
                output_folder_path=tmp,
                not_use_onnxsim=True,  # onnxsim runs as a PATH subprocess and rewrites files; not needed here
                disable_strict_mode=True,  # strict mode re-runs every op against onnxruntime: 20x slower
                disable_model_save=True,
                keep_shape_absolutely_input_names=keep,
                non_verbose=True,
                verbosity="error",
            )
        except ConversionError:
            raise
        except (Exception, SystemExit) as err:  # onnx2tf reports many failures as sys.exit(1)
            node = _node_named(model, getattr(err, "onnx_op_name", None))
            where = ""
            if node is not None:
                where = f" at ONNX op {node.op_type!r} (node {node.name!r}, {torch_origin(node) or 'origin unknown'})"
            raise ConversionError(
                f"onnx2tf failed{where}: {type(err).__name__}: {str(err)[:300]}. "
                "Use route='onnx-jax', or replace that op in the model."
            ) from err
    t1 = time.perf_counter()
    if len(keras_model.inputs) != len(inputs):
        raise ConversionError(f"onnx2tf made {len(keras_model.inputs)} inputs for {len(inputs)} ONNX graph inputs.")
    for v, k_in in zip(inputs, keras_model.inputs, strict=True):
        if list(k_in.shape) != _static_shape(v):
            raise ConversionError(
                f"onnx2tf changed input {v.name!r} to shape {list(k_in.shape)}; expected torch layout."
            )
    specs = [tf.TensorSpec(k_in.shape, _np_dtype(v)) for v, k_in in zip(inputs, keras_model.inputs, strict=True)]

    @tf.function(autograph=False)
    def tf_fn(*args):
        out = keras_model(list(args))
        return list(out) if isinstance(out, (list, tuple)) else [out]

    try:
        with quiet_tf_env(), native_stderr_captured():
            jax_fn, jax_params = tf2jax.convert(tf_fn, *specs)
    except Exception as err:
        raise ConversionError(
            f"tf2jax could not convert the TensorFlow model ({type(err).__name__}: {str(err)[:300]}). "
            "Use route='onnx-jax'."
        ) from err
    t2 = time.perf_counter()
    out_shapes = [_static_shape(v) for v in graph_model.graph.output]

    def g(*graph_inputs):
        outs, _ = jax_fn(jax_params, *graph_inputs)  # tf2jax also returns the (unchanged) TF variables
        outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        return [_to_onnx_layout(o, s) for o, s in zip(outs, out_shapes, strict=True)]

    g.timings = {"onnx2tf": t1 - t0, "tf2jax": t2 - t1}
    return g


def _to_onnx_layout(y, onnx_shape: list[int]):
    """onnx2tf returns 3-5-D outputs channel-last; give them back in ONNX (torch) layout."""
    if list(y.shape) == onnx_shape or y.ndim < 3:
        return y
    k = y.ndim - 2
    if list(y.shape) == _channel_last(onnx_shape):
        return y.transpose(0, k + 1, *range(1, k + 1))
    raise ConversionError(f"onnx2tf produced an output of shape {list(y.shape)} for ONNX shape {onnx_shape}.")


def _channel_last(shape: list[int]) -> list[int]:
    return [shape[0], *shape[2:], shape[1]]


def _static_shape(value: onnx.ValueInfoProto) -> list[int]:
    dims = value.type.tensor_type.shape.dim
    if any(not d.HasField("dim_value") for d in dims):
        raise ConversionError(f"ONNX value {value.name!r} has a dynamic shape; route 'onnx-tf' needs static shapes.")
    return [d.dim_value for d in dims]


def _np_dtype(value: onnx.ValueInfoProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
