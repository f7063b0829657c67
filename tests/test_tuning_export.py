"""Tuning (the tile search and its database), exported kernel libraries (export, load in a fresh
process, every refusal), the tune/export commands, and measurement through a loopback RPC
tracker."""

from __future__ import annotations

import collections
import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from _cli_helpers import static_train_args
from typer.testing import CliRunner

import fraccompile
from fraccompile import FracConfig
from fraccompile.targets import tvm_unavailable_reason

pytestmark = pytest.mark.skipif(tvm_unavailable_reason() is not None, reason=str(tvm_unavailable_reason()))

MODEL_SRC = textwrap.dedent("""
    import torch
    from torch import nn

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.conv = nn.Conv2d(16, 16, 3, padding=1)
            # channels-last inputs: implicit-GEMM forward and weight gradient; 18 channels (not
            # a multiple of 4) and a stride: A and B packed from the codes
            self.conv2 = nn.Conv2d(16, 18, 3, padding=1)
            self.conv3 = nn.Conv2d(18, 16, 3, padding=1, stride=2)
            self.proj = nn.Linear(16, 32)
            self.head = nn.Linear(32, 10)

        def forward(self, x):
            x = torch.relu(self.conv(torch.relu(self.stem(x))))
            x = torch.relu(self.conv3(torch.relu(self.conv2(x))))
            h = self.proj(x.mean((2, 3)))
            h = h + (h.unsqueeze(1) @ h.unsqueeze(2)).squeeze(2) * 1e-3
            return self.head(torch.relu(h))

    def model():
        torch.manual_seed(0)
        return Small()
""")
SHAPE = (4, 3, 8, 8)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "small.py"
    path.write_text(MODEL_SRC)
    return path


def _small(model_file, **cfg):
    from fraccompile.loading import load_model

    torch.manual_seed(0)
    model = load_model(str(model_file))
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(1))
    config = FracConfig(**{"backend": "tvm", "scheme": "symmetric", **cfg})
    return fraccompile.compile(model, x, config), model, x


@pytest.fixture(scope="module")
def exported(model_file, tmp_path_factory):
    from fraccompile.targets.tools.export import export

    out = tmp_path_factory.mktemp("kernels")
    fm, _, x = _small(model_file)
    manifest = export(fm, x, out, model="small")
    return out, manifest


# -- the search space and the database ---------------------------------------------------------------
def test_space_fits_the_register_file_and_starts_with_the_default():
    from fraccompile.targets.kernels import gemm
    from fraccompile.targets.tools import tuning

    problem = (1, 100, 70, 301)
    tiles = tuning.space(problem)
    assert len(tiles) > 50
    assert all(t.mb * t.nb + t.nb + 1 <= tuning.MAX_ZMM and t.kb % 4 == 0 for t in tiles)
    cands = tuning.candidates(problem, 8, seed=3)
    assert cands[0] == gemm.default_tile(100, 70, 301) and len(set(cands)) == 8
    assert cands == tuning.candidates(problem, 8, seed=3)  # seeded
    # the default fits M and K exactly (A goes to the kernel uncopied): so must every candidate
    exact = (1, 131072, 16, 144)
    cands = tuning.candidates(exact, 200)
    assert len(cands) > 5
    assert all(131072 % t.mb == 0 and 144 % t.kb == 0 for t in cands)


class FakeRunner:
    """Times from a formula (no building): tile 2x2x16 is fastest, the default 1.0 s."""

    def __init__(self, fast=(2, 2, 16), ratio=0.5):
        from fraccompile.targets.runtime.host import detect

        self.host, self.fast, self.ratio, self.calls = detect(), fast, ratio, 0

    def time(self, shape, confirm=False):
        self.calls += 1
        t = shape.tile
        return self.ratio if (t.mb, t.nb, t.kb) == self.fast else 1.0 + 0.01 * t.mb


def _space_with(problem, tile):
    from fraccompile.targets.kernels import gemm
    from fraccompile.targets.tools import tuning

    return gemm.Tile(*tile) in tuning.candidates(problem, 10_000)


def test_tune_keeps_the_faster_tile_and_the_database_is_reused(tmp_path):
    from fraccompile.targets.runtime.tuning_db import TuningDB
    from fraccompile.targets.tools import tuning

    problems = [(1, 40, 48, 64), (1, 24, 32, 96)]
    assert all(_space_with(p, (2, 2, 16)) for p in problems)
    db = TuningDB(tmp_path)
    runner = FakeRunner()
    size = len(tuning.space(problems[0]))
    results = tuning.tune(problems, db, runner, trials=size)
    assert [r.reused for r in results] == [False, False]
    for r in results:
        assert r.record.tile == (2, 2, 16) and r.record.speedup > 1.5
        assert r.record.trials == len(tuning.candidates(r.record.problem, size))
    # a new process reads it back; a second call measures nothing it already has
    db2 = TuningDB(tmp_path)
    assert db2.tile(runner.host, problems[0]).kb == 16
    runner2 = FakeRunner()
    again = tuning.tune(problems + [(1, 8, 16, 32)], db2, runner2, trials=4)
    assert [r.reused for r in again] == [True, True, False]
    assert runner2.calls <= 4 + 2 * tuning.CONFIRM  # only the new problem


