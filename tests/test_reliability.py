"""Safe by default: checkpoints that cannot run code and are refused when damaged, training that
skips non-finite steps and never writes them to a checkpoint, logs that stay strict JSON and resume
after a torn line, the file helpers (atomic writes, stale temporaries, checksums, ELF checks), and a
kernel cache that rebuilds a truncated library instead of dying of SIGBUS."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from _cli_helpers import static_train_args
from torch import nn
from typer.testing import CliRunner

import fraccompile
from fraccompile import fileio
from fraccompile.cli import app
from fraccompile.data import ClassificationData
from fraccompile.ops.modules import RunningRange
from fraccompile.plots import read_log
from fraccompile.train import (
    CheckpointError,
    NonFiniteError,
    fit,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PREFIX = "fraccompile: error:"


def _strict(line: str):
    """json.loads that refuses NaN and Infinity, as strict JSON readers do."""

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(line, parse_constant=refuse)


def _log(run_dir: Path) -> list[dict]:
    return [_strict(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


class SmallNet(nn.Module):
    """Two BatchNorms (running statistics a NaN would poison) and one quantized site."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.stem(x)))
        x = torch.relu(self.bn2(self.conv(x)))
        return self.fc(x.mean((2, 3)))


def _small():
    torch.manual_seed(0)
    return fraccompile.compile(SmallNet(), torch.zeros(8, 3, 32, 32), fraccompile.FracConfig(a=6, w=6, g=8))


class Poisoned:
    """``data`` whose training batches ``bad(index)`` (global batch index) hold a NaN pixel."""

    def __init__(self, data, bad):
        self.data, self.bad = data, bad
        self.steps_per_epoch, self.batch_size = data.steps_per_epoch, data.batch_size

    def batches(self, epoch, start=0):
        for i, (x, y) in enumerate(self.data.batches(epoch, start=start), start):
            if self.bad(epoch * self.steps_per_epoch + i):
                x = x.clone()
                x[0, 0, 0, 0] = float("nan")
            yield x, y

    def test_batches(self):
        return self.data.test_batches()


@pytest.fixture(scope="module")
def data():
    return ClassificationData.from_source("bundled", batch_size=8, train_limit=64, test_limit=16, seed=0)


def _fit(model, data, **kw):
    kw.setdefault("iters", 8)
    return fit(model, data, eval_every=4, lr=0.05, progress=False, deterministic=True, **kw)


def _all_finite(state: dict) -> bool:
    return all(
        bool(torch.isfinite(t).all())
        for t in state.values()
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    )


# -- non-finite steps -------------------------------------------------------------------------------
def test_nan_batch_is_skipped_and_changes_nothing(data, tmp_path):
    """The step on a NaN batch leaves weights, optimizer and buffers (BatchNorm statistics, the
    activation ranges) exactly as they were; the run goes on, its checkpoint is finite and
    resumable, and its log is strict JSON with the skipped step counted."""
    before = _small()
    opt_a = torch.optim.SGD(before.parameters(), lr=0.05, momentum=0.9)
    _fit(before, data, optimizer=opt_a, stop_at=2)
    after = _small()
    opt_b = torch.optim.SGD(after.parameters(), lr=0.05, momentum=0.9)
    res = _fit(after, Poisoned(data, lambda i: i == 2), optimizer=opt_b, stop_at=3)
    assert res.skipped_steps == 1
    a, b = before.state_dict(), after.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [
        k for k in a if not torch.equal(a[k], b[k])
    ]
    bufs_a = [s["momentum_buffer"] for s in opt_a.state_dict()["state"].values()]
    bufs_b = [s["momentum_buffer"] for s in opt_b.state_dict()["state"].values()]
    assert len(bufs_a) == len(bufs_b) > 0 and all(map(torch.equal, bufs_a, bufs_b))

    out = tmp_path / "run"
    full = _fit(_small(), Poisoned(data, lambda i: i == 2), out_dir=out, stop_at=4)
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["iteration"] == 4 and ckpt["skipped_steps"] == 1 and _all_finite(ckpt["model"])
    assert full.periods[0]["skipped"] == 1 and full.periods[0]["train_loss"] is not None
    resumed = _fit(_small(), Poisoned(data, lambda i: i == 2), out_dir=out, resume=out / "checkpoint.pt")
    assert resumed.iterations == 8 and resumed.final["skipped_steps"] == 1
    log = _log(out)  # strict JSON throughout
    assert [r["event"] for r in log] == ["start", "period", "resume", "period", "end"]


