"""Exported kernels: every kernel a compiled model needs, in one library per target with a manifest.

``export`` runs one training step of the model with a :class:`~..runtime.library.Recorder` on its ``tvm``
backend (every site at 8 bits, so sites a schedule starts in full precision are included) to learn
the GEMM problems and kernels it calls, and writes::

    DIR/kernels-cpu.so        --target cpu: one shared library (tvm.runtime.load_module loads it)
                              with the GEMMs in every sign variant of each problem (a tensor's
                              codes are unsigned when a batch has no negative value, which adds a
                              ones row to the GEMM), the quantizers and the pack kernels
    DIR/kernels-cuda.fatbin   --target cuda: the dp4a GEMMs (cubins for sm_80 and sm_90, PTX of
                              sm_90); the pip TVM has no CUDA runtime, so the CUDA driver loads it
                              (:mod:`..runtime.cuda_driver`)
    DIR/manifest.json         per target: the library's sha256, TVM version, kernel-source hash
                              (and CPU/instruction set, or archs); per kernel: function name,
                              kind, shapes, dtypes, precision, target, and the sites and roles
                              that call it. Exporting the other target into DIR adds its section.

:class:`ExportedKernels` serves a backend from such a directory and builds nothing. It refuses, with
a :class:`KernelLibraryError` naming the mismatch, a manifest of another CPU, instruction set, TVM
version or kernel source, a missing or damaged library, a library whose bytes differ from the
manifest's hash, a CPU library that is not a whole ELF file (checked before ``dlopen``, which
would die of SIGBUS on a truncated one, even when the manifest's hash was edited to match), and
(at the call, naming the site and role) a GEMM the library does not hold or a target it was not
exported for — unless the user asked for the fallback, which builds what is
missing, with a warning.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pathlib
from collections.abc import Callable

import torch
import tvm

from ... import __version__, fileio
from ...errors import FracCompileError
from ..kernels import gemm
from ..runtime import threads
from ..runtime.cache import DTYPES
from ..runtime.host import HostTarget, detect
from ..runtime.library import GENERIC, JitKernels, KernelRef, Recorder, source_hash

log = logging.getLogger("fraccompile.targets")
MANIFEST = "manifest.json"
CUDA_LIBRARY = "kernels-cuda.fatbin"
FORMAT = 1
TARGETS = ("cpu", "cuda")


class KernelLibraryError(FracCompileError):
    """An exported kernel library that cannot serve this model on this machine."""


def library_name(target: str) -> str:
    return f"kernels-{target}.so"


def _problem_key(problem) -> str:
    return ",".join(map(str, problem))


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
    if ref.kind == "gemm":
        s = ref.gemm_shape
        entry.update(
            dtypes=DTYPES,
            precision="1..8 bits (u8/s8 codes)",
            shapes={
                "A": [s.groups, s.m, s.k],
                "B": [s.groups, s.n // 16, s.k // 4, 16, 4],
                "C": [s.groups, s.m, s.n],
            },
            tile=[s.tile.mb, s.tile.nb, s.tile.kb],
            problems=[list(p) for p in sorted(info["problems"])],
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


def export(fmodel, inputs, out: str | os.PathLike, target: str = "cpu", tuning=None, model: str = "") -> dict:
    """Build every kernel ``fmodel`` needs on ``inputs`` for ``target`` (``cpu`` or ``cuda``) into
    ``out`` (see the module docstring); ``tuning`` is a :class:`~..runtime.tuning_db.TuningDB` whose tiles are
    used (CPU). Returns the manifest."""
    if target not in TARGETS:
        raise KernelLibraryError(f"export target {target!r}: choose {' or '.join(TARGETS)}")
    rec = record(fmodel, inputs)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("kernels-*", MANIFEST):  # what exports killed mid-write left
        fileio.remove_stale_temps(out, name)
    shapes = [list(t.shape) for t in (inputs if isinstance(inputs, tuple) else (inputs,))]
    if target == "cuda":
        section, kernels = _build_cuda(rec, out)
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
            _problem_key(p): ref.name for ref in refs if ref.kind == "gemm" for p in refs[ref]["problems"]
        },
    }
    return section, [_entry(ref, refs[ref], "cpu", host.key) for ref in refs]


def _build_cuda(rec: Recorder, out: pathlib.Path) -> tuple[dict, list]:
    """The CUDA GEMMs of ``rec``'s problems (signs are corrected around the s8·s8 kernel, so a
    problem's base shape is all it needs; K in the chunks :class:`..runtime.cuda_driver.CudaGemm` uses),
    all in one CUDA source compiled by nvcc into one fatbin for every arch of :data:`..kernels.cuda.ARCHS`
    (plus PTX of the newest, which the driver compiles for newer GPUs)."""
    from ..kernels import cuda
    from ..runtime.cuda_driver import MAX_K

    reason = cuda.nvcc_unavailable_reason()
    if reason:
        raise KernelLibraryError(f"export --target cuda needs nvcc: {reason}")
    uses: dict = {}
    for problem, where in rec.problems.items():
        G, M, N, K = rec.variants[problem][0]  # no ones rows: the base problem
        for k0 in range(0, K, MAX_K):
            shape = cuda.padded(G, M, N, min(MAX_K, K - k0))
            uses.setdefault(shape, set()).update(w for w in where if w)
    shapes = sorted(uses, key=lambda s: s.name)
    mod = tvm.IRModule(
        {s.name: cuda.schedule(s).mod["main"].with_attr("global_symbol", s.name) for s in shapes}
    )
    source = tvm.compile(mod, target=cuda.target(cuda.ARCHS[-1])).mod.imports[0].inspect_source()
    fatbin = cuda.compile_fatbin(source)
    path = out / CUDA_LIBRARY
    fileio.atomic_write(path, fatbin)
    kernels, table = [], {}
    for s in shapes:
        grid, block, _, params = cuda.launch_config(s)
        name = f"{s.name}_kernel"
        if name not in source:
            raise KernelLibraryError(f"generated CUDA source lacks {name}")
        table[s.name] = {"function": name, "params": list(params), "grid": list(grid), "block": list(block)}
        kernels.append(
            {
                "function": name,
                "kind": "gemm",
                "target": "cuda",
                "archs": list(cuda.ARCHS),
                "tvm": tvm.__version__,
                "source_hash": cuda.source_hash(),
                "dtypes": "s8s8s32",
                "precision": "1..8 bits (s8 codes; u8 shifted)",
                "shapes": {"A": [s.groups, s.m, s.k], "B": [s.groups, s.n, s.k], "C": [s.groups, s.m, s.n]},
                "grid": list(grid),
                "block": list(block),
                "sites": [{"site": a, "role": b} for a, b in sorted(uses[s])],
            }
        )
    section = {
        "library": path.name,
        "sha256": fileio.sha256_file(path),
        "archs": list(cuda.ARCHS),
        "tvm": tvm.__version__,
        "source_hash": cuda.source_hash(),
        "kernels": table,
    }
    return section, kernels


# -- loading ----------------------------------------------------------------------------------------
def _refusal(directory) -> Callable[[str], KernelLibraryError]:
    return lambda what: KernelLibraryError(f"exported kernels in {directory}: {what}")


def _read_manifest(directory: pathlib.Path) -> dict:
    refuse = _refusal(directory)
    path = directory / MANIFEST
    if not path.exists():
        raise refuse(f"no {MANIFEST} (write one with `fraccompile export`)")
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest["targets"], dict) or not manifest["targets"]:
            raise ValueError("no targets")
    except (ValueError, KeyError, TypeError) as e:
        raise refuse(f"{MANIFEST} is damaged ({type(e).__name__}: {e})") from None
    if manifest.get("format") != FORMAT:
        raise refuse(f"manifest format {manifest.get('format')!r}, this fraccompile reads {FORMAT}")
    return manifest


def _check_library(directory: pathlib.Path, info: dict, expected: dict, elf: bool = False) -> pathlib.Path:
    """The library ``info`` names, checked: the manifest's fields against ``expected``, its
    sha256, and (``elf``: a shared library to ``dlopen``) its ELF structure."""
    refuse = _refusal(directory)
    for field, mine in expected.items():
        if info.get(field) != mine:
            raise refuse(
                f"built for {field} {info.get(field)!r}, this machine/install has {mine!r}; export again here"
            )
    lib = directory / str(info.get("library", ""))
    if not lib.is_file():
        raise refuse(f"the library {lib.name} is missing")
    if fileio.sha256_file(lib) != info.get("sha256"):
        raise refuse(
            f"{lib.name} does not match the sha256 in {MANIFEST} (modified or truncated "
            "after export); export again"
        )
    problem = fileio.elf_problem(lib) if elf else None
    if problem:
        raise refuse(f"{lib.name} is not a whole shared library ({problem}); export again")
    return lib


class CudaLibrary:
    """The CUDA kernels of an exported directory, for :class:`..runtime.cuda_driver.CudaGemm`. ``info``
    None: the directory has no CUDA target (refused at the first GPU GEMM unless ``fallback``)."""

    def __init__(self, directory: pathlib.Path, info: dict | None, fallback: bool = False):
        self.directory, self.info, self.fallback = directory, info, fallback
        self.image = None
        if info is not None:
            from ..kernels import cuda

            lib = _check_library(directory, info, {"tvm": tvm.__version__, "source_hash": cuda.source_hash()})
            self.image = lib.read_bytes()

    def kernel(self, shape, arch: str):
        """``(image, name, params, grid, block)`` of ``shape``'s kernel, or None: build it."""
        refuse = _refusal(self.directory)
        if self.info is None:
            if self.fallback:
                return None
            raise refuse("no cuda target (export with --target cuda), and kernels_fallback is not set")
        entry = self.info["kernels"].get(shape.name)
        if entry is None or arch not in self.info["archs"]:
            what = (
                f"no CUDA kernel for {shape.name}"
                if entry is None
                else f"no code for {arch} (has {', '.join(self.info['archs'])})"
            )
            if self.fallback:
                log.warning("exported kernels: %s; building it", what)
                return None
            raise refuse(f"{what}; export again for these shapes, or set kernels_fallback=True")
        return (
            self.image,
            entry["function"],
            tuple(entry["params"]),
            tuple(entry["grid"]),
            tuple(entry["block"]),
        )


