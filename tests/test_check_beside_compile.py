"""The conversion's check against torch runs beside the structured program's compile, and still guards every result.

``to_jax_while_checking`` leaves the converted side of the check (trace, compile, run of the value and JVP) running
in a thread while its body compiles; on exit it waits, raises a refusal, and only then caches the conversion.
The hostile cases: a conversion whose derivatives differ from torch's (the old inclusive ``Clip``) must be refused
after the body ran, never cached, and structured derivatives must then answer by the route that passes.
"""

from __future__ import annotations

import copy
import threading

import jax
import numpy as np
import pytest
import torch
from _oracle import oracle_ntk
from test_kink_conventions import _depthwise_relu6

import torchntk
from torchntk.converters import (
    ConversionError,
    RouteFellBack,
    api,
    clear_memory_cache,
    compile_cache,
    is_converted,
    to_jax,
    to_jax_while_checking,
)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHNTK_CACHE_DIR", str(tmp_path))
    clear_memory_cache()
    yield tmp_path
    clear_memory_cache()


@pytest.fixture
def inclusive_clip(monkeypatch):
    """onnx-jax's Clip with torch.clamp's old derivative at the bounds (1): equal outputs, other derivatives."""
    from torchntk.converters.onnx_jax import _core

    def clip(node, x, low=None, high=None):
        x = _core.where(x < low, _core.astype(np.asarray(low), x.dtype), x)
        return _core.where(x > high, _core.astype(np.asarray(high), x.dtype), x)

    monkeypatch.setitem(_core.HANDLERS, "Clip", clip)