def test_nonfinite_steps_in_a_row_stop_the_run_and_keep_the_last_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(
        NonFiniteError,
        match=r"iteration 7: 3 step\(s\) in a row with a non-finite "
        r"loss.*iteration 4\), is kept",
    ):
        _fit(_small(), Poisoned(data, lambda i: i >= 4), out_dir=out, max_nonfinite=3)
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["iteration"] == 4 and _all_finite(ckpt["model"])
    log = _log(out)
    assert log[-1]["event"] == "stopped" and log[-1]["skipped_steps"] == 3
    with pytest.raises(NonFiniteError, match="iteration 5: 1 step"):  # stop at once
        _fit(
            _small(),
            Poisoned(data, lambda i: i >= 4),
            out_dir=out,
            nonfinite="stop",
            resume=out / "checkpoint.pt",
        )
    with pytest.raises(ValueError, match="nonfinite must be one of skip, stop"):
        _fit(_small(), data, nonfinite="ignore")


def test_nonfinite_gradient_with_a_finite_loss_is_skipped(data):
    calls = []

    def loss_fn(out, y):  # the third training step: loss finite, gradient NaN (0 * d sqrt(0))
        calls.append(1)
        loss = torch.nn.functional.cross_entropy(out, y)
        if len(calls) == 3:
            loss = loss + 0 * torch.sqrt(out.sum() - out.sum().detach())
        return loss

    model = _small()
    res = _fit(model, data, iters=4, loss_fn=loss_fn)
    assert res.skipped_steps == 1 and res.periods[0]["skipped"] == 1
    assert _all_finite(model.state_dict())


def test_running_range_never_absorbs_nonfinite_batches():
    r = RunningRange(0.5)
    r.observe(torch.tensor([float("nan"), 1.0]))  # a first batch with NaN does not initialize it
    assert not bool(r.initialized) and r.current() == (None, None)
    r.observe(torch.tensor([-1.0, 3.0]))
    for bad in (float("nan"), float("inf"), float("-inf")):
        r.observe(torch.tensor([0.0, bad, 2.0]))
        assert r.range.tolist() == [-1.0, 3.0]
    r.observe(torch.tensor([-3.0, 5.0]))
    assert r.range.tolist() == [-2.0, 4.0]


# -- logs -------------------------------------------------------------------------------------------
def test_resume_after_a_kill_mid_append_of_the_log(data, tmp_path):
    out = tmp_path / "run"
    _fit(_small(), data, out_dir=out, stop_at=4)
    with (out / "log.jsonl").open("a") as f:
        f.write('{"event": "period", "iter": 5, "train_lo')  # a kill mid-append
    assert [p["iter"] for p in read_log(out).periods] == [4]
    res = _fit(_small(), data, out_dir=out, resume=out / "checkpoint.pt")
    assert res.iterations == 8
    assert [r["event"] for r in _log(out)] == ["start", "period", "resume", "period", "end"]
    (out / "log.jsonl").write_text('{"event": "start"}\n{"event": "per\n{"event": "end", "iter": 1}\n')
    with pytest.raises(CheckpointError, match=r"log.jsonl:2: not valid JSON"):  # not the last line
        _fit(_small(), data, out_dir=out, resume=out / "checkpoint.pt")


def test_finite_json_and_read_jsonl(tmp_path):
    rec = {"a": float("nan"), "b": [1.5, float("inf")], "c": {"d": -float("inf"), "e": "x"}}
    assert fileio.finite_json(rec) == {"a": None, "b": [1.5, None], "c": {"d": None, "e": "x"}}
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": ')
    assert fileio.read_jsonl(path) == [(1, {"a": 1}), (3, {"a": 2})]
    path.write_text('{"a": 1}\n{"a": \n')  # a damaged line that was completed: not a torn write
    with pytest.raises(ValueError, match=r"x.jsonl:2: not valid JSON"):
        fileio.read_jsonl(path)