class ExportedKernels:
    """A kernel provider over an exported directory (see the module docstring). The CPU library
    serves CPU tensors; :attr:`cuda_library` the CUDA GEMM of GPU tensors."""

    def __init__(
        self,
        directory: str | os.PathLike,
        fallback: bool = False,
        tuning=None,
        host: HostTarget | None = None,
    ):
        self.directory = pathlib.Path(directory)
        self.host = host or detect()
        self.fallback = fallback
        self._jit = JitKernels(tuning=tuning, host=self.host)
        self._fns: dict[str, object] = {}
        self.manifest, self.module, self.problems = None, None, {}
        self.cuda_library = CudaLibrary(self.directory, None, fallback)
        try:
            self.manifest = _read_manifest(self.directory)
            targets = self.manifest["targets"]
            if "cpu" in targets:
                self.module = self._open_cpu(targets["cpu"])
                self.problems = targets["cpu"].get("problems", {})
            if "cuda" in targets:
                self.cuda_library = CudaLibrary(self.directory, targets["cuda"], fallback)
        except KernelLibraryError as e:
            if not fallback:
                raise
            log.warning("%s; kernels_fallback is set: building kernels instead", e)
            self.manifest, self.module, self.problems = None, None, {}
            self.cuda_library = CudaLibrary(self.directory, None, fallback)

    @property
    def cache(self):
        return self._jit.cache

    def _refuse(self, what: str) -> KernelLibraryError:
        return _refusal(self.directory)(what)

    def _open_cpu(self, info: dict):
        lib = _check_library(
            self.directory,
            info,
            {
                "tvm": tvm.__version__,
                "mcpu": self.host.mcpu,
                "isa": self.host.isa,
                "source_hash": source_hash(),
            },
            elf=True,
        )
        try:
            module = tvm.runtime.load_module(str(lib))
        except Exception as e:
            raise self._refuse(f"cannot load {lib.name}: {str(e).splitlines()[0]}") from None
        threads.adopt(lib)  # its parallel loops on torch's OpenMP threads
        return module

    def _missing(self, what: str, where) -> KernelLibraryError:
        site = f" (site {where[0]!r}, role {where[1]})" if where else ""
        if self.module is None:
            return self._refuse(f"no cpu target (export with --target cpu) for {what}{site}")
        shapes = (self.manifest or {}).get("input_shapes")
        return self._refuse(
            f"no kernel for {what}{site}; the library was exported for input "
            f"shape(s) {shapes}: export again for these shapes, or set "
            "kernels_fallback=True to build what is missing"
        )

    def gemm_shape(self, G: int, M: int, N: int, K: int, where=None) -> gemm.GemmShape:
        name = self.problems.get(_problem_key((G, M, N, K)))
        if name is None:
            if self.manifest is not None and not self.fallback:
                raise self._missing(f"the GEMM problem G={G} M={M} N={N} K={K}", where)
            if self.manifest is not None:
                log.warning("exported kernels: building the missing GEMM %s", (G, M, N, K))
            return self._jit.gemm_shape(G, M, N, K)
        return KernelRef("gemm", _gemm_args(name)).gemm_shape

    def get(self, ref: KernelRef, where=None):
        fn = self._fns.get(ref.name)
        if fn is not None:
            return fn
        if self.module is not None and _has(self.module, ref.name):
            fn = self.module.get_function(ref.name, query_imports=True)
        else:
            if self.manifest is not None and not self.fallback:
                raise self._missing(f"{_KIND_NAMES.get(ref.kind, 'kernel')} {ref.name}", where)
            fn = self._jit.get(ref)
        self._fns[ref.name] = fn
        return fn


_KIND_NAMES = {
    "conv": "the implicit-GEMM conv forward",
    "conv_dq": "the implicit-GEMM conv forward with its dequantize epilogue",
    "conv_dqz": "the implicit-GEMM conv forward with its dequantize epilogue and a weight zero point's term",
    "gc": "the implicit-GEMM conv weight gradient",
}


def _has(module, name: str) -> bool:
    try:
        return module.implements_function(name, query_imports=True)
    except Exception:
        try:
            module.get_function(name, query_imports=True)
            return True
        except Exception:
            return False


def _gemm_args(name: str) -> tuple:
    """The KernelRef args of a GEMM function name (``gemm_g1_m8_n16_k32_t6x4x32``)."""
    parts = dict((p[0], p[1:]) for p in name.split("_")[1:5])
    t = name.rsplit("_t", 1)[1].split("x")
    return (int(parts["g"]), int(parts["m"]), int(parts["n"]), int(parts["k"]), *map(int, t))
