"""A second process pays neither export nor compilation; the persistent compilation cache refuses bad entries.

The process-level tests run ``torchntk.ntk(..., implementation="structured_derivatives")`` in fresh interpreters
sharing one ``TORCHNTK_CACHE_DIR`` and count what happened inside: calls of ``torch.export.export``, XLA backend
compilations (JAX's ``/jax/core/compile/backend_compile_duration`` events), and the persistent cache's hits, misses,
writes and rejected entries.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _oracle import oracle_ntk

from torchntk._problem import prepare
from torchntk.converters import compile_cache

CHILD = r"""
import json, sys
import jax, torch
import torchntk
from torchntk.converters import compile_cache

counts = {"export": 0, "backend_compile": 0, "jax_cache_hits": 0, "traced": 0, "level_chosen": 0}
real_export = torch.export.export
def counting_export(*args, **kwargs):
    counts["export"] += 1
    return real_export(*args, **kwargs)
torch.export.export = counting_export

from torchntk.bridge import structured  # the structured interpreter's tracing: one example's ingredients
real_ingredients = structured.per_example_ingredients
def counting_ingredients(*args, **kwargs):
    counts["traced"] += 1
    return real_ingredients(*args, **kwargs)
structured.per_example_ingredients = counting_ingredients

from torchntk.bridge import compile_tiers  # the fast tier's LLVM level, chosen by XLA's cost analysis (~1 s)
real_fast_options = compile_tiers.fast_options
def counting_fast_options(lowered):
    counts["level_chosen"] += 1
    return real_fast_options(lowered)
compile_tiers.fast_options = counting_fast_options

