#!/usr/bin/env bash
# The GPU device check of issue 13, in one go (about 8 minutes at most; the last line is a one-line verdict):
#   1. JAX's CUDA backend — kept when the machine has one, else installed: the [cuda] extra where the pinned jax is
#      installed, else the CUDA plugin matching the installed jax (pip from the registry; wheels in .whl/ offline);
#   2. the CUDA tests (tests/test_gpu_cuda.py and the CUDA tests beside the CPU ones);
#   3. the README's main job on the GPU: python -m torchntk demo --device cuda;
#   3b. benchmarks/gpu/precision_check.py: each method's float32 kernel within 1e-5 of float64 at torch's flags;
#   4. benchmarks/gpu/bench_gpu.py: anchors FCN W 1024/4096 x O 10/100, resnet18/50 at 224x224 with O 1/10/1000
#      (resnet18 O=1000: the full 1000x1000 NTK of one pair), the largest FCN width per method;
#   5. benchmarks/gpu/render_table.py: the README table from its JSON.
# Run from the repository root:  bash benchmarks/gpu_check.sh   (BUDGET_S, default 480, sets the whole run's length;
# BENCH_ARGS adds arguments to bench_gpu.py, e.g. BENCH_ARGS="--sections anchors resnet18")
# Through the device tool (it sends the session's own checkout: merge this branch there first), with 15 minutes of
# device time in all and a minute or two per machine start:  run(command="BUDGET_S=420 bash benchmarks/gpu_check.sh",
# timeout_s=480); rerun at once (warm machine) only after a fast failure. $OUT then brings back gpu_check.log,
# demo.log, gpu_tests.xml, precision_check.json, the results JSON and gpu_table.md: commit the JSONs under
# benchmarks/results/gpu/ and put the table in the README's GPU section. The device image has its own torch/jax (no registry there): the JSON
# records their versions and whether they differ from the pins.
set -u
START=$(date +%s)
BUDGET_S=${BUDGET_S:-480}
RESULTS=benchmarks/results/gpu
OUT=${OUT:-$RESULTS}
mkdir -p "$OUT" "$RESULTS"
LOG="$OUT/gpu_check.log"
: >"$LOG"
touch "$LOG.start"  # results older than this are a previous run's
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TORCHNTK_CACHE_DIR=${TORCHNTK_CACHE_DIR:-/tmp/torchntk-gpu-check-cache}
PROBLEMS=()
elapsed() { echo $(($(date +%s) - START)); }
left() { echo $((BUDGET_S - $(elapsed))); }
step() { echo "== [$(elapsed) s] $*" | tee -a "$LOG"; }

GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
GPU_NAME=${GPU_NAME:-"no nvidia-smi"}
step "device: $GPU_NAME; python $($PY -c 'import sys; print(sys.version.split()[0])')"

# 1. JAX's CUDA backend ----------------------------------------------------------------------------------------
jax_gpu() { timeout 120 "$PY" -c "import jax; print('JAX GPU devices:', jax.devices('gpu'))" >>"$LOG" 2>&1; }
step "JAX's CUDA backend"
if ! timeout 120 "$PY" -c "import torch; assert torch.cuda.is_available()" >>"$LOG" 2>&1; then
  PROBLEMS+=("torch sees no CUDA device")  # nothing to install for: the steps below say what they can
elif ! jax_gpu; then
  JAXV=$("$PY" -c "import jax; print(jax.__version__)" 2>>"$LOG")
  PIP=("$PY" -m pip install -q --retries 1 --timeout 20)
  [ -d .whl ] && PIP+=(--find-links .whl)
  if [ "$JAXV" = "0.10.2" ]; then
    step "installing the [cuda] extra (jax $JAXV is the pinned one)"
    timeout 300 "${PIP[@]}" -e ".[cuda]" >>"$LOG" 2>&1
  else
    step "installing jax-cuda13-plugin $JAXV (jax $JAXV is the image's, not the pinned 0.10.2)"
    timeout 300 "${PIP[@]}" "jax-cuda13-plugin[with-cuda]==$JAXV" "jax-cuda13-pjrt==$JAXV" >>"$LOG" 2>&1
  fi
  jax_gpu || PROBLEMS+=("JAX has no GPU backend (structured derivatives ran on the CPU)")
fi
"$PY" -m pip list 2>/dev/null | grep -iE "^(torch|torchvision|jax|jaxlib|jax-cuda|nvidia-cu(blas|dnn)) " >>"$LOG"

# 2. CUDA tests --------------------------------------------------------------------------------------------------
step "CUDA tests"
timeout $(($(left) > 150 ? 150 : $(left))) "$PY" -m pytest -q -p no:cacheprovider -rs --junitxml="$OUT/gpu_tests.xml" \
  tests/test_gpu_cuda.py tests/test_torch_native.py::test_cuda_device_preserved \
  tests/test_structured_torch.py::test_cuda_model_stays_on_cuda >>"$LOG" 2>&1
TESTS=$("$PY" - "$OUT/gpu_tests.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET

try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    print("no report (timed out?)")
    raise SystemExit
cases = root.iter("testcase")
counts = {"passed": 0, "failed": 0, "skipped": 0, "unexpected skips": 0}
for case in cases:
    if case.find("failure") is not None or case.find("error") is not None:
        counts["failed"] += 1
    elif (skip := case.find("skipped")) is not None:
        counts["skipped"] += 1
        counts["unexpected skips"] += "two CUDA devices" not in (skip.get("message") or "")
    else:
        counts["passed"] += 1
print(", ".join(f"{v} {k}" for k, v in counts.items()))
EOF
)
step "tests: $TESTS"
case "$TESTS" in
  *" 0 failed, "*" 0 unexpected skips"*) ;;
  *) PROBLEMS+=("tests: $TESTS") ;;
