"""Route-level behaviour of onnx-jax: errors, no TensorFlow, dtypes, local functions, clean linearized jaxprs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_onnx_jax_ops import check, make_model, rand

from torchntk.converters.onnx_jax import SUPPORTED_OPS, UnsupportedOnnxOp, onnx_to_jax

REPO = Path(__file__).resolve().parents[1]


def count_primitives(jaxpr: jax.extend.core.Jaxpr, counts: dict[str, int] | None = None) -> dict[str, int]:
    """Primitive counts of a jaxpr, recursing into nested jaxprs (jit, custom_jvp ...)."""
    counts = {} if counts is None else counts
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count_primitives(inner, counts)
    return counts


def test_unknown_op_is_named_at_conversion_time() -> None:
    model = make_model("Loop", {"x": rand(2)})
    with pytest.raises(UnsupportedOnnxOp, match=r"'Loop' \(node 'Loop_node'\)") as info:
        onnx_to_jax(model)
    assert isinstance(info.value, ValueError) and info.value.op_type == "Loop"


def test_foreign_domain_op_is_unsupported() -> None:
    node = helper.make_node("FusedGemm", ["x"], ["y"], domain="com.microsoft", name="fused")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    )
    with pytest.raises(UnsupportedOnnxOp, match="com.microsoft"):
        onnx_to_jax(model)


def test_unsupported_attribute_and_dynamic_shape_errors_name_the_fix() -> None:
    with pytest.raises(UnsupportedOnnxOp, match="cubic"):
        onnx_to_jax(
            make_model("Resize", {"x": rand(1, 1, 2, 2)}, [("", None), ("s", np.ones(4, np.float32))], mode="cubic")
        )(rand(1, 1, 2, 2))
    dynamic = make_model("Reshape", {"x": rand(2, 3), "s": np.asarray([3, 2], np.int64)})
    with pytest.raises(UnsupportedOnnxOp, match="static shapes"):
        onnx_to_jax(dynamic)(rand(2, 3), np.asarray([3, 2]))


def test_wrong_number_of_inputs() -> None:
    with pytest.raises(TypeError, match="takes 2 inputs"):
        onnx_to_jax(make_model("Add", {"a": rand(2), "b": rand(2)}))(rand(2))


def test_float64_graph_stays_float64_under_enable_x64() -> None:
    x, w = np.random.default_rng(0).standard_normal((2, 3)), np.random.default_rng(1).standard_normal((4, 3))
    model = make_model("Gemm", {"x": x, "w": w}, transB=1, out_type=TensorProto.DOUBLE)
    with jax.enable_x64(True):
        (y,) = onnx_to_jax(model)(x, w)
        assert y.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(y), x @ w.T, rtol=1e-14)


def test_model_local_functions_are_inlined() -> None:
    body = [
        helper.make_node("Mul", ["a", "a"], ["sq"]),
        helper.make_node("LeakyRelu", ["sq"], ["out"], alpha=0.0),
    ]
    body[1].attribute[0].ref_attr_name = "slope"  # alpha forwarded from the call site
    function = helper.make_function(
        "local", "SquareLeaky", ["a"], ["out"], body, [helper.make_opsetid("", 20)], attributes=["slope"]
    )
    call = helper.make_node("SquareLeaky", ["x"], ["y"], domain="local", slope=0.5)
    graph = helper.make_graph(
        [call, helper.make_node("Neg", ["y"], ["z"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(
        graph, functions=[function], opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("local", 1)]
    )
    x = np.asarray([-2.0, 0.5, 3.0], np.float32)
    np.testing.assert_allclose(onnx_to_jax(model)(x)[0], -(x * x))


def test_relu_derivative_at_zero_matches_torch() -> None:
    # JAX's max splits ties (0.5); torch's relu gives 0 at 0, and relu(relu(x)) feeds exact zeros.
    g = onnx_to_jax(make_model("Relu", {"x": rand(3)}))
    np.testing.assert_array_equal(jax.grad(lambda v: g(v)[0].sum())(np.zeros(3, np.float32)), 0.0)


def test_linearized_conv_net_holds_only_plain_lax_primitives() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], group=2),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1),
    ]
    inputs = {"w": rand(4, 1, 3, 3), "b": rand(4), "fc": rand(5, 16), "x": rand(1, 2, 4, 4)}
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape) for k, v in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    g = onnx_to_jax(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    params, x = list(inputs.values())[:3], inputs["x"]
    linear = jax.linearize(lambda p: g(*p, x)[0], params)[1]
    counts = count_primitives(jax.make_jaxpr(linear)(params).jaxpr)
    # One conv (x is not differentiated); two dot_generals (product rule: features and fc both vary).
    assert counts["conv_general_dilated"] == 1 and counts["dot_general"] == 2
    assert not {"gather", "transpose", "custom_jvp_call", "pjit", "jit"} & set(counts), counts


def test_converts_without_tensorflow() -> None:
    script = textwrap.dedent(
        """
        import importlib.abc, sys
        BLOCKED = ("tensorflow", "tf_keras", "tf2jax", "onnx2tf")

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{name} is blocked in this test")

        sys.meta_path.insert(0, Block())
        import numpy as np
        from onnx import TensorProto, helper
        from torchntk.converters.onnx_jax import onnx_to_jax

        node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
        graph = helper.make_graph(
            [node], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4]),
             helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 2, 3, 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        )
        g = onnx_to_jax(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
        (y,) = g(np.ones((1, 2, 4, 4), np.float32), np.ones((3, 2, 3, 3), np.float32))
        assert y.shape == (1, 3, 4, 4) and float(y[0, 0, 1, 1]) == 18.0
        assert not any(m.split(".")[0] in BLOCKED for m in sys.modules), "a TensorFlow module was imported"
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_supported_ops_cover_the_zoo() -> None:
    zoo_ops = {
        "Conv",
        "BatchNormalization",
        "Relu",
        "MaxPool",
        "Add",
        "ReduceMean",
        "Reshape",
        "Gemm",
        "Clip",
        "Transpose",
        "GatherND",
        "Sigmoid",
        "Mul",
        "LayerNormalization",
        "MatMul",
        "Gelu",
        "Gather",
        "Expand",
        "Concat",
        "Unsqueeze",
        "Squeeze",
        "Softmax",
    }
    assert zoo_ops <= SUPPORTED_OPS


def test_matmul_with_transposed_weight_becomes_one_dot_general() -> None:
    nodes = [
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["y"]),
    ]
    inputs = {"w": rand(5, 4), "x": rand(2, 3, 4)}
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape) for k, v in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    check(model, inputs)
    g = onnx_to_jax(model)
    linear = jax.linearize(lambda w: g(w, inputs["x"])[0], inputs["w"])[1]
    assert count_primitives(jax.make_jaxpr(linear)(inputs["w"]).jaxpr) == {"dot_general": 1}


