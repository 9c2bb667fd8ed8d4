#!/usr/bin/env bash
# The device check for a lent CUDA machine: the gpu-marked tests, then the decode benchmark at TP=1
# in bf16. Runs from the repository root without installing mgpu (the image has torch and
# transformers); results land in $OUT (or ./gpu-out when run by hand).
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log"
python3 benchmarks/decode_speed.py --device cuda --tp 1 --rss-tp "" --demo-dtype bfloat16 \
    --big-dtypes bfloat16 --no-write --output "$out/decode_cuda.md" 2>&1 | grep -v "it/s\]" | tail -30