# -- checkpoints -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint the CLI wrote for examples/functional_model.py."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    args = static_train_args(
        EXAMPLES / "functional_model.py",
        iters=2,
        eval_every=2,
        batch_size=8,
        train_limit=16,
        test_limit=8,
        out=out,
    )
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return out / "checkpoint.pt"


def _resume_cli(model: Path, checkpoint: Path, out: Path):
    """``fraccompile train MODEL --out OUT --resume CHECKPOINT``, in-process."""
    return CliRunner().invoke(app, ["train", str(model), "--out", str(out), "--resume", str(checkpoint)])


def test_checkpoint_holds_tensors_and_plain_data_only(checkpoint):
    raw = torch.load(checkpoint, weights_only=True)  # plain torch can read it without code
    assert raw["version"] == 2 and len(raw["checksum"]) == 64
    state = load_checkpoint(checkpoint)
    set_rng_state(state["rng"])  # the RNG state round-trips through tensors and plain data
    draws = (torch.rand(3), __import__("numpy").random.rand(3).tolist(), __import__("random").random())
    set_rng_state(state["rng"])
    again = (torch.rand(3), __import__("numpy").random.rand(3).tolist(), __import__("random").random())
    assert torch.equal(draws[0], again[0]) and draws[1:] == again[1:]
    with pytest.raises(TypeError, match=r"state\['x'\]\[0\] is a pathlib"):
        save_checkpoint({"x": [Path(".")]}, checkpoint.parent / "bad.pt")
    assert isinstance(rng_state()["numpy"]["keys"], torch.Tensor)


