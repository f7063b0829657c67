#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: install what is missing, run the CUDA kernel tests, print GOPS of
# each GEMM role (TVM mma and dp4a vs torch bf16 and torch._int_mm) and the Transformer training
# step (fp32 / bf16 eager vs the TVM backend). Budget: under 8 minutes (the steps below are capped
# at 200 + 150 + 110 s).
#
#     bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# the package, and the test tools; torch stays as installed (a CUDA build is needed here)
python -c "import fraccompile, tvm, pytest" 2>/dev/null || python -m pip install -q -e ".[test]"
python - <<'PY'
import sys, torch
from fraccompile.targets.runtime.cuda_driver import gpu_unavailable_reason
from fraccompile.targets.kernels.cuda import nvcc_unavailable_reason
print("torch", torch.__version__, "cuda", torch.version.cuda)
for what, reason in (("GPU", gpu_unavailable_reason()), ("nvcc", nvcc_unavailable_reason())):
    if reason:
        sys.exit(f"gpu_check: no {what}: {reason}")
PY
timeout 200 python -m pytest -q tests/test_cuda.py tests/test_cuda_mma.py tests/test_cuda_quantize.py \
    tests/test_tuning_export.py::test_gpu_step_on_the_exported_fatbin_builds_nothing
timeout 150 python bench/gpu_kernels.py --repeats 20
timeout 110 python bench/gpu_step.py --repeats 10 --profile
echo "gpu_check: done in $(( $(date +%s) - start )) s"
