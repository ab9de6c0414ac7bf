"""The backward on any device: the three kernels of cuda_src/backward.cu and the post-passes around them.

1. the norm pre-pass (``staging.stage``, non-finite elements zeroed): qhat, khat (or q, k when
   ``l2norm_qk=False``), v;
2. ``bwd_prep``: per query row D_i = sum(dO * O) and lse2 = lse * log2(e) (+inf for empty rows);
3. ``bwd_dkdv``: dK-hat, dV per key tile in registers (GQA heads summed in the block), dS -> dbias,
   and in the default (fast) mode dQ-hat by fp32 atomicAdd;
4. ``bwd_dq`` (``deterministic=True`` only): dQ-hat per query tile in registers, no atomics;
5. post-passes with ``xp``: partial dK/dV of query-head splits summed in a fixed order, broadcast
   dbias summed, and the gradient through the l2 norm (norm.cu ``l2norm_bwd``), or a cast to the
   input dtype;
6. last, unless the caller opts out (``need_dscale=False``): dscale_h = sum_ij dS_ij (S_ij - c_i) with
   S_ij = <qhat_i, khat_j> and c_i = sum_j P_ij S_ij, taken as sum_i (<qhat_i, dqhat_i> - c_i r_i) /
   scale_h from the fp32 dqhat and the kernels' per-row sums c_i, r_i = sum_j scale_h dS_ij (the form in
   which the rounding of D_i through the stored O cancels; backward.cu's file comment); reduced on the
   device and copied to the host once everything else is queued (the call's only device-to-host copy,
   so the host never waits for the GPU between launches).

The correction by c_i r_i is exact only when out and lse are this call's own (then sum_j dS_ij = 0 in
every row). A caller that passes the statistics of whole rows of which these keys are a share (ring
attention's blocks) runs the backward inside :func:`partial_rows`, and dscale is then the plain
sum_i <qhat_i, dqhat_i> / scale_h, exactly this share's.

Every kernel reads one ``BwdParams`` record (params.BWD_PARAMS); the kernels, tiles and grids are
``dispatch.select``'s.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..problem import Inputs, Problem
from .arrays import cast
from .devices import Device
from .dispatch import DKDV, DQ, NORM_BWD_K, NORM_BWD_Q, PREP, KernelChoice, select
from .limits import check_smem, check_supported
from .norm import l2norm_backward
from .packed import batch_ranges, sub_launch
from .params import BWD_PARAMS, DBIAS_ATOMIC, DBIAS_NONE, DBIAS_STORE, make_record
from .registry import BACKWARD_SOURCE, KernelSpec, bwd_name
from .staging import Staged, attn_fields, deliver, padded, stage
from .tiles import INFO_THREADS, nq_padded

# False inside partial_rows(): out and lse belong to whole rows of which this call's keys are a share.
_WHOLE_ROWS: contextvars.ContextVar[bool] = contextvars.ContextVar("cosattn_whole_rows", default=True)


@contextlib.contextmanager
def partial_rows() -> Iterator[None]:
    """Backward calls in this context take out and lse as the statistics of whole rows of which their
    keys are only a share (sum_j dS_ij != 0 over these keys), so dscale is not corrected by c_i r_i."""
    token = _WHOLE_ROWS.set(False)
    try:
        yield
    finally:
        _WHOLE_ROWS.reset(token)

F32 = np.dtype(np.float32)


def tile_info(dev: Device, dtype_name: str, dp: int, small: bool = False) -> tuple[int, ...]:
    """The 12 ints bwd_info<T, DP, SMALL> writes: (dkdv threads, BC, BR, DC, chunks, smem, dq threads,
    BR, BC, DC, chunks, smem), as compiled."""
    out = dev.zeros((12,), np.int32)
    info = KernelChoice(KernelSpec(BACKWARD_SOURCE, bwd_name("info", dtype_name, dp, small), INFO_THREADS), (1, 1, 1))
    dev.launch(info, out)
    return tuple(int(x) for x in dev.to_host(out))


@dataclass
class _DBias:
    """Where bwd_dkdv puts dS for the bias gradient."""

    mode: int = DBIAS_NONE
    f32: bool = False
    buf: Any = None
    strides: tuple[int, int, int] = (0, 0, 0)


def _dbias_target(dev: Device, prob: Problem, bias_f32: bool) -> _DBias:
    """dbias is written in place for a bias of the full (B, H, Nq, Nk) size; a broadcast bias gets dS
    summed over its broadcast dims, from a full fp32 buffer (deterministic) or by fp32 atomics (fast
    mode)."""
    if not prob.has_bias:
        return _DBias()
    B, H, Nq, Nk = prob.B, prob.H, prob.Nq, prob.Nk
    full = (H * Nq * Nk, Nq * Nk, Nk)
    if prob.bias_dense:
        return _DBias(DBIAS_STORE, bias_f32, dev.zeros((B, H, Nq, Nk), F32 if bias_f32 else prob.dtype), full)
    if prob.deterministic:
        return _DBias(DBIAS_STORE, True, dev.zeros((B, H, Nq, Nk), F32), full)
    Bb, Hb = prob.bias_shape[:2]
    return _DBias(DBIAS_ATOMIC, True, dev.zeros((Bb, Hb, Nq, Nk), F32),
                  (Hb * Nq * Nk if Bb > 1 else 0, Nq * Nk if Hb > 1 else 0, Nk))


def _finish(dev: Device, x: Any, D: int, dtype: np.dtype) -> Any:
    """x[..., :D] as a new contiguous array of `dtype` (of the device's array library)."""
    y = cast(dev.xp, x, dtype)
    return deliver(dev, y if y.shape[-1] == D else y[..., :D], None)


def run_backward(dev: Device, prob: Problem, inp: Inputs, dout: Any, out: Any, lse: Any,
                 need_dscale: bool = True) -> tuple[Any, Any, Any, Optional[Any], Optional[np.ndarray]]:
    """Gradients of one canonical problem on `dev`: (dq (B, H, Nq, D), dk (B, Hk, Nk, D), dv,
    dbias (inp.bias.shape, bias dtype) | None, dscale float64 NumPy (H,)); for a packed batch dq
    (total_q, H, D), dk and dv (total_k, Hk, D).

    dscale is reduced after every kernel is queued; its host copy is the call's only device-to-host
    transfer (on the CUDA path the only point where the host waits for the GPU). With
    ``need_dscale=False`` it is not computed at all and None is returned in its place (no reduction,
    no copy, no wait): for callers whose scale is a constant (a float scale in torch)."""
    check_supported(prob)
    caps = dev.capabilities()
    caps.check()
    prep, dkdv, dqk = (select(prob, caps, kind) for kind in (PREP, DKDV, DQ))
    check_smem("the backward kernels", prob, max(dkdv.smem, dqk.smem), caps)
    xp = dev.xp
    B, H, Hk, Nq, Nk, D = prob.B, prob.H, prob.Hk, prob.Nq, prob.Nk, prob.D

    # bwd_dq skips the key tiles (of its own size) whose keys are all masked; bwd_dkdv finds its own.
    # q, k, v with non-finite elements zeroed: a pair that is not visible (P = 0) must add exactly 0 to
    # dP = dO·Vᵀ, dQ = dS·K̂, dK = dSᵀ·Q̂ and dscale (a poisoned row is NaN already through its lse).
    st: Staged = stage(dev, prob, inp, caps, tile=dqk.tile if prob.deterministic else 0, zero_nonfinite=True)
    Ds = st.cols
    dO = padded(dev, dout, Ds)
    out_d = padded(dev, out, Ds)
    lse = lse.astype(F32, copy=False) if lse.dtype != F32 else lse
    # the kernels' lse rows are contiguous per head: a packed batch's (total_q, H) goes as (H, total_q)
    lse_d = dev.to_device(lse.T if prob.varlen else lse)

    nq_pad = nq_padded(Nq)
    lse2 = dev.empty((B * H, nq_pad), F32)
    dvec = dev.empty((B * H, nq_pad), F32)
    # q-like rows (B, H, Nq) or (total_q, H), k-like rows (B, Hk, Nk) or (total_k, Hk): strides below
    q_rows = (prob.total_q, H) if prob.varlen else (B, H, Nq)
    dq = dev.empty(q_rows + (Ds,), F32) if prob.deterministic else dev.zeros(q_rows + (Ds,), F32)

    nsplit = dkdv.nsplit
    dk_f32 = nsplit > 1 or prob.l2norm_qk
    dv_f32 = nsplit > 1
    kv_rows = (prob.total_k, Hk * nsplit) if prob.varlen else (B, Hk * nsplit, Nk)
    dk = dev.empty(kv_rows + (Ds,), F32 if dk_f32 else prob.dtype)
    dv = dev.empty(kv_rows + (Ds,), F32 if dv_f32 else prob.dtype)
    db = _dbias_target(dev, prob, st.bias_f32)
    # (c_i, r_i) per query row for dscale, zero past Nq: (B * H, 2, nq_pad), one (batch, head) after another
    rows = dev.zeros((B * H, 2, nq_pad), F32) if need_dscale else None

    if prob.varlen:  # (batch, head, row) strides of rows (total, heads, Ds); batch strides 0 (seq_view)
        q_str, kv_str = (0, Ds, H * Ds), (0, Ds, Hk * nsplit * Ds)
    else:
        q_str, kv_str = (H * Nq * Ds, Nq * Ds, Ds), (Hk * nsplit * Nk * Ds, Nk * Ds, Ds)
    fields = dict(
        attn_fields(dev, prob, st, out_d, lse_d),
        dout=dev.ptr(dO), lse2=dev.ptr(lse2), dvec=dev.ptr(dvec), dbias=dev.ptr(db.buf), dq=dev.ptr(dq),
        dk=dev.ptr(dk), dv=dev.ptr(dv), dscale_rows=dev.ptr(rows),
        do_sb=q_str[0], do_sh=q_str[1], do_sn=q_str[2],
        dq_sb=q_str[0], dq_sh=q_str[1], dq_sn=q_str[2],
        dkv_sb=kv_str[0], dkv_sh=kv_str[1], dkv_sn=kv_str[2],
        dbias_sb=db.strides[0], dbias_sh=db.strides[1], dbias_sq=db.strides[2],
        nq_pad=nq_pad, dbias_mode=db.mode, dbias_f32=int(db.f32), dq_atomic=int(not prob.deterministic),
        dk_f32=int(dk_f32), dv_f32=int(dv_f32), nsplit=nsplit, heads_per_split=prob.q_per_kv // nsplit,
        dscale_stats=int(need_dscale),
    )

    # 1. D and lse2. 2. dK, dV (+ dS -> dbias, + dQ atomics in fast mode). 3. Deterministic dQ.
    for choice in (prep, dkdv) + ((dqk,) if prob.deterministic else ()):
        if prob.varlen:  # one block per (sequence, head) work item: at most GRID_YZ_LIMIT per launch
            per_batch = Hk * nsplit if choice is dkdv else H
            for b0, nb in batch_ranges(prob, per_batch):
                sub, f = sub_launch(choice, dict(fields, n_y=0), b0, nb, per_batch,
                                    dict(lse2=H * nq_pad, dvec=H * nq_pad, dscale_rows=H * 2 * nq_pad))
                dev.launch(sub, make_record(BWD_PARAMS, **f, n_chunks=choice.n_chunks))
        else:
            dev.launch(choice, make_record(BWD_PARAMS, **fields, n_y=choice.n_y, n_chunks=choice.n_chunks))

    # 4. Post-passes (fixed reduction orders throughout).
    if nsplit > 1:
        split = (prob.total_k, Hk, nsplit, Ds) if prob.varlen else (B, Hk, nsplit, Nk, Ds)
        dk = dk.reshape(split).sum(axis=2)
        dv = dv.reshape(split).sum(axis=2)

    if prob.l2norm_qk:
        dq_out = l2norm_backward(dev, dev.to_device(inp.q), dq, prob.groups, choice=select(prob, caps, NORM_BWD_Q))
        dk_out = l2norm_backward(dev, dev.to_device(inp.k), dev.to_device(dk), prob.groups,
                                 choice=select(prob, caps, NORM_BWD_K))
    else:
        dq_out = _finish(dev, dq, D, prob.dtype)
        dk_out = _finish(dev, dk, D, prob.dtype)
    dv_out = _finish(dev, dv, D, prob.dtype)

    dbias = None
    if prob.has_bias:
        buf = db.buf
        if db.mode == DBIAS_STORE and not prob.bias_dense:
            buf = buf.sum(axis=prob.bias_sum_axes, keepdims=True)
        dbias = _finish(dev, buf, Nk, np.dtype(inp.bias.dtype))

    # 5. dscale last: its reduction is queued behind everything above, and the copy to the host (a
    # stream sync on the CUDA path) waits for work that is already queued instead of stalling the
    # launches. Skipped entirely (None) when the caller does not need it.
    dscale = None
    if need_dscale:
        axes = tuple(a for a in range(dq.ndim) if a != 1)  # all but the head axis
        dscale = xp.sum(cast(xp, st.q, F32) * dq, axis=axes, dtype=np.float64)
        if _WHOLE_ROWS.get():
            cr = rows.reshape(B, H, 2, nq_pad).astype(np.float64)
            dscale = dscale - xp.sum(cr[:, :, 0] * cr[:, :, 1], axis=(0, 2))
        dscale = dev.to_host(dscale) / np.asarray(inp.scale, dtype=np.float64)
    return dq_out, dk_out, dv_out, dbias, dscale
