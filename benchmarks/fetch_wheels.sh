#!/usr/bin/env bash
# Download the pure-Python packages the GPU machine lacks (it reaches no package index) into .whl/, for
# benchmarks/gpu_check.sh: TRL (the drop-in, its fused head as an anchor) with the datasets stack it imports, Liger
# and Cut Cross-Entropy (anchors) at the anchors' versions. The machine has torch, triton, transformers, accelerate, peft,
# pyarrow, pandas, huggingface_hub 1.x: datasets 4.7 (pyarrow >= 21, hub < 2) rather than 5.x (pyarrow >= 24).
# Run here, in the repository root (needs PyPI); .whl/ is git-ignored and travels with the device tool's `carry`.
set -euo pipefail
mkdir -p .whl
grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
    -d .whl trl==1.16.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1 datasets==4.7.0 dill==0.4.0 multiprocess==0.70.18
ls -la .whl
du -sh .whl
