"""Exported kernels: every kernel a compiled model needs, in one shared library with a manifest.

``export`` runs one training step of the model with a :class:`~.kernels.Recorder` on its ``tvm``
backend (every site at 8 bits, so sites a schedule starts in full precision are included) to learn
the GEMM problems and kernels it calls, adds the sign variants of each GEMM problem (a tensor's
codes are unsigned when a batch has no negative value, which adds a ones row to the GEMM), builds
them all into one module and writes::

    DIR/kernels-cpu.so    one shared library (tvm.runtime.load_module loads it)
    DIR/manifest.json     the target, TVM version, source hash, library sha256, and per kernel its
                          function name, kind, shapes, dtypes, precision, and the sites and roles
                          that call it

:class:`ExportedKernels` serves a backend from such a directory and builds nothing. It refuses, with
a :class:`KernelLibraryError` naming the mismatch, a manifest of another target, CPU, TVM version
or kernel source, a missing or damaged library, a library whose bytes differ from the manifest's
hash, and (at the call) a GEMM problem the library does not hold — unless the user asked for the
fallback, which builds what is missing, with a warning.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import pathlib
import tempfile

import torch
import tvm

from .. import __version__
from ..errors import FracCompileError
from . import gemm
from .cache import DTYPES
from .host import HostTarget, detect
from .kernels import GENERIC, JitKernels, KernelRef, Recorder, source_hash

log = logging.getLogger("fraccompile.targets")
MANIFEST = "manifest.json"
FORMAT = 1
TARGETS = ("cpu", "cuda")


class KernelLibraryError(FracCompileError):
    """An exported kernel library that cannot serve this model on this machine."""


def library_name(target: str) -> str:
    return f"kernels-{target}.so"


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _problem_key(problem) -> str:
    return ",".join(map(str, problem))


# -- enumerating a model's kernels --------------------------------------------------------------------
def tvm_backends(fmodel) -> list:
    """The TVM backends the sites of ``fmodel`` run on."""
    from ..ops.modules import FracOp
    from .backend import TVMBackend

    found = {id(m.backend): m.backend for m in fmodel.modules()
             if isinstance(m, FracOp) and isinstance(m.backend, TVMBackend)}
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
            + ": compile it with FracConfig(backend='tvm', scheme='symmetric')")
    model = copy.deepcopy(fmodel)
    model.precision.set(a=8, w=8, g=8)
    model.train()
    rec = Recorder()
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    for b in backends:
        b.recorder = rec
    try:
        out = model(*inputs)
        loss = sum(o.float().sum() for o in (out if isinstance(out, (tuple, list)) else [out])
                   if isinstance(o, torch.Tensor) and o.is_floating_point())
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

    for problem, use in rec.problems.items():
        for variant in rec.variants[problem]:
            add(KernelRef.gemm(provider.gemm_shape(*variant)), use.where, variant)
    for (geo, k0, kc, variants), where in rec.conv_packs.items():
        for variant in variants:
            shape = provider.gemm_shape(*variant)
            add(KernelRef("pack_conv_b", (*geo, k0, kc, shape.n // 16, shape.k // 4)), where)
    for ref in GENERIC:
        add(ref, ())
    return refs


def _entry(ref: KernelRef, info: dict, target: str, host_key: str) -> dict:
    entry = {"function": ref.name, "kind": ref.kind, "target": target, "host": host_key,
             "tvm": tvm.__version__, "source_hash": source_hash(),
             "sites": [{"site": s, "role": r} for s, r in sorted(w for w in info["where"] if w)]}
    if ref.kind == "gemm":
        s = ref.gemm_shape
        entry.update(dtypes=DTYPES, precision="1..8 bits (u8/s8 codes)",
                     shapes={"A": [s.groups, s.m, s.k], "B": [s.groups, s.n // 16, s.k // 4, 16, 4],
                             "C": [s.groups, s.m, s.n]},
                     tile=[s.tile.mb, s.tile.nb, s.tile.kb],
                     problems=[list(p) for p in sorted(info["problems"])])
    elif ref.kind == "quantize":
        entry.update(dtypes=f"f32->{ref.args[0]}", precision="1..8 bits",
                     shapes={"x": ["n"], "q": ["n"]},
                     rounding="stochastic" if ref.args[1] else "nearest-even")
    elif ref.kind == "pack_conv_b":
        entry.update(dtypes="u8->s8", precision="1..8 bits", shapes={"geometry": list(ref.args)})
    else:
        entry.update(dtypes="u8->u8" if ref.kind == "pack_a" else "u8->s8",
                     precision="1..8 bits", shapes={"layout": ref.args[0], "dims": "symbolic"})
    return entry


def export(fmodel, inputs, out: str | os.PathLike, target: str = "cpu", tuning=None,
           model: str = "") -> dict:
    """Build every kernel ``fmodel`` needs on ``inputs`` into ``out`` (see the module docstring);
    ``tuning`` is a :class:`~.tuning.TuningDB` whose tiles are used. Returns the manifest."""
    if target != "cpu":
        raise KernelLibraryError(f"export --target {target!r}: the integer CUDA kernels are "
                                 "exported with fraccompile.targets.cuda (see the README); the "
                                 "training backend exports 'cpu'")
    host = detect()
    rec = record(fmodel, inputs)
    provider = JitKernels(tuning=tuning, host=host)
    refs = kernel_refs(rec, provider)
    mod = tvm.IRModule({ref.name: ref.primfunc(host.isa) for ref in refs})
    lib = tvm.compile(mod, target=host.target())
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / library_name(target)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out)
    os.close(fd)
    try:
        lib.export_library(tmp)
        os.replace(tmp, path)
    finally:
        pathlib.Path(tmp).unlink(missing_ok=True)
    shapes = [list(t.shape) for t in (inputs if isinstance(inputs, tuple) else (inputs,))]
    manifest = {
        "format": FORMAT, "fraccompile": __version__, "model": model, "input_shapes": shapes,
        "targets": {target: {"library": path.name, "sha256": _sha256(path), "host": host.key,
                             "mcpu": host.mcpu, "isa": host.isa, "tvm": tvm.__version__,
                             "source_hash": source_hash()}},
        "problems": {_problem_key(p): refs_name
                     for ref in refs if ref.kind == "gemm"
                     for refs_name in [ref.name] for p in refs[ref]["problems"]},
        "kernels": [_entry(ref, refs[ref], target, host.key) for ref in refs],
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


# -- loading ----------------------------------------------------------------------------------------
class ExportedKernels:
    """A kernel provider over an exported directory (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, fallback: bool = False, tuning=None,
                 host: HostTarget | None = None, target: str = "cpu"):
        self.directory = pathlib.Path(directory)
        self.host = host or detect()
        self.fallback = fallback
        self._jit = JitKernels(tuning=tuning, host=self.host)
        self._fns: dict[str, object] = {}
        try:
            self.manifest, self.module = self._open(target)
        except KernelLibraryError as e:
            if not fallback:
                raise
            log.warning("%s; kernels_fallback is set: building kernels instead", e)
            self.manifest, self.module = None, None
        self.problems = (self.manifest or {}).get("problems", {})

    @property
    def cache(self):
        return self._jit.cache

    def _refuse(self, what: str) -> KernelLibraryError:
        return KernelLibraryError(f"exported kernels in {self.directory}: {what}")

    def _open(self, target: str):
        path = self.directory / MANIFEST
        if not path.exists():
            raise self._refuse(f"no {MANIFEST} (write one with `fraccompile export`)")
        try:
            manifest = json.loads(path.read_text())
            info = manifest["targets"]
        except (ValueError, KeyError, TypeError) as e:
            raise self._refuse(f"{MANIFEST} is damaged ({type(e).__name__}: {e})") from None
        if manifest.get("format") != FORMAT:
            raise self._refuse(f"manifest format {manifest.get('format')!r}, this fraccompile "
                               f"reads {FORMAT}")
        if target not in info:
            raise self._refuse(f"the manifest has target(s) {', '.join(sorted(info))}, not "
                               f"{target!r}")
        info = info[target]
        expected = {"tvm": tvm.__version__, "mcpu": self.host.mcpu, "isa": self.host.isa,
                    "source_hash": source_hash()}
        for field, mine in expected.items():
            if info.get(field) != mine:
                raise self._refuse(f"built for {field} {info.get(field)!r}, this machine/install "
                                   f"has {mine!r}; export again here")
        lib = self.directory / str(info.get("library", ""))
        if not lib.is_file():
            raise self._refuse(f"the library {lib.name} is missing")
        if _sha256(lib) != info.get("sha256"):
            raise self._refuse(f"{lib.name} does not match the sha256 in {MANIFEST} (modified or "
                               "truncated after export); export again")
        try:
            module = tvm.runtime.load_module(str(lib))
        except Exception as e:
            raise self._refuse(f"cannot load {lib.name}: {str(e).splitlines()[0]}") from None
        return manifest, module

    def _missing(self, what: str, where) -> KernelLibraryError:
        site = f" (site {where[0]!r}, role {where[1]})" if where else ""
        shapes = (self.manifest or {}).get("input_shapes")
        return self._refuse(f"no kernel for {what}{site}; the library was exported for input "
                            f"shape(s) {shapes}: export again for these shapes, or set "
                            "kernels_fallback=True to build what is missing")

    def gemm_shape(self, G: int, M: int, N: int, K: int, where=None) -> gemm.GemmShape:
        if self.module is None:
            return self._jit.gemm_shape(G, M, N, K)
        name = self.problems.get(_problem_key((G, M, N, K)))
        if name is None:
            if not self.fallback:
                raise self._missing(f"the GEMM problem G={G} M={M} N={N} K={K}", where)
            log.warning("exported kernels: building the missing GEMM %s", (G, M, N, K))
            return self._jit.gemm_shape(G, M, N, K)
        return KernelRef("gemm", _gemm_args(name)).gemm_shape

    def get(self, ref: KernelRef, where=None):
        fn = self._fns.get(ref.name)
        if fn is not None:
            return fn
        if self.module is not None:
            fn = self.module.get_function(ref.name, query_imports=True) \
                if _has(self.module, ref.name) else None
        if fn is None:
            if self.module is not None and not self.fallback:
                raise self._missing(f"kernel {ref.name}", where)
            fn = self._jit.get(ref)
        self._fns[ref.name] = fn
        return fn


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
