"""Validated, versioned, serializable configuration.

``FracConfig`` is the one typed object that says how a model is compiled. Every field is checked in
``__post_init__``; a bad value raises :class:`~fraccompile.errors.ConfigError` naming the field and the
allowed values. It round-trips losslessly through ``to_dict``/``from_dict`` and TOML.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .ops.quantizers import DEFAULT_WEIGHT_SCALE, ROUNDING_NOISES, WEIGHT_SCALES  # (ops owns them)

CONFIG_VERSION = 1
SCHEMES = ("sbm", "symmetric")
RECOMPUTE_LEVELS = ("none", "activations", "norms")  # passes/epilogue_fusion.py
BACKENDS = ("reference", "tvm", "auto")  # the built-in ones; others register (ops.backend)
CAPTURE_METHODS = ("auto", "fx", "export")
OP_KINDS = ("conv", "linear", "matmul")
MIN_BITS, MAX_BITS = 2, 16
# Selectors understood in ``full_precision`` besides fnmatch patterns of site names.
FIRST_CONV, LAST_LINEAR = "@first_conv", "@last_linear"


def check_bits(field_name: str, value: Any) -> int:
    """Return ``value`` as a precision, or raise: 0 means full precision, else MIN_BITS..MAX_BITS."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"{field_name} = {value!r} must be an integer precision in bits "
            f"(0 = full precision, or {MIN_BITS}..{MAX_BITS})"
        )
    if value != 0 and not MIN_BITS <= value <= MAX_BITS:
        raise ConfigError(
            f"{field_name} = {value} is out of range: allowed 0 (full precision) or {MIN_BITS}..{MAX_BITS}"
        )
    return value