def test_tune_never_records_a_tile_slower_than_the_default(tmp_path):
    from fraccompile.targets.tools import tuning

    problem = (1, 40, 48, 64)
    trials = len(tuning.candidates(problem, 10_000))

    class Noisy(FakeRunner):
        """The candidate wins the search, then loses the confirmation (a lucky measurement)."""

        def time(self, shape, confirm=False):
            self.calls += 1
            t = shape.tile
            if (t.mb, t.nb, t.kb) == self.fast:
                return 0.5 if self.calls <= trials else 0.99  # < 3% faster: not enough
            return 1.0

    runner = Noisy()
    rec = tuning.tune_problem(problem, runner, trials=trials, seed=0)
    assert runner.calls == trials + 2 * tuning.CONFIRM  # the winner was re-measured
    assert rec.tile == rec.default_tile and rec.gops == rec.default_gops


def test_real_measurement_and_tuned_tiles_reach_the_backend(tmp_path, model_file):
    """A measured search on a real kernel; a backend given the database pads with the tuned tile
    and stays exact."""
    from fraccompile.ops.backend import get_backend
    from fraccompile.targets.runtime.tuning_db import TuningDB
    from fraccompile.targets.tools import tuning

    db = TuningDB(tmp_path)
    problem = (1, 33, 40, 72)
    res = tuning.tune([problem], db, tuning.LocalRunner(repeat=2, min_repeat_ms=5), trials=3)[0]
    rec = res.record
    assert rec.gops >= rec.default_gops > 0 and rec.trials == 3
    db.records.clear()
    rec.tile = (3, 1, 8)  # force a non-default tile to see it used
    db.put(rec)
    backend = get_backend("tvm", tuning_db=str(tmp_path))
    shape = backend.kernels.gemm_shape(*problem)
    assert (shape.tile.mb, shape.tile.nb, shape.tile.kb) == (3, 1, 8)
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (1, 32, 72), generator=gen).to(torch.int8)  # M+1 = 33 (ones row)
    b = torch.randint(-127, 128, (1, 40, 72), generator=gen).to(torch.int8)
    assert torch.equal(backend.gemm(a, b).long(), a.long() @ b.long().mT)


def test_damaged_database_is_refused(tmp_path):
    from fraccompile.targets.runtime import tuning_db

    (tmp_path / tuning_db.DB_FILE).write_text("{not json")
    with pytest.raises(tuning_db.TuningDBError, match="damaged"):
        tuning_db.TuningDB(tmp_path)
    (tmp_path / tuning_db.DB_FILE).write_text(json.dumps({"format": 99, "records": []}))
    with pytest.raises(tuning_db.TuningDBError, match="format 99"):
        tuning_db.TuningDB(tmp_path)


def test_bad_rpc_address_is_refused():
    from fraccompile.targets.tools.tuning import parse_rpc

    assert parse_rpc("127.0.0.1:9190:cpu") == ("127.0.0.1", 9190, "cpu")
    for bad in ("127.0.0.1:9190", "host:port:key", ":9190:k"):
        with pytest.raises(ValueError, match="HOST:PORT:KEY"):
            parse_rpc(bad)


# -- export -----------------------------------------------------------------------------------------
def test_manifest_describes_every_kernel(exported):
    out, manifest = exported
    from fraccompile.targets.runtime.library import source_hash

    info = manifest["targets"]["cpu"]
    assert (out / info["library"]).is_file() and info["source_hash"] == source_hash()
    import tvm

    assert info["tvm"] == tvm.__version__
    kinds = {k["kind"] for k in manifest["kernels"]}
    assert kinds >= {"gemm", "conv", "gc", "quantize", "pack_a", "pack_b", "pack_conv_a", "pack_conv_b"}
    from fraccompile.targets.runtime.host import detect

    # the linears' forward dequantizes in the GEMM's write-back (on VNNI hosts)
    assert ("gemm_dq" in kinds) == (detect().isa == "avx512-vnni")
    fused = collections.Counter(
        (s["site"], s["role"]) for k in manifest["kernels"] if k["kind"] == "gemm_dq" for s in k["sites"]
    )
    if fused:  # either sign of A (another batch may be unsigned): 4 rows (tile 4x2) and 4 + 1 (6x2)
        assert fused[("proj", "fw")] == 2
    for kind, role in (("conv", "fw"), ("gc", "gc")):
        convs = [k for k in manifest["kernels"] if k["kind"] == kind]
        assert {s["role"] for k in convs for s in k["sites"]} == {role}
    gemms = [k for k in manifest["kernels"] if k["kind"] == "gemm"]
    roles = {s["role"] for k in gemms for s in k["sites"]}
    assert roles == {"fw", "eb", "gc"}  # eb: the matmul's integer backprop
    for k in gemms:
        assert k["dtypes"] == "u8s8s32" and k["function"].startswith("gemm_")
        assert set(k["shapes"]) == {"A", "B", "C"} and k["problems"]
    # the library loads with TVM alone and holds every function the manifest names
    lib = tvm.runtime.load_module(str(out / info["library"]))
    for k in manifest["kernels"]:
        assert lib.implements_function(k["function"], query_imports=True), k["function"]