def test_sparse_initializer_and_sparse_constant() -> None:
    values = onnx.numpy_helper.from_array(np.asarray([1.0, 2.0], np.float32), "s")
    sparse = helper.make_sparse_tensor(values, onnx.numpy_helper.from_array(np.asarray([1, 4], np.int64), "i"), [2, 3])
    nodes = [
        helper.make_node("Constant", [], ["c"], sparse_value=sparse),
        helper.make_node("Add", ["x", "c"], ["xc"]),
        helper.make_node("Mul", ["xc", "s"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        sparse_initializer=[sparse],
    )
    dense = np.asarray([[0, 1, 0], [0, 2, 0]], np.float32)
    x = rand(2, 3)
    y = onnx_to_jax(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))(x)[0]
    np.testing.assert_allclose(y, (x + dense) * dense)


def test_undefined_value_is_reported_at_conversion_time() -> None:
    node = helper.make_node("Add", ["x", "nowhere"], ["y"], name="adder")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    with pytest.raises(ValueError, match=r"'adder' \(Add\) reads \['nowhere'\]"):
        onnx_to_jax(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
def test_pooling_linearizes_under_jit(op: str) -> None:
    # Under tracing a jnp init value would be traced too, giving a generic reduce_window that cannot be linearized.
    g = onnx_to_jax(make_model(op, {"x": rand(1, 2, 4, 4)}, kernel_shape=[2, 2], strides=[2, 2]))
    x = rand(1, 2, 4, 4)
    tangent = jax.jit(lambda v: jax.linearize(lambda u: g(u)[0], v)[1](v))(x)
    np.testing.assert_allclose(tangent, g(x)[0], rtol=1e-6)  # pooling is positively homogeneous
