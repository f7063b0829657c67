"""The ``fraccompile`` command line: ``transform`` on every example, ``--config``, one-line errors on
bad input, and ``demo``. In-process through typer's CliRunner (fast), and through the installed
console script in subprocesses (the real stdout/stderr, including what torch prints itself)."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fraccompile.cli import app
from fraccompile.config import FracConfig
from fraccompile.examples import resnet_cifar

EXAMPLES = Path(resnet_cifar.__file__).resolve().parent
PREFIX = "fraccompile: error:"
SCRIPT = shutil.which("fraccompile")

# click >= 8.2 (typer's CliRunner has no mix_stderr): result.stdout and result.stderr are separate,
# result.output interleaves both.
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


TVM_SYMMETRIC = ("--backend", "tvm", "--scheme", "symmetric")


def transform_resnet(*args):
    """``fraccompile transform examples/resnet_cifar.py --input-shape 2,3,32,32 ARGS``, in-process."""
    return invoke("transform", EXAMPLES / "resnet_cifar.py", "--input-shape", "2,3,32,32", *args)


@pytest.fixture(scope="module")
def out_root(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


# (id, model spec, input shape, extra args, expected quantized sites, expected capture)
TRANSFORMS = [
    ("resnet_cifar", "resnet_cifar.py", "2,3,32,32", [], 20, "fx"),
    ("mobilenetv2", "mobilenetv2_cifar.py", "2,3,32,32", [], 51, "fx"),
    ("resnet18", "resnet18_imagenet.py", "2,3,64,64", [], 19, "fx"),
    ("transformer", "transformer_lm.py", "2,16", [], 16, "fx"),
    ("functional", "functional_model.py", "2,3,32,32", [], 3, "fx"),
    ("control_flow", "control_flow.py", "2,3,64,64", [], 2, "export"),
    ("value_branch_leaf", "control_flow.py:ValueBranchNet", "2,3,32,32", ["--leaf", "ValueGate"], 1, "fx"),
]


def check_outputs(out: Path, n_sites: int, capture: str, precision: tuple = (8, 8, 8)) -> dict:
    """transformed.py, graph.json and report.md exist and agree with each other."""
    assert sorted(p.name for p in out.iterdir()) == ["graph.json", "report.md", "transformed.py"]
    graph = json.loads((out / "graph.json").read_text())
    assert {"nodes", "edges", "sites", "capture", "config", "cost"} <= set(graph)
    assert graph["capture"] == capture
    node_names = [n["name"] for n in graph["nodes"]]
    assert len(set(node_names)) == len(node_names)
    assert graph["edges"] and all(a in node_names and b in node_names for a, b in graph["edges"])
    quantized = [s["name"] for s in graph["sites"] if not s["full_precision"]]
    assert len(quantized) == n_sites
    assert sorted(n["precision_for"] for n in graph["nodes"] if "precision_for" in n) == sorted(quantized)
    assert {n["site"] for n in graph["nodes"] if "site" in n} == set(quantized)
    assert all(s["precision"] == list(precision) for s in graph["sites"] if not s["full_precision"])
    shown = "/".join(str(b) if b else "fp" for b in precision)  # how the report writes a/w/g

    code = (out / "transformed.py").read_text()
    ast.parse(code)
    prec_lines = [ln for ln in code.splitlines() if "frac_precision(" in ln]
    assert prec_lines, "no precision-control lines"
    assert sorted(re.findall(r"frac_precision\('([^']+)'\)", code)) == sorted(quantized)

    report = (out / "report.md").read_text()
    m = re.search(r"Captured with torch\.(\w+); (\d+) sites, (\d+) layers kept in full precision", report)
    assert m, report[:300]
    assert (m.group(1), int(m.group(2))) == (capture, n_sites)
    assert int(m.group(3)) == len(graph["sites"]) - n_sites
    rows = [ln for ln in report.splitlines() if ln.startswith("| ") and not ln.startswith("| site ")]
    assert len(rows) == len(graph["sites"])
    assert sum(f"| {shown} |" in r for r in rows) == n_sites
    assert "cp =" in report
    return graph


@pytest.mark.parametrize(
    "name, spec, shape, extra, n_sites, capture", TRANSFORMS, ids=[t[0] for t in TRANSFORMS]
)
def test_transform_every_example(out_root, name, spec, shape, extra, n_sites, capture):
    out = out_root / name
    res = invoke("transform", f"{EXAMPLES}/{spec}", "--input-shape", shape, "--out", out, *extra)
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    assert res.stdout.count("wrote ") == 3
    assert all(f in res.stdout for f in ("transformed.py", "graph.json", "report.md"))
    assert "cp =" in res.stdout
    assert f"torch.{capture}" in res.stdout
    check_outputs(out, n_sites, capture)


def test_transform_with_config_file(out_root):
    cfg = out_root / "a4.toml"
    cfg.write_text("[fraccompile]\na = 4\nw = 4\n")
    out = out_root / "with_config"
    res = transform_resnet("--config", cfg, "--out", out)
    assert res.exit_code == 0, res.output
    assert "4/4/8" in res.stdout
    graph = check_outputs(out, 20, "fx", precision=(4, 4, 8))
    assert graph["config"]["a"] == 4 and graph["config"]["w"] == 4 and graph["config"]["g"] == 8
    assert "8/8/8" not in (out / "report.md").read_text()


def test_transform_config_saved_by_fracconfig_and_capture_option(out_root):
    cfg = out_root / "saved.toml"
    FracConfig(a=6, w=5, g=0, scheme="symmetric").save(cfg)
    out = out_root / "saved_config"
    res = invoke(
        "transform",
        EXAMPLES / "control_flow.py",
        "--input-shape",
        "2,3,64,64",
        "--config",
        cfg,
        "--capture",
        "export",
        "--out",
        out,
    )
    assert res.exit_code == 0, res.output
    graph = check_outputs(out, 2, "export", precision=(6, 5, 0))
    assert "6/5/fp" in res.stdout
    assert graph["config"]["scheme"] == "symmetric" and graph["config"]["capture"] == "export"


@pytest.mark.parametrize(
    "option,value,bad",
    [
        ("weight_scale", "tensor", "rows"),
        ("rounding_noise", "counter", "philox"),
        ("recompute", "norms", "all"),
    ],
)
def test_transform_config_options(out_root, option, value, bad):
    """A FracConfig field from the command line lands in graph.json; a bad value is one error
    line naming the field and its choices."""
    flag = "--" + option.replace("_", "-")
    out = out_root / option
    res = transform_resnet(*TVM_SYMMETRIC, flag, value, "--out", out)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "graph.json").read_text())["config"][option] == value
    bad_res = transform_resnet(flag, bad, "--out", out_root / f"bad_{option}")
    assert bad_res.exit_code != 0 and option in bad_res.output and value in bad_res.output


def test_transform_shows_the_sites_epilogues(out_root):
    res = transform_resnet(*TVM_SYMMETRIC, "--recompute", "norms", "--out", out_root / "norms")
    assert res.exit_code == 0, res.output
    assert "BatchNorm2d+relu" in (out_root / "norms" / "report.md").read_text()
    assert "BatchNorm2d+relu" in res.stdout
    res = transform_resnet(
        *TVM_SYMMETRIC, "--recompute", "norms", "--recompute-budget", "0.4", "--out", out_root / "budget"
    )
    assert res.exit_code == 0, res.output
    graph = json.loads((out_root / "budget" / "graph.json").read_text())
    assert graph["config"]["recompute_budget"] == 0.4
    report = (out_root / "budget" / "report.md").read_text()
    assert "BatchNorm2d not fused (recompute_budget 0.4)" in report
    assert "not fused" in res.stdout  # the console table folds the cell
    bad_args = ("--recompute", "none", "--recompute-budget", "0.4", "--out", out_root / "bad_budget")
    bad = transform_resnet(*bad_args)
    assert bad.exit_code != 0 and "needs recompute='activations' or" in bad.output


# -- bad input: one line on stderr -----------------------------------------------------------------
def _bad_inputs(root: Path) -> dict[str, tuple[list[str], list[str]]]:
    """id -> (argv after `fraccompile`, substrings the error line must contain)."""
    (root / "a99.toml").write_text("[fraccompile]\na = 99\n")
    (root / "unknown_key.toml").write_text("[fraccompile]\na = 4\nbits = 8\n")
    (root / "exits.py").write_text("import sys\nsys.exit(0)\n")
    (root / "a_file").write_text("")
    (root / "empty.pt").write_bytes(b"")
    ex = EXAMPLES
    cases = {
        "missing_file": (
            ["transform", str(root / "nope.py"), "--input-shape", "2,3,32,32"],
            ["nope.py", "does not exist"],
        ),
        "unknown_name": (
            ["transform", f"{ex}/resnet_cifar.py:nope", "--input-shape", "2,3,32,32"],
            ["'nope'", "resnet20"],
        ),
        "untraceable": (
            ["transform", f"{ex}/control_flow.py:ValueBranchNet", "--input-shape", "2,3,32,32"],
            ["ValueGate", "control_flow.py", "--leaf ValueGate"],
        ),
        "wrong_shape": (
            ["transform", f"{ex}/resnet_cifar.py", "--input-shape", "2,4,32,32"],
            ["(2, 4, 32, 32)", "does not fit"],
        ),
        "malformed_shape": (
            ["transform", f"{ex}/resnet_cifar.py", "--input-shape", "2,a"],
            ["--input-shape", "'2,a'"],
        ),
        "config_out_of_range": (
            [
                "transform",
                f"{ex}/resnet_cifar.py",
                "--input-shape",
                "2,3,32,32",
                "--config",
                str(root / "a99.toml"),
            ],
            ["FracConfig.a", "99"],
        ),
        "config_unknown_key": (
            [
                "transform",
                f"{ex}/resnet_cifar.py",
                "--input-shape",
                "2,3,32,32",
                "--config",
                str(root / "unknown_key.toml"),
            ],
            ["bits", "valid fields", "act_momentum"],
        ),
        "sys_exit_at_import": (
            ["transform", str(root / "exits.py"), "--input-shape", "2,3,32,32"],
            ["exits.py", "sys.exit(0)", "__main__"],
        ),
        "out_is_a_file": (
            [
                "transform",
                f"{ex}/resnet_cifar.py",
                "--input-shape",
                "2,3,32,32",
                "--out",
                str(root / "a_file"),
            ],
            ["--out", "exists and is not a directory"],
        ),
        "out_under_a_file": (
            ["train", f"{ex}/resnet_cifar.py", "--out", str(root / "a_file" / "run")],
            ["--out", "a_file is not a directory"],
        ),
        "out_not_writable": (
            [
                "transform",
                f"{ex}/resnet_cifar.py",
                "--input-shape",
                "2,3,32,32",
                "--out",
                "/proc/fraccompile-out",
            ],
            ["--out", "cannot write in /proc"],
        ),
        "empty_checkpoint": (
            [
                "train",
                f"{ex}/functional_model.py",
                "--resume",
                str(root / "empty.pt"),
                "--out",
                str(root / "unexpected_out"),
            ],
            ["empty.pt", "is empty"],
        ),
    }
    # never write into the working directory, even if a case unexpectedly succeeded
    return {
        c: (argv + ([] if "--out" in argv else ["--out", str(root / "unexpected_out")]), needles)
        for c, (argv, needles) in cases.items()
    }


BAD_IDS = [
    "missing_file",
    "unknown_name",
    "untraceable",
    "wrong_shape",
    "malformed_shape",
    "config_out_of_range",
    "config_unknown_key",
    "sys_exit_at_import",
    "out_is_a_file",
    "out_under_a_file",
    "out_not_writable",
    "empty_checkpoint",
]


def _error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith(PREFIX)]
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{stderr}"
    return lines[0]


@pytest.mark.parametrize("case", BAD_IDS)
def test_bad_input_error_message_in_process(out_root, case):
    argv, needles = _bad_inputs(out_root)[case]
    res = invoke(*argv)
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)  # not an uncaught exception
    line = _error_line(res.stderr)
    assert PREFIX not in res.stdout
    for needle in needles:
        assert needle in line, (needle, line)
    assert not (out_root / "unexpected_out").exists()


@pytest.mark.parametrize("case", BAD_IDS)
def test_bad_input_one_line_on_stderr_in_process(out_root, case):
    argv, _ = _bad_inputs(out_root)[case]
    res = invoke(*argv)
    assert res.exit_code != 0
    assert "Traceback" not in res.output
    assert res.stderr.strip().splitlines() == [_error_line(res.stderr)], res.stderr


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--capture", "fx", "--input-shape", "2,3,64,64"], "cannot capture"),
        (["--capture", "bogus", "--input-shape", "2,3,64,64"], "FracConfig.capture"),
        (["--dtype", "int8", "--input-shape", "2,3,64,64"], "--dtype"),
        (["--input-shape", "2,-3,64,64"], "--input-shape"),
        (["--input-shape", "2,3,64,64", "--config", "/nonexistent/frac.toml"], "does not exist"),
    ],
    ids=["fx_only", "bad_capture", "bad_dtype", "negative_shape", "missing_config"],
)
def test_more_bad_inputs_in_process(argv, needle):
    res = invoke("transform", EXAMPLES / "control_flow.py", *argv)
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    assert needle in _error_line(res.stderr)


def test_bad_toml_and_not_python_in_process(out_root):
    bad = out_root / "syntax.toml"
    bad.write_text("a = = 4\n")
    res = transform_resnet("--config", bad)
    assert res.exit_code == 2 and "TOML" in _error_line(res.stderr)
    res = invoke("transform", bad, "--input-shape", "2,3,32,32")
    assert res.exit_code == 2 and "not a Python file" in _error_line(res.stderr)


@pytest.mark.parametrize("command", ["transform", "train", "tune", "export"])
def test_unusable_out_is_refused_before_compiling(out_root, monkeypatch, command):
    import fraccompile.api

    monkeypatch.setattr(fraccompile.api, "compile", lambda *a, **k: pytest.fail("compiled"))
    (out_root / "taken").write_text("")
    option = "--db" if command == "tune" else "--out"
    shape = [] if command == "train" else ["--input-shape", "2,3,32,32"]
    res = invoke(command, EXAMPLES / "resnet_cifar.py", *shape, option, out_root / "taken")
    if command in ("tune", "export") and "TVM is not usable" in res.stderr:
        pytest.skip(res.stderr)
    assert res.exit_code == 2, res.output
    assert f"{option} {out_root / 'taken'}: exists and is not a directory" in _error_line(res.stderr)


def _read_only_mount_works() -> bool:
    probe = (
        subprocess.run(
            ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o ro tmpfs /mnt && touch /mnt/x"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if shutil.which("unshare")
        else None
    )
    return probe is not None and "Read-only file system" in probe.stderr


@pytest.mark.skipif(SCRIPT is None, reason="the fraccompile console script is not on PATH")
def test_out_on_a_read_only_file_system(tmp_path):
    """A read-only tmpfs mounted in a private mount namespace (needs root and unshare)."""
    if not _read_only_mount_works():
        pytest.skip("cannot mount a read-only file system here (unshare -m needs root)")
    ro = tmp_path / "ro"
    ro.mkdir()
    proc = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            f'mount -t tmpfs -o ro tmpfs "{ro}" && exec "$0" "$@"',
            SCRIPT,
            "transform",
            str(EXAMPLES / "resnet_cifar.py"),
            "--input-shape",
            "2,3,32,32",
            "--out",
            str(ro / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"{PREFIX} --out {ro / 'out'}: cannot write in {ro} (read-only file system)"
    ]


LAZY = """
import torch
from torch import nn


