"""Kernel definitions: the TE/TIR compute definitions and schedules of every kernel, built by the
runtime layer.

``gemm`` (the u8·s8→s32 GEMM every site role lowers to), ``conv`` (implicit-GEMM conv forward and
weight gradient), ``pack`` (operand packing), ``quantize`` (the fused quantizer, the dequantize
epilogues), ``subbyte`` (1/2/4-bit storage of saved codes), ``probe`` (a routed site's gate
gradient), ``sums`` (exact column sums of codes), ``intrin`` (the ``vpdpbusd`` tensor intrinsic),
``cuda`` (the dp4a GEMM for NVIDIA GPUs and its nvcc build), ``cuda_mma`` (the tensor-core GEMM
for NVIDIA GPUs, with split-K), ``cuda_epilogue`` (``cuda_mma``'s GEMM with the dequantize fused
in its write-back), ``cuda_conv`` (2-D convs as implicit GEMMs on ``cuda_mma``'s
schedule), ``cuda_quantize`` (range, grid and quantize kernels for CUDA tensors, no host
decisions; not wired into the backend yet).

Imports: tvm, :mod:`fraccompile.ops` (the quantizer's constants), and of ``fraccompile.targets``
only these modules and :mod:`..runtime.host` (the target a kernel is built for). This file
imports nothing.
"""
