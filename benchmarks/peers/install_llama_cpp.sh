#!/usr/bin/env bash
# Builds llama.cpp's llama-server and llama-bench (CPU, Release, -march=native) from the llama.cpp
# sources vendored in the llama-cpp-python sdist on PyPI. Sources go to PREFIX/src, the build to
# PREFIX/llama.cpp-build, binaries to PREFIX/llama.cpp-build/bin/{llama-server,llama-bench}
# (PREFIX defaults to /work/peers). Needs cmake >= 3.14, a C++17 compiler and pip.
# Takes ~12 CPU-minutes per core on 2 cores (~15 min idle, 32 min here with other jobs running).
# Idempotent: does nothing when both binaries exist. On a busy 2-core machine run the server
# and llama-bench with -t 1: with the default 2 spinning threads decode was 5-50x slower.
#
#   benchmarks/peers/install_llama_cpp.sh [PREFIX]
set -euo pipefail

PREFIX="${1:-/work/peers}"
SRC="$PREFIX/src"
BUILD="$PREFIX/llama.cpp-build"
JOBS="${JOBS:-$(nproc)}"

if [ -x "$BUILD/bin/llama-server" ] && [ -x "$BUILD/bin/llama-bench" ]; then
    echo "llama.cpp already built in $BUILD/bin"
    exit 0
fi

mkdir -p "$SRC"
# the newest llama-cpp-python sdist unless one is already there
sdist=$(ls -t "$SRC"/llama_cpp_python-*.tar.gz 2>/dev/null | head -n1 || true)
if [ -z "$sdist" ]; then
    python3 -m pip download --disable-pip-version-check --no-deps --no-binary :all: llama-cpp-python -d "$SRC"
    sdist=$(ls -t "$SRC"/llama_cpp_python-*.tar.gz | head -n1)
fi
tree="$SRC/$(basename "$sdist" .tar.gz)"
[ -f "$tree/vendor/llama.cpp/CMakeLists.txt" ] || tar -xzf "$sdist" -C "$SRC"

# LLAMA_USE_PREBUILT_UI=OFF: do not try to download the web UI (the server then has none);
# LLAMA_CURL is deprecated in newer trees and only warns.
cmake -S "$tree/vendor/llama.cpp" -B "$BUILD" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF
cmake --build "$BUILD" --config Release -j"$JOBS" --target llama-server llama-bench

"$BUILD/bin/llama-server" --version
