"""A small emulator of CUDA kernels on the CPU, for tests without a GPU.

A kernel's CUDA C (from its ``extern "C" __global__`` definition on) is compiled by g++ with a shim
(``threadIdx``/``blockIdx``, ``__syncthreads`` as a ``std::barrier``, ``__dp4a``, ``atomicAdd``,
the vector types) into ``emulate(void** args)``, which runs the grid block after block, the threads
of a block concurrently as ``std::thread`` s. So a schedule's indexing, shared-memory staging and
synchronization are checked exactly, without a GPU.

Warp-collective instructions run as the hardware defines them. Thread ``t = x + bx·(y + by·z)``
is lane ``t % 32`` of warp ``t / 32``, as on the GPU. The inline PTX that TVM emits for the
tensor-core kernels (``ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16`` and
``mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32``) is replaced, statement by statement, by calls
of C++ functions (:func:`replace_inline_ptx`) in which every lane deposits its operands in a
per-warp scratch, waits on a per-warp barrier of 32, computes its own registers from the whole
warp's operands with the fragment layouts of the PTX ISA, and waits again; ``__shfl_sync`` works
the same way. Shared-memory addresses (``__cvta_generic_to_shared``) are plain pointers here.
``cp.async`` (in TVM's ``__device__`` wrappers, which are compiled too) copies at once and its
commit and wait groups do nothing: a pipeline's waits cannot be checked here.
Inline PTX the emulator does not know is refused with its text, not run wrongly.
"""

import ctypes
import re
import shutil
import subprocess

import pytest

_SHIM = r"""
#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
struct U3 { unsigned x, y, z; };
static thread_local U3 threadIdx;
static U3 blockIdx;
static std::barrier<>* block_barrier;
#define __global__
#define __launch_bounds__(n)
#define __forceinline__ inline
#define __device__
#define __restrict__ __restrict
#define __syncthreads() block_barrier->arrive_and_wait()
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
static inline int __dp4a(int a, int b, int c) {
  for (int i = 0; i < 4; ++i) c += int(int8_t(a >> (8 * i))) * int(int8_t(b >> (8 * i)));
  return c;
}
static inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
using std::min;  // CUDA's min of two ints (or floats)
// IEEE round-to-nearest fp32 operations (x86-64 g++ without -march emits no FMA: no contraction)
#define __fmul_rn(a, b) ((float)(a) * (float)(b))
#define __fadd_rn(a, b) ((float)(a) + (float)(b))

// -- warps: lane t % 32 of warp t / 32, a barrier of the warp's threads and a scratch per warp ---
struct WarpScratch { uintptr_t addr[32]; uint32_t reg[32][8]; };
static thread_local unsigned emu_lane, emu_warp;
static std::barrier<>** warp_barriers;
static WarpScratch* warp_scratch;
static inline void warp_sync() { warp_barriers[emu_warp]->arrive_and_wait(); }
static inline uintptr_t __cvta_generic_to_shared(const void* p) { return (uintptr_t)p; }
static inline unsigned __activemask() { return 0xffffffffu; }
static inline uint32_t lane_reg(unsigned lane, int r) { return warp_scratch[emu_warp].reg[lane][r]; }
static inline int8_t lane_byte(unsigned lane, int r, int b) { return int8_t(lane_reg(lane, r) >> (8 * b)); }

static inline int __shfl_sync(unsigned, int v, int src, int width) {
  WarpScratch& s = warp_scratch[emu_warp];
  s.reg[emu_lane][0] = uint32_t(v);
  warp_sync();
  int out = int(s.reg[(emu_lane / width) * width + (src % width)][0]);
  warp_sync();
  return out;
}

// ldmatrix.sync.aligned.m8n8.x{num}[.trans].shared.b16: lane 8j + r holds the address of row r of
// 8 x 8 matrix j (rows of 8 b16); lane l receives in register j row l / 4, b16 elements
// 2 (l % 4) and 2 (l % 4) + 1 (with .trans: column l / 4, rows 2 (l % 4) and 2 (l % 4) + 1).
static void emu_ldmatrix(int num, bool trans, uintptr_t addr, void* const* out) {
  WarpScratch& s = warp_scratch[emu_warp];
  s.addr[emu_lane] = addr;
  warp_sync();
  const unsigned l = emu_lane;
  for (int j = 0; j < num; ++j) {
    uint32_t v;
    if (!trans) {
      std::memcpy(&v, (const void*)(s.addr[8 * j + l / 4] + 4 * (l % 4)), 4);
    } else {
      uint16_t lo, hi;
      std::memcpy(&lo, (const void*)(s.addr[8 * j + 2 * (l % 4)] + 2 * (l / 4)), 2);
      std::memcpy(&hi, (const void*)(s.addr[8 * j + 2 * (l % 4) + 1] + 2 * (l / 4)), 2);
      v = uint32_t(lo) | (uint32_t(hi) << 16);
    }
    std::memcpy(out[j], &v, 4);
  }
  warp_sync();
}

// mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32: D = A (16 x 32) B (32 x 8) + C, with
// g = lane / 4, t = lane % 4: a_i (register i / 4, byte i % 4) at row g (+8 for i in 4..7 and
// 12..15), column 4t + i % 4 (+16 for i >= 8); b_i (register i / 4) at row 4t + i % 4 (+16 for
// i >= 4), column g; c_i / d_i at row g (+8 for i >= 2), column 2t + i % 2. s32 adds wrap.
static void emu_mma_m16n8k32_s8(void* const* d, const uint32_t* a, const uint32_t* b, const uint32_t* c) {
  WarpScratch& s = warp_scratch[emu_warp];
  for (int r = 0; r < 4; ++r) s.reg[emu_lane][r] = a[r];
  for (int r = 0; r < 2; ++r) s.reg[emu_lane][4 + r] = b[r];
  warp_sync();
  const unsigned g = emu_lane / 4, t = emu_lane % 4;
  uint32_t out[4];
  for (int i = 0; i < 4; ++i) {
    const unsigned row = g + 8 * (i / 2), col = 2 * t + i % 2;
    int64_t sum = int32_t(c[i]);
    for (unsigned k = 0; k < 32; ++k) {
      const int8_t x = lane_byte(4 * (row % 8) + (k % 16) / 4, (row / 8) + 2 * (k / 16), k % 4);
      const int8_t y = lane_byte(4 * col + (k % 16) / 4, 4 + k / 16, k % 4);
      sum += int64_t(x) * int64_t(y);
    }
    out[i] = uint32_t(sum);
  }
  for (int i = 0; i < 4; ++i) std::memcpy(d[i], &out[i], 4);
  warp_sync();
}
"""


