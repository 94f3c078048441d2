"""A ~2-minute benchmark subset: torchntk's methods against the torch.func tutorial's on a few FCN cases.

Runs ``anchors.py`` on one small case (FCN depth 3, W=256, O=10, N1=N2=8; all torch rows, and neural-tangents'
structured derivatives when /work/nt-venv exists) and ``fcn.py --quick`` (depth 3, W 64..256, O 1/16, N 1/8, every
torchntk method), with the same protocol as the full scripts (peak memory in child processes, medians of ≥ 5 runs
side by side), writes the JSON files under ``--out-dir`` (default: a temporary directory, so the committed results
are not overwritten) and prints both tables.

Usage: ``python benchmarks/bench.py [--out-dir DIR] [--skip-anchors] [--skip-fcn]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import _common as c
import anchors
import fcn


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(tempfile.mkdtemp(prefix="torchntk-bench-")))
    parser.add_argument("--skip-anchors", action="store_true")
    parser.add_argument("--skip-fcn", action="store_true")
    args = parser.parse_args(argv)
    start = time.time()
    print(f"machine: {c.machine().get('Model name')}, load average {c.load_average()}", flush=True)
    if not args.skip_anchors:
        rows = [*anchors.TORCH_ROWS, "neural-tangents SD"]
        out = str(args.out_dir / "anchors.json")
        anchors.main(["--widths", "256", "--outputs", "10", "--rows", *rows, "--out", out])
    if not args.skip_fcn:
        fcn.main(["--quick", "--no-plot", "--out", str(args.out_dir / "fcn.json")])
    print(f"total {time.time() - start:.0f} s; JSON in {args.out_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