class Lazy(nn.Module):  # {what}
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        {extra}
        self.fc = nn.LazyLinear(10)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        {call}
        return self.fc(x.flatten(1))
"""


@pytest.mark.parametrize("sites", [0, 1])
def test_models_with_lazy_layers(out_root, sites):
    """nn.LazyLinear is materialized by the capture's run; with no layer left to quantize (the
    first conv and the last linear stay in full precision) the model compiles and trains too."""
    path = out_root / f"lazy{sites}.py"
    path.write_text(
        LAZY.format(
            what="first conv, lazy last linear" + (", a lazy conv between" if sites else ""),
            extra="self.mid = nn.LazyConv2d(8, 3, padding=1)" if sites else "",
            call="x = torch.relu(self.mid(x))" if sites else "",
        )
    )
    res = invoke("transform", path, "--input-shape", "2,3,32,32", "--out", out_root / f"lazy{sites}")
    assert res.exit_code == 0, res.output
    graph = json.loads((out_root / f"lazy{sites}" / "graph.json").read_text())
    assert sum(not s["full_precision"] for s in graph["sites"]) == sites
    if not sites:
        res = invoke(
            "train",
            path,
            "--iters",
            "1",
            "--eval-every",
            "1",
            "--batch-size",
            "4",
            "--train-limit",
            "8",
            "--test-limit",
            "4",
            "--out",
            out_root / "lazy_run",
        )
        assert res.exit_code == 0, res.output
        assert "done: 1 iterations" in res.stdout


# -- the real console script -----------------------------------------------------------------------
def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPT, *argv], capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def script_results(out_root):
    """Every bad input run through the console script, two at a time (each start imports torch)."""
    if SCRIPT is None:
        pytest.skip("the fraccompile console script is not on PATH")
    (out_root / "script").mkdir(exist_ok=True)
    cases = _bad_inputs(out_root / "script")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {c: pool.submit(_run, argv) for c, (argv, _) in cases.items()}
        return {c: (f.result(), cases[c][1]) for c, f in futures.items()}


@pytest.mark.parametrize("case", BAD_IDS)
def test_bad_input_console_script_exit_code_and_message(script_results, case):
    proc, needles = script_results[case]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    line = _error_line(proc.stderr)
    for needle in needles:
        assert needle in line, (needle, line)
    assert PREFIX not in proc.stdout


@pytest.mark.parametrize("case", BAD_IDS)
def test_bad_input_console_script_one_line_on_stderr(script_results, case):
    proc, _ = script_results[case]
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), proc.stderr[-3000:]


@pytest.mark.skipif(SCRIPT is None, reason="the fraccompile console script is not on PATH")
def test_transform_console_script(out_root):
    out = out_root / "script_transform"
    proc = _run(
        [
            "transform",
            f"{EXAMPLES}/control_flow.py:ValueBranchNet",
            "--input-shape",
            "2,3,32,32",
            "--leaf",
            "ValueGate",
            "--out",
            str(out),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip() == ""
    assert "Traceback" not in proc.stdout
    assert proc.stdout.count("wrote ") == 3 and "cp =" in proc.stdout
    check_outputs(out, 1, "fx")


# -- demo and help ---------------------------------------------------------------------------------
def test_demo_runs_and_prints_a_cost_line():
    res = invoke("demo", "--iters", "6", "--batch-size", "8")
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    assert re.search(r"iter\s+6\s+train loss \d+\.\d+", res.stdout)
    cost = [ln for ln in res.stdout.splitlines() if ln.startswith("bit-cost of the run:")]
    assert len(cost) == 1 and re.search(r"\d+\.\d+% saved against static 8/8/8", cost[0]), res.stdout
    assert "final test accuracy" in res.stdout
    step = re.search(
        r"step time .*?: (\d+\.\d) ms compiled \((\d+) of (\d+) quantized sites on "
        r"integer kernels.*?against (\d+\.\d) ms for fp32",
        " ".join(res.stdout.split()),
    )
    assert step and float(step[1]) > 0 and float(step[4]) > 0, res.stdout
    from fraccompile.targets import tvm_unavailable_reason

    if tvm_unavailable_reason() is None:  # backend auto: every quantized site on TVM
        assert step[2] == step[3] != "0", res.stdout


def test_demo_bad_scheme_is_one_line():
    res = invoke("demo", "--iters", "1", "--batch-size", "4", "--scheme", "bogus")
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == [_error_line(res.stderr)]
    assert "FracConfig.scheme" in res.stderr


def test_help_lists_the_commands():
    res = invoke("--help")
    assert res.exit_code == 0
    for command in ("transform", "train", "tune", "export", "report", "demo"):  # a row each
        assert re.search(rf"^\W*{command}\s{{2,}}\S", res.stdout, re.M), (command, res.stdout)
    res = invoke("transform", "--help")
    assert res.exit_code == 0 and "--input-shape" in res.stdout and "--leaf" in res.stdout