def _split_top(text, sep):
    """``text`` split at ``sep`` outside parentheses and string literals."""
    parts, depth, quoted, start = [], 0, False, 0
    for i, ch in enumerate(text):
        if quoted:
            quoted = ch != '"' or text[i - 1] == "\\"
        elif ch == '"':
            quoted = True
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _operands(section):
    """``"=r"(expr), "r"(expr)`` -> the expressions."""
    out = []
    for op in _split_top(section, ","):
        if op.strip():
            m = re.fullmatch(r'\s*"[=+]?[a-z]+"\s*\((.*)\)\s*', op, re.S)
            if m is None:
                raise ValueError(f"unexpected inline asm operand {op.strip()!r}")
            out.append(m.group(1))
    return out


def _emulation(template, outputs, inputs):
    """The C++ statement that runs one inline PTX instruction in the emulator."""
    ldm = re.fullmatch(
        r"ldmatrix\.sync\.aligned\.m8n8\.x([124])(\.trans)?\.shared\.b16\s*\{[^}]*\},\s*\[%\d+\];?", template
    )
    if ldm and len(outputs) == int(ldm.group(1)) and len(inputs) == 1:
        outs = ", ".join(f"(void*)&({e})" for e in outputs)
        trans = "true" if ldm.group(2) else "false"
        call = f"emu_ldmatrix({ldm.group(1)}, {trans}, (uintptr_t)({inputs[0]}), o);"
        return f"{{ void* const o[] = {{{outs}}}; {call} }}"
    if template.startswith("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32") and (
        len(outputs),
        len(inputs),
    ) == (4, 10):
        d = ", ".join(f"(void*)&({e})" for e in outputs)
        a, b, c = (
            ", ".join(f"(uint32_t)({e})" for e in part) for part in (inputs[:4], inputs[4:6], inputs[6:])
        )
        return (
            f"{{ void* const d[] = {{{d}}}; const uint32_t a[] = {{{a}}}, b[] = {{{b}}}, c[] = {{{c}}}; "
            "emu_mma_m16n8k32_s8(d, a, b, c); }"
        )
    cp = re.fullmatch(r"cp\.async\.c[ag]\.shared\.global(\.L2::\d+B)? \[%0\], \[%1\], %2;", template)
    if cp and not outputs and len(inputs) == 3:  # synchronous: a pipeline's waits are not checked
        return f"std::memcpy((void*)({inputs[0]}), (const void*)({inputs[1]}), {inputs[2]});"
    if re.fullmatch(r"cp\.async\.(commit_group|wait_group \d+|wait_all);", template) and not inputs + outputs:
        return ";  /* cp.async group: every copy above already ran */"
    raise ValueError(f"the emulator cannot run this inline PTX: {template!r}")


def device_helpers(source):
    """The ``__forceinline__ __device__`` functions TVM writes before the kernels (its ``cp.async``
    wrappers), their inline PTX replaced as the kernels' is."""
    head = source[: source.index('extern "C" __global__')]
    funcs = re.findall(r"__forceinline__ __device__ \w+ \w+\([^)]*\) \{.*?\n\}", head, re.S)
    return "\n".join(replace_inline_ptx(f.replace("asm volatile(", "__asm__ __volatile__(")) for f in funcs)


