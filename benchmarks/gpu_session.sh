#!/usr/bin/env bash
# A GPU session in one device call: build eqprop against the machine's CUDA torch, then time-boxed
# steps whose results land in $OUT as they are produced (copy the JSON files to benchmarks/results/
# and commit them). Two modes, one device call each, timeout_s ≈ 560:
#
#   bash benchmarks/gpu_session.sh          # check: env log, build, CUDA tests, bench_markov, bench_relax,
#                                           #        bench_lengthgen
#   bash benchmarks/gpu_session.sh train    # train: env log, build, training throughput, k = 4 recipe
#
# Every step has its own `timeout`; together they stay under 9 minutes (check: 20 + 180 + 150 + 40 +
# 100 + 60 s plus 5 s of kill grace each; train: 20 + 180 + 90 + 200 s plus grace), so the call returns
# with a summary even when a step hangs. A step that needs CUDA is skipped, saying why, when
# torch.cuda is unavailable or the build has no CUDA kernels: on a CPU machine the script runs
# through (build included) as a dry run of its own control flow; FORCE_CUDA_STEPS=1 runs the CUDA
# steps there too (the CUDA tests skip themselves, the benchmarks measure the CPU and may hit their
# time limits), to check the steps' own plumbing.
#
# $OUT holds at most 8 entries: session.log (everything printed), build.log, tests.log, summary.txt,
# markov_cuda.json, relax_cuda.json, lengthgen_cuda.json (check); markov_train.json, markov_train_recipe.json and recipe/
# (the run's history and summary; train). The bench scripts rewrite their JSON after every figure,
# so a crash or a timeout keeps what ran ("complete": false).
# Optional: wheels in .whl/ (carried with the call) are installed with --no-deps into /tmp/site first
# (e.g. torchdeq for bench_relax's comparison row).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
MODE=${1:-check}
case "$MODE" in check|train) ;; *) echo "usage: $0 [check|train]" >&2; exit 2 ;; esac
OUT=${OUT:-/tmp/eqprop_gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
exec > >(tee -a "$OUT/session.log") 2>&1
TEE_PID=$!
T0=$(date +%s)
SUMMARY=()
note() { SUMMARY+=("$*"); }
step() { echo; echo "== [$(( $(date +%s) - T0 )) s] $*"; }
# run LIMIT_S CMD...: the command under `timeout` (TERM at the limit, KILL 5 s later); echo its status
run() {
  local limit=$1; shift
  timeout -k 5 "$limit" "$@"
  local rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "!! timed out after ${limit} s: $*"; fi
  return $rc
}
status_word() { case $1 in 0) echo ok ;; 124|137) echo "TIMEOUT" ;; *) echo "FAILED (rc $1)" ;; esac; }

step "environment ($MODE mode)"
run 20 bash -c '
  echo "date: $(date -u +%FT%TZ)   host: $(uname -n)   cpus: $(nproc --all)"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader
  else echo "nvidia-smi: not found"; fi
  if command -v nvcc >/dev/null; then echo "nvcc: $(command -v nvcc): $(nvcc --version | tail -1)"
  else echo "nvcc: not found"; fi
  echo "cmake: $(cmake --version 2>/dev/null | head -1 || echo not found)   ninja: $(ninja --version 2>/dev/null || echo no)   ccache: $(command -v ccache || echo no)"
  nvcc_root=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")")")
  for d in ${CUDA_HOME:-} /usr/local/cuda "$nvcc_root"; do
    [ -d "$d" ] && echo "toolkit $d: libnvrtc $(ls "$d"/lib64/libnvrtc.so* "$d"/lib/libnvrtc.so* 2>/dev/null | head -1 || true)"
  done
