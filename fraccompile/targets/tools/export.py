"""The export tool: every kernel a compiled model needs, in one library per target with a manifest.

``export`` runs one training step of the model with a :class:`~..runtime.library.Recorder` on its
``tvm`` backend (every site at 8 bits, so sites a schedule starts in full precision are included)
to learn the GEMM problems and kernels it calls, and writes ``DIR/kernels-cpu.so`` (``--target
cpu``) or ``DIR/kernels-cuda.fatbin`` (``--target cuda``) with ``DIR/manifest.json``. The
directory's format, and :class:`~..runtime.exported.ExportedKernels` that serves a backend from
it, are in :mod:`fraccompile.targets.runtime.exported`.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib

import torch
import tvm

from ... import __version__, fileio
from ..runtime.cache import DTYPES
from ..runtime.exported import CUDA_LIBRARY, FORMAT, MANIFEST, KernelLibraryError, library_name, problem_key
from ..runtime.host import detect
from ..runtime.library import GENERIC, JitKernels, KernelRef, Recorder, source_hash

TARGETS = ("cpu", "cuda")


# -- enumerating a model's kernels --------------------------------------------------------------------
def tvm_backends(fmodel) -> list:
    """The TVM backends the sites of ``fmodel`` run on."""
    from ...ops.modules import FracOp
    from ..backend import TVMBackend

    found = {
        id(m.backend): m.backend
        for m in fmodel.modules()
        if isinstance(m, FracOp) and isinstance(m.backend, TVMBackend)
    }
    return list(found.values())


def record(fmodel, inputs) -> Recorder:
    """Run one training step of a copy of ``fmodel`` on ``inputs`` (every site at 8 bits) and
    return what its ``tvm`` backend asked for."""
    backends = tvm_backends(fmodel)
    if not backends:
        reasons = {s.fallback_reason for s in fmodel.sites if s.fallback_reason}
        raise KernelLibraryError(
            "no site of this model runs on the tvm backend"
            + (f" ({'; '.join(sorted(reasons))})" if reasons else "")
            + ": compile it with FracConfig(backend='tvm', scheme='symmetric')"
        )
    model = copy.deepcopy(fmodel)
    model.precision.set(a=8, w=8, g=8)
    model.train()
    rec = Recorder()
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    for b in backends:
        b.recorder = rec
    try:
        out = model(*inputs)
        loss = sum(
            o.float().sum()
            for o in (out if isinstance(out, (tuple, list)) else [out])
            if isinstance(o, torch.Tensor) and o.is_floating_point()
        )
        loss.backward()
    finally:
        for b in backends:
            b.recorder = None
    return rec


def kernel_refs(rec: Recorder, provider) -> dict[KernelRef, dict]:
    """Every kernel to export for ``rec``: each GEMM problem's sign variants at the tiles
    ``provider`` chooses, the conv patch packers for each, and the generic quantize/pack kernels;
    mapped to a manifest entry."""
    refs: dict[KernelRef, dict] = {}

    def add(ref, where, problem=None):
        entry = refs.setdefault(ref, {"where": set(), "problems": set()})
        entry["where"] |= set(where)
        if problem is not None:
            entry["problems"].add(tuple(problem))

    for problem, where in rec.problems.items():
        for variant in rec.variants[problem]:
            add(KernelRef.gemm(provider.gemm_shape(*variant)), where, variant)
    for (side, geo, k0, kc, variants), where in rec.conv_packs.items():
        for variant in variants:
            shape = provider.gemm_shape(*variant)
            if side == "a":
                add(KernelRef("pack_conv_a", (*geo, shape.m, shape.k)), where)
            else:
                add(KernelRef("pack_conv_b", (*geo, k0, kc, shape.n // 16, shape.k // 4)), where)
    for ref, where in rec.kernels.items():
        if ref.kind == "gemm_dq":  # noted with the problem's true M: for either sign of A, at the
            G, M, N, K = ref.args[:4]  # tile ``provider`` picks, where the backend would run it
            for rows in (M, M + 1):  # (a signed A's tile is its problem's with a ones row more)
                shape = provider.gemm_shape(G, rows, N, K)
                if shape.n == N and (shape.m == M or G == 1):
                    add(KernelRef.gemm_dq(shape, ref.args[7] == "dqz"), where)
            continue
        add(ref, where)
    for ref in GENERIC:
        add(ref, ())
    return refs


def _entry(ref: KernelRef, info: dict, target: str, host_key: str) -> dict:
    entry = {
        "function": ref.name,
        "kind": ref.kind,
        "target": target,
        "host": host_key,
        "tvm": tvm.__version__,
        "source_hash": source_hash(),
        "sites": [{"site": s, "role": r} for s, r in sorted(w for w in info["where"] if w)],
    }
    if ref.kind in ("gemm", "gemm_dq"):
        s, fused = ref.gemm_shape, ref.kind == "gemm_dq"
        problems = [list(p) for p in sorted(info["problems"])]
        entry.update(
            dtypes=DTYPES + ("->f32" if fused else ""),
            precision="1..8 bits (u8/s8 codes)",
            shapes={
                "A": [s.groups, s.m, s.k],
                "B": [s.groups, s.n // 16, s.k // 4, 16, 4],
                "Y" if fused else "C": [s.groups, s.m, s.n],
            },
            tile=[s.tile.mb, s.tile.nb, s.tile.kb],
            **({"epilogue": ref.args[7]} if fused else {"problems": problems}),
        )
    elif ref.kind in ("conv", "conv_dq", "conv_dqz", "gc"):
        dtypes = DTYPES + ("->f32" if ref.kind in ("conv_dq", "conv_dqz") else "")
        entry.update(dtypes=dtypes, precision="1..8 bits (u8/s8 codes)", shapes={"geometry": list(ref.args)})
    elif ref.kind == "quantize":
        counter = ref.args[2:] == ("counter",)
        dims = ["n", "s", "c"] if counter else ["n"]
        entry.update(
            dtypes=f"f32->{ref.args[0]}",
            precision="1..8 bits",
            shapes={"x": dims, "q": dims},
            rounding="stochastic, counter noise"
            if counter
            else "stochastic"
            if ref.args[1]
            else "nearest-even",
        )
    elif ref.kind == "dequant":
        entry.update(
            dtypes="s32->f32", precision="1..8 bits", shapes={"c": ["g", "mp", "np"], "out": ["g", "m", "n"]}
        )
    elif ref.kind == "dequant_codes":
        entry.update(dtypes=f"{ref.args[0]}->f32", precision="1..8 bits", shapes={"q": ["n"], "out": ["n"]})
    elif ref.kind == "mask_grad":
        entry.update(
            dtypes="f32,u8->f32", precision="fp32", shapes={"dy": ["n"], "mask": ["n"], "out": ["n"]}
        )
    elif ref.kind == "pad_planes":
        entry.update(dtypes="u8->u8", precision="1..8 bits", shapes={"geometry": list(ref.args)})
    elif ref.kind in ("pack_conv_a", "pack_conv_b"):
        entry.update(
            dtypes="u8->u8" if ref.kind == "pack_conv_a" else "u8->s8",
            precision="1..8 bits",
            shapes={"geometry": list(ref.args)},
        )
    else:
        entry.update(
            dtypes="u8->u8" if ref.kind == "pack_a" else "u8->s8",
            precision="1..8 bits",
            shapes={"layout": ref.args[0], "dims": "symbolic"},
        )
    return entry


def _merge_manifest(out: pathlib.Path, target: str, section: dict, kernels: list, shapes, model: str) -> dict:
    """The manifest of ``out`` with ``target``'s section and kernels replaced: exporting the other
    target into the same directory (same input shapes) keeps its section."""
    manifest = {
        "format": FORMAT,
        "fraccompile": __version__,
        "model": model,
        "input_shapes": shapes,
        "targets": {},
        "kernels": [],
    }
    try:
        old = json.loads((out / MANIFEST).read_text())
        if old.get("format") == FORMAT and old.get("input_shapes") == shapes:
            manifest["targets"] = {t: v for t, v in old["targets"].items() if t != target}
            manifest["kernels"] = [k for k in old["kernels"] if k.get("target") != target]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    manifest["targets"][target] = section
    manifest["kernels"] += kernels
    fileio.atomic_write(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def export(
    fmodel,
    inputs,
    out: str | os.PathLike,
    target: str = "cpu",
    tuning=None,
    model: str = "",
    cuda_kernel: str = "mma",
) -> dict:
    """Build every kernel ``fmodel`` needs on ``inputs`` for ``target`` (``cpu`` or ``cuda``) into
    ``out`` (see the module docstring); ``tuning`` is a :class:`~..runtime.tuning_db.TuningDB` whose tiles are
    used (CPU); ``cuda_kernel``: the CUDA GEMM kind, ``"mma"`` (tensor cores) or ``"dp4a"``.
    Returns the manifest."""
    if target not in TARGETS:
        raise KernelLibraryError(f"export target {target!r}: choose {' or '.join(TARGETS)}")
    rec = record(fmodel, inputs)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("kernels-*", MANIFEST):  # what exports killed mid-write left
        fileio.remove_stale_temps(out, name)
    shapes = [list(t.shape) for t in (inputs if isinstance(inputs, tuple) else (inputs,))]
    if target == "cuda":
        section, kernels = _build_cuda(rec, out, cuda_kernel)
    else:
        section, kernels = _build_cpu(rec, out, tuning)
    return _merge_manifest(out, target, section, kernels, shapes, model)


def _build_cpu(rec: Recorder, out: pathlib.Path, tuning) -> tuple[dict, list]:
    host = detect()
    refs = kernel_refs(rec, JitKernels(tuning=tuning, host=host))
    mod = tvm.IRModule({ref.name: ref.primfunc(host.isa) for ref in refs})
    lib = tvm.compile(mod, target=host.target())
    path = out / library_name("cpu")
    with fileio.atomic_path(path, suffix=".so") as tmp:
        lib.export_library(str(tmp))
    section = {
        "library": path.name,
        "sha256": fileio.sha256_file(path),
        "host": host.key,
        "mcpu": host.mcpu,
        "isa": host.isa,
        "tvm": tvm.__version__,
        "source_hash": source_hash(),
        "problems": {
            problem_key(p): ref.name for ref in refs if ref.kind == "gemm" for p in refs[ref]["problems"]
        },
    }
    return section, [_entry(ref, refs[ref], "cpu", host.key) for ref in refs]


def _build_cuda(rec: Recorder, out: pathlib.Path, kernel: str = "mma") -> tuple[dict, list]:
    """The CUDA GEMMs of ``rec``'s problems (signs are corrected around the s8·s8 kernel, so a
    problem's base shape is all it needs; K in the chunks, and for the ``kernel`` kind ``"mma"``
    the K split, :class:`..runtime.cuda_driver.CudaGemm` uses), all in one CUDA source compiled
    by nvcc into one fatbin for every arch of :data:`..kernels.cuda.ARCHS` (plus PTX of the
    newest, which the driver compiles for newer GPUs). ``kernel``: ``"mma"`` (tensor cores, what
    ``CudaGemm`` runs on these archs) or ``"dp4a"``."""
    from ..kernels import cuda, cuda_epilogue, cuda_mma
    from ..runtime.cuda_driver import MAX_K

    if kernel not in ("mma", "dp4a"):
        raise KernelLibraryError(f"CUDA kernel {kernel!r}: choose mma or dp4a")
    gen = cuda_mma if kernel == "mma" else cuda  # the kernels' module

    reason = cuda.nvcc_unavailable_reason()
    if reason:
        raise KernelLibraryError(f"export --target cuda needs nvcc: {reason}")
    uses: dict = {}
    problems = [(rec.variants[p][0], where) for p, where in rec.problems.items()]  # no ones rows
    for (G, M, N, K), where in problems + list(rec.gpu_problems.items()):
        for k0 in range(0, K, MAX_K):
            shape = gen.padded(G, M, N, min(MAX_K, K - k0))
            uses.setdefault(shape, set()).update(w for w in where if w)
            if kernel == "mma" and K <= MAX_K and shape.split_k == 1:  # the dequantize fused too
                fused = cuda_epilogue.MmaEpilogueShape(shape, M, N)
                uses.setdefault(fused, set()).update(w for w in where if w)
    shapes = sorted(uses, key=lambda s: s.name)
    if kernel == "mma":
        source = cuda_epilogue.combined_source(shapes, cuda.ARCHS[-1])
    else:
        mod = tvm.IRModule(
            {s.name: cuda.schedule(s).mod["main"].with_attr("global_symbol", s.name) for s in shapes}
        )
        source = tvm.compile(mod, target=cuda.target(cuda.ARCHS[-1])).mod.imports[0].inspect_source()
    fatbin = cuda.compile_fatbin(source)
    path = out / CUDA_LIBRARY
    fileio.atomic_write(path, fatbin)
    kernels, table = [], {}
    for s in shapes:
        module = cuda_epilogue if getattr(s, "kind", None) == cuda_epilogue.KIND else gen
        grid, block, _, params = module.launch_config(s)[:4]
        zero = list(getattr(s, "zero", ()))  # buffers to zero before the launch (split-K C)
        name = f"{s.name}_kernel"
        if name not in source:
            raise KernelLibraryError(f"generated CUDA source lacks {name}")
        table[s.name] = {
            "function": name,
            "params": list(params),
            "grid": list(grid),
            "block": list(block),
            "zero": zero,
        }
        kernels.append(
            {
                "function": name,
                "kind": "gemm_dequant" if module is cuda_epilogue else "gemm",
                "target": "cuda",
                "archs": list(cuda.ARCHS),
                "tvm": tvm.__version__,
                "source_hash": module.source_hash(),
                "cuda_kernel": kernel,
                "dtypes": "s8s8f32" if module is cuda_epilogue else "s8s8s32",
                "precision": "1..8 bits (s8 codes; u8 shifted)",
                "shapes": {
                    "A": [s.groups, s.m, s.k],
                    "B": [s.groups, s.n, s.k],
                    **(
                        {"out": [s.groups, s.rows, s.cols]}
                        if module is cuda_epilogue
                        else {"C": [s.groups, s.m, s.n]}
                    ),
                },
                "grid": list(grid),
                "block": list(block),
                "zero": zero,
                "sites": [{"site": a, "role": b} for a, b in sorted(uses[s])],
            }
        )
    section = {
        "library": path.name,
        "sha256": fileio.sha256_file(path),
        "archs": list(cuda.ARCHS),
        "kernel": kernel,
        "tvm": tvm.__version__,
        "source_hash": gen.source_hash(),
        "kernels": table,
        "quantize": _build_cuda_quantize(out),
    }
    if kernel == "mma":  # the fused kernels' own source hash (CudaLibrary.has_kernel checks it)
        section["epilogue"] = {"source_hash": cuda_epilogue.source_hash()}
    return section, kernels


def _build_cuda_quantize(out: pathlib.Path) -> dict:
    """The quantization kernels of CUDA tensors (:mod:`..kernels.cuda_quantize`: every variant,
    symbolic shapes, so one module serves every model) as a second fatbin, and its manifest
    entry (the cuda section's ``quantize``)."""
    from ..kernels import cuda, cuda_quantize
    from ..runtime.exported import CUDA_QUANTIZE_LIBRARY

    path = out / CUDA_QUANTIZE_LIBRARY
    fileio.atomic_write(path, cuda.compile_fatbin(cuda_quantize.generate_source()))
    return {
        "library": path.name,
        "sha256": fileio.sha256_file(path),
        "archs": list(cuda.ARCHS),
        "tvm": tvm.__version__,
        "source_hash": cuda_quantize.source_hash(),
        "kernels": [k.name for k in cuda_quantize.KERNELS],
    }