def _check_choice(field_name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{field_name} = {value!r} is not allowed: choose one of {', '.join(allowed)}")


def _check_str_tuple(field_name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{field_name} = {value!r} must be a list of strings")
    return tuple(value)


@dataclass(frozen=True)
class FracConfig:
    """How to compile a model for FracTrain-style quantized training.

    Attributes:
        a, w, g: initial precisions (bits) of input activations, weights and output gradients of
            every site; 0 keeps that tensor in full precision. The controller changes them later.
        scheme: ``"sbm"`` (FracTrain's asymmetric min/max quantizer) or ``"symmetric"`` (zero point
            0, maps onto int8 kernels).
        weight_scale: ``"gemm"`` (the default: each GEMM quantizes the weight along its own
            non-reduction axis, per output channel in the forward and again per input channel for
            the error backprop, torchao's INT8 mixed-precision training recipe), ``"channel"``
            (one range per output channel for every GEMM, FracTrain's own) or ``"tensor"`` (one
            range per weight tensor). With ``"gemm"`` or ``"tensor"`` the error backprop on the
            ``tvm`` backend is an integer GEMM too; with ``"channel"`` the ranges sit on its
            reduction axis, so it runs in fp32 (docs/contract.md). On the 30-epoch CIFAR-10
            protocol ``"gemm"`` trained as ``"channel"`` does, within two seeds' spread, for SBM
            and for FracTrain (docs/benchmarks.md).
        rounding_noise: where stochastic rounding of gradients draws its uniform noise:
            ``"counter"`` (the default: a counter-based hash of each element's index, seeded from
            torch's generator; the ``tvm`` backend computes it inside its quantize kernel instead
            of drawing and reading a tensor, and the numbers do not depend on memory layout or
            device) or ``"torch"`` (``torch.rand``, as in docs/benchmarks.md's accuracy runs).
            Both are seeded by ``torch.manual_seed`` and give the same numbers on every backend.
        full_precision: sites kept as the original op: fnmatch patterns of site names, plus the
            selectors ``@first_conv`` and ``@last_linear`` (the paper keeps both in fp32).
        ops: which op kinds become sites (``conv``, ``linear``, ``matmul``).
        backend: ``"reference"`` (torch on fake-quantized values), ``"tvm"`` (integer TVM kernels
            for the sites that can run them — either scheme, ``a``/``w`` of 1..8 bits, ``g`` of
            1..16, DFQ-routed sites; the others run on the reference backend with the reason in
            ``.sites``) or ``"auto"`` (the default: ``tvm`` where TVM imports and builds for this
            host, else ``reference``). docs/backends.md has what runs where, and the one visible
            difference: on ``tvm`` the fp32 convs run channels-last
            (:attr:`FracModel.fp32_memory_format`).
        capture: ``"auto"`` (torch.fx, then torch.export), ``"fx"`` or ``"export"``.
        leaf_modules: module class names or module paths that tracing keeps opaque.
        pipeline: name of the pass pipeline (see ``fraccompile.passes.PIPELINES``).
        act_momentum: EMA momentum of the running activation range used in eval mode
            (torch BatchNorm convention: ``new = (1 - m) * old + m * batch``).
        gate_a, gate_g: DFQ candidate (activation, gradient) precision pairs (pipeline ``dfq``;
            FracTrain's CIFAR default a in 3,4,4,6,6 with g in 6,6,8,8,12).
        gate_mode: ``"routed"`` (each sample runs at its chosen precision only) or ``"dense"``
            (every candidate computed and masked, as FracTrain's public code does).
        gate_hidden: width of the gates' feature extractors and shared LSTM.
        kernels: directory written by ``fraccompile export`` (backend ``tvm``): every kernel comes
            from its library and nothing is built; a library that does not match the model or
            this machine is refused with the reason ("" = build kernels on first use).
        tuning_db: directory of a ``fraccompile tune`` database (backend ``tvm``): kernels built
            on first use take the tiles it chose ("" = default tiles).
        recompute: (backend ``tvm``) what backward recomputes from a site's int8 codes instead of
            autograd keeping fp32 tensors; values and gradients are unchanged. ``"none"``: nothing
            (the graph is the reference's). ``"activations"`` (default): a GELU/ReLU/SiLU right
            after a site becomes the site's epilogue (one more forward GEMM per such site in
            backward), and the other ReLUs save a 1-byte mask instead of their output (free).
            ``"norms"``: also a BatchNorm right after a site (and the activation after it): one
            more forward GEMM and BatchNorm per such site.
        recompute_budget: with ``recompute="activations"`` or ``"norms"``, the fraction (0..1)
            of what backward would keep for those activations and BatchNorms unfused (fp32
            inputs, a ReLU's 1-byte mask) that it may still keep instead of recomputing: the
            sites whose recompute costs the most per byte kept (the longest GEMM reductions) stay
            unfused first, while they fit. 0 (default) recomputes every one; 1 none (with
            ``"activations"``, the graph of ``"none"`` but for the ReLUs' masks).
        kernels_fallback: with ``kernels``, build what the library lacks or cannot serve (with a
            warning) instead of refusing.
        cuda_graphs: capture the compiled model's forward and backward on CUDA tensors in CUDA
            graphs (``torch.cuda.make_graphed_callables``) and replay them at every training step
            with the same input shapes and precisions; a precision or shape change captures again
            (:mod:`fraccompile.cuda_graphs`, docs/cuda.md). Forward passes in eval mode or without
            autograd run as usual; a training step on CPU tensors is refused. Not with pipeline
            ``dfq`` (the gates decide per sample, from the data, outside the graph).
    """

    a: int = 8
    w: int = 8
    g: int = 8
    scheme: str = "sbm"
    weight_scale: str = DEFAULT_WEIGHT_SCALE
    rounding_noise: str = "counter"
    full_precision: tuple[str, ...] = (FIRST_CONV, LAST_LINEAR)
    ops: tuple[str, ...] = OP_KINDS
    backend: str = "auto"
    capture: str = "auto"
    leaf_modules: tuple[str, ...] = ()
    pipeline: str = "default"
    act_momentum: float = 0.1
    gate_a: tuple[int, ...] = (3, 4, 4, 6, 6)
    gate_g: tuple[int, ...] = (6, 6, 8, 8, 12)
    gate_mode: str = "routed"
    gate_hidden: int = 32
    kernels: str = ""
    tuning_db: str = ""
    kernels_fallback: bool = False
    recompute: str = "activations"
    recompute_budget: float = 0.0
    cuda_graphs: bool = False
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        for name in ("a", "w", "g"):
            check_bits(f"FracConfig.{name}", getattr(self, name))
        _check_choice("FracConfig.scheme", self.scheme, SCHEMES)
        _check_choice("FracConfig.weight_scale", self.weight_scale, WEIGHT_SCALES)
        _check_choice("FracConfig.rounding_noise", self.rounding_noise, ROUNDING_NOISES)
        from .ops.backend import backend_names  # (registered backends; imported at call time)

        _check_choice("FracConfig.backend", self.backend, backend_names())
        _check_choice("FracConfig.capture", self.capture, CAPTURE_METHODS)
        object.__setattr__(
            self, "full_precision", _check_str_tuple("FracConfig.full_precision", self.full_precision)
        )
        object.__setattr__(
            self, "leaf_modules", _check_str_tuple("FracConfig.leaf_modules", self.leaf_modules)
        )
        ops = _check_str_tuple("FracConfig.ops", self.ops)
        for op in ops:
            _check_choice("FracConfig.ops entry", op, OP_KINDS)
        object.__setattr__(self, "ops", ops)
        if not isinstance(self.pipeline, str) or not self.pipeline:
            raise ConfigError(f"FracConfig.pipeline = {self.pipeline!r} must be a pipeline name")
        if (
            isinstance(self.act_momentum, bool)
            or not isinstance(self.act_momentum, (int, float))
            or not 0.0 < self.act_momentum <= 1.0
        ):
            raise ConfigError(
                f"FracConfig.act_momentum = {self.act_momentum!r} is out of range: "
                "allowed 0 < act_momentum <= 1"
            )
        gate_a = tuple(check_bits("FracConfig.gate_a entry", b) for b in self.gate_a)
        gate_g = tuple(check_bits("FracConfig.gate_g entry", b) for b in self.gate_g)
        if len(gate_a) != len(gate_g) or not gate_a or 0 in gate_a + gate_g:
            raise ConfigError(
                f"FracConfig.gate_a {list(gate_a)} and gate_g {list(gate_g)} must "
                "pair up one to one, with quantized (non-zero) precisions"
            )
        object.__setattr__(self, "gate_a", gate_a)
        object.__setattr__(self, "gate_g", gate_g)
        _check_choice("FracConfig.gate_mode", self.gate_mode, ("dense", "routed"))
        if (
            isinstance(self.gate_hidden, bool)
            or not isinstance(self.gate_hidden, int)
            or not 1 <= self.gate_hidden <= 4096
        ):
            raise ConfigError(
                f"FracConfig.gate_hidden = {self.gate_hidden!r} is out of range: allowed 1..4096"
            )
        for name in ("kernels", "tuning_db"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ConfigError(f"FracConfig.{name} = {value!r} must be a directory path")
            if value and self.backend not in ("tvm", "auto"):
                raise ConfigError(
                    f"FracConfig.{name} = {value!r} needs backend='tvm' or 'auto' "
                    f"(backend is {self.backend!r})"
                )
        _check_choice("FracConfig.recompute", self.recompute, RECOMPUTE_LEVELS)
        budget = self.recompute_budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 <= budget <= 1.0:
            raise ConfigError(
                f"FracConfig.recompute_budget = {budget!r} is out of range: "
                "allowed 0 <= recompute_budget <= 1"
            )
        if budget and self.recompute == "none":
            raise ConfigError(
                f"FracConfig.recompute_budget = {budget!r} needs recompute='activations' or "
                "'norms' (recompute is 'none': nothing is recomputed)"
            )
        object.__setattr__(self, "recompute_budget", float(budget))
        if not isinstance(self.kernels_fallback, bool):
            raise ConfigError(
                f"FracConfig.kernels_fallback = {self.kernels_fallback!r} must be true or false"
            )
        if not isinstance(self.cuda_graphs, bool):
            raise ConfigError(f"FracConfig.cuda_graphs = {self.cuda_graphs!r} must be true or false")
        if self.cuda_graphs and self.pipeline == "dfq":
            raise ConfigError(
                "FracConfig.cuda_graphs = True cannot be used with pipeline='dfq': the DFQ gates "
                "choose each sample's precision from the data (routed sites group the batch by "
                "precision, a data-dependent shape) and their decisions feed the cost regularizer "
                "and the cost accounting outside the forward, which a replayed CUDA graph cannot "
                "follow; use cuda_graphs=False with DFQ/FracTrain"
            )
        if self.version != CONFIG_VERSION:
            raise ConfigError(
                f"FracConfig.version = {self.version!r} is not supported: "
                f"this fraccompile reads version {CONFIG_VERSION}"
            )

    @property
    def backend_options(self) -> dict[str, Any]:
        """The options :func:`fraccompile.ops.get_backend` takes for this config's backend."""
        if self.backend not in ("tvm", "auto"):
            return {}
        opts = {"kernels": self.kernels, "tuning_db": self.tuning_db}
        opts = {k: v for k, v in opts.items() if v}
        if self.kernels and self.kernels_fallback:
            opts["kernels_fallback"] = True
        return opts

    def replace(self, **changes: Any) -> FracConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    # -- serialization ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FracConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a FracConfig must be a table/dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown FracConfig field(s) {', '.join(unknown)}: "
                f"valid fields are {', '.join(sorted(known))}"
            )
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        if "version" in kwargs and "rounding_noise" not in kwargs:
            # written by to_dict before the field existed, when the noise was always torch.rand:
            # keep it (a resumed run draws the same numbers); hand-written tables take the default
            kwargs["rounding_noise"] = "torch"
        return cls(**kwargs)

    def to_toml(self) -> str:
        lines = ["[fraccompile]"]
        for key, value in self.to_dict().items():
            lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, text: str) -> FracConfig:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config is not valid TOML: {err}") from None
        # Accept both a bare table and one under [fraccompile].
        return cls.from_dict(data.get("fraccompile", data))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_toml())

    @classmethod
    def load(cls, path: str | Path) -> FracConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return cls.from_toml(path.read_text())


def _toml_char(c: str) -> str:
    """One character of a TOML basic string: quote, backslash and control characters escaped."""
    if c in '"\\':
        return "\\" + c
    if ord(c) < 0x20 or ord(c) == 0x7F:
        return f"\\u{ord(c):04X}"
    return c


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(_toml_char(c) for c in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
