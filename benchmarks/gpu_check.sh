#!/usr/bin/env bash
# The GPU record in one device call (issue 13): install offline, the test suite on CUDA, the correctness checks at
# the Llama-3-8B head, fastpref against every anchor side by side, the tile candidates; everything under $OUT.
#
#   on the device machine (the repository root, wheels from benchmarks/fetch_wheels.sh in .whl/, carried):
#       bash benchmarks/gpu_check.sh                 # ~8 minutes; run with the device tool's timeout_s=560
#   rehearsal on the CPU (tiny shapes, the interpreter, no install, a few seconds per step):
#       OUT=/tmp/gpu-rehearsal bash benchmarks/gpu_check.sh --smoke
#
# Each step has its own time cap, so a slow or failing step leaves the others their time; every step's exit
# status is in $OUT/steps.txt. What comes back is at most 8 files: the logs, steps.txt, and results.tar.gz
# (each step's JSON, markdown and PNG files), which the session unpacks into benchmarks/results/DATE-gpu/.
set -uo pipefail
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
OUT=${OUT:-/tmp/fastpref-gpu}
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STEPS="$OUT/steps.txt"
: > "$STEPS"

step() {  # step NAME SECONDS COMMAND...: run with a time cap, log to $OUT/NAME.log, record the exit status
    local name=$1 cap=$2
    shift 2
    local t0=$SECONDS
    timeout --signal=INT --kill-after=10 "$cap" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - t0)) cap=$cap" | tee -a "$STEPS"
}

if [[ $SMOKE == 0 ]]; then
    if ls .whl/*.whl > /dev/null 2>&1; then  # trl, liger-kernel, cut-cross-entropy and what they need
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl > "$OUT/install.log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1 \
        || echo "editable install failed (see install.log); running from the checkout" >> "$STEPS"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    nvidia-smi > "$OUT/results/nvidia-smi.txt" 2>&1
fi

$PY - > "$OUT/results/versions.json" <<'EOF'
import importlib.metadata as md, json, platform, datetime, torch
out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "python": platform.python_version(), "torch": torch.__version__,
       "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
for p in ("triton", "transformers", "trl", "liger-kernel", "cut-cross-entropy", "accelerate", "peft"):
    try:
        out[p] = md.version(p)
    except md.PackageNotFoundError:
        out[p] = None
print(json.dumps(out, indent=1))
EOF

if [[ $SMOKE == 1 ]]; then
    S="--smoke"
    export TRITON_INTERPRET=1  # no GPU: the Triton kernels run on the CPU through the interpreter
    step pytest 300 $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_exactness.py -k \
        "split_merge or large_bias or logits_of_1e4"
    step head_check 120 $PY -m benchmarks.head_check $S --out "$OUT/results/head"
    step compare 120 $PY -m benchmarks.compare $S --out "$OUT/results/compare"
    step tune_head 60 $PY -m benchmarks.tune_head $S --iters 1 --out "$OUT/results/tune"
    step cost 60 $PY -m benchmarks.cost --no-naive --out "$OUT/results/cost"
else
    # 1. the suite on CUDA: the kernels compiled by this machine's triton for the first time; the head's tests
    #    first (they matter most), then the rest in what remains of the cap
    step pytest_head 150 $PY -m pytest -q -p no:cacheprovider --durations=15 tests/test_kernels.py \
        tests/test_exactness.py tests/test_head_stats.py tests/test_logprobs.py tests/test_autograd_limits.py \
        tests/test_losses_fused.py tests/test_auxdpo_penalty.py tests/test_compile.py
    step pytest_rest 100 $PY -m pytest -q -p no:cacheprovider -x --durations=10 tests \
        --ignore=tests/test_kernels.py --ignore=tests/test_exactness.py --ignore=tests/test_head_stats.py \
        --ignore=tests/test_logprobs.py --ignore=tests/test_autograd_limits.py --ignore=tests/test_losses_fused.py \
        --ignore=tests/test_auxdpo_penalty.py --ignore=tests/test_compile.py --ignore=tests/test_kernels_compile.py \
        --ignore=tests/test_distributed_trl.py --ignore=tests/test_demo.py
    # 2. correctness at the Llama-3-8B head against float64, and the DPO step beside every anchor
    step head_check 90 $PY -m benchmarks.head_check --out "$OUT/results/head"
    # 3. the side-by-side matrix (Llama-3-8B cross, Qwen2.5-7B, Gemma-2-2B, one 32k pair), time-boxed
    step compare 150 $PY -m benchmarks.compare --time-budget-s 130 --out "$OUT/results/compare"
    # 4. the tile candidates of the forward and the backward's gradient tile
    step tune_head 40 $PY -m benchmarks.tune_head --out "$OUT/results/tune"
fi

tar -czf "$OUT/results.tar.gz" -C "$OUT" results
rm -rf "$OUT/results"
cat "$STEPS"
