"""What a site computes: its op and hyper-parameters, and its precisions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
# The exact full-precision op of each op name (precision 0 must be bit-identical to the original).
FP_OPS = {
    "conv1d": F.conv1d,
    "conv2d": F.conv2d,
    "conv3d": F.conv3d,
    "linear": F.linear,
    "matmul": torch.matmul,
    "bmm": torch.bmm,
    "mm": torch.mm,
}


class Precision(NamedTuple):
    """Bits of a site's input activation ``a``, weight (or second operand) ``w`` and output gradient
    ``g``; 0 keeps that tensor in full precision."""

    a: int = 0
    w: int = 0
    g: int = 0

    @property
    def is_full(self) -> bool:
        return not (self.a or self.w or self.g)

    def __str__(self) -> str:
        return "/".join(str(b) if b else "fp" for b in self)


def _tuple(value, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class SiteSpec:
    """A quantizable op: ``kind`` is ``conv``, ``linear`` or ``matmul``; ``op_name`` the exact op
    (``conv2d``, ``linear``, ``matmul``, ``bmm``, ...). Conv fields follow ``F.conv{n}d``.

    ``pre_pad``/``padding_mode`` describe padding applied before the GEMM as ``F.pad`` does: a conv
    module with ``padding_mode != "zeros"``, or ``padding="same"`` with uneven sides.
    """

    kind: str
    op_name: str
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    padding_mode: str = "zeros"
    pre_pad: tuple[int, ...] = ()

    @property
    def conv_dims(self) -> int:
        return int(self.op_name[-2]) if self.kind == "conv" else 0

    @classmethod
    def conv(
        cls, n: int, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros", pre_pad=()
    ) -> SiteSpec:
        pad = padding if isinstance(padding, str) else _tuple(padding, n)
        return cls(
            "conv",
            f"conv{n}d",
            _tuple(stride, n),
            pad,
            _tuple(dilation, n),
            int(groups),
            padding_mode,
            tuple(pre_pad),
        )

    # -- the original op, bit for bit ---------------------------------------------------------------
    def fp_forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        fn = FP_OPS[self.op_name]
        if self.kind == "conv":
            if self.pre_pad:
                x = F.pad(
                    x, self.pre_pad, mode=self.padding_mode if self.padding_mode != "zeros" else "constant"
                )
            return fn(x, w, b, self.stride, self.padding, self.dilation, self.groups)
        if self.kind == "linear":
            return fn(x, w, b)
        return fn(x, w)

    # -- the GEMM form used by quantized backends ----------------------------------------------------
    def gemm_padding(self, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Numeric symmetric padding of the GEMM (a string padding resolved)."""
        n = self.conv_dims
        if self.padding == "valid":
            return (0,) * n
        if self.padding == "same":
            totals = [d * (k - 1) for d, k in zip(self.dilation, weight_shape[2:])]
            return tuple(t // 2 for t in totals)
        return tuple(self.padding)

    def same_extra_pad(self, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        """``padding='same'`` with an odd total pads one more on the right/bottom, as torch does."""
        if self.padding != "same":
            return ()
        totals = [d * (k - 1) for d, k in zip(self.dilation, weight_shape[2:])]
        if all(t % 2 == 0 for t in totals):
            return ()
        pads: list[int] = []
        for t in reversed(totals):  # F.pad order: last dim first
            pads += [0, t % 2]
        return tuple(pads)

    def describe(self) -> str:
        if self.kind != "conv":
            return self.op_name
        k = f"{self.op_name} s={','.join(map(str, self.stride))}"
        if self.groups != 1:
            k += f" g={self.groups}"
        return k


def addmm_linear(x: torch.Tensor, w_t: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.addmm(b, x, W)`` given ``w_t = W.t()``: the op of an ``addmm`` site, which is a
    linear layer of weight ``Wᵀ`` (``w_t.t()`` is ``W`` itself, same strides: bit-identical)."""
    return torch.addmm(b, x, w_t.t())


FP_OPS["addmm"] = addmm_linear
