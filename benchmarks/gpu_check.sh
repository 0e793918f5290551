#!/usr/bin/env bash
# The GPU acceptance run, in one command on a CUDA machine where arlm is not installed and
# nothing can be downloaded: the CUDA tests, then benchmarks/gpu.py, each under a time limit,
# their logs (and gpu.py's JSON) written into one folder as they run.
#
#   bash benchmarks/gpu_check.sh [folder=gpu-logs] [benchmarks/gpu.py's arguments...]
#
# Wheels in .whl/ (benchmarks/gpu_wheels.sh, run beforehand where the package index is) are
# installed first into a folder of their own. TESTS_S and BENCH_S are the two limits in
# seconds (150 and 400: the whole run fits a 10-minute command); TESTS_S=0 skips the tests,
# BENCH_S=0 the benchmark (to give each a command of its own and a longer limit).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-logs}
shift $(($# > 0 ? 1 : 0))
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    site=$(mktemp -d)
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
        .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:$site"  # ahead of site-packages: carry only what it lacks
fi
"$python" - <<'EOF' 2>&1 | tee "$out/machine.txt"
import importlib.metadata, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
for name in ("triton", "transformers", "xgrammar", "fastapi", "uvicorn"):
    try:
        print(f"  {name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        print(f"  {name} missing")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"  {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
else:
    print("  no CUDA device")
EOF
status=0
if [ "${TESTS_S:-150}" != 0 ]; then
    echo "== CUDA tests (limit ${TESTS_S:-150} s)"
    timeout "${TESTS_S:-150}" "$python" -m pytest -p no:cacheprovider -rfEs \
        tests/test_cuda.py tests/test_cuda_graphs.py tests/test_overlap.py \
        tests/test_families.py tests/test_model_kernels.py tests/test_multi_lora.py \
        -k "cuda or model_kernels" \
        2>&1 | tee "$out/tests.log"
    status=${PIPESTATUS[0]}
fi
bench=0
if [ "${BENCH_S:-400}" != 0 ]; then
    echo "== benchmarks/gpu.py $* (limit ${BENCH_S:-400} s)"
    timeout "${BENCH_S:-400}" "$python" benchmarks/gpu.py --json "$out/gpu.json" "$@" 2>&1 |
        tee "$out/gpu.log"
    bench=${PIPESTATUS[0]}
fi
echo "tests rc $status, benchmark rc $bench"
exit $((status || bench))