' ; "$PY" - <<'EOF' || true
import glob, importlib.util, os, sys
print("python:", sys.executable, sys.version.split()[0])
hits = [h for p in sys.path if os.path.isdir(p) for h in glob.glob(os.path.join(p, "nvidia/*/lib/libnvrtc.so*"))]
print("pip libnvrtc:", hits[0] if hits else "none")
print("pytest-timeout:", bool(importlib.util.find_spec("pytest_timeout")))
try:
    import torch
    print("torch:", torch.__version__, "cuda:", torch.version.cuda, "available:", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
except Exception as err:
    print("torch import failed:", err)
EOF

if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
  step "carried wheels (.whl/)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$REPO"/.whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step "build (pip install --no-build-isolation, ≤ 180 s, $CMAKE_BUILD_PARALLEL_LEVEL jobs; log: build.log)"
run 180 "$PY" -m pip install -v --no-build-isolation --no-deps "$REPO" >"$OUT/build.log" 2>&1
rc=$?
grep -E "eqprop:|Added CUDA NVCC flags|CMake Warning|error:|Error" "$OUT/build.log" | head -20
BUILT=0
CUDA_READY=0
why=""
if [ $rc -eq 0 ]; then
  # Outside the source tree, so that `import eqprop` is the installed build. WHY: why CUDA cannot run.
  info=$(cd /tmp && "$PY" -c "
import eqprop, torch
info = eqprop.build_info()
print(info)
if not info['cuda_kernels']:
    print('WHY eqprop was built without CUDA kernels (torch', torch.__version__, 'has no CUDA)')
elif not torch.cuda.is_available():
    print('WHY torch.cuda.is_available() is False')
else:
    print('READY')" 2>&1)
  echo "$info" | grep -v "^WHY\|^READY$"
  grep -q "^READY$" <<<"$info" && CUDA_READY=1
  why=$(echo "$info" | sed -n 's/^WHY //p')
  [ $CUDA_READY = 1 ] || [ -n "$why" ] || why="eqprop could not be imported after the build"
  BUILT=1
else
  tail -30 "$OUT/build.log"
  why="the build failed"
fi
note "build: $(status_word $rc) ($(( $(date +%s) - T0 )) s since start)"
if [ $CUDA_READY != 1 ]; then
  if [ $BUILT = 1 ] && [ "${FORCE_CUDA_STEPS:-0}" = 1 ]; then
    echo "!! FORCE_CUDA_STEPS=1: the CUDA steps run anyway ($why): a dry run of their control flow, in"
    echo "   which the CUDA tests skip themselves and the benchmarks measure the CPU"
    CUDA_READY=1
  else
    echo "!! CUDA steps will be SKIPPED: $why"
  fi
fi
cuda_step() {  # cuda_step NAME: true when the step may run, else notes the skip
  if [ "${CUDA_READY:-0}" = 1 ]; then return 0; fi
  echo "SKIPPED $1: $why"
  note "$1: skipped ($why)"
  return 1
}

if [ "$MODE" = check ]; then
  step "CUDA tests (≤ 150 s; log: tests.log)"
  if cuda_step "CUDA tests"; then
    # The CUDA-marked tests of every file (test_engine_cuda.py and test_markov_cuda.py are marked
    # whole), one pytest process per file so that a crashed CUDA context stops one file only.
    files=$(grep -l "pytest.mark.cuda" tests/test_*.py)
    n=$(echo "$files" | wc -w)
    [ "$n" -gt 0 ] || { echo "no test file has pytest.mark.cuda"; n=1; }
    per=$(( 145 / n - 5 ))
    per_test=()
    "$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout=$(( per < 60 ? per : 60 )))
    for f in $files; do
      echo "-- $f (≤ $per s)" | tee -a "$OUT/tests.log"
      (cd /tmp && run "$per" "$PY" -m pytest -v -p no:cacheprovider -m cuda -rfEs --durations=5 \
        --rootdir "$REPO" -c "$REPO/pyproject.toml" "${per_test[@]}" "$REPO/$f") >>"$OUT/tests.log" 2>&1
      rc=$?
      line=$(grep -E "^=+ .*(passed|failed|error|skipped|deselected).* =+$" "$OUT/tests.log" | tail -1)
      echo "   $(status_word $rc): ${line:-no pytest summary (crashed or killed)}"
      note "tests $(basename "$f"): $(status_word $rc) ${line//=/}"
    done
    grep -E "^(FAILED|ERROR) " "$OUT/tests.log" | head -20
  fi

  step "bench_markov, the CUDA kernel only (≤ 40 s; the CPU rows come from the CPU machine)"
  if cuda_step "bench_markov"; then
    (cd "$REPO/benchmarks" && run 40 "$PY" bench_markov.py --no-cpu --out "$OUT/markov_cuda.json")
    note "bench_markov: $(status_word $?)"
  fi

  step "bench_relax (≤ 100 s)"
  if cuda_step "bench_relax"; then
    (cd "$REPO/benchmarks" && run 100 "$PY" bench_relax.py --out "$OUT/relax_cuda.json")
    note "bench_relax: $(status_word $?)"
  fi

  step "bench_lengthgen: full / sliding (chunked, flex) / TTT dual vs primal (≤ 60 s)"
  if cuda_step "bench_lengthgen"; then
    (cd "$REPO/benchmarks" && run 60 "$PY" bench_lengthgen.py --device cuda --out "$OUT/lengthgen_cuda.json")
    note "bench_lengthgen: $(status_word $?)"
  fi
else
  step "training throughput, k = 6 (≤ 90 s)"
  if cuda_step "training throughput"; then
    (cd "$REPO/benchmarks" && run 90 "$PY" bench_markov_train.py --no-recipe --out "$OUT/markov_train.json")
    note "training throughput: $(status_word $?)"
  fi

  step "k = 4 recipe run (≤ 200 s; SIGTERM at the limit stops it cleanly, no final evaluation)"
  if cuda_step "k = 4 recipe"; then
    (cd "$REPO/benchmarks" && timeout -k 20 200 "$PY" bench_markov_train.py --recipe-only \
      --recipe-dir /tmp/eqprop_recipe_k4 --out "$OUT/markov_train_recipe.json")
    rc=$?
    note "k = 4 recipe: $(status_word $rc)"
    for f in summary.json config.json training_history.csv figures/training_curve.png figures/gap_by_position.png; do
      [ -f "/tmp/eqprop_recipe_k4/$f" ] && mkdir -p "$OUT/recipe" && cp "/tmp/eqprop_recipe_k4/$f" "$OUT/recipe/"
    done
  fi
fi

step "summary"
{
  echo "eqprop GPU session ($MODE), $(( $(date +%s) - T0 )) s"
  printf '  %s\n' "${SUMMARY[@]}"
  "$PY" - "$OUT" <<'EOF'
import json, os, sys

out = sys.argv[1]

def load(name):
    try:
        with open(os.path.join(out, name)) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None

m = load("markov_cuda.json")
if m:
    for r in m.get("rows", []):
        print(f"  markov {r['path']:>9} k={r['k']} B={r['batch']}: {r['tokens_per_s']:.3e} tokens/s")
    print(f"  markov goals: {m.get('goals')}  complete={m['complete']}")
r = load("relax_cuda.json")
if r:
    for dtype, run in r.get("runs", {}).items():
        ps = run.get("per_step", {})
        print(f"  relax {dtype}: " + ", ".join(f"{k} {v * 1e3:.3f} ms" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in ps.items()))
        for k in ("speedup_per_step_vs_eager_reference", "speedup_per_step_graph_vs_no_graph"):
            if run.get(k) is not None:
                print(f"    {k}: {run[k]:.2f}x")
    print(f"  relax complete={r['complete']}")
lg = load("lengthgen_cuda.json")
if lg:
    print(f"  lengthgen: {len(lg.get('rows', []))} rows, goals {lg.get('goals')}, complete={lg.get('complete')}")
t = load("markov_train.json")
if t:
    for row in t.get("throughput", []):
        print(f"  train bf16={row['bf16']} {row['attention']} ckpt={row['grad_checkpointing']}: "
              f"{row.get('tokens_per_s') or row.get('error')} tokens/s, {row.get('peak_mem_mib')} MiB")
    print(f"  train speedup bf16+flash vs fp32+math: {t.get('speedup_bf16_fast_vs_fp32_math')}")
rec = (load("markov_train_recipe.json") or {}).get("recipe_k4")
if rec:
    last = rec["evals"][-1] if rec.get("evals") else {}
    print(f"  recipe k=4: {rec.get('status')}, {len(rec.get('evals', []))} evals, last gap "
          f"{last.get('gap_pct')} at step {last.get('step')}, final {rec.get('final')}")
EOF
} | tee "$OUT/summary.txt"
echo "files in \$OUT ($OUT): $(ls "$OUT" | tr '\n' ' ')"
exec >&- 2>&-  # let tee drain session.log before the call returns
wait "$TEE_PID" 2>/dev/null || true
