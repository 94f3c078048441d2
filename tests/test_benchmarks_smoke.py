"""Smoke tests: each benchmark script runs its smallest configuration end to end (child-process memory probe,
side-by-side timing, JSON). No timing assertions. The fast tests leave structured derivatives out (a cold model
conversion alone takes several seconds); ``-m slow`` runs every method."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{name}.json"
    command = [sys.executable, str(BENCHMARKS / f"{name}.py"), "--smoke", "--out", str(out), *extra]
    done = subprocess.run(command, cwd=BENCHMARKS, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["points"], payload
    for point in payload["points"]:
        assert point["status"] == "ok" or point["status"].startswith("skipped"), point
    return payload


def test_fcn_smoke(tmp_path: Path) -> None:
    payload = run_script("fcn", tmp_path, "--methods", "jacobian_contraction", "ntk_vector_products", "--no-plot")
    assert {p["method"] for p in payload["points"]} == {"jacobian_contraction", "ntk_vector_products"}
    assert all(p["median_s"] > 0 and p["peak_bytes"] > 0 for p in payload["points"])


@pytest.mark.slow  # 25 s: neural-tangents' child process; the other benchmark smokes run by default
def test_anchors_smoke(tmp_path: Path) -> None:
    rows = ["tutorial JC", "tutorial NVP", "torchntk NVP", "neural-tangents SD"]
    payload = run_script("anchors", tmp_path, "--rows", *rows)
    assert [p["row"] for p in payload["points"]] == rows
    assert "| tutorial JC |" in payload["table_markdown"]


def test_resnet_smoke(tmp_path: Path) -> None:
    payload = run_script("resnet", tmp_path, "--methods", "ntk_vector_products")
    assert payload["points"][0]["time_per_pair_s"] > 0


@pytest.mark.slow
def test_every_method_smoke(tmp_path: Path) -> None:
    payload = run_script("fcn", tmp_path, "--no-plot")
    assert len(payload["points"]) == 4


@pytest.mark.slow
def test_sd_tiling_smoke(tmp_path: Path) -> None:
    payload = run_script("sd_tiling", tmp_path)
    point = payload["points"][0]
    assert point["whole_s"] > 0 and point["ratio_to_yardstick"] > 0


def test_zoo_sweep_runs_a_failing_reference_once_per_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--retry-failed`` retries a failed reference once, not once per later stage (each attempt can take the
    stage timeout: tens of minutes for the largest builders)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import zoo

    monkeypatch.setattr(zoo, "OUT", tmp_path / "zoo.json")
    monkeypatch.setattr(zoo, "_param_counts", lambda names: dict.fromkeys(names, 1))
    calls: list[tuple[str, str]] = []

    def fake_child(name: str, stage: str, work: Path, timeout: float, memory: float) -> dict:
        calls.append((name, stage))
        return {"failure": "timeout (1 s)"} if stage == "ref" else {"correct": True}

    monkeypatch.setattr(zoo, "_run_child", fake_child)
    zoo.write_json(zoo.OUT, {"models": {"m": {"params": 1, "ref": {"failure": "timeout (1 s)"}}}})
    zoo.sweep(["m"], ["ref", "onnx-jax", "auto"], timeout=1, memory_gb=1, redo=False, retry_failed=True)
    assert calls == [("m", "ref")]
    entry = json.loads(zoo.OUT.read_text())["models"]["m"]
    assert entry["auto"]["failure"].startswith("no reference kernel") and "failure" in entry["onnx-jax"]
    calls.clear()
    zoo.sweep(["m"], ["onnx-jax", "auto"], timeout=1, memory_gb=1, redo=False, retry_failed=True)
    assert calls == [("m", "ref")]  # no explicit "ref" stage: the first stage needing it runs it, once

    def succeeding_child(name: str, stage: str, work: Path, timeout: float, memory: float) -> dict:
        calls.append((name, stage))
        if stage == "ref":
            (work / "ref.npy").write_bytes(b"")
        return {"correct": True}

    monkeypatch.setattr(zoo, "_run_child", succeeding_child)
    calls.clear()
    zoo.sweep(["m"], ["ref", "onnx-jax", "auto"], timeout=1, memory_gb=1, redo=True)
    assert calls == [("m", "ref"), ("m", "onnx-jax"), ("m", "auto")]  # a reference that succeeded serves them all
