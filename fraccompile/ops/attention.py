"""Composite sites: ops whose GEMMs are matmul sites but which are not one GEMM themselves.

Each module here wraps one original op of the graph and holds its GEMMs as :class:`FracOp` children
(``spec.kind == "matmul"``, or ``"linear"`` for a weight), each a site of its own with its own
precision-control node. When every child's precision is 0 the module calls the original op,
unchanged, so the result is bit-identical (values and gradients); otherwise it runs the op's
decomposition with the GEMMs quantized:

* :class:`AttentionSite` — ``F.scaled_dot_product_attention``: ``qk = q·kᵀ`` (site ``….qk``),
  scale, causal / boolean / additive mask, softmax, dropout, ``av = p·v`` (site ``….av``). The
  decomposition materializes the ``(…, L, S)`` score matrix that the fused op does not
  (``bench/attention_memory.py`` measures what that costs).
* :class:`BaddbmmSite` — ``baddbmm(input, b1, b2, beta, alpha)`` as ``beta·input + alpha·(b1@b2)``.
* :class:`EinsumSite` — a two-operand ``einsum`` that is one batched GEMM (no index summed within
  one operand, no repeated index), as permute/reshape → matmul → reshape/permute.
* :class:`MultiheadAttentionSite` — ``nn.MultiheadAttention`` (packed or separate projection
  weights): the input projections and the output projection as linear sites, the attention as an
  :class:`AttentionSite`.

A composite never fuses an epilogue (the epilogue-fusion pass only fuses into a ``FracOp`` node).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .spec import Precision


def is_full(prec) -> bool:
    """Whether a precision-node value keeps everything in full precision (a DFQ gate's decision,
    which is not a tuple, never does)."""
    return isinstance(prec, tuple) and Precision(*prec).is_full


def sdpa_reference(
    qk: nn.Module,
    av: nn.Module,
    q,
    k,
    v,
    attn_mask,
    dropout_p,
    is_causal,
    scale,
    enable_gqa,
    prec_qk,
    prec_av,
    training_dropout: bool = True,
):
    """``F.scaled_dot_product_attention``'s math (its documented reference implementation) with
    the two GEMMs run by ``qk(q, kᵀ, prec_qk)`` and ``av(p, v, prec_av)``."""
    L, S = q.size(-2), k.size(-2)
    factor = 1 / math.sqrt(q.size(-1)) if scale is None else scale
    if enable_gqa and q.dim() >= 3 and k.size(-3) != q.size(-3):
        k = k.repeat_interleave(q.size(-3) // k.size(-3), -3)
        v = v.repeat_interleave(q.size(-3) // v.size(-3), -3)
    s = qk(q, k.transpose(-2, -1), prec_qk) * factor  # a fresh tensor: masked in place
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        s.masked_fill_(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask
    p = torch.softmax(s, dim=-1)
    if dropout_p and training_dropout:
        p = F.dropout(p, dropout_p, training=True)
    return av(p, v, prec_av)


class AttentionSite(nn.Module):
    """``F.scaled_dot_product_attention`` with its two GEMMs as the matmul sites ``qk`` and
    ``av``. ``forward(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, prec_qk,
    prec_av)``; ``dropout_p`` applies as in the fused op, whatever the module's mode (callers pass
    ``p if self.training else 0``)."""

    def __init__(self, qk: nn.Module, av: nn.Module):
        super().__init__()
        self.qk, self.av = qk, av

    def forward(self, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, prec_qk, prec_av):
        if is_full(prec_qk) and is_full(prec_av):
            kwargs = {"enable_gqa": True} if enable_gqa else {}
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs
            )
        return sdpa_reference(
            self.qk, self.av, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, prec_qk, prec_av
        )


class BaddbmmSite(nn.Module):
    """``torch.baddbmm(input, b1, b2, beta=, alpha=)`` with ``b1 @ b2`` as the matmul site
    ``mm``."""

    def __init__(self, mm: nn.Module):
        super().__init__()
        self.mm = mm

    def forward(self, inp, b1, b2, beta, alpha, prec):
        if is_full(prec):
            return torch.baddbmm(inp, b1, b2, beta=beta, alpha=alpha)
        y = self.mm(b1, b2, prec)
        if alpha != 1:
            y = y * alpha
        if beta == 0:  # as baddbmm: input is ignored (its NaNs too)
            return y
        return y + (inp if beta == 1 else inp * beta)


def einsum_plan(equation: str, a_dims: int, b_dims: int) -> dict | None:
    """How a two-operand ``einsum`` is one batched GEMM, or None when it is not: the permutations
    of the operands into ``(batch…, m…, k…)`` and ``(batch…, k…, n…)`` and of the product back into
    the output's order."""
    eq = equation.replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    ins, out = eq.split("->")
    parts = ins.split(",")
    if len(parts) != 2:
        return None
    a, b = parts
    if len(a) != a_dims or len(b) != b_dims or any(len(set(s)) != len(s) for s in (a, b, out)):
        return None
    if any(c not in a and c not in b for c in out):
        return None
    batch = [c for c in a if c in b and c in out]
    contract = [c for c in a if c in b and c not in out]
    m = [c for c in a if c not in b]
    n = [c for c in b if c not in a]
    if any(c not in out for c in m + n) or not contract:
        return None  # an index summed within one operand, or an outer product: not one GEMM
    prod = batch + m + n
    return {
        "a": [a.index(c) for c in batch + m + contract],
        "b": [b.index(c) for c in batch + contract + n],
        "sizes": (len(batch), len(m), len(contract), len(n)),
        "out": [prod.index(c) for c in out],
    }


