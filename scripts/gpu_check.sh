#!/usr/bin/env bash
# The device check for a lent CUDA machine: the gpu-marked tests, the decode benchmark at TP=1 in
# bf16 (eager and --compile), and the serving benchmark. Runs from the repository root without
# installing mgpu (the image has torch and transformers; wheels in .whl/, if carried, add the
# server's packages). Results land in $OUT (or ./gpu-out when run by hand).
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log"
python3 benchmarks/decode_speed.py --device cuda --tp 1 --rss-tp "" --demo-dtype bfloat16 \
    --big-dtypes bfloat16 --compile --no-write --output "$out/decode_cuda.md" 2>&1 \
    | grep -E "^\|" 
if python3 -c "import fastapi, uvicorn" 2> /dev/null; then
    python3 benchmarks/serve_throughput.py --device cuda 2>&1 | grep -E "tok/s|^\|"
    cp docs/benchmarks.md "$out/benchmarks_cuda.md"
    cp docs/img/serve_throughput_cuda.png "$out/" 2> /dev/null
fi