def _step(fm, x, seed=5):
    fm.train()
    torch.manual_seed(seed)
    loss = fm(x).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in fm.named_parameters() if p.grad is not None}


CHILD = textwrap.dedent("""
    import json, sys, torch
    import fraccompile
    from fraccompile import FracConfig
    from fraccompile.loading import load_model
    from fraccompile.targets.tools.export import tvm_backends
    model_file, kernels, state, out = sys.argv[1:5]
    model = load_model(model_file)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    fm = fraccompile.compile(model, x, FracConfig(backend="tvm", scheme="symmetric",
                                                  kernels=kernels))
    fm.load_state_dict(torch.load(state))
    fm.train()
    torch.manual_seed(5)
    loss = fm(x).square().mean()
    loss.backward()
    cache = tvm_backends(fm)[0].cache.stats
    built = cache.built + cache.loaded  # every JIT kernel goes through the cache
    torch.save({"loss": loss.detach(), "grads": {n: p.grad for n, p in fm.named_parameters()
                                                 if p.grad is not None}, "built": built}, out)
""")


def test_exported_library_trains_in_a_fresh_process_like_the_jit_backend(exported, model_file, tmp_path):
    out, _ = exported
    fm, _, x = _small(model_file)
    state = tmp_path / "state.pt"
    torch.save(fm.state_dict(), state)
    loss, grads = _step(fm, x)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    res = tmp_path / "res.pt"
    subprocess.run(
        [sys.executable, str(script), str(model_file), str(out), str(state), str(res)],
        check=True,
        timeout=300,
    )
    child = torch.load(res)
    assert child["built"] == 0  # every kernel came from the library
    assert torch.equal(child["loss"], loss)
    assert child["grads"].keys() == grads.keys()
    for name, g in grads.items():
        assert torch.equal(child["grads"][name], g), name


def _copy_export(exported, tmp_path):
    import shutil

    out, _ = exported
    dst = tmp_path / "k"
    shutil.copytree(out, dst)
    return dst


def _edit_manifest(path, **fields):
    m = json.loads((path / "manifest.json").read_text())
    m["targets"]["cpu"].update(fields)
    (path / "manifest.json").write_text(json.dumps(m))


def _other_cpu() -> str:
    """An LLVM CPU name that is not this machine's (the project's machines are Intel Xeons and AMD
    Zen 4 / Zen 5)."""
    from fraccompile.targets.runtime.host import detect

    return next(c for c in ("znver4", "sapphirerapids") if c != detect().mcpu)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("mcpu", "another-cpu", "mcpu '{value}'"),
        ("isa", "avx2", "isa 'avx2'"),
        ("tvm", "0.19.0", "tvm '0.19.0'"),
        ("source_hash", "0" * 16, "source_hash"),
    ],
)
def test_manifest_of_another_target_or_version_is_refused(exported, tmp_path, field, value, match):
    from fraccompile.targets.runtime.exported import ExportedKernels, KernelLibraryError
    from fraccompile.targets.runtime.host import detect

    if field == "mcpu":
        value = _other_cpu()
    if field == "isa" and detect().isa == value:
        value = "avx512bw"
        match = "isa 'avx512bw'"
    d = _copy_export(exported, tmp_path)
    _edit_manifest(d, **{field: value})
    with pytest.raises(KernelLibraryError, match=match.format(value=value)):
        ExportedKernels(d)


