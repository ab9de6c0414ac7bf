"""The CPU implementation of the torch op: plain torch, chunked over queries.

Only a (B, H, chunk, Nk) block of scores exists at a time (at most ``CPU_BLOCK_ELEMS`` elements); the
backward recomputes the scores chunk by chunk. It computes in float32 (float64 for float64 inputs,
which the CPU path accepts so that ``torch.autograd.gradcheck`` works).

Non-finite inputs follow the semantics of the reference (cupy_cosattn/reference.py, docs/kernels.md
"Non-finite values"): a NaN or Inf on a visible pair poisons its row (out and lse NaN, NaN gradients
from it), and pairs that are not visible never contribute, whatever their k, v or bias hold. The extra
selections this takes run only when some input is not finite (``Canon.nonfinite``).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch
from torch import Tensor

from .. import problem as _problem
from ..problem import Problem
from .outputs import as_output, empty_grad, user_dscale

# Scores per block of the CPU path: a (B, H, chunk, Nk) block holds at most this many elements.
CPU_BLOCK_ELEMS = 1 << 22

def compute_dtype(dt: torch.dtype) -> torch.dtype:
    return torch.float64 if dt == torch.float64 else torch.float32


def grouped_l2norm(x: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """(x̂, n): each of `groups` chunks of the last dim divided by max(‖chunk‖, 1e-12); n the norms."""
    shape = x.shape
    xs = x.reshape(*shape[:-1], groups, shape[-1] // groups)
    n = torch.linalg.vector_norm(xs, dim=-1, keepdim=True)
    return (xs / n.clamp_min(_problem.NORM_EPS)).reshape(shape), n


def grouped_l2norm_backward(xhat: Tensor, n: Tensor, dxhat: Tensor, groups: int) -> Tensor:
    """dx = (dx̂ − x̂⟨x̂, dx̂⟩)/n per chunk, or dx̂/1e-12 where the norm was clamped."""
    shape = xhat.shape
    xs = xhat.reshape(*shape[:-1], groups, shape[-1] // groups)
    dxs = dxhat.reshape(xs.shape)
    big = n > _problem.NORM_EPS
    proj = (xs * dxs).sum(-1, keepdim=True)
    dx = torch.where(big, (dxs - xs * proj) / torch.where(big, n, torch.ones_like(n)), dxs / _problem.NORM_EPS)
    # a chunk that received no gradient gets none, even when x is not finite (a masked NaN key: dk = 0)
    dx = torch.where((dxs == 0).all(-1, keepdim=True), torch.zeros_like(dx), dx)
    return dx.reshape(shape)


def _finite(x: Tensor) -> Tensor:
    """x with non-finite elements replaced by 0: operand rows of the products over pairs."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


