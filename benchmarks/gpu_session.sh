#!/usr/bin/env bash
# One device call of a GPU session (DEVELOPERS.md "The GPU"): build eqprop against the machine's
# CUDA torch, run the CUDA-vs-CPU tests, then the benchmarks; every result and log lands in $OUT
# (copy the JSON files to benchmarks/results/ and commit them). Written for a 10-minute call:
#   bash benchmarks/gpu_session.sh            # build, CUDA tests, bench_relax, bench_markov
#   bash benchmarks/gpu_session.sh train      # build, bench_markov_train (k = 6 throughput + k = 4 recipe)
# It has not run yet: no session so far had a GPU (see the issue notes).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-/tmp/eqprop_gpu}
mkdir -p "$OUT"
step() { echo "== $* ($(date +%T))"; }

step build
if ! python3 -m pip install --no-build-isolation --no-deps . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi
nvcc --version | tail -2
python3 -c "import eqprop, torch; print(eqprop.build_info(), torch.cuda.get_device_name())"

cd "$REPO/benchmarks"
if [ "${1:-}" = train ]; then
  step bench_markov_train
  python3 bench_markov_train.py --out "$OUT/markov_train.json" 2>&1 | tee "$OUT/bench_markov_train.log" | tail -20
  exit 0
fi

step CUDA tests
(cd /tmp && python3 -m pytest -q -p no:cacheprovider "$REPO/tests/test_engine_cuda.py" \
  "$REPO/tests/test_markov_cuda.py" "$REPO/tests/test_solvers.py" "$REPO/tests/test_block.py") \
  >"$OUT/tests.log" 2>&1
tail -15 "$OUT/tests.log"

step bench_relax
python3 bench_relax.py --out "$OUT/relax_cuda.json" 2>&1 | tee "$OUT/bench_relax.log" | tail -12
step bench_markov
python3 bench_markov.py --name markov_cuda 2>&1 | tee "$OUT/bench_markov.log" | tail -12
cp results/markov_cuda.json "$OUT/"