def test_tampered_missing_or_damaged_files_are_refused(exported, tmp_path):
    from fraccompile.targets.runtime.exported import ExportedKernels, KernelLibraryError

    d = _copy_export(exported, tmp_path)
    lib = d / "kernels-cpu.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    with pytest.raises(KernelLibraryError, match="does not match the sha256"):
        ExportedKernels(d)
    lib.unlink()
    with pytest.raises(KernelLibraryError, match="kernels-cpu.so is missing"):
        ExportedKernels(d)
    (d / "manifest.json").write_text('{"format": 1, "targ')
    with pytest.raises(KernelLibraryError, match="damaged"):
        ExportedKernels(d)
    (d / "manifest.json").unlink()
    with pytest.raises(KernelLibraryError, match="no manifest.json"):
        ExportedKernels(d)
    from fraccompile.targets.kernels import cuda

    lib = ExportedKernels(exported[0]).cuda_library  # a cpu-only export has no GPU kernels
    with pytest.raises(KernelLibraryError, match="no cuda target"):
        lib.kernel(cuda.padded(1, 64, 64, 64), "sm_90")


def test_truncated_library_is_refused_even_when_the_manifest_hash_matches(exported, tmp_path):
    """dlopen of a truncated library dies of SIGBUS, past any except: its ELF structure is checked
    before, whatever the manifest says."""
    from fraccompile import fileio
    from fraccompile.targets.runtime.exported import ExportedKernels, KernelLibraryError

    d = _copy_export(exported, tmp_path)
    lib = d / "kernels-cpu.so"
    lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])
    _edit_manifest(d, sha256=fileio.sha256_file(lib))
    with pytest.raises(
        KernelLibraryError,
        match=r"kernels-cpu.so is not a whole shared library "
        r"\(truncated",
    ):
        ExportedKernels(d)


def _library_step_equals_jit(fm, exp, x):
    """A step of ``exp`` (compiled on an exported library) takes every kernel from the library
    and equals ``fm``'s on the JIT backend (same weights), loss and gradients bit for bit."""
    from fraccompile.targets.tools.export import tvm_backends

    exp.load_state_dict(fm.state_dict())
    loss, grads = _step(fm, x)
    loss_e, grads_e = _step(exp, x)
    cache = tvm_backends(exp)[0].cache.stats
    assert cache.built + cache.loaded == 0  # every kernel came from the library
    assert torch.equal(loss_e, loss)
    for name, g in grads.items():
        assert torch.equal(grads_e[name], g), name


def test_sbm_export_holds_its_row_sum_kernels_and_trains_like_the_jit_backend(model_file, tmp_path):
    """``sbm``'s zero-point terms take the row sums of channels-last codes from a kernel of each
    row length: the export records them per site, and a step on the library alone equals the JIT
    backend's."""
    from fraccompile.targets.tools.export import export

    fm, _, x = _small(model_file, scheme="sbm")
    manifest = export(fm, x, tmp_path / "k", model="small")
    rows = [k for k in manifest["kernels"] if k["kind"] == "row_sums"]
    assert {k["function"] for k in rows} >= {"row_sums_uint8_16"}  # conv's 16 input channels
    assert all(k["sites"] for k in rows)
    exp, _, _ = _small(model_file, scheme="sbm", kernels=str(tmp_path / "k"))
    _library_step_equals_jit(fm, exp, x)


class _Attention(torch.nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(d, d) for _ in range(3))

    def forward(self, x):
        att = (self.q(x) @ self.k(x).mT).softmax(-1)
        return att @ self.v(x)


def test_sbm_attention_export_holds_its_matmul_kernels_and_trains_like_the_jit_backend(tmp_path):
    """An ``sbm`` attention's matmuls (their GEMMs carry ones rows for the zero points' code sums,
    and an ``affine`` dequantize pass): the export holds every kernel they call, and a step on
    the library alone equals the JIT backend's."""
    from fraccompile.targets.tools.export import export

    torch.manual_seed(0)
    model, x = _Attention(), torch.randn(2, 9, 16)
    cfg = dict(backend="tvm", scheme="sbm", full_precision=())
    fm = fraccompile.compile(copy.deepcopy(model), x, FracConfig(**cfg))
    export(fm, x, tmp_path / "k", model="attention")
    exp = fraccompile.compile(copy.deepcopy(model), x, FracConfig(**cfg, kernels=str(tmp_path / "k")))
    _library_step_equals_jit(fm, exp, x)


def test_refusal_surfaces_at_compile_and_fallback_only_when_asked(exported, model_file, tmp_path, caplog):
    d = _copy_export(exported, tmp_path)
    other = _other_cpu()
    _edit_manifest(d, mcpu=other)
    with pytest.raises(fraccompile.errors.FracCompileError, match=f"mcpu '{other}'"):
        _small(model_file, kernels=str(d))
    fm, _, x = _small(model_file, kernels=str(d), kernels_fallback=True)
    assert "building kernels instead" in caplog.text
    fm(x).sum().backward()


