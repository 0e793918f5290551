#!/usr/bin/env bash
# Fetch, on a machine with the package index, the wheels that arlm needs beside what a bare
# CUDA machine image already holds (PyTorch, Triton, transformers, numpy, jinja2, httpx, ...):
# the server (fastapi, uvicorn, pydantic), structured outputs (xgrammar), GGUF, and PEFT (the
# multi-LoRA tests compare against it; pure Python, as accelerate). Copy the
# folder with the repository to a GPU machine without internet; benchmarks/gpu_check.sh
# installs them there. The versions are those the test suite runs with.
#
#   bash benchmarks/gpu_wheels.sh [folder=.whl] [python version=3.12]
set -euo pipefail
dest=${1:-.whl}
py=${2:-3.12}
wheels=(
    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 opentelemetry-api==1.45.2
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 gguf==0.19.0 peft==0.22.0 accelerate==1.16.0
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
    manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
mkdir -p "$dest"
# The machine's own constraints file may cap versions for this Python; these wheels are for
# another one.
PIP_CONSTRAINT= python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version "$py" --implementation cp "${platforms[@]}" -d "$dest" "${wheels[@]}"
du -sh "$dest"
