"""What the kernel stores and the architecture fingerprint cost (torchntk._store, torchntk._fingerprint).

1. ``stores``: one NTK computed into each destination of ``out=`` side by side in one process (median of round-robin
   runs): a new tensor, a fresh ``open_memmap(..., "w+")``, a fresh ``.npy`` path, a fresh ``.zarr`` path, and the
   re-run of a finished ``.npy`` / ``.zarr`` store (every tile's checksum verified, nothing computed). Ratios are to
   the tensor destination.
2. ``fingerprint``: seconds of the conversion-cache key (``converters.cache.fingerprint``, what every ``to_jax`` and
   auto call computes) on torchvision models. ``--label before`` with ``PYTHONPATH`` at an older checkout measures
   the old key the same way; both land in the same JSON under their labels.

``python benchmarks/store.py`` (a few minutes) writes ``benchmarks/results/store.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import RESULTS, load_average, ntk_mlp, timed_side_by_side, write_json

import torchntk


def store_case(n: int, outputs: int, trace: bool, chunk: int) -> dict:
    model = ntk_mlp(16, 64, 2, outputs)
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(0))
    kwargs = {"implementation": "jacobian_contraction", "chunk_size": chunk, "trace_axes": (-1,) if trace else ()}
    kwargs["progress"] = False
    shape = tuple(torchntk.ntk(model, x[:2], **kwargs).shape[2:])
    shape = (n, n, *shape)
    work = Path(tempfile.mkdtemp(prefix="torchntk-store-bench-"))
    counter = iter(range(10**9))

    def fresh(suffix: str) -> str:
        path = work / f"{next(counter)}{suffix}"
        return str(path)

    def cleanup() -> None:
        for path in work.iterdir():
            if path.name.startswith("done"):
                continue
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    def into(out_factory):
        def call():
            torchntk.ntk(model, x, out=out_factory(), **kwargs)
            cleanup()

        return call

    done_npy, done_zarr = str(work / "done.npy"), str(work / "done.zarr")
    torchntk.ntk(model, x, out=done_npy, **kwargs)
    torchntk.ntk(model, x, out=done_zarr, **kwargs)
    calls = {
        "tensor": into(lambda: None),
        "memmap w+": into(lambda: np.lib.format.open_memmap(fresh(".npy"), "w+", np.float32, shape)),
        "npy path": into(lambda: fresh(".npy")),
        "zarr path": into(lambda: fresh(".zarr")),
        "npy re-run (all done)": lambda: torchntk.ntk(model, x, out=done_npy, **kwargs),
        "zarr re-run (all done)": lambda: torchntk.ntk(model, x, out=done_zarr, **kwargs),
    }
    times = timed_side_by_side(calls, {})
    shutil.rmtree(work)
    base = times["tensor"]["median_s"]
    tiles = (-(-n // chunk)) * (-(-n // chunk) + 1) // 2
    return {
        "case": {"n": n, "outputs": outputs, "trace_axes": kwargs["trace_axes"], "chunk": chunk, "tiles": tiles},
        "kernel_bytes": int(np.prod(shape)) * 4,
        "times": times,
        "ratio_to_tensor": {name: t["median_s"] / base for name, t in times.items()},
    }


def fingerprint_case(name: str) -> dict:
    import torchvision

    from torchntk.converters import cache

    model = getattr(torchvision.models, name)(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    names = [n for n, _ in model.named_parameters()]
    cache.fingerprint(model, (x,), names, "auto")  # reads package metadata once
    runs = []
    for _ in range(7):
        start = time.perf_counter()
        cache.fingerprint(model, (x,), names, "auto")
        runs.append(time.perf_counter() - start)
    return {"median_s": statistics.median(runs), "min_s": min(runs), "runs": len(runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="after", help="key for the fingerprint timings (after / before)")
    parser.add_argument("--only-fingerprint", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "store.json")
    args = parser.parse_args()
    payload = json.loads(args.out.read_text()) if args.out.exists() else {}
    payload.setdefault("load_average", {})[args.label] = load_average()
    if not args.only_fingerprint:
        payload["stores"] = [
            store_case(128, 10, trace=True, chunk=16),  # small kernel (64 KB), 36 tiles: per-tile overheads
            store_case(128, 10, trace=False, chunk=64),  # 6.6 MB kernel, 3 tiles: bytes written and hashed
        ]
        payload["torchntk_version_note"] = "stores measured on the store branch"
    payload.setdefault("fingerprint", {})[args.label] = {
        name: fingerprint_case(name) for name in ("resnet18", "densenet121", "convnext_tiny")
    }
    payload["load_average"][args.label] = [payload["load_average"][args.label], load_average()]
    write_json(args.out, payload)
    for case in payload.get("stores", []):
        print(case["case"], {k: f"{v:.2f}x" for k, v in case["ratio_to_tensor"].items()})
    for label, cases in payload["fingerprint"].items():
        print(label, {k: f"{v['median_s'] * 1e3:.1f} ms" for k, v in cases.items()})


if __name__ == "__main__":
    main()
