"""What the CUDA kernel tests share: operand dtypes and codes, the exact reference GEMM, the nvcc
skip, the GPU-only marker and the SM version of a cubin."""

import struct

import pytest
import torch

DTYPES = [
    (torch.int8, torch.int8),
    (torch.uint8, torch.int8),
    (torch.int8, torch.uint8),
    (torch.uint8, torch.uint8),
]


def codes(shape, dtype, gen):
    lo, hi = (-128, 128) if dtype == torch.int8 else (0, 256)
    return torch.randint(lo, hi, shape, dtype=dtype, generator=gen)


def reference(a, b):
    return a.long() @ b.long().mT


def needs_nvcc():
    from fraccompile.targets.kernels.cuda import nvcc_unavailable_reason

    reason = nvcc_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def gpu_reason() -> str | None:
    """Why the GPU-only tests skip on this machine (no usable GPU, or no nvcc), or None."""
    from fraccompile.targets.runtime.cuda_driver import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    if reason is None:
        from fraccompile.targets.kernels.cuda import nvcc_unavailable_reason

        reason = nvcc_unavailable_reason()
    return reason


# the GPU-only tests: skipped, with the reason, where there is no GPU or no nvcc
gpu = pytest.mark.skipif(gpu_reason() is not None, reason=f"needs a GPU and nvcc: {gpu_reason()}")


def elf_arch(cubin: bytes) -> int:
    """The SM version in a CUDA ELF's ``e_flags`` (bits 8-15 for the ELF ABI of CUDA 12+)."""
    assert cubin[:4] == b"\x7fELF" and cubin[4] == 2  # ELF64
    (machine,) = struct.unpack_from("<H", cubin, 18)
    assert machine == 190  # EM_CUDA
    (flags,) = struct.unpack_from("<I", cubin, 48)
    return (flags >> 8) & 0xFF