class EinsumSite(nn.Module):
    """A two-operand ``torch.einsum`` that is one batched GEMM, that GEMM being the matmul site
    ``mm`` (see :func:`einsum_plan`)."""

    def __init__(self, mm: nn.Module, equation: str, plan: dict):
        super().__init__()
        self.mm, self.equation, self.plan = mm, equation, plan

    def forward(self, a, b, prec):
        if is_full(prec):
            return torch.einsum(self.equation, a, b)
        plan = self.plan
        nb, nm, nk, nn_ = plan["sizes"]
        a = a.permute(plan["a"])
        b = b.permute(plan["b"])
        batch, m_sh, k_sh = a.shape[:nb], a.shape[nb : nb + nm], a.shape[nb + nm :]
        n_sh = b.shape[nb + nk :]
        a2 = a.reshape(*batch, math.prod(m_sh), math.prod(k_sh))
        b2 = b.reshape(*b.shape[:nb], math.prod(k_sh), math.prod(n_sh))
        y = self.mm(a2, b2, prec)
        return y.reshape(*y.shape[:nb], *m_sh, *n_sh).permute(plan["out"])

    def extra_repr(self) -> str:
        return repr(self.equation)


class MultiheadAttentionSite(nn.Module):
    """``nn.MultiheadAttention`` as sites: ``q``/``k``/``v`` (the input projections; with a packed
    ``in_proj_weight`` they read row blocks of it), ``attn`` (an :class:`AttentionSite`) and
    ``out`` (the output projection). At precision 0 everywhere the original module runs.

    ``forward(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
    is_causal, *precisions)`` with the precisions of q, k, v, qk, av, out in that order. The module
    forms it rewrites are those :func:`supported_mha` accepts."""

    def __init__(self, mha: nn.MultiheadAttention, q, k, v, attn: AttentionSite, out):
        super().__init__()
        object.__setattr__(self, "mha", mha)  # the original (its parameters stay where they are)
        self.q, self.k, self.v, self.attn, self.out = q, k, v, attn, out

    def _weights(self):
        m, E = self.mha, self.mha.embed_dim
        if m._qkv_same_embed_dim:
            ws = (m.in_proj_weight[:E], m.in_proj_weight[E : 2 * E], m.in_proj_weight[2 * E :])
        else:
            ws = (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
        b = m.in_proj_bias
        bs = (None,) * 3 if b is None else (b[:E], b[E : 2 * E], b[2 * E :])
        return ws, bs

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
        *precs,
    ):
        m = self.mha
        if all(is_full(p) for p in precs):
            return m(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        pq, pk, pv, pqk, pav, pout = precs
        if m.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        L, N, E = query.shape
        S, H = key.shape[0], m.num_heads
        (wq, wk, wv), (bq, bk, bv) = self._weights()
        q = self.q(query, wq, bq, pq) if bq is not None else self.q(query, wq, pq)
        k = self.k(key, wk, bk, pk) if bk is not None else self.k(key, wk, pk)
        v = self.v(value, wv, bv, pv) if bv is not None else self.v(value, wv, pv)
        q, k, v = (
            t.reshape(t.shape[0], N * H, m.head_dim).transpose(0, 1).reshape(N, H, t.shape[0], m.head_dim)
            for t in (q, k, v)
        )
        mask = _merged_mask(attn_mask, key_padding_mask, N, H, L, S, query.dtype)
        if is_causal and mask is None:
            causal = True
        else:
            causal = False
        dropout = m.dropout if m.training else 0.0
        if need_weights:
            p_store = []

            def av(p, v_, prec):
                p_store.append(p)
                return self.attn.av(p, v_, prec)

            o = sdpa_reference(self.attn.qk, av, q, k, v, mask, dropout, causal, None, False, pqk, pav)
        else:
            o = sdpa_reference(
                self.attn.qk, self.attn.av, q, k, v, mask, dropout, causal, None, False, pqk, pav
            )
        o = o.permute(2, 0, 1, 3).reshape(L * N, E)
        out_b = m.out_proj.bias
        o = (
            self.out(o, m.out_proj.weight, out_b, pout)
            if out_b is not None
            else self.out(o, m.out_proj.weight, pout)
        )
        o = o.view(L, N, E)
        if m.batch_first:
            o = o.transpose(0, 1)
        if not need_weights:
            return o, None
        weights = p_store[0]
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return o, weights


def _merged_mask(attn_mask, key_padding_mask, N, H, L, S, dtype):
    """``attn_mask`` and ``key_padding_mask`` as one additive float mask of shape broadcastable to
    ``(N, H, L, S)`` (MultiheadAttention's semantics: True means "not allowed")."""

    def additive(mask):
        if mask.dtype == torch.bool:
            return torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    merged = None
    if attn_mask is not None:
        merged = additive(attn_mask)
        merged = merged.view(N, H, L, S) if merged.dim() == 3 else merged.view(1, 1, L, S)
    if key_padding_mask is not None:
        kpm = additive(key_padding_mask).view(N, 1, 1, S)
        merged = kpm if merged is None else merged + kpm
    return merged


def supported_mha(mha: nn.MultiheadAttention) -> str | None:
    """Why ``mha`` cannot be rewritten into sites (None when it can)."""
    if mha.bias_k is not None or mha.bias_v is not None:
        return "MultiheadAttention with add_bias_kv"
    if mha.add_zero_attn:
        return "MultiheadAttention with add_zero_attn"
    if mha._forward_hooks or mha._forward_pre_hooks:
        return "MultiheadAttention with hooks"
    return None