@pytest.fixture
def check_threads(monkeypatch):
    """The names of the threads the converted side of each check ran in."""
    threads = []
    compare = api.compare_with_torch

    def recording_compare(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return compare(*args, **kwargs)

    monkeypatch.setattr(api, "compare_with_torch", recording_compare)
    return threads


def _kink_model(dtype=torch.float64):
    model, x = _depthwise_relu6()
    return model.to(dtype), (x - 1.0).to(dtype)  # more ReLU6 zeros at the bounds


def _compile_value(converted, x):
    """What a body does: compile a program of ``fn`` (run nothing)."""
    with jax.enable_x64(converted.x64):
        example = np.asarray(x[0].numpy())
        return jax.jit(converted.fn).lower(converted.params, example).compile()


def test_check_runs_in_a_thread_beside_the_body(fresh, monkeypatch):
    """The converted side runs in the check's thread while the body runs (the body signals, the check waits for it:
    a check run before the body returned would time out), and the conversion is cached after a pass."""
    model, x = _kink_model()
    body_started = threading.Event()
    seen = {}
    compare = api.compare_with_torch

    def waiting_compare(*args, **kwargs):
        seen["thread"] = threading.current_thread().name
        seen["body_first"] = body_started.wait(timeout=60)
        return compare(*args, **kwargs)

    monkeypatch.setattr(api, "compare_with_torch", waiting_compare)
    with to_jax_while_checking(model, x, route="onnx-jax") as converted:
        body_started.set()
        assert not is_converted(model, x, route="onnx-jax")  # not cached before its check passed
        _compile_value(converted, x)
    assert seen == {"thread": seen["thread"], "body_first": True} and seen["thread"].startswith("torchntk-check")
    assert is_converted(model, x, route="onnx-jax")
    assert "check" in converted.timings and "check_wait" in converted.timings
    assert list(fresh.glob("*.onnxentry"))  # and stored for the next process


def test_a_refused_conversion_raises_after_the_body_and_is_never_cached(fresh, inclusive_clip):
    model, x = _kink_model()
    ran = []
    with pytest.raises(ConversionError, match="derivative disagrees with torch"):
        with to_jax_while_checking(model, x, route="onnx-jax") as converted:
            _compile_value(converted, x)
            ran.append(True)
    assert ran == [True]
    assert not is_converted(model, x, route="onnx-jax")
    assert not list(fresh.glob("*.onnxentry"))
    with pytest.raises(ConversionError, match="derivative disagrees with torch"):
        to_jax(model, x, route="onnx-jax")  # the in-line path refuses it as well


def test_a_body_that_raises_still_awaits_the_check(fresh):
    """The body's error propagates; the check is awaited first (no thread left compiling), a passing conversion
    cached."""
    model, x = _kink_model()
    with pytest.raises(KeyError, match="the body's"):
        with to_jax_while_checking(model, x, route="onnx-jax"):
            raise KeyError("the body's")
    assert api._checks()._work_queue.qsize() == 0  # nothing left queued or running for the check's thread
    assert is_converted(model, x, route="onnx-jax")


def test_onnx_tf_checks_in_line(fresh, check_threads):
    model, x = _kink_model(torch.float32)
    with to_jax_while_checking(model, x, route="onnx-tf") as converted:
        assert check_threads == [threading.main_thread().name]  # done before the body
    assert converted.route == "onnx-tf" and is_converted(model, x, route="onnx-tf")


def test_auto_falls_back_to_the_route_that_passes(fresh, inclusive_clip):
    """route='auto': onnx-jax refused beside the body, onnx-tf converted and checked in line at exit, cached, and
    the caller told to convert again (RouteFellBack); the next to_jax is answered from memory by onnx-tf."""
    model, x = _kink_model(torch.float32)
    with pytest.raises(RouteFellBack, match="route 'onnx-tf' passed"):
        with to_jax_while_checking(model, x) as converted:
            assert converted.route == "onnx-jax"
    again = to_jax(model, x)
    assert again.route == "onnx-tf" and "cache" in again.timings


def test_structured_derivatives_answer_by_the_route_that_passes(fresh, inclusive_clip, monkeypatch):
    """End to end: the structured call compiled its first tile with the refused onnx-jax function, then recompiles
    with onnx-tf's; the kernel equals the explicit-Jacobian oracle (float32 route, float64 oracle)."""
    from torchntk.bridge import torch_glue

    monkeypatch.setattr(torch_glue, "_COMPILED", {})
    model, x = _kink_model(torch.float32)
    kernel = torchntk.ntk(model, x, implementation="structured_derivatives")
    want = oracle_ntk(copy.deepcopy(model).double(), (x.double(),), None)
    np.testing.assert_allclose(kernel.double().numpy(), want.numpy(), atol=1e-5 * float(want.abs().max()), rtol=0)
    assert to_jax(model, x).route == "onnx-tf"


def test_persistent_compilation_scopes_overlap_across_threads(fresh):
    """Two threads inside torchntk's persistent-cache scope at once both compile through it; the last to leave
    restores JAX's own cache; hits are counted per thread."""
    from jax._src import compilation_cache as jax_cache

    before = jax_cache._cache
    both_inside = threading.Barrier(2, timeout=60)
    seen, hits = [], {}

    def compile_in_scope(scale: float) -> None:
        with compile_cache.persistent_compilation() as ours:
            both_inside.wait()
            seen.append((ours, type(jax_cache._cache).__name__))
            start = compile_cache.ValidatedCache.thread_hits()
            jax.jit(lambda a: a * scale).lower(np.ones(3, np.float32)).compile()
            hits[scale] = compile_cache.ValidatedCache.thread_hits() - start
            both_inside.wait()

    threads = [threading.Thread(target=compile_in_scope, args=(s,)) for s in (2.0, 3.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [(True, "TorchntkCache")] * 2
    assert jax_cache._cache is before
    assert hits == {2.0: 0, 3.0: 0}  # fresh programs: compiled, not loaded
    thread = threading.Thread(target=compile_in_scope, args=(2.0,))
    both_inside = threading.Barrier(1, timeout=60)
    thread.start()
    thread.join()
    assert hits[2.0] == 1  # the same program again, in another thread: its hit is its own


@pytest.mark.parametrize("fits", [True, False])
def test_the_check_goes_beside_the_compile_only_where_its_memory_fits(fresh, monkeypatch, check_threads, fits):
    """The check's memory (CHECK_BYTES_PER_WEIGHT_BYTE × the weights) and the tile's must fit the budget together;
    else the check runs first, in the caller's thread. The kernel is the oracle's either way."""
    from torchntk._problem import prepare
    from torchntk.bridge import torch_glue

    model, x = _kink_model()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    problem = prepare(model, x, None, params=None, trace_axes=(), diagonal_axes=())
    per_weight_byte = torch_glue.CHECK_BYTES_PER_WEIGHT_BYTE
    assert torch_glue.check_fits_beside(problem, 100.0, per_weight_byte * weights + 100)
    assert not torch_glue.check_fits_beside(problem, 100.0, per_weight_byte * weights + 99)
    if not fits:
        monkeypatch.setattr(torch_glue, "CHECK_BYTES_PER_WEIGHT_BYTE", 1e15)
    monkeypatch.setattr(torch_glue, "_COMPILED", {})
    kernel = torchntk.ntk(model, x, implementation="structured_derivatives")
    assert len(check_threads) == 1 and check_threads[0].startswith("torchntk-check") == fits
    want = oracle_ntk(model, (x,), None)
    np.testing.assert_allclose(kernel.numpy(), want.numpy(), atol=1e-10 * float(want.abs().max()), rtol=0)