class Canon:
    """Canonical views (compute dtype) of one call for the CPU path, and its per-chunk scores."""

    def __init__(self, prob: Problem, shapes: dict, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                 bias: Optional[Tensor], scale_t: Optional[Tensor], scale: float) -> None:
        cd = compute_dtype(q.dtype)
        self.prob, self.cd = prob, cd
        self.q = q.reshape(shapes["q"]).to(cd)
        self.k = k.reshape(shapes["k"]).to(cd)
        self.v = v.reshape(shapes["v"]).to(cd)
        self.mask = mask
        self.bias = None if bias is None else bias.reshape(shapes["bias"]).to(cd)
        H = prob.H
        if scale_t is None:
            self.scale = torch.full((H,), float(scale), dtype=cd, device=q.device)
        else:
            self.scale = scale_t.detach().reshape(-1).to(cd).expand(H)
        if prob.l2norm_qk:
            self.qh, self.qn = grouped_l2norm(self.q, prob.groups)
            self.kh, self.kn = grouped_l2norm(self.k, prob.groups)
        else:
            self.qh, self.qn, self.kh, self.kn = self.q, None, self.k, None
        self.qs = self.qh * self.scale.view(1, H, 1, 1)  # scale_h·q̂: the scale folded into the queries
        # Can a row end up with no visible key (softmax of all -inf gives NaN, which must become 0)?
        self.may_be_empty = mask is not None or bias is not None or (prob.causal and prob.Nq > prob.Nk)
        # A NaN or Inf anywhere (a -inf bias is a legal exclusion): rows may be poisoned, and invisible
        # pairs must be selected away instead of multiplied by a zero probability.
        self.nonfinite = not (bool(torch.isfinite(self.q).all()) and bool(torch.isfinite(self.k).all())
                              and bool(torch.isfinite(self.v).all())
                              and (self.bias is None
                                   or not bool((torch.isnan(self.bias) | (self.bias == float("inf"))).any())))
        if self.nonfinite:
            self.bad_v = ~torch.isfinite(self.v).all(-1)  # (B, Hk, Nk): v rows that poison the rows seeing them
            self.vt, self.kt, self.qht = _finite(self.v), _finite(self.kh), _finite(self.qh)
            self.qst = _finite(self.qs)
        else:
            self.vt, self.kt, self.qht, self.qst = self.v, self.kh, self.qh, self.qs

    def chunks(self) -> Iterator[tuple[int, int, int]]:
        """(i0, i1, kend): query rows [i0, i1) see at most keys [0, kend) (causal trims the rest)."""
        p = self.prob
        rows = max(1, CPU_BLOCK_ELEMS // max(1, p.B * p.H * p.Nk))
        for i0 in range(0, p.Nq, rows):
            i1 = min(p.Nq, i0 + rows)
            kend = min(p.Nk, max(0, i1 + p.Nk - p.Nq)) if p.causal else p.Nk
            yield i0, i1, kend

    def grouped(self, x: Tensor) -> Tensor:
        """(B, H, C, X) -> (B, Hk, G, C, X): the query heads that share a kv head side by side."""
        p = self.prob
        return x.reshape(p.B, p.Hk, p.q_per_kv, x.shape[-2], x.shape[-1])

    def visible(self, i0: int, i1: int, kend: int) -> Optional[Tensor]:
        """Bool (1 | B, 1, C, kend) view of the visible pairs of rows [i0, i1) and keys [0, kend), or None
        when all are visible (problem.visible)."""
        rows = torch.arange(i0, i1, device=self.q.device).unsqueeze(1)
        cols = torch.arange(kend, device=self.q.device).unsqueeze(0)
        return _problem.visible(self.prob, rows, cols, None if self.mask is None else self.mask[:, :kend])

    def logits(self, i0: int, i1: int, kend: int) -> Tensor:
        """s = scale_h·⟨q̂_i, k̂_j⟩ + bias_ij for rows [i0, i1) and keys [0, kend), -inf where excluded."""
        p = self.prob
        B, H, C = p.B, p.H, i1 - i0
        s = (self.grouped(self.qs[:, :, i0:i1]) @ self.kh[:, :, :kend].unsqueeze(2).transpose(-1, -2))
        s = s.reshape(B, H, C, kend)
        if self.bias is not None:
            s = s + self.bias[:, :, i0:i1, :kend]
        vis = self.visible(i0, i1, kend)
        if vis is not None:
            s = s.masked_fill(~vis, float("-inf"))
        return s

    def probs(self, s: Tensor, i0: int, i1: int, kend: int) -> tuple[Tensor, Optional[Tensor]]:
        """(P, poisoned): the softmax over the visible keys (0 for a row without any), and None or a
        bool (B, H, C, 1) of the poisoned rows, whose P is NaN on their visible pairs."""
        P = torch.softmax(s, dim=-1)
        if not self.nonfinite:
            return (torch.nan_to_num(P, nan=0.0) if self.may_be_empty else P), None
        p = self.prob
        vis = self.visible(i0, i1, kend)
        vis = torch.ones((1, 1, 1, kend), dtype=torch.bool, device=s.device) if vis is None else vis
        bad_v = self.bad_v[:, :, :kend].repeat_interleave(p.q_per_kv, dim=1).unsqueeze(2)  # (B, H, 1, kend)
        poisoned = (vis & (torch.isnan(s) | (s == float("inf")) | bad_v)).any(-1, keepdim=True)
        empty = (s == float("-inf")).all(-1, keepdim=True)
        P = torch.where(empty, torch.zeros_like(P), P)
        P = torch.where(poisoned, torch.where(vis, torch.full_like(P, float("nan")), torch.zeros_like(P)), P)
        return P, poisoned


def cpu_forward(prob: Problem, shapes: dict, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                bias: Optional[Tensor], scale_t: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    c = Canon(prob, shapes, q, k, v, mask, bias, scale_t, scale)
    B, H, Nq, D = prob.B, prob.H, prob.Nq, prob.D
    out = torch.zeros((B, H, Nq, D), dtype=c.cd, device=q.device)
    lse = torch.full((B, H, Nq), float("-inf"), dtype=torch.float32, device=q.device)
    for i0, i1, kend in c.chunks():
        if kend == 0:
            continue  # no key visible to any row of this chunk: out 0, lse -inf
        s = c.logits(i0, i1, kend)
        P, poisoned = c.probs(s, i0, i1, kend)
        o = c.grouped(P) @ c.vt[:, :, :kend].unsqueeze(2)  # (B, Hk, G, C, D)
        out[:, :, i0:i1] = o.reshape(B, H, i1 - i0, D)
        row_lse = torch.logsumexp(s, dim=-1)  # -inf for a row without a key
        if poisoned is not None:
            row_lse = row_lse.masked_fill(poisoned[..., 0], float("nan"))
        lse[:, :, i0:i1] = row_lse.to(torch.float32)
    return as_output(out, q.dtype, q.shape), as_output(lse, torch.float32, q.shape[:-1])


def cpu_backward(prob: Problem, shapes: dict, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                 bias: Optional[Tensor], scale_t: Optional[Tensor], scale: float,
                 stats: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients by recomputing each query chunk's probabilities (docs/design.md section 1, backward).

    stats: None, or the (out, lse) of whole rows of which these keys are only a share (ring attention's
    blocks): P = exp(s − lse) and D_i = ⟨dO_i, O_i⟩ are then the whole rows' ones, as the kernels use
    them, and the gradients are exactly this share's. Without it each chunk's softmax is recomputed over
    the keys given."""
    c = Canon(prob, shapes, q, k, v, mask, bias, scale_t, scale)
    B, H, Nq, D = prob.B, prob.H, prob.Nq, prob.D
    do = dout.reshape(B, H, Nq, D).to(c.cd)
    if stats is not None:
        Drow = (do * stats[0].reshape(B, H, Nq, D).to(c.cd)).sum(-1, keepdim=True)
        lse = stats[1].reshape(B, H, Nq).to(c.cd)
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # a row seeing nothing: s is −inf
    dqh = c.q.new_zeros(c.q.shape)  # new_zeros: contiguous, whatever the inputs' strides
    dkh = c.k.new_zeros(c.k.shape)
    dv = c.v.new_zeros(c.v.shape)
    dbias = None if c.bias is None else c.bias.new_zeros(c.bias.shape)
    dscale = torch.zeros((H,), dtype=c.cd, device=q.device)
    for i0, i1, kend in c.chunks():
        if kend == 0:
            continue
        C = i1 - i0
        s = c.logits(i0, i1, kend)
        if stats is None:
            P, poisoned = c.probs(s, i0, i1, kend)
        else:
            P, poisoned = torch.exp(s - lse[:, :, i0:i1, None]), None  # 0 where hidden
        dog = c.grouped(do[:, :, i0:i1])  # (B, Hk, G, C, D)
        kh, vv = c.kt[:, :, :kend].unsqueeze(2), c.vt[:, :, :kend].unsqueeze(2)  # (B, Hk, 1, kend, D)
        dP = (dog @ vv.transpose(-1, -2)).reshape(B, H, C, kend)
        if stats is None:
            dS = torch._softmax_backward_data(dP, P, -1, P.dtype)  # P ∘ (dP − rowsum(P ∘ dP))
        else:
            dS = P * (dP - Drow[:, :, i0:i1])
        if poisoned is not None:  # a poisoned row's NaN row sum must not reach its invisible pairs
            vis = c.visible(i0, i1, kend)
            if vis is not None:
                dS = dS.masked_fill(~vis, 0.0)
        dSg = c.grouped(dS)
        dv[:, :, :kend] += (c.grouped(P).transpose(-1, -2) @ dog).sum(2)
        g = (dSg @ kh).reshape(B, H, C, D)  # dS·K̂ = dq̂ / scale_h
        dqh[:, :, i0:i1] = g * c.scale.view(1, H, 1, 1)
        dkh[:, :, :kend] += (dSg.transpose(-1, -2) @ c.grouped(c.qst[:, :, i0:i1])).sum(2)
        dscale += (g * c.qht[:, :, i0:i1]).sum(dim=(0, 2, 3))  # Σ dS_ij ⟨q̂_i, k̂_j⟩
        if dbias is not None:
            axes = prob.bias_sum_axes
            dbias[:, :, i0:i1, :kend] = dS.sum(dim=axes, keepdim=True) if axes else dS
    if prob.l2norm_qk:
        dq = grouped_l2norm_backward(c.qh, c.qn, dqh, prob.groups)
        dk = grouped_l2norm_backward(c.kh, c.kn, dkh, prob.groups)
    else:
        dq, dk = dqh, dkh
    dq = as_output(dq, q.dtype, q.shape)
    dk = as_output(dk, k.dtype, k.shape)
    dv = as_output(dv, v.dtype, v.shape)
    dbias = empty_grad(q) if bias is None else as_output(dbias, bias.dtype, bias.shape)
    return dq, dk, dv, dbias, user_dscale(dscale, scale_t, q)