def test_other_input_shapes_are_refused_naming_the_site(exported, model_file):
    from fraccompile.targets.runtime.exported import KernelLibraryError

    out, _ = exported
    fm, model, _ = _small(model_file, kernels=str(out))
    x = torch.randn(9, 3, 8, 8)  # exported for batch 4
    with pytest.raises(
        KernelLibraryError, match=r"no kernel for the implicit-GEMM conv forward.* conv(_dq)?_9_.*site 'conv'"
    ):
        fm(x)
    ok, _, _ = _small(model_file, kernels=str(out), kernels_fallback=True)
    y = ok(x)
    ref, _, _ = _small(model_file)
    assert torch.equal(y, ref(x))


def test_kernel_options_need_the_tvm_backend():
    with pytest.raises(fraccompile.errors.ConfigError, match="needs backend='tvm'"):
        FracConfig(backend="reference", kernels="somewhere")
    with pytest.raises(fraccompile.errors.ConfigError, match="kernels_fallback"):
        FracConfig(backend="tvm", kernels_fallback="yes")
    cfg = FracConfig(backend="tvm", kernels="k", tuning_db="db", kernels_fallback=True)
    assert FracConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.backend_options == {"kernels": "k", "tuning_db": "db", "kernels_fallback": True}


def test_pickled_model_keeps_its_kernel_library(exported, model_file):
    import pickle

    out, _ = exported
    fm, _, x = _small(model_file, kernels=str(out))
    copy_ = pickle.loads(pickle.dumps(fm))
    from fraccompile.targets.tools.export import tvm_backends

    (backend,) = tvm_backends(copy_)
    assert backend is tvm_backends(fm)[0] and dict(backend.options)["kernels"] == str(out)
    assert tvm_backends(copy.deepcopy(fm)) == [backend]  # a copy shares it too