def replace_inline_ptx(body):
    """Every ``__asm__ __volatile__(...)`` statement of ``body`` replaced by the emulator's call
    (:func:`_emulation`), and ``unsigned int x = __cvta_generic_to_shared(...)`` widened to a
    pointer-sized integer."""
    body = re.sub(
        r"unsigned int (\w+) = __cvta_generic_to_shared\(", r"uintptr_t \1 = __cvta_generic_to_shared(", body
    )
    out, pos = [], 0
    for m in re.finditer(r"__asm__\s+__volatile__\s*\(", body):
        if m.start() < pos:
            continue
        depth, i, quoted = 1, m.end(), False
        while depth:  # the matching parenthesis, skipping string literals
            ch = body[i]
            if quoted:
                quoted = ch != '"' or body[i - 1] == "\\"
            elif ch == '"':
                quoted = True
            else:
                depth += {"(": 1, ")": -1}.get(ch, 0)
            i += 1
        sections = _split_top(body[m.end() : i - 1], ":")
        template = " ".join(
            re.sub(r"\\n|\\t", " ", lit) for lit in re.findall(r'"((?:[^"\\]|\\.)*)"', sections[0])
        )
        template = re.sub(r"\s+", " ", template).strip()
        outputs = _operands(sections[1]) if len(sections) > 1 else []
        inputs = _operands(sections[2]) if len(sections) > 2 else []
        end = body.index(";", i) + 1
        out += [body[pos : m.start()], _emulation(template, outputs, inputs)]
        pos = end
    return "".join(out) + body[pos:]


class EmulatedKernel:
    """The CUDA C ``source`` of kernel ``name`` (parameters ``params``, launched on ``grid`` blocks
    of ``block`` threads), run on the CPU. ``launch(pointers)`` takes the buffer pointers in the
    kernel's parameter order. Skips the test without g++."""

    def __init__(self, source, name, grid, block, params, workdir, stem=None):
        if shutil.which("g++") is None:
            pytest.skip("g++ not found (needed to emulate the kernels)")
        self.grid, self.block, self.name, self.params = tuple(grid), tuple(block), name, tuple(params)
        body = source[source.index('extern "C" __global__') :]
        body = re.sub(r"__shared__\s+(alignas\(\d+\))", r"\1 static", body)
        body = replace_inline_ptx(body.replace("__shared__", "static"))
        sig = re.search(r"\(([^)]*)\)\s*\{", body).group(1)
        types = [re.sub(r"__restrict__\s+\w+$", "", p).strip() for p in sig.split(",")]
        call = ", ".join(f"({t})args[{i}]" for i, t in enumerate(types))
        (gx, gy, gz), (bx, by, bz) = self.grid, self.block
        code = (
            _SHIM
            + device_helpers(source)
            + body
            + f"""
extern "C" void emulate(void** args) {{
  const unsigned nt = {bx * by * bz};
  for (unsigned z = 0; z < {gz}; ++z) for (unsigned y = 0; y < {gy}; ++y)
  for (unsigned x = 0; x < {gx}; ++x) {{
    blockIdx = U3{{x, y, z}};
    std::barrier<> bar(nt);
    block_barrier = &bar;
    const unsigned nw = (nt + 31) / 32;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<std::barrier<>*> warp_ptrs;
    for (unsigned w = 0; w < nw; ++w) {{
      warps.emplace_back(new std::barrier<>(std::min(32u, nt - 32 * w)));
      warp_ptrs.push_back(warps.back().get());
    }}
    std::vector<WarpScratch> scratch(nw);
    warp_barriers = warp_ptrs.data();
    warp_scratch = scratch.data();
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < nt; ++t) threads.emplace_back([=] {{
      threadIdx = U3{{t % {bx}, (t / {bx}) % {by}, t / {bx * by}}};
      emu_lane = t % 32;
      emu_warp = t / 32;
      {self.name}({call});
    }});
    for (auto& t : threads) t.join();
  }}
}}
"""
        )
        stem = stem or name
        cc, so = workdir / f"{stem}.cc", workdir / f"{stem}.so"
        cc.write_text(code)
        subprocess.run(
            [
                "g++",
                "-std=c++20",
                "-O1",
                "-fno-strict-aliasing",
                "-w",
                "-shared",
                "-fPIC",
                "-pthread",
                "-o",
                str(so),
                str(cc),
            ],
            check=True,
        )
        self.lib = ctypes.CDLL(str(so))
        self.lib.emulate.argtypes = [ctypes.POINTER(ctypes.c_void_p)]

    def launch(self, pointers):
        self.lib.emulate((ctypes.c_void_p * len(pointers))(*pointers))