esac

# 3. the README demo on the GPU ----------------------------------------------------------------------------------
step "python -m torchntk demo --device cuda"
DEMO_LOG="$OUT/demo.log"
timeout $(($(left) > 240 ? 150 : 90)) "$PY" -m torchntk demo --device cuda >"$DEMO_LOG" 2>&1
DEMO_RC=$?
cat "$DEMO_LOG" >>"$LOG"
DEMO=$("$PY" - "$DEMO_LOG" "$DEMO_RC" <<'EOF'
import re
import sys

text, rc = open(sys.argv[1]).read(), int(sys.argv[2])
ran = re.findall(r"^\s+(\w+)\s+[\d.]+ s\s+kernel", text, re.M)
gaps = [float(g) for g in re.findall(r"/ max \|Θ\| = ([0-9.e+-]+)", text)]
failed = re.findall(r"^\s+(\w+)\s+failed:", text, re.M)
ok = rc == 0 and len(ran) == 3 and not failed and gaps and max(gaps) < 1e-4
print(("ok" if ok else "FAIL") + f" (exit {rc}, methods {ran}, largest disagreement {max(gaps) if gaps else None})")
EOF
)
step "demo: $DEMO"
case "$DEMO" in ok*) ;; *) PROBLEMS+=("demo: $DEMO") ;; esac

# 3b. float32 kernels in float32 at torch's default flags (benchmarks/gpu/precision_check.py) -----------------------
step "precision_check.py"
timeout 120 "$PY" benchmarks/gpu/precision_check.py --out "$OUT/precision_check.json" >>"$LOG" 2>&1
PRECISION=$("$PY" - "$OUT/precision_check.json" <<'EOF'
import json
import sys

try:
    rows = json.load(open(sys.argv[1]))["rows"]
except (OSError, ValueError, KeyError):
    print("FAIL (no results)")
    raise SystemExit
default = [r for r in rows if r["cudnn_allow_tf32"]]  # torch's flags as found: torchntk must compute in float32
worst = max((r.get("rel_error_vs_float64", float("inf")) for r in default), default=float("inf"))
failed = [f"{r['model']} {r['method']}" for r in default if "error" in r]
ok = worst < 1e-5 and not failed
print(("ok" if ok else "FAIL") + f" (largest float32 error at torch's default flags {worst:.1e}; errors: {failed})")
EOF
)
step "precision: $PRECISION"
case "$PRECISION" in ok*) ;; *) PROBLEMS+=("precision: $PRECISION") ;; esac

# 4. benchmarks --------------------------------------------------------------------------------------------------
LEFT=$(left)
DEADLINE=$((LEFT - 100))
GRACE=60
step "bench_gpu.py (${DEADLINE} s to start points, ${GRACE} s grace)"
BENCH_OK=0
if [ "$DEADLINE" -gt 30 ]; then
  timeout $((DEADLINE + GRACE + 30)) "$PY" benchmarks/gpu/bench_gpu.py --deadline-s "$DEADLINE" --grace-s "$GRACE" \
    --full-ntk-budget-s 45 --call-budget-s 15 --width-call-s 8 ${BENCH_ARGS:-} >>"$LOG" 2>&1 && BENCH_OK=1
else
  PROBLEMS+=("no time left for the benchmarks")
fi
JSON=$(find "$RESULTS" -maxdepth 1 -name 'gpu_check_*.json' -newer "$LOG.start" 2>/dev/null | head -1)  # this run's
BENCH="no results"
if [ -n "$JSON" ]; then
  [ "$OUT" != "$RESULTS" ] && cp "$JSON" "$OUT/"
  BENCH=$("$PY" - "$JSON" <<'EOF'
import json
import sys

payload = json.load(open(sys.argv[1]))
points = payload["points"]
ok = [p for p in points if p.get("status") == "ok"]
sd = [p for p in ok if p["method"] == "structured_derivatives"]
on_gpu = bool(sd) and all(str(p.get("jax_device", "")).startswith(("cuda", "gpu")) for p in sd)
status = {}
for p in points:
    status[p["status"]] = status.get(p["status"], 0) + 1
print(f"{len(ok)}/{len(points)} points ok {status}, SD on the GPU: {'yes' if on_gpu else 'NO'}")
EOF
)
  # 5. the README table
  "$PY" benchmarks/gpu/render_table.py "$JSON" >"$RESULTS/gpu_table.md" 2>>"$LOG" && cat "$RESULTS/gpu_table.md" >>"$LOG"
  [ "$OUT" != "$RESULTS" ] && cp "$RESULTS/gpu_table.md" "$OUT/"
fi
step "bench: $BENCH (exit ok: $BENCH_OK)"
case "$BENCH" in *"SD on the GPU: yes"*) ;; *) PROBLEMS+=("bench: $BENCH") ;; esac
[ "$BENCH_OK" = 1 ] || PROBLEMS+=("bench_gpu.py did not finish cleanly (see gpu_check.log)")

rm -f "$LOG.start"

# verdict ----------------------------------------------------------------------------------------------------------
if [ ${#PROBLEMS[@]} -eq 0 ]; then
  echo "GPU CHECK PASS on $GPU_NAME in $(elapsed) s: tests $TESTS; demo $DEMO; bench $BENCH" | tee -a "$LOG"
else
  SUMMARY=$(printf '%s; ' "${PROBLEMS[@]}")
  echo "GPU CHECK FAIL on $GPU_NAME in $(elapsed) s: ${SUMMARY%; }" | tee -a "$LOG"
  exit 1
fi