# -- the commands -------------------------------------------------------------------------------------
def test_tune_and_export_commands(model_file, tmp_path):
    from fraccompile.cli import app

    runner = CliRunner()
    db = tmp_path / "db"
    args = ["tune", str(model_file), "--input-shape", "4,3,8,8", "--db", str(db), "--trials", "2"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "tuned GEMMs" in first.output and " 0 reused" in first.output
    n = json.loads((db / "tuning.json").read_text())["records"]
    assert len(n) >= 3
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and f"0 tuned, {len(n)} reused" in second.output
    out = tmp_path / "k"
    res = runner.invoke(
        app, ["export", str(model_file), "--input-shape", "4,3,8,8", "--db", str(db), "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    tiles = {tuple(r["problem"]): r["tile"] for r in n}
    for k in manifest["kernels"]:  # the export took the tuned tiles
        for p in k.get("problems", []):
            if tuple(p) in tiles:
                assert k["tile"] == tiles[tuple(p)]
    bad = runner.invoke(app, ["tune", str(model_file), "--input-shape", "4,3,8,8", "--rpc", "x"])
    assert bad.exit_code == 2 and "HOST:PORT:KEY" in bad.output
    cuda = runner.invoke(app, ["tune", str(model_file), "--input-shape", "4,3,8,8", "--target", "cuda"])
    assert cuda.exit_code == 2 and "CUDA runtime" in cuda.output


def test_tuning_through_a_loopback_rpc_tracker(tmp_path):
    """A local tracker and server (TVM's RPC): a kernel is built here, uploaded and timed there."""
    from fraccompile.errors import MissingDependencyError, require_extra

    try:  # TVM's tracker and server need the RPC part of the `tune` extra
        require_extra("tune", "TVM's RPC tracker and server", ("tornado", "psutil", "cloudpickle"))
    except MissingDependencyError as err:
        pytest.skip(str(err))
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    from fraccompile.targets.kernels import gemm
    from fraccompile.targets.runtime.tuning_db import TuningDB
    from fraccompile.targets.tools import tuning

    tracker = Tracker("127.0.0.1", port=9190, port_end=9990, silent=True)
    server = rpc.Server(
        "127.0.0.1",
        port=10000,
        port_end=10990,
        key="fctest",
        tracker_addr=("127.0.0.1", tracker.port),
        silent=True,
    )
    try:
        runner = tuning.RPCRunner(f"127.0.0.1:{tracker.port}:fctest", repeat=2, min_repeat_ms=5)
        assert 0 < runner.time(gemm.padded(1, 64, 64, 64)) < 1
        db = TuningDB(tmp_path)
        res = tuning.tune([(1, 24, 32, 40)], db, runner, trials=2)
        assert res[0].record.gops > 0 and not res[0].reused
    finally:
        server.terminate()
        tracker.terminate()


# -- the CUDA target (code generation and nvcc; running needs a GPU) ---------------------------------
def _nvcc_reason():
    from fraccompile.targets.kernels import cuda

    return cuda.nvcc_unavailable_reason()


@pytest.fixture(scope="module")
def exported_both(exported, tmp_path_factory, model_file):
    """The cpu export plus a cuda export into the same directory."""
    import shutil

    from fraccompile.targets.tools.export import export

    if _nvcc_reason():
        pytest.skip(_nvcc_reason())
    out = tmp_path_factory.mktemp("both") / "k"
    shutil.copytree(exported[0], out)
    fm, _, x = _small(model_file)
    return out, export(fm, x, out, target="cuda", model="small")


# the im2col GEMMs (G, M, N, K) of the small model's convs on CUDA tensors: forwards (N·OH·OW rows,
# OC columns, C·kh·kw deep) and weight gradients (OC rows, C·kh·kw columns, N·OH·OW deep)
CONV_GPU_GEMMS = {
    (1, 256, 16, 144): {("conv", "fw")},
    (1, 256, 18, 144): {("conv2", "fw")},
    (1, 64, 16, 162): {("conv3", "fw")},
    (1, 16, 144, 256): {("conv", "gc")},
    (1, 18, 144, 256): {("conv2", "gc")},
    (1, 16, 162, 64): {("conv3", "gc")},
}


def test_recording_notes_the_gemms_cuda_convs_run(model_file):
    """On the CPU a conv's forward and weight gradient take conv kernels with no GEMM of their
    own; on an exported CUDA library they run as im2col + GEMM, so the recording notes those
    GEMMs for ``export --target cuda`` (on an H200, a GPU step on an export that lacked them
    stopped at the first conv)."""
    from fraccompile.targets.tools.export import record

    fm, _, x = _small(model_file)
    assert record(fm, x).gpu_problems == CONV_GPU_GEMMS


def test_cuda_export_writes_a_fatbin_and_keeps_the_cpu_section(exported_both):
    from fraccompile.targets.kernels import cuda, cuda_epilogue, cuda_mma
    from fraccompile.targets.runtime.cuda_driver import CudaGemm
    from fraccompile.targets.runtime.exported import ExportedKernels

    out, manifest = exported_both
    assert set(manifest["targets"]) == {"cpu", "cuda"}
    info = manifest["targets"]["cuda"]
    fatbin = (out / info["library"]).read_bytes()
    assert fatbin[:4] == bytes.fromhex("50ed55ba")  # the fatbin magic
    assert info["archs"] == ["sm_80", "sm_90"] and info["source_hash"] == cuda_mma.source_hash()
    assert info["kernel"] == "mma"  # the tensor-core kernels CudaGemm runs on these archs
    kernels = [k for k in manifest["kernels"] if k["target"] == "cuda"]
    assert len(kernels) == len(info["kernels"]) >= 3
    assert {s["role"] for k in kernels for s in k["sites"]} == {"fw", "eb", "gc"}
    assert any(k["target"] == "cpu" for k in manifest["kernels"])
    # a backend on this directory: CPU kernels from the .so, GPU kernels from the fatbin, with the
    # launch geometry TVM's schedule gives, and C to zero for the split-K kernels
    provider = ExportedKernels(out)
    assert provider.cuda_library.kind == "mma"
    assert CudaGemm(library=provider.cuda_library).kind_for(torch.device("cuda", 0)) == "mma"
    _assert_cpu_gemms_run_exactly(provider)
    fused = 0
    for name, entry in info["kernels"].items():
        g, m, n, k, s = [int(p[1:]) for p in name.split("_")[2:7]]
        shape, module = cuda_mma.padded(g, m, n, k, split_k=s), cuda_mma
        if name.startswith("cuda_mmadq_"):  # the same GEMM with the dequantize fused
            rows, cols = map(int, name.rsplit("_o", 1)[1].split("x"))
            shape, module, fused = cuda_epilogue.MmaEpilogueShape(shape, rows, cols), cuda_epilogue, fused + 1
            assert shape.split_k == 1 and provider.cuda_library.has_kernel(shape, "sm_80")
        assert shape.name == name
        image, fn, params, grid, block = provider.cuda_library.kernel(shape, "sm_80")
        assert image == fatbin and fn == entry["function"]
        assert (grid, block, params, tuple(entry["zero"])) == (*module.launch_config(shape)[:2],) + (
            module.launch_config(shape)[3],
            shape.zero,
        )
    assert fused >= 1 and info["epilogue"] == {"source_hash": cuda_epilogue.source_hash()}
    for G, M, N, K in CONV_GPU_GEMMS:  # the convs' GEMMs on CUDA tensors are in the fatbin
        assert cuda_mma.padded(G, M, N, K).name in info["kernels"]
    missing = cuda_mma.padded(1, 8, 8, 4096)
    from fraccompile.targets.runtime.exported import KernelLibraryError

    with pytest.raises(KernelLibraryError, match="no CUDA kernel for " + missing.name):
        provider.cuda_library.kernel(missing, "sm_90")
    dp4a = cuda.padded(1, 8, 8, 64)
    with pytest.raises(KernelLibraryError, match="the export holds mma kernels, this is a dp4a one"):
        provider.cuda_library.kernel(dp4a, "sm_90")
    assert ExportedKernels(out, fallback=True).cuda_library.kernel(missing, "sm_90") is None


def _assert_cpu_gemms_run_exactly(provider) -> None:
    """Every GEMM problem of the provider's CPU section runs from its library (an export builds
    nothing: ``get`` refuses what the library lacks) and gives the exact integer product."""
    from fraccompile.targets.runtime.library import KernelRef

    assert provider.problems
    gen = torch.Generator().manual_seed(0)
    for key in sorted(provider.problems):
        shape = provider.gemm_shape(*map(int, key.split(",")))
        g, m, n, k = shape.groups, shape.m, shape.n, shape.k
        a = torch.randint(0, 256, (g, m, k), dtype=torch.uint8, generator=gen)
        b = torch.randint(-128, 128, (g, n // 16, k // 4, 16, 4), dtype=torch.int8, generator=gen)
        c = torch.full((g, m, n), 7, dtype=torch.int32)
        provider.get(KernelRef.gemm(shape))(a, b, c)
        b_nk = b.permute(0, 1, 3, 2, 4).reshape(g, n, k)  # B[j // 16, r // 4, j % 16, r % 4]
        assert torch.equal(c.long(), a.long() @ b_nk.long().mT), shape.name


def test_exported_cpu_gemms_run_exactly(exported):
    from fraccompile.targets.runtime.exported import ExportedKernels

    _assert_cpu_gemms_run_exactly(ExportedKernels(exported[0]))


def test_tampered_fatbin_is_refused(exported_both, tmp_path):
    import shutil

    from fraccompile.targets.runtime.exported import ExportedKernels, KernelLibraryError

    out, _ = exported_both
    d = tmp_path / "k"
    shutil.copytree(out, d)
    lib = d / "kernels-cuda.fatbin"
    lib.write_bytes(lib.read_bytes()[:-16])
    with pytest.raises(KernelLibraryError, match="kernels-cuda.fatbin does not match the sha256"):
        ExportedKernels(d)


def test_export_without_fused_kernels_falls_back_to_the_plain_ones(exported_both, tmp_path, monkeypatch):
    """An export made before the fused-dequantize kernels (no ``epilogue`` entry): the fused path
    declines (the plain kernel + torch dequantize serve), nothing is refused or built."""
    import json
    import shutil

    from fraccompile.targets.kernels import cuda_epilogue, cuda_mma
    from fraccompile.targets.runtime import cuda_epilogue as fused
    from fraccompile.targets.runtime.cuda_driver import CudaGemm
    from fraccompile.targets.runtime.exported import ExportedKernels

    out, _ = exported_both
    d = tmp_path / "k"
    shutil.copytree(out, d)
    manifest = json.loads((d / "manifest.json").read_text())
    names = [n for n in manifest["targets"]["cuda"]["kernels"] if n.startswith("cuda_mmadq_")]
    g, m, n, k = [int(p[1:]) for p in names[0].split("_")[2:6]]
    rows, cols = map(int, names[0].rsplit("_o", 1)[1].split("x"))
    shape = cuda_epilogue.MmaEpilogueShape(cuda_mma.padded(g, m, n, k, split_k=1), rows, cols)
    assert ExportedKernels(d).cuda_library.has_kernel(shape, "sm_90")
    del manifest["targets"]["cuda"]["epilogue"]
    (d / "manifest.json").write_text(json.dumps(manifest))
    library = ExportedKernels(d).cuda_library
    assert not library.has_kernel(shape, "sm_90") and library.has_kernel(shape.gemm, "sm_90")
    monkeypatch.setattr(fused, "runs_kernels", lambda t: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    a, b = torch.zeros((g, rows, k), dtype=torch.int8), torch.zeros((g, cols, k), dtype=torch.int8)
    assert fused.gemm_f32(CudaGemm(library=library), a, b, torch.ones(1)) is None


def test_backend_on_an_export_takes_gpu_kernels_from_it(exported_both):
    from fraccompile.ops.backend import get_backend

    out, _ = exported_both
    backend = get_backend("tvm", kernels=str(out))
    assert backend.cuda.library.info is not None
    assert backend.cuda.library.directory == out
    assert backend.cuda_quant.library is backend.cuda.library


def test_cuda_export_holds_the_quantization_kernels(exported_both, tmp_path, monkeypatch):
    """The cuda section's ``quantize`` entry: every quantization kernel in a second fatbin, which
    the GPU quantizer loads instead of building it (nvcc is not called); a damaged one is refused,
    and an export without the entry (made before it) has them built on first use."""
    import json
    import shutil

    from fraccompile.targets.kernels import cuda, cuda_quantize
    from fraccompile.targets.runtime.cuda_quant import CudaQuant
    from fraccompile.targets.runtime.exported import ExportedKernels, KernelLibraryError

    out, manifest = exported_both
    entry = manifest["targets"]["cuda"]["quantize"]
    fatbin = (out / entry["library"]).read_bytes()
    assert fatbin[:4] == bytes.fromhex("50ed55ba") and entry["source_hash"] == cuda_quantize.source_hash()
    assert entry["kernels"] == [k.name for k in cuda_quantize.KERNELS]
    library = ExportedKernels(out).cuda_library
    monkeypatch.setattr(cuda, "compile_source", lambda *a: pytest.fail("nvcc called"))
    assert CudaQuant(library=library, cache_dir=tmp_path / "c").image("sm_80", "cubin") == fatbin
    assert library.quantize_image("sm_75") is None  # (an arch it was not built for)
    d = tmp_path / "k"
    shutil.copytree(out, d)
    (d / entry["library"]).write_bytes(fatbin[:-16])
    with pytest.raises(KernelLibraryError, match="does not match the sha256"):
        ExportedKernels(d).cuda_library.quantize_image("sm_90")
    m = json.loads((d / "manifest.json").read_text())
    del m["targets"]["cuda"]["quantize"]
    (d / "manifest.json").write_text(json.dumps(m))
    assert ExportedKernels(d).cuda_library.quantize_image("sm_90") is None


def test_train_command_on_exported_kernels(model_file, tmp_path):
    """`fraccompile train --kernels DIR` trains on an export made for its batch shape, and refuses
    (one line, exit 2) when the batch shape differs from the export's."""
    from fraccompile.cli import app

    runner = CliRunner()
    out = tmp_path / "k"
    res = runner.invoke(app, ["export", str(model_file), "--input-shape", "4,3,32,32", "--out", str(out)])
    assert res.exit_code == 0, res.output
    common = static_train_args(
        model_file,
        iters=2,
        eval_every=2,
        test_limit=8,
        train_limit=16,
        backend="tvm",
        scheme="symmetric",
        kernels=out,
    )
    ok = runner.invoke(app, common + ["--batch-size", "4", "--out", str(tmp_path / "run")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "run" / "log.jsonl").exists()
    bad = runner.invoke(app, common + ["--batch-size", "8", "--out", str(tmp_path / "run2")])
    assert bad.exit_code == 2
    assert "no kernel for the implicit-GEMM conv forward" in bad.output


def test_cuda_only_export_refuses_cpu_tensors(exported_both, model_file, tmp_path):
    import shutil

    from fraccompile.targets.runtime.exported import KernelLibraryError

    out, _ = exported_both
    d = tmp_path / "k"
    shutil.copytree(out, d)
    m = json.loads((d / "manifest.json").read_text())
    del m["targets"]["cpu"]
    m["kernels"] = [k for k in m["kernels"] if k["target"] != "cpu"]
    (d / "manifest.json").write_text(json.dumps(m))
    fm, _, x = _small(model_file, kernels=str(d))
    with pytest.raises(KernelLibraryError, match="no cpu target"):
        fm(x)


def _gpu_reason():
    from fraccompile.targets.runtime.cuda_driver import gpu_unavailable_reason

    return gpu_unavailable_reason() or _nvcc_reason()


@pytest.mark.skipif(_gpu_reason() is not None, reason=f"needs a GPU and nvcc: {_gpu_reason()}")
def test_gpu_step_on_the_exported_fatbin_builds_nothing(exported_both, model_file, monkeypatch):
    """On a GPU, a model compiled on an export runs its GEMMs from the fatbin (nvcc is never
    called) and gives the JIT GPU backend's loss and gradients."""
    from fraccompile.targets.kernels import cuda

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    out, _ = exported_both

    def gpu_step(**cfg):
        fm, _, x = _small(model_file, **cfg)
        fm = fm.cuda()
        return _step(fm, x.cuda())

    jit_loss, jit_grads = gpu_step()

    def no_nvcc(*args, **kwargs):
        raise AssertionError("nvcc called: a kernel was missing from the fatbin")

    monkeypatch.setattr(cuda, "compile_source", no_nvcc)
    monkeypatch.setenv("FRACCOMPILE_CACHE_DIR", str(out / "empty-cache"))  # no cached cubins
    loss, grads = gpu_step(kernels=str(out))
    assert torch.allclose(loss, jit_loss, rtol=1e-6, atol=0)
    assert grads.keys() == jit_grads.keys()
    for name, g in grads.items():
        assert torch.allclose(g, jit_grads[name], rtol=1e-6, atol=1e-9), name
