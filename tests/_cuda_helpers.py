"""What the CUDA kernel tests share: operand dtypes and codes, the exact reference GEMM, the nvcc
skip and the SM version of a cubin."""

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


def elf_arch(cubin: bytes) -> int:
    """The SM version in a CUDA ELF's ``e_flags`` (bits 8-15 for the ELF ABI of CUDA 12+)."""
    assert cubin[:4] == b"\x7fELF" and cubin[4] == 2  # ELF64
    (machine,) = struct.unpack_from("<H", cubin, 18)
    assert machine == 190  # EM_CUDA
    (flags,) = struct.unpack_from("<I", cubin, 48)
    return (flags >> 8) & 0xFF
