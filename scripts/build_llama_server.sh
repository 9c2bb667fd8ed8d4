#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` (parallel slots, continuous batching) for the peer
# benchmark, from the llama.cpp sources vendored in llama-cpp-python's source distribution: PyPI
# is the only network this needs, no git clone. Prints the binary's path on its last line.
#
# usage: scripts/build_llama_server.sh [DIR]   (default DIR: ~/.cache/mgpu/llama.cpp)
# then:  python benchmarks/peers.py --llama-server "$(scripts/build_llama_server.sh | tail -1)"
set -euo pipefail
version=0.3.36
dir=${1:-$HOME/.cache/mgpu/llama.cpp}
src=$dir/llama_cpp_python-$version/vendor/llama.cpp
bin=$src/build/bin/llama-server
if [ ! -x "$bin" ]; then
  mkdir -p "$dir"
  if [ ! -d "$src" ]; then
    python3 -m pip download "llama-cpp-python==$version" --no-deps --no-binary :all: -d "$dir" >&2
    tar -xzf "$dir/llama_cpp_python-$version.tar.gz" -C "$dir"
  fi
  cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DGGML_NATIVE=ON >&2
  cmake --build "$src/build" --target llama-server -j "$(nproc)" >&2
fi
echo "$bin"
