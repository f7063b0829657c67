#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: install what is missing, run the CUDA tests (kernels, quantize,
# CUDA graphs), print GOPS of each GEMM role (TVM mma and dp4a vs torch bf16 and torch._int_mm),
# and the training steps of the Transformer and ResNet-20 (batch 128: fp32, bf16 autocast and the
# fraccompile backends, with and without CUDA graphs; step time and kernel launches per step).
# Budget: 9 minutes in all. Each step is capped at the smaller of its own cap (170 + 40 + 100 + 220 s)
# and what is left of 530 s since the script started (setup included), so it ends within 9 minutes
# unless the setup alone takes that long; a step cut short prints what it has so far. A failing
# step does not stop the ones after it: the script exits with the status of the last failure.
# The GPU tests alone took about six minutes on an H200, more than their cap here: `tests` runs
# them and nothing else (caps 460 + 40 s), within the same 9 minutes.
#
#     bash bench/gpu_check.sh          # tests (cut at their cap), GOPS per role, training steps
#     bash bench/gpu_check.sh tests    # every GPU test, no benchmarks
set -euo pipefail
mode=${1:-all}
if [[ $mode != all && $mode != tests ]]; then
    echo "usage: bash bench/gpu_check.sh [tests]" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
start=$(date +%s)
total=530
cap() {  # cap SECONDS: the smaller of SECONDS and the time left of the total budget (at least 1)
    local left=$((total - ($(date +%s) - start)))
    ((left < 1)) && left=1
    echo $((left < $1 ? left : $1))
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# the package (installed: its examples are a mapped subpackage), and the test tools; torch stays as
# installed (a CUDA build is needed here)
python -c "import fraccompile.examples, tvm, pytest" 2>/dev/null || python -m pip install -q -e ".[test]"
python - <<'PY'
import sys, torch
from fraccompile.targets.runtime.cuda_driver import gpu_unavailable_reason
from fraccompile.targets.kernels.cuda import nvcc_unavailable_reason
print("torch", torch.__version__, "cuda", torch.version.cuda)
for what, reason in (("GPU", gpu_unavailable_reason()), ("nvcc", nvcc_unavailable_reason())):
    if reason:
        sys.exit(f"gpu_check: no {what}: {reason}")
PY
status=0
# (the CUDA-graph tests last: a capture that fails may leave the process's GPU state unusable)
# the GPU tests of every CUDA test file (their emulator and code-generation tests run in CI): the
# kernels exact against torch, the device quantization path (a step under torch's sync debug
# mode), the fused epilogue and the cp.async pipeline, the tensor-core convs, an exported fatbin
timeout "$(cap $([[ $mode == tests ]] && echo 460 || echo 170))" python -m pytest -q -k "gpu and not branch" tests/test_cuda.py tests/test_cuda_mma.py \
    tests/test_cuda_quantize.py tests/test_cuda_epilogue.py tests/test_cuda_backend.py tests/test_cuda_conv.py \
    tests/test_tuning_export.py::test_gpu_step_on_the_exported_fatbin_builds_nothing || status=$?
# (the CUDA-graph tests last: a capture that fails may leave the process's GPU state unusable)
timeout "$(cap 40)" python -m pytest -q tests/test_cuda_graphs.py -k gpu || status=$?
if [[ $mode == tests ]]; then
    echo "gpu_check: done in $(($(date +%s) - start)) s (exit status $status)"
    exit "$status"
fi
timeout "$(cap 100)" python bench/gpu_kernels.py --repeats 20 || status=$?
t=$(cap 220)
timeout "$t" python bench/gpu_step.py --batch 128 --repeats 10 --budget $((t * 3 / 4)) || status=$?
echo "gpu_check: done in $(($(date +%s) - start)) s (exit status $status)"
exit "$status"