def on_duration(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
        counts["backend_compile"] += 1
def on_event(event, **kwargs):
    if event == "/jax/compilation_cache/cache_hits":
        counts["jax_cache_hits"] += 1
jax.monitoring.register_event_duration_secs_listener(on_duration)
jax.monitoring.register_event_listener(on_event)

torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Conv2d(2, 3, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 4)
).double()
# four examples: the comparison on every example runs the check's program vmapped over four, compiled beside the
# structured program by the first process and loaded by the second
x1, x2 = torch.randn(4, 2, 6, 6, dtype=torch.float64), torch.randn(2, 2, 6, 6, dtype=torch.float64)
kernel = torchntk.ntk(model, x1, x2, implementation="structured_derivatives")
cache = compile_cache.ValidatedCache
counts |= {"hits": cache.hits, "misses": cache.misses, "writes": cache.writes, "rejected": cache.rejected}
print("RESULT " + json.dumps({"counts": counts, "kernel": kernel.tolist()}))
"""


def _run(cache_dir: Path) -> dict:
    env = dict(os.environ, TORCHNTK_CACHE_DIR=str(cache_dir))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    result["kernel"] = torch.tensor(result["kernel"], dtype=torch.float64)
    return result


def _expected() -> torch.Tensor:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 4)
    ).double()
    x1, x2 = torch.randn(4, 2, 6, 6, dtype=torch.float64), torch.randn(2, 2, 6, 6, dtype=torch.float64)
    return oracle_ntk(model, (x1,), (x2,))


def _entries(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "xla").rglob("*.xlaentry"))


@pytest.fixture(scope="module")
def warm(tmp_path_factory) -> tuple[Path, dict]:
    """A cache directory after one process ran (its counts)."""
    cache_dir = tmp_path_factory.mktemp("torchntk-cache")
    return cache_dir, _run(cache_dir)


def test_first_process_exports_compiles_and_stores(warm):
    cache_dir, first = warm
    assert first["counts"]["export"] == 1
    assert first["counts"]["traced"] == 1  # both sides' ingredients in one computation: one tile, one program
    assert first["counts"]["level_chosen"] == 1  # the one program's fast-tier level, stored beside it
    assert first["counts"]["writes"] >= 3  # the conversion's check, its batched program and the structured NTK
    assert first["counts"]["hits"] == 0
    assert len(_entries(cache_dir)) == first["counts"]["writes"]
    torch.testing.assert_close(first["kernel"], _expected(), rtol=1e-10, atol=1e-12)


def test_second_process_neither_exports_nor_compiles(warm, tmp_path):
    cache_dir, first = warm
    second = _run(cache_dir)
    counts = second["counts"]
    assert counts["export"] == 0, counts  # the ONNX graph came from the disk cache
    assert counts["traced"] == 0, counts  # the structured program came from the disk cache (jax.export)
    assert counts["level_chosen"] == 0, counts  # and its compile options with it: no cost analysis
    assert counts["misses"] == 0 and counts["writes"] == 0 and counts["rejected"] == 0, counts
    # every executable the first process stored: the check's (value and JVP in one program) and the NTK's
    assert counts["hits"] == first["counts"]["writes"], counts
    # Every XLA compilation of the process was answered by the persistent cache.
    assert counts["backend_compile"] == counts["jax_cache_hits"], counts
    torch.testing.assert_close(second["kernel"], first["kernel"], rtol=0, atol=0)


def _corrupt(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF  # a flipped bit inside XLA's executable: the hash no longer matches
    path.write_bytes(bytes(raw))


def _make_foreign(path: Path) -> None:
    """A well-formed entry from other versions (another torchntk/JAX wrote it into this directory)."""
    line, _, payload = path.read_bytes().partition(b"\n")
    header = json.loads(line)
    header["versions"] = {"jax": "0.0.1", "jaxlib": "0.0.1", "torchntk": "0.0.1"}
    header["sha256"] = hashlib.sha256(payload).hexdigest()
    path.write_bytes(json.dumps(header).encode() + b"\n" + payload)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def test_bad_entries_are_ignored_and_rebuilt(warm, tmp_path):
    """Every entry damaged, each kind on some entry (a flipped bit, other versions, an empty file): none is handed to
    XLA, all are rebuilt, and the process after that hits them all."""
    source, first = warm
    cache_dir = tmp_path / "cache"
    import shutil

    shutil.copytree(source, cache_dir)
    entries = _entries(cache_dir)
    assert len(entries) >= 3
    for i, path in enumerate(entries):
        (_corrupt, _make_foreign, _empty)[i % 3](path)
    second = _run(cache_dir)
    counts = second["counts"]
    needed = len(entries)  # a warm process loads every one: the check's program (value and JVP) and the NTK's
    assert counts["rejected"] == needed and counts["hits"] == 0, counts
    assert counts["writes"] == needed, counts  # rebuilt
    torch.testing.assert_close(second["kernel"], first["kernel"], rtol=1e-12, atol=1e-14)
    third = _run(cache_dir)["counts"]
    assert third["rejected"] == 0 and third["misses"] == 0 and third["hits"] == needed, third


def test_validated_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHNTK_CACHE_DIR", str(tmp_path))
    cache = compile_cache.ValidatedCache(compile_cache.directory())
    assert cache.get("key-a") is None
    cache.put("key-a", b"\x00executable bytes\n\xff")
    assert cache.get("key-a") == b"\x00executable bytes\n\xff"
    assert cache.get("key-b") is None  # another key never answers with key-a's bytes
    (path,) = _entries(tmp_path)
    path.write_bytes(path.read_bytes()[:-3])  # truncated
    assert cache.get("key-a") is None and not path.exists()  # ignored and removed, rebuilt by the next put


def test_user_cache_settings_are_left_alone(tmp_path, monkeypatch):
    import jax

    monkeypatch.setenv("TORCHNTK_CACHE_DIR", str(tmp_path))
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "users-own"))
    try:
        with compile_cache.persistent_compilation() as ours:
            assert not ours
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
    with compile_cache.persistent_compilation() as ours:
        assert ours
    from jax._src import compilation_cache as jax_cache

    assert not isinstance(jax_cache._cache, compile_cache.ValidatedCache)  # restored after the scope
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 1.0


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("TORCHNTK_COMPILE_CACHE", "0")
    with compile_cache.persistent_compilation() as ours:
        assert not ours


# ------------------------------------------------------------------------------ auto knows what a first call costs


@pytest.fixture
def fresh_auto(monkeypatch, tmp_path):
    from torchntk import _auto
    from torchntk.converters.api import clear_memory_cache

    for name in ("_CHOICES", "_NATIVE", "_SPENT", "_FAILED"):
        monkeypatch.setattr(_auto, name, {})
    monkeypatch.setenv("TORCHNTK_CACHE_DIR", str(tmp_path))
    clear_memory_cache()
    yield _auto
    clear_memory_cache()


def test_explain_reports_conversion_compile_and_run(fresh_auto):
    import torchntk

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    explanation = torchntk.explain(model, torch.randn(3, 8))
    assert explanation.conversion_seconds > 0 and explanation.compile_seconds > 0
    assert not explanation.persisted
    assert "compilation" in explanation.reason
    assert {e.implementation for e in explanation.estimates} == {"jacobian_contraction", "ntk_vector_products"}


def test_rental_counts_compilation(fresh_auto, monkeypatch):
    """Issue 14 class 9: torch-native seconds that pay for the conversion alone do not start a conversion whose
    compilation is predicted to take far longer; they do once they pay for both."""
    import torchntk
    from torchntk._problem import prepare

    monkeypatch.setattr(fresh_auto, "conversion_seconds", lambda problem: 28.0)
    monkeypatch.setattr(fresh_auto, "compile_seconds", lambda problem: 250.0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    problem = prepare(model, x, None, params=None, trace_axes=(), diagonal_axes=())
    fresh_auto.record_native_run(problem, 50.0)  # the first call ran NTK-vector products for 50 s
    explanation = torchntk.explain(model, x)
    assert explanation.choice != "structured_derivatives" and explanation.conversion_seconds == 28.0
    assert explanation.compile_seconds == 250.0
    kernel = torchntk.ntk(model, x)  # still torch-native: nothing converted
    from torchntk.converters import is_converted

    assert not is_converted(model, x)
    fresh_auto.record_native_run(problem, 230.0)  # now 280 s were spent: converting pays
    assert torchntk.explain(model, x).conversion_seconds is None
    torch.testing.assert_close(torchntk.ntk(model, x), kernel, rtol=1e-10, atol=1e-12)


def _problem(name: str):
    import torchvision

    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    return prepare(model, torch.randn(2, 3, 32, 32), None, params=None, trace_axes=(), diagonal_axes=())


def test_deep_model_compile_is_predicted_long():
    """densenet161 (322 parameter-holding modules, no repeated blocks) is predicted to compile for longer than the
    compile sweep measured, and several times resnet18's: auto's first call on it stays torch-native."""
    import torchntk
    from torchntk import _auto

    deep, shallow = _problem("densenet161"), _problem("resnet18")
    sweep = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/compile_sweep.json").read_text())
    measured = sweep["rows"]["densenet161"]
    assert _auto.compile_seconds(deep) >= measured["lower_s"] + measured["compile_s"]
    assert _auto.compile_seconds(deep) > 4 * _auto.compile_seconds(shallow)
    explanation = torchntk.explain(deep.model, deep.x1[0])
    assert explanation.choice != "structured_derivatives"


def test_rolled_programs_are_predicted_within_a_small_factor():
    """Every compile the sweep measured (76 zoo builders, rolled ones included) is predicted at 1-4 times its
    seconds: an estimate counting a rolled run's blocks once each had predicted resnet152 at 132 s for 6.7 s. The
    terms calibrated are the ones auto computes (resnet152: 311 holders, 71 once its stages of 8 and 36 roll)."""
    from torchntk import _auto

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "compile_calibration.json"
    calibration = json.loads(path.read_text())
    for name, seconds, _ in calibration["points"]:
        predicted = sum(c * t for c, t in zip(calibration["coefficients"], calibration["terms"][name], strict=True))
        assert 1 - 1e-6 <= predicted / seconds <= 4.0, name
    assert _auto.compile_terms(_problem("resnet152")) == calibration["terms"]["resnet152"] == [1.0, 71.0, 311.0]


def test_persisted_caches_lower_the_estimate(fresh_auto):
    """A previous process's conversion and executable (here: this process's, memory cache cleared) make the first
    structured call cheap: explain says so."""
    import torchntk
    from torchntk.converters.api import clear_memory_cache

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    x = torch.randn(3, 8)
    cold = torchntk.explain(model, x)
    assert not cold.persisted
    torchntk.ntk(model, x, implementation="structured_derivatives")  # converts, compiles, persists both
    clear_memory_cache()
    for name in ("_CHOICES", "_NATIVE", "_SPENT"):
        getattr(fresh_auto, name).clear()
    warm = torchntk.explain(model, x)
    assert warm.persisted and warm.compile_seconds == 0.0
    assert warm.conversion_seconds < cold.conversion_seconds + cold.compile_seconds


def test_compile_model_constants_are_the_committed_calibration():
    """_FIRST_CALL_SECONDS_PER_TERM["compile"] is what calibrate_auto.py --compile fitted."""
    from torchntk import _auto

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "compile_calibration.json"
    calibration = json.loads(path.read_text())
    assert _auto._FIRST_CALL_SECONDS_PER_TERM["compile"] == pytest.approx(calibration["coefficients"], rel=1e-3)


def test_stored_programs_are_named_by_everything_that_shapes_them(monkeypatch, tmp_path):
    """The output block and the symmetric form change the traced program, not its arguments' shapes: each must get
    its own stored program (one served for another would ignore max_memory's blocks)."""
    from _zoo import make

    import torchntk
    from torchntk.bridge import torch_glue

    monkeypatch.setenv("TORCHNTK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch_glue, "_COMPILED", {})
    names = []
    real = compile_cache.compile_persisted

    def recording(name, fn, args, options=None):
        names.append((name, str(__import__("jax").tree_util.tree_structure(args))))
        return real(name, fn, args, options)

    monkeypatch.setattr(compile_cache, "compile_persisted", recording)
    model, x1, x2 = make("mlp", n1=2, n2=2)
    for kwargs in ({}, {"output_block": 1}, {"output_block": 2}):
        problem = prepare(model, x1, x2, params=None, trace_axes=(), diagonal_axes=())
        torch_glue.structured_derivatives(problem, **kwargs)
    torchntk.ntk(model, x1, None, implementation="structured_derivatives")
    assert len(set(names)) == len(names) == 4, names
