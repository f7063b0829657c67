"""FracTrain's own configurations, training step by step: fp32 baselines against `sbm` static
8/8/8, each PFQ stage, DFQ routed and FracTrain routed, on the reference and the tvm backend.

Issue 16's benchmark ("What it must show", first bullet). Per model, the fp32 model, the fp32 model
channels-last (convnets; PyTorch's advice for convnets on CPU and the strongest CPU baseline) and
every variant on every backend are built in one process from the same initial weights, and their
training steps run round-robin, as ``bench/step_interleaved.py`` does: each round runs one step of
every entry on the same batch (the first entry rotates by one per round, so no entry always follows
the same one); ``--warmup`` rounds first (the TVM kernels are built or loaded from the disk cache
there), then ``--rounds`` timed rounds. A step is zero_grad, forward, loss (DFQ and FracTrain: plus
the schedule's cost regularizer ``beta * s * gate_cp``, as ``fraccompile.train.fit`` adds it),
backward, SGD update; ``frac_step`` (cost bookkeeping, the same Python on every backend) is not
timed. Per entry:

* step ms: the median over the timed rounds; vs fp32 / vs fp32-cl: the median and quartiles of the
  per-round ratio to the baseline's step in the same round; tvm/ref: the per-round ratio of a tvm
  row to the same variant on the reference backend (issue 16's goal: FracTrain routed <= 0.5x);
* peak RSS: the peak resident set (``VmHWM``) of a child process (``sys.executable``) that
  imports TVM, builds only that entry and runs ``--warmup`` + 1 steps (``--no-rss`` skips the
  children). The one-process timing run holds every entry at once, so its own peak says nothing
  per entry; the import-only child's peak is printed in the header;
* saved for backward: the bytes of the distinct storages autograd saves during one forward and
  loss, parameters excluded (``torch.autograd.graph.saved_tensors_hooks``, as ``bench/step.py``);
* sites on tvm: quantized sites whose ``.sites`` backend is ``tvm`` (read after the timed steps, so
  gated sites report their last call), over all quantized sites; the distinct fallback reasons are
  listed under the table.

Variants (``--variants``, all by default; every one `sbm`, per-channel weight ranges for every
GEMM (``weight_scale="channel"``, FracTrain's own) unless named ``gemm``, the library's defaults
otherwise): ``sbm8`` static a/w/g 8/8/8 (which is also PFQ's last stage, 8/8), ``pfq3``,
``pfq4``, ``pfq6`` the other PFQ stages FW/BW 3/6, 4/6, 6/8 (a = w = FW, g = BW) held static,
``pfq4n`` the 4/6 stage with ``recompute="norms"`` (tvm only: backward recomputes BatchNorm inputs
from the codes, the memory-lean setting), ``sbm8g`` and ``fractraing``: ``sbm8`` and ``fractrain``
with ``weight_scale="gemm"`` (the error backprop reads the weight quantized per input channel: an
integer GEMM on tvm), ``sbm8gk`` ``sbm8g`` with ``recompute_budget=1`` (tvm only: backward keeps
the fp32 inputs of the activations after sites, a GELU's, instead of recomputing the site's GEMM;
ReLUs keep their 1-byte masks), ``dfq`` (``pipeline="dfq"``, routed gates,
``DFQ(0.05)``: weights at 8 bits) and ``fractrain``
(the same graph under ``FracTrain(0.045, 0.005)``, as ``fraccompile train --schedule fractrain``
builds it). The gates choose per sample among FracTrain's 5 (a, g) candidates; here a forward hook
on the gate bank's output head adds a large constant to one logit per sample, so the gates pick a
fixed share of the batch for each candidate (a fixed random assignment of samples per region) and
everything else in the gate (features, LSTM, straight-through one-hot, the routed sites, the gate
probe) runs as in training. ``--gate-shares``: ``log`` (default) takes each variant's shares from
its own trained run, ``bench/results/accuracy_cifar10/{dfq,fractrain}/log.jsonl`` (ResNet-20, 600
iterations; the mean over every logged period and region), falling back to 0.3,0.3,0.2,0.1,0.1 when
a log is missing; a comma list or a ``log.jsonl`` path sets both. The same shares serve every
model. Those trained runs never chose the candidates 4/8 and 6/12 (shares 0), so ``log`` runs no
g = 12 site; ``--gate-shares 0.3,0.3,0.2,0.1,0.1`` does.

    python bench/fractrain_step.py [--models resnet20,resnet38,transformer] [--rounds 7]
        [--warmup 2] [--batch N] [--backends reference,tvm] [--variants sbm8,pfq3,...]
        [--gate-shares log|S1,...,S5|PATH] [--no-rss] [--out FILE]

Quick check: ``python bench/fractrain_step.py --models resnet20 --rounds 2 --warmup 1 --batch 16``.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import zlib

import fraccompile.targets.backend  # noqa: F401  isort: skip  (sets TVM's thread count first)

import torch
import torch.nn.functional as F

import fraccompile
from fraccompile.control import DFQ, FracTrain

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = {  # key: (description, default batch)
    "resnet20": ("ResNet-20, 3x32x32", 128),
    "resnet38": ("ResNet-38, 3x32x32", 128),
    "transformer": ("Transformer d512 (2 layers), 64 tokens", 32),
}
# key: (row label, a, w, g, pipeline)
VARIANTS = {
    "sbm8": ("sbm 8/8/8 (= PFQ 8/8)", 8, 8, 8, "default"),
    "pfq3": ("PFQ stage 3/6", 3, 3, 6, "default"),
    "pfq4": ("PFQ stage 4/6", 4, 4, 6, "default"),
    "pfq4n": ("PFQ 4/6, recompute norms", 4, 4, 6, "default"),
    "pfq6": ("PFQ stage 6/8", 6, 6, 8, "default"),
    "dfq": ("DFQ routed", 8, 8, 8, "dfq"),
    "fractrain": ("FracTrain routed", 8, 8, 8, "dfq"),
    "sbm8g": ("sbm 8/8/8, weight_scale gemm", 8, 8, 8, "default"),
    "fractraing": ("FracTrain routed, weight_scale gemm", 8, 8, 8, "dfq"),
    "sbm8gk": ("sbm 8/8/8, gemm, recompute_budget 1", 8, 8, 8, "default"),
}
# variants that are another one with other FracConfig fields (its schedule and gate shares)
BASE = {"sbm8g": "sbm8", "fractraing": "fractrain", "sbm8gk": "sbm8"}
# FracConfig fields a variant sets beyond the defaults; variants that only mean something on the
# integer kernels (``recompute``) have no reference-backend row
OPTIONS = {
    "pfq4n": {"recompute": "norms"},
    "sbm8g": {"weight_scale": "gemm"},
    "fractraing": {"weight_scale": "gemm"},
    "sbm8gk": {"weight_scale": "gemm", "recompute_budget": 1.0},
}
TVM_ONLY = {"pfq4n", "sbm8gk"}
BACKENDS = ("reference", "tvm")
RUN_LOGS = {
    "dfq": "bench/results/accuracy_cifar10/dfq/log.jsonl",
    "fractrain": "bench/results/accuracy_cifar10/fractrain/log.jsonl",
}
FALLBACK_SHARES = (0.3, 0.3, 0.2, 0.1, 0.1)


# -- models and variants ---------------------------------------------------------------------------
def make_case(key: str, batch: int):
    from fraccompile.examples import resnet_cifar, transformer_lm

    torch.manual_seed(0)
    if key in ("resnet20", "resnet38"):
        return (
            getattr(resnet_cifar, key)(),
            torch.randn(batch, 3, 32, 32),
            torch.randint(0, 10, (batch,)),
            F.cross_entropy,
        )
    tokens = torch.randint(0, 65, (batch, 65))
    return (
        transformer_lm.model_d512(),
        tokens[:, :-1],
        tokens[:, 1:],
        lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten()),
    )


def shares_from_log(path: str) -> tuple[list[float], str]:
    """Mean share of each gate candidate over every logged period and region of a trained run."""
    per_period = []
    candidates = None
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("event") != "period" or "gates" not in rec:
                continue
            gates = rec["gates"]
            gates = ast.literal_eval(gates) if isinstance(gates, str) else gates
            rows = list(gates.values())
            per_period.append([sum(r[k] for r in rows) / len(rows) for k in range(len(rows[0]))])
            candidates = rec.get("gate_candidates", candidates)
    if not per_period:
        raise ValueError(f"{path} has no period record with gate shares")
    mean = [sum(p[k] for p in per_period) / len(per_period) for k in range(len(per_period[0]))]
    cand = " ".join(f"{a}/{g}" for a, g in candidates) if candidates else "?"
    return mean, (f"{path}: mean over {len(per_period)} periods and every region (candidates a/g {cand})")


def resolve_shares(spec: str) -> dict[str, tuple[list[float], str]]:
    """Gate shares per routed variant, with where they come from."""
    out = {}
    for v, log in RUN_LOGS.items():
        if spec == "log":
            path = os.path.join(os.path.dirname(HERE), log)
            try:
                out[v] = shares_from_log(path)
            except (OSError, ValueError) as err:
                out[v] = (list(FALLBACK_SHARES), f"default (no usable trained-run log: {err})")
        elif os.path.exists(spec):
            out[v] = shares_from_log(spec)
        else:
            out[v] = ([float(s) for s in spec.split(",")], "--gate-shares")
    for v, (s, _) in out.items():
        if any(x < 0 for x in s) or sum(s) <= 0:
            raise ValueError(f"gate shares {s} of {v}: need non-negative values with a positive sum")
        total = sum(s)
        out[v] = ([x / total for x in s], out[v][1])
    return out


def counts_for(shares: list[float], batch: int) -> list[int]:
    """Samples per candidate: largest-remainder rounding of ``shares * batch``."""
    raw = [s * batch for s in shares]
    counts = [int(r) for r in raw]
    for k in sorted(range(len(raw)), key=lambda k: counts[k] - raw[k])[: batch - sum(counts)]:
        counts[k] += 1
    return counts


def force_gate_shares(fmodel, shares: list[float]) -> None:
    """Make every gate of ``fmodel`` pick candidate k for a fixed ``shares[k]`` of the batch.

    No package change: a forward pre-hook on the gate bank notes the region, a forward hook on its
    output head (``bank.head``, whose arg-max is the gate's choice) adds 1e4 to one logit per
    sample. The samples of each candidate are a fixed random set per region (seeded by the
    region's name)."""
    bank = fmodel.frac_gates
    if len(shares) != len(bank.a):
        raise ValueError(f"{len(shares)} gate shares for {len(bank.a)} candidates")
    current = {}
    bias: dict[tuple[str, int], torch.Tensor] = {}

    def note_region(module, args):
        current["region"] = args[0]

    def steer(module, args, logits):
        key = (current["region"], logits.shape[0])
        if key not in bias:
            counts = counts_for(shares, logits.shape[0])
            choice = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
            gen = torch.Generator().manual_seed(zlib.crc32(key[0].encode()))
            choice = choice[torch.randperm(len(choice), generator=gen)]
            bias[key] = 1e4 * F.one_hot(choice, len(counts)).to(logits.dtype)
        return logits + bias[key]

    bank.register_forward_pre_hook(note_region)
    bank.head.register_forward_hook(steer)


def check_shares(fmodel, shares: list[float]) -> str:
    """'' when the latest forward's gate choices have exactly the forced counts, else what they
    were."""
    bank = fmodel.frac_gates
    bad = []
    for region, out in bank.last.items():
        got = torch.bincount(out.choice, minlength=len(bank.a)).tolist()
        if got != counts_for(shares, out.choice.shape[0]):
            bad.append(f"{region} {got}")
    return "gate choices not as forced: " + ", ".join(bad) if bad else ""


def build(model_key: str, entry: str, base, x, shares: dict):
    """(model, input, schedule or None) of an entry: ``fp32``, ``fp32-cl`` or
    ``VARIANT/BACKEND``."""
    if entry == "fp32":
        return copy.deepcopy(base), x, None
    if entry == "fp32-cl":
        return (
            copy.deepcopy(base).to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
            None,
        )
    variant, backend = entry.split("/")
    _, a, w, g, pipeline = VARIANTS[variant]
    cfg = fraccompile.FracConfig(
        a=a,
        w=w,
        g=g,
        scheme="sbm",
        backend=backend,
        pipeline=pipeline,
        gate_mode="routed",
        **{"weight_scale": "channel", **OPTIONS.get(variant, {})},
    )
    fmodel = fraccompile.compile(copy.deepcopy(base), x, config=cfg)
    schedule, base_variant = None, BASE.get(variant, variant)
    if base_variant == "dfq":
        schedule = DFQ(0.05)  # bench/accuracy_cifar10.py's DFQ run: --cp 5
    elif base_variant == "fractrain":
        schedule = FracTrain(0.045, 0.005)  # its FracTrain run: --cp 4.5 --cp-step 0.5
    if schedule is not None:
        fmodel.use_schedule(schedule)
        force_gate_shares(fmodel, shares[base_variant][0])
    return fmodel, x, schedule


class Runner:
    """One entry's model, optimizer and training step."""

    def __init__(self, model, x, y, loss_fn, schedule):
        self.model, self.x, self.y, self.loss_fn, self.schedule = model, x, y, loss_fn, schedule
        self.model.train()
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def loss(self):
        loss = self.loss_fn(self.model(self.x), self.y)
        if self.schedule is not None and hasattr(self.schedule, "regularizer"):
            loss = loss + self.schedule.regularizer(self.model)
        return loss

    def step(self) -> float:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        self.loss().backward()
        self.opt.step()
        return time.perf_counter() - t0

    def saved_bytes(self) -> int:
        """Bytes of the distinct storages autograd saves in one forward + loss, parameters
        excluded (the gates' parameters too)."""
        from _common import saved_bytes

        total = saved_bytes(self.loss, self.model.parameters())
        self.opt.zero_grad(set_to_none=True)
        return total


def provenance() -> str:
    """Where the measured fraccompile comes from: its directory, commit and uncommitted files."""
    pkg = os.path.dirname(os.path.abspath(fraccompile.__file__))
    root = os.path.dirname(pkg)
    try:
        git = ["git", "--no-optional-locks", "-C", root]
        head = subprocess.run(
            git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            git + ["status", "--porcelain", "--", "fraccompile"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return f"fraccompile from {pkg} (not a git checkout)"
    return f"fraccompile from {pkg}, commit {head}" + (
        f", {len(dirty)} uncommitted file(s) under fraccompile/" if dirty else ", clean"
    )


def error_text(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".splitlines()[0]
    return text if len(text) <= 160 else text[:157] + "..."


def peak_rss_mb() -> float:
    """This process's peak RSS: ``VmHWM`` of /proc/self/status. Not ``ru_maxrss``: Linux carries
    that over ``execve`` from the forking process, so a child of this (large) parent would report
    the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# -- the child: peak RSS of one entry --------------------------------------------------------------
def child(model_key: str, entry: str, batch: int, warmup: int, shares: dict) -> dict:
    if model_key == "-":
        from fraccompile.examples import resnet_cifar, transformer_lm  # noqa: F401

        return {"rss_mb": peak_rss_mb()}
    base, x, y, loss_fn = make_case(model_key, batch)
    model, xx, schedule = build(model_key, entry, base, x, shares)
    del base
    runner = Runner(model, xx, y, loss_fn, schedule)
    for _ in range(warmup + 1):
        runner.step()
    return {"rss_mb": peak_rss_mb()}


def run_child(args, model_key: str, entry: str, batch: int) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        model_key,
        entry,
        "--batch",
        str(batch),
        "--warmup",
        str(args.warmup),
        "--gate-shares",
        args.gate_shares,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {"error": f"child exited with {proc.returncode}: {last[:120]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the parent ------------------------------------------------------------------------------------
class Tee:
    def __init__(self, path: str | None):
        self.stdout, self.file = sys.stdout, open(path, "w") if path else None

    def write(self, text: str) -> None:
        self.stdout.write(text)
        if self.file:
            self.file.write(text)
            self.file.flush()

    def flush(self) -> None:
        self.stdout.flush()


def quartiles(values: list[float]) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) < 2:
        return f"{med:.2f}x"
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return f"{med:.2f}x ({q1:.2f}-{q3:.2f})"


def bench_model(args, model_key: str, shares: dict, variants: list[str], backends: list[str]):
    desc, default_batch = MODELS[model_key]
    batch = args.batch or default_batch
    base, x, y, loss_fn = make_case(model_key, batch)
    baselines = ["fp32"] + (["fp32-cl"] if x.dim() == 4 else [])
    entries = baselines + [f"{v}/{b}" for v in variants for b in backends if b == "tvm" or v not in TVM_ONLY]
    runners: dict[str, Runner] = {}
    errors: dict[str, str] = {}
    build_s: dict[str, float] = {}
    for entry in entries:
        t0 = time.perf_counter()
        try:
            model, xx, schedule = build(model_key, entry, base, x, shares)
            runners[entry] = Runner(model, xx, y, loss_fn, schedule)
        except Exception as err:  # a variant that cannot be built on a backend: its row says why
            errors[entry] = f"compile failed: {error_text(err)}"
        build_s[entry] = time.perf_counter() - t0

    times: dict[str, dict[int, float]] = {e: {} for e in entries}
    warm: dict[str, list[float]] = {e: [] for e in entries}
    order = [e for e in entries if e in runners]
    for r in range(args.warmup + args.rounds):
        print(
            f"[{model_key}] round {r + 1}/{args.warmup + args.rounds}"
            + (" (warm-up)" if r < args.warmup else ""),
            file=sys.stderr,
            flush=True,
        )
        shift = r % len(order) if order else 0
        for entry in order[shift:] + order[:shift]:
            if entry in errors:
                continue
            try:
                t = runners[entry].step()
            except Exception as err:
                errors[entry] = f"step failed (round {r + 1}): {error_text(err)}"
                runners.pop(entry).model = None
                continue
            if r < args.warmup:
                warm[entry].append(t)
            else:
                times[entry][r] = t

    info: dict[str, dict] = {}
    for entry, runner in runners.items():
        i = info[entry] = {}
        try:
            i["saved"] = runner.saved_bytes()
        except Exception as err:
            i["saved_error"] = error_text(err)
        model = runner.model
        if hasattr(model, "frac_gates") and model.frac_gates is not None:
            variant = entry.split("/")[0]
            i["gate_check"] = check_shares(model, shares[BASE.get(variant, variant)][0])
        if hasattr(model, "sites"):
            quantized = [s for s in model.sites if not s.full_precision]
            i["sites"] = (sum(s.backend == "tvm" for s in quantized), len(quantized))
            i["reasons"] = sorted({s.fallback_reason for s in quantized if s.fallback_reason})
    runners.clear()
    del base

    rss = {}
    if not args.no_rss:
        for entry in entries:
            print(f"[{model_key}] peak RSS of {entry}", file=sys.stderr, flush=True)
            rss[entry] = run_child(args, model_key, entry, batch) if entry not in errors else {"error": "-"}

    # the table
    print(f"## {desc}, batch {batch}")
    print()
    print(
        f"{args.rounds} timed rounds after {args.warmup} warm-up rounds; each round runs one "
        "step of every row in turn (same weights at the start, same batch)"
    )
    reason_keys: dict[str, int] = {}
    rows = []
    for entry in entries:
        variant, _, backend = entry.partition("/")
        label = VARIANTS[variant][0] if variant in VARIANTS else variant
        ts = times[entry]
        i = info.get(entry, {})
        note = errors.get(entry, "")
        if i.get("gate_check"):
            note = (note + "; " if note else "") + i["gate_check"]
        if i.get("saved_error"):
            note = (note + "; " if note else "") + f"saved bytes: {i['saved_error']}"
        if not ts:
            rows.append(
                [
                    label,
                    backend or "torch",
                    "-",
                    "-",
                    "-",
                    "-",
                    _rss_cell(rss.get(entry)),
                    "-",
                    "-",
                    "-",
                    note or "no timed step",
                ]
            )
            continue

        def ratio(other: str, ts=ts) -> str:
            o = times.get(other, {})
            return quartiles([ts[r] / o[r] for r in ts if r in o])

        saved = i.get("saved")
        fp_saved = info.get("fp32", {}).get("saved")
        sites = "-"
        if "sites" in i:
            n_tvm, n_q = i["sites"]
            keys = []
            for reason in i["reasons"]:
                keys.append(str(reason_keys.setdefault(reason, len(reason_keys) + 1)))
            sites = f"{n_tvm}/{n_q}" + (f" [{','.join(keys)}]" if keys else "")
        rows.append(
            [
                label,
                backend or "torch",
                f"{statistics.median(ts.values()) * 1e3:.1f}",
                "1" if entry == "fp32" else ratio("fp32"),
                "1" if entry == "fp32-cl" else ratio("fp32-cl") if "fp32-cl" in times else "-",
                ratio(f"{variant}/reference")
                if backend == "tvm" and f"{variant}/reference" in times
                else "-",
                _rss_cell(rss.get(entry)),
                f"{saved / 2**20:.1f}" if saved is not None else "-",
                f"{saved / fp_saved:.2f}x" if saved is not None and fp_saved else "-",
                sites,
                note,
            ]
        )
    from _common import print_table

    print_table(
        [
            "variant",
            "backend",
            "step ms",
            "vs fp32: median (q1-q3)",
            "vs fp32-cl: median (q1-q3)",
            "tvm/ref",
            "peak RSS MB",
            "saved MB",
            "saved vs fp32",
            "sites on tvm",
            "note",
        ],
        rows,
    )
    print()
    if reason_keys:
        print("fallback reasons (quantized sites not on tvm; [n] in the table):")
        for reason, k in reason_keys.items():
            print(f"  [{k}] {reason}")
    slow = [
        f"{e} {' '.join(f'{t * 1e3:.0f}' for t in warm[e])} ms (built in {build_s[e]:.1f} s)"
        for e in entries
        if warm[e]
    ]
    if slow:
        print("warm-up steps: " + "; ".join(slow))
    if not args.no_rss:
        print(
            "peak RSS: each row in its own child process (imports with TVM, builds that row "
            f"only, {args.warmup} + 1 steps)"
        )
    print()


def _rss_cell(r: dict | None) -> str:
    if r is None:
        return "-"
    if "rss_mb" in r:
        return f"{r['rss_mb']:.0f}"
    return "-" if r.get("error") == "-" else "failed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}"
    )
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (median over them)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up rounds before them")
    parser.add_argument(
        "--batch",
        type=int,
        default=0,
        help="batch size of every model (default: 128 convnets, 32 Transformer)",
    )
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help="comma-separated subset of reference, tvm"
    )
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}"
    )
    parser.add_argument(
        "--gate-shares",
        default="log",
        help="DFQ/FracTrain share of each gate candidate: 'log' (each from its "
        "trained run under bench/results/accuracy_cifar10), a comma list, "
        "or a log.jsonl path",
    )
    parser.add_argument(
        "--no-rss", action="store_true", help="skip the per-row child processes that measure peak RSS"
    )
    parser.add_argument("--out", help="also write the output to this file")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "ENTRY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        shares = resolve_shares(args.gate_shares)
    except (OSError, ValueError) as err:
        parser.error(f"--gate-shares {args.gate_shares!r}: {err}")
    if args.child:
        print(json.dumps(child(*args.child, args.batch, args.warmup, shares)))
        return
    if args.rounds < 1 or args.warmup < 0 or args.batch < 0:
        parser.error("--rounds must be at least 1, --warmup and --batch not negative")

    def subset(option: str, text: str, allowed) -> list[str]:
        items = [k.strip() for k in text.split(",") if k.strip()]
        for k in items:
            if k not in allowed:
                parser.error(f"{option}: unknown {k!r}; choose from {', '.join(allowed)}")
        return items

    models = subset("--models", args.models, MODELS)
    backends = subset("--backends", args.backends, BACKENDS)
    variants = subset("--variants", args.variants, VARIANTS)

    sys.path.insert(0, HERE)
    from _common import header

    sys.stdout = Tee(args.out)
    header(
        "FracTrain's configurations, training step: fp32 vs sbm static, PFQ stages, DFQ and "
        "FracTrain routed (reference and tvm backends, interleaved in one process)"
    )
    try:
        import tvm

        tvm_version = tvm.__version__
    except Exception as err:  # the tvm rows then fall back, each site saying why
        tvm_version = f"not importable ({error_text(err)})"
    print(f"tvm {tvm_version}; {provenance()}")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(
        "every variant: scheme sbm, per-channel weight ranges, @first_conv/@last_linear in fp32, "
        "the library's defaults otherwise; a step includes DFQ/FracTrain's cost regularizer"
    )
    if any(BASE.get(v, v) in RUN_LOGS for v in variants):
        for v in RUN_LOGS:
            if any(BASE.get(u, u) == v for u in variants):
                s, source = shares[v]
                print(
                    f"gate shares of {VARIANTS[v][0]} over the 5 candidates (a/g 3/6 4/6 4/8 "
                    f"6/8 6/12): {', '.join(f'{x:.3f}' for x in s)}; from {source}"
                )
        print(
            "(forced: every gate picks these shares of every batch, a fixed random set of samples per region)"
        )
    if not args.no_rss:
        base = run_child(args, "-", "-", 1)
        if "rss_mb" in base:
            print(
                f"peak RSS of a child that only imports torch, TVM and fraccompile: {base['rss_mb']:.0f} MB"
            )
    print()
    for key in models:
        bench_model(args, key, shares, variants, backends)
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