class _Payload:
    """Unpickling this creates the file MARKER (what a hostile checkpoint would run)."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _hostile(path: Path, marker: Path, kind: str) -> Path:
    payload = _Payload()
    payload.marker = marker
    state = {"version": 2, "model": {"w": torch.zeros(2)}, "x": payload}
    if kind == "zip":
        torch.save(state, path)
    elif kind == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(state))
    return path


@pytest.mark.parametrize("kind", ["zip", "legacy", "raw-pickle"])
def test_hostile_checkpoint_never_runs_its_payload(tmp_path, kind):
    marker = tmp_path / "MARKER"
    path = _hostile(tmp_path / "evil.pt", marker, kind)
    with pytest.raises(CheckpointError, match="refused|not a checkpoint|damaged"):
        load_checkpoint(path)
    assert not marker.exists()
    res = _resume_cli(EXAMPLES / "functional_model.py", path, tmp_path / "run")
    assert res.exit_code == 2 and res.stderr.startswith(PREFIX), res.output
    assert len(res.stderr.strip().splitlines()) == 1
    assert not marker.exists()
    if kind == "zip":  # the payload is live: a load that runs code would have created the marker
        torch.load(path, weights_only=False)
        assert marker.exists()


def _flip_tensor_byte(path: Path, tensor: torch.Tensor) -> None:
    data = bytearray(path.read_bytes())
    at = bytes(data).find(tensor.numpy().tobytes())
    assert at > 0
    data[at + tensor.numel() * tensor.element_size() // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _damage(src: Path, dst: Path, kind: str) -> Path:
    data = src.read_bytes()
    if kind == "empty":
        dst.write_bytes(b"")
    elif kind == "truncated":
        dst.write_bytes(data[: len(data) // 2])
    elif kind == "random-bytes":
        dst.write_bytes(os.urandom(len(data)))
    elif kind == "flipped-tensor-byte":
        dst.write_bytes(data)
        _flip_tensor_byte(dst, load_checkpoint(src)["model"]["fc1_weight"])
    else:
        state = load_checkpoint(src)
        if kind == "other-version":
            state["version"] = 1
        elif kind == "missing-keys":
            del state["optimizer"], state["rng"]
        save_checkpoint(state, dst)
    return dst


DAMAGE = {
    "empty": "is empty",
    "truncated": "is truncated or damaged",
    "random-bytes": "not a checkpoint|is truncated or damaged",
    "other-version": "has version 1; this fraccompile reads version 2",
    "missing-keys": "lacks 'optimizer', 'rng' \\(missing keys\\)",
    "flipped-tensor-byte": "does not match the checksum",
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_checkpoint_is_refused_in_one_line_before_compiling(checkpoint, tmp_path, kind, monkeypatch):
    path = _damage(checkpoint, tmp_path / "checkpoint.pt", kind)
    with pytest.raises(CheckpointError, match=DAMAGE[kind]):
        load_checkpoint(path)

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before checking the checkpoint")

    monkeypatch.setattr(fraccompile.api, "compile", no_compile)
    res = _resume_cli(EXAMPLES / "functional_model.py", path, tmp_path / "run")
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith(PREFIX) and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert str(path) in res.stderr


def test_checkpoint_of_another_model_is_refused(checkpoint, tmp_path, monkeypatch, data):
    with pytest.raises(CheckpointError, match="does not fit this model: it lacks .*stem.weight"):
        _fit(_small(), data, resume=checkpoint)
    monkeypatch.setattr(fraccompile.api, "compile", lambda *a, **k: pytest.fail("compiled"))
    res = _resume_cli(EXAMPLES / "resnet_cifar.py", checkpoint, tmp_path / "run")
    assert res.exit_code == 2 and "does not fit this model" in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1


# -- the file helpers --------------------------------------------------------------------------------
def _age(path: Path, seconds: float = 3600) -> Path:
    past = time.time() - seconds
    os.utime(path, (past, past))
    return path


def _leftover(path: Path, data: bytes = b"") -> Path:
    path.write_bytes(data)
    return _age(path)


def test_stale_temporaries_are_removed_live_ones_kept(tmp_path, data):
    stale = _leftover(tmp_path / "checkpoint.pt.abcd1234.tmp", b"partial")
    fresh = tmp_path / "checkpoint.pt.efgh5678.tmp"
    fresh.write_bytes(b"being written")  # younger than min_age: its writer may just have begun
    build = tmp_path / "lib.so.ijkl9012.tmp"
    build.mkdir()
    _age(build)
    busy = _leftover(tmp_path / "other.so.mnop3456.tmp.so")  # its target is being built
    unrelated = _leftover(tmp_path / "notes.tmp.txt", b"mine")
    with (
        fileio.locked(tmp_path / "other.so"),
        fileio.atomic_path(tmp_path / "live.pt") as live,
    ):  # flock-ed by its live writer
        live.write_bytes(b"half")
        _age(live)
        removed = fileio.remove_stale_temps(tmp_path)
        assert live.exists() and busy.exists()
    assert sorted(removed) == sorted([stale, build])
    assert fresh.exists() and unrelated.exists() and (tmp_path / "live.pt").read_bytes() == b"half"
    # fit cleans what killed checkpoint writes left in its run directory
    run = tmp_path / "run"
    run.mkdir()
    left = _leftover(run / "checkpoint.pt.qrst7890.tmp")
    _fit(_small(), data, out_dir=run, iters=4)
    assert not left.exists() and sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "log.jsonl"]


def test_atomic_write_keeps_the_old_file_on_failure_and_uses_the_umask(tmp_path):
    path = fileio.atomic_write(tmp_path / "a.json", "old")
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(RuntimeError), fileio.atomic_path(path) as tmp:
        tmp.write_text("new, but interrupted")
        raise RuntimeError
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.json"]


def test_cached_bytes_builds_once_rebuilds_an_empty_entry_and_survives_a_read_only_cache(tmp_path):
    """The disk cache of the CUDA kernels (cubins of the GEMMs, convs and quantizers)."""
    builds = []

    def build():
        builds.append(1)
        return b"cubin %d" % len(builds)

    path = tmp_path / "cache" / "k.cubin"
    assert fileio.cached_bytes(path, build) == b"cubin 1" and path.read_bytes() == b"cubin 1"
    assert fileio.cached_bytes(path, build) == b"cubin 1" and len(builds) == 1  # from the cache
    path.write_bytes(b"")  # an empty entry (a crash before the atomic write existed) is rebuilt
    assert fileio.cached_bytes(path, build) == b"cubin 2" and path.read_bytes() == b"cubin 2"
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")  # a cache directory that cannot be created
    assert fileio.cached_bytes(blocked / "k.cubin", build) == b"cubin 3"
    assert blocked.read_text() == "not a directory"


def test_checksum_and_elf_checks(tmp_path):
    import _ctypes  # an extension module: a shared library every Python has

    lib = tmp_path / "lib.so"
    shutil.copyfile(_ctypes.__file__, lib)
    assert fileio.elf_problem(lib) is None
    assert fileio.checksum_problem(lib) == fileio.NO_CHECKSUM
    fileio.write_checksum(lib)
    assert fileio.checksum_problem(lib) is None
    data = lib.read_bytes()
    for size in (len(data) - 1, len(data) // 2, 100):
        lib.write_bytes(data[:size])
        assert "truncated" in fileio.elf_problem(lib)
        assert "truncated" in fileio.checksum_problem(lib)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    lib.write_bytes(bytes(flipped))
    assert "modified" in fileio.checksum_problem(lib)
    lib.write_bytes(os.urandom(4096))
    assert fileio.elf_problem(lib) == "not an ELF shared library"


def test_dir_problem(tmp_path):
    assert fileio.dir_problem(tmp_path / "new" / "deeper") is None
    (tmp_path / "file").write_text("")
    assert fileio.dir_problem(tmp_path / "file") == "exists and is not a directory"
    assert "is not a directory" in fileio.dir_problem(tmp_path / "file" / "sub")
    if Path("/proc/self").is_dir():  # nobody, not even root, creates files in /proc
        assert "cannot write in /proc" in fileio.dir_problem("/proc/fraccompile-out")
    assert os.listdir(tmp_path) == ["file"]  # the probe left nothing behind


# -- the kernel cache -----------------------------------------------------------------------------------
CACHE_CHILD = textwrap.dedent("""
    import json, logging, torch, fraccompile
    from torch import nn
    from fraccompile.data import ClassificationData
    from fraccompile.targets.tools.export import tvm_backends
    from fraccompile.train import fit
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(512, 10))
    data = ClassificationData.from_source("bundled", batch_size=4, train_limit=8, test_limit=4)
    fm = fraccompile.compile(model, torch.zeros(4, 3, 32, 32),
                             fraccompile.FracConfig(backend="tvm", scheme="symmetric"))
    assert any(s.backend == "tvm" for s in fm.sites), [s.fallback_reason for s in fm.sites]
    res = fit(fm, data, iters=2, eval_every=2, progress=False)
    stats = tvm_backends(fm)[0].cache.stats
    print(json.dumps({"built": stats.built, "loaded": stats.loaded,
                      "loss": res.periods[-1]["train_loss"]}))
""")


@pytest.mark.skipif(
    fraccompile.targets.tvm_unavailable_reason() is not None,
    reason=str(fraccompile.targets.tvm_unavailable_reason()),
)
def test_truncated_cached_kernel_is_rebuilt_and_training_goes_on(tmp_path):
    """In fresh processes (a truncated library that reached dlopen would kill them with SIGBUS):
    the damaged kernel and the damaged thread launcher are rebuilt, the rest loaded, and what
    killed builds left in the cache is removed."""
    cache = tmp_path / "cache"
    script = tmp_path / "child.py"
    script.write_text(CACHE_CHILD)
    env = {**os.environ, "FRACCOMPILE_CACHE_DIR": str(cache)}

    def run():
        proc = subprocess.run(
            [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr

    first, _ = run()
    assert first["built"] >= 2 and first["loss"] is not None
    kernels = sorted(
        (p for p in cache.glob("*.so") if not p.name.startswith("omp_launch")), key=lambda p: p.stat().st_size
    )
    victim = kernels[-1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    for launcher in cache.glob("omp_launch-*.so"):
        launcher.write_bytes(launcher.read_bytes()[:4096])
    leftover = _leftover(cache / f"{victim.name}.a1b2c3d4.tmp.so", b"\x7fELF half")
    build_dir = cache / "omp_launch-0123456789abcdef.so.e5f6g7h8.tmp"
    build_dir.mkdir()
    (build_dir / "launch.c").write_text("")
    _age(build_dir)
    second, stderr = run()
    assert second["built"] == 1 and second["loaded"] == first["built"]
    assert f"{victim.name} is damaged" in stderr and "truncated" in stderr
    assert second["loss"] is not None
    assert fileio.checksum_problem(victim) is None and fileio.elf_problem(victim) is None
    assert not leftover.exists() and not build_dir.exists()
