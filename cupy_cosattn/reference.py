"""The NumPy float64 reference backend (docs/design.md section 1, written plainly).

Dense and vectorized: every (query, key) score of a call is materialized, so this is for testing and
small problems, not for speed. Inputs are the canonical views of problem.py (q (B, H, Nq, D); k, v
(B, Hk, Nk, D); mask (B, Nk) bool or None; bias a (Bb, Hb, Nq, Nk) broadcast view or None; scale
float64 (H,)). All arithmetic is float64; results are cast to ``prob.dtype`` (the input dtype; bfloat16
is ``ml_dtypes.bfloat16``), ``lse`` to float32, ``dbias`` to the bias's dtype.

Semantics, exactly as the contract states them:

- q̂, k̂: each of ``groups`` chunks of the head dim becomes x / max(‖x‖, 1e-12) (``l2norm_qk=True``), or
  q, k as given (``l2norm_qk=False``).
- s_ij = scale_h·⟨q̂_i, k̂_j⟩ + bias_ij for visible pairs only. Key padding (mask False) and causality
  (bottom-right aligned: j ≤ i + Nk − Nq) remove pairs from the softmax; nothing is filled with a large
  negative number.
- The softmax subtracts each row's maximum visible logit. With normalized q, k and no bias the fixed
  offset scale_h would do (that is what the kernels exploit); the reference must also be right for a
  bias or ``l2norm_qk=False``, where logits are unbounded, so it always uses the row maximum.
- A row with no visible key (or whose visible logits are all -inf through the bias) has output 0,
  ``lse = -inf`` and contributes zero to every gradient. A bias of -inf removes its pair from the
  softmax exactly as the mask does.

Non-finite values (the same semantics on every backend; docs/kernels.md "Non-finite values"):

- Row i is *poisoned* when one of its visible pairs (i, j) has a NaN or +inf logit (a NaN or Inf in
  q_i or k_j after normalization, or a NaN / +inf bias) or a value row v_j with a non-finite element.
  A poisoned row has out_i = NaN (every column), lse_i = NaN and p_ij = NaN on its visible pairs, so
  its gradients (dq_i, dk_j and dv_j of its visible keys, dbias on its visible pairs, dscale) are NaN.
- Pairs that are not visible (mask, causality) take no part in anything: their k_j, v_j and bias_ij may
  hold NaN or Inf without changing a single result. In the products that sum over pairs, the operand
  rows are therefore used with non-finite elements replaced by 0 (``_finite``): on a visible pair of a
  poisoned row the other factor is NaN anyway, and on any other pair the factor (p_ij or dS_ij) is 0.
- The gradient through the l2 norm is 0 for a chunk whose incoming gradient is all zero, whatever x
  holds (a masked key with a NaN k gets dk = 0).

``backward`` recomputes the probabilities in float64 from q, k, v (and the output o = P·V used in
D_i = ⟨dO_i, O_i⟩) instead of trusting the passed ``out``/``lse``: those come back rounded to the
input dtype / float32, and the reference should be the exact gradient of the exact forward. It only
checks their shapes.

float64 input (accepted by the public API on this backend only) gives float64 results: the float64
computation, unrounded. The functions accept any floating dtype, so a test may also pass float64
canonical arrays together with ``dataclasses.replace(prob, dtype=np.float64)``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .problem import NORM_EPS, Inputs, Problem, visible


def _f64(x):
    """A float64 NumPy copy of x (bfloat16, float16, float32, float64 in)."""
    return np.asarray(x).astype(np.float64)


def _check_shape(name: str, x, want):
    if tuple(x.shape) != tuple(want):
        raise ValueError(f"reference: {name} must have shape {tuple(want)}, got {tuple(x.shape)}")


def _l2norm(x, groups: int):
    """(x̂, n): x̂ = grouped l2norm of x (last axis split into `groups` chunks), n (..., groups, 1) the norms."""
    D = x.shape[-1]
    xs = x.reshape(x.shape[:-1] + (groups, D // groups))
    with np.errstate(invalid="ignore", over="ignore"):
        n = np.sqrt(np.sum(xs * xs, axis=-1, keepdims=True))
        xhat = xs / np.maximum(n, NORM_EPS)  # NaN for a chunk holding a NaN or an Inf
    return xhat.reshape(x.shape), n


def _l2norm_backward(xhat, n, dxhat, groups: int):
    """dx from dx̂ through the grouped l2norm: (dx̂ − x̂⟨x̂, dx̂⟩)/n, or dx̂/1e-12 where n ≤ 1e-12; exactly 0
    for a chunk whose dx̂ is all zero (even when x is not finite: such a row took part in nothing)."""
    shape = xhat.shape
    D = shape[-1]
    xh = xhat.reshape(shape[:-1] + (groups, D // groups))
    dxh = dxhat.reshape(xh.shape)
    big = n > NORM_EPS
    with np.errstate(invalid="ignore"):
        proj = np.sum(xh * dxh, axis=-1, keepdims=True)
        dx = np.where(big, (dxh - xh * proj) / np.where(big, n, 1.0), dxh / NORM_EPS)
    dx = np.where(np.all(dxh == 0, axis=-1, keepdims=True), 0.0, dx)
    return dx.reshape(shape)


def _finite(x):
    """x with its non-finite elements replaced by 0: the operand rows of the products over pairs (see
    the module docstring)."""
    return np.where(np.isfinite(x), x, 0.0)


def _visible(prob: Problem, inp: Inputs):
    """Bool array broadcastable to (B, H, Nq, Nk): which (query, key) pairs take part in the softmax."""
    mask = None
    if prob.has_mask:
        mask = np.asarray(inp.mask, dtype=bool)
        _check_shape("mask", mask, (prob.B, prob.Nk))
    vis = visible(prob, np.arange(prob.Nq)[:, None], np.arange(prob.Nk)[None, :], mask)
    return np.ones((1, 1, prob.Nq, prob.Nk), dtype=bool) if vis is None else vis


def _expand_kv(x, prob: Problem):
    """(B, Hk, Nk, D) -> (B, H, Nk, D): query head h reads kv head h // (H // Hk)."""
    return np.repeat(x, prob.q_per_kv, axis=1)


def _reduce_kv(dx, prob: Problem):
    """(B, H, Nk, D) gradients -> (B, Hk, Nk, D): the heads sharing a kv head sum their gradients."""
    B, H, Nk, D = dx.shape
    return dx.reshape(B, prob.Hk, prob.q_per_kv, Nk, D).sum(axis=2)


def _compute(prob: Problem, inp: Inputs):
    """Everything forward and backward need, in float64, as a dict."""
    B, H, Hk, Nq, Nk, D = prob.B, prob.H, prob.Hk, prob.Nq, prob.Nk, prob.D
    _check_shape("q", inp.q, (B, H, Nq, D))
    _check_shape("k", inp.k, (B, Hk, Nk, D))
    _check_shape("v", inp.v, (B, Hk, Nk, D))
    q, k, v = _f64(inp.q), _f64(inp.k), _f64(inp.v)
    scale = np.asarray(inp.scale, dtype=np.float64).reshape(H)

    if prob.l2norm_qk:
        qhat, qn = _l2norm(q, prob.groups)
        khat, kn = _l2norm(k, prob.groups)
    else:
        qhat, qn, khat, kn = q, None, k, None
    khat_x = _expand_kv(khat, prob)  # (B, H, Nk, D)
    v_x = _expand_kv(v, prob)

    with np.errstate(invalid="ignore", over="ignore"):
        cos = qhat @ np.swapaxes(khat_x, -1, -2)  # (B, H, Nq, Nk): <q̂_i, k̂_j>, NaN for a non-finite row
        s = scale[None, :, None, None] * cos
        if inp.bias is not None:
            bias = _f64(inp.bias)
            if (bias.ndim != 4 or bias.shape[0] not in (1, B) or bias.shape[1] not in (1, H)
                    or bias.shape[2:] != (Nq, Nk)):
                raise ValueError(f"reference: bias must be a (1 or B, 1 or H, Nq, Nk) view, got {bias.shape}")
            s = s + bias
    vis = np.broadcast_to(_visible(prob, inp), s.shape)

    # Poisoned rows (module docstring): a visible NaN / +inf logit, or a visible v row that is not finite.
    bad_v = ~np.all(np.isfinite(v_x), axis=-1)  # (B, H, Nk)
    poison = np.any(vis & (np.isnan(s) | (s == np.inf) | bad_v[:, :, None, :]), axis=-1, keepdims=True)

    # Max-subtracted softmax over the visible pairs of the other rows (their logits are finite or -inf).
    with np.errstate(invalid="ignore", over="ignore"):
        s_vis = np.where(vis & ~poison, s, -np.inf)
        m = np.max(s_vis, axis=-1, keepdims=True) if Nk > 0 else np.full(s.shape[:-1] + (1,), -np.inf)
        has_key = m > -np.inf  # False: no visible key (or all visible logits are -inf), or poisoned
        m_safe = np.where(has_key, m, 0.0)
        e = np.where(s_vis > -np.inf, np.exp(s_vis - m_safe), 0.0)
    lsum = np.sum(e, axis=-1, keepdims=True)
    ok = has_key & (lsum > 0)
    p = np.where(ok, e / np.where(ok, lsum, 1.0), 0.0)
    p = np.where(poison & vis, np.nan, p)
    with np.errstate(divide="ignore"):
        lse = np.where(ok, m_safe + np.log(np.where(ok, lsum, 1.0)), -np.inf)
    lse = np.where(poison, np.nan, lse)[..., 0]
    o = p @ _finite(v_x)  # (B, H, Nq, D); rows without a visible key are exactly 0, poisoned rows NaN
    return dict(q=q, k=k, v=v, qhat=qhat, khat=khat, qn=qn, kn=kn, khat_x=khat_x, v_x=v_x, vis=vis, cos=cos, p=p,
                o=o, lse=lse, scale=scale)


def forward64(prob: Problem, inp: Inputs) -> tuple[np.ndarray, np.ndarray]:
    """(out, lse) in float64, (B, H, Nq, D) and (B, H, Nq); for tests and for `forward`."""
    c = _compute(prob, inp)
    return c["o"], c["lse"]


def forward(prob: Problem, inp: Inputs, out: Optional[np.ndarray] = None,
            lse: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """(out (B, H, Nq, D) in prob.dtype, lse (B, H, Nq) float32). If out/lse are given (NumPy arrays of
    those shapes), the results are written into them and they are returned."""
    o64, lse64 = forward64(prob, inp)
    if out is None:
        out = o64.astype(prob.dtype)
    else:
        _check_shape("out", out, o64.shape)
        out[...] = o64.astype(out.dtype)
    if lse is None:
        lse = lse64.astype(np.float32)
    else:
        _check_shape("lse", lse, lse64.shape)
        lse[...] = lse64.astype(lse.dtype)
    return out, lse


def backward64(prob: Problem, inp: Inputs, dout: np.ndarray) -> tuple[np.ndarray, ...]:
    """(dq, dk, dv, dbias | None, dscale (H,)) all in float64; see `backward`."""
    B, H, Nq, D = prob.B, prob.H, prob.Nq, prob.D
    _check_shape("dout", dout, (B, H, Nq, D))
    c = _compute(prob, inp)
    do = _f64(dout)
    p, o = c["p"], c["o"]

    dv = _reduce_kv(np.swapaxes(p, -1, -2) @ do, prob)  # dV = Pᵀ·dO, summed over sharing heads
    dp = do @ np.swapaxes(_finite(c["v_x"]), -1, -2)  # dP = dO·Vᵀ
    di = np.sum(do * o, axis=-1, keepdims=True)  # D_i = <dO_i, O_i>
    with np.errstate(invalid="ignore"):
        ds = np.where(c["vis"], p * (dp - di), 0.0)  # dS = P∘(dP − D) on visible pairs, else exactly 0

    scale = c["scale"][None, :, None, None]
    qt, kt = _finite(c["qhat"]), _finite(c["khat_x"])
    dqhat = scale * (ds @ kt)
    dkhat = _reduce_kv(scale * (np.swapaxes(ds, -1, -2) @ qt), prob)
    dscale = np.sum(ds * (qt @ np.swapaxes(kt, -1, -2)), axis=(0, 2, 3))  # (H,): Σ dS_ij <q̂_i, k̂_j>

    if prob.l2norm_qk:
        dq = _l2norm_backward(c["qhat"], c["qn"], dqhat, prob.groups)
        dk = _l2norm_backward(c["khat"], c["kn"], dkhat, prob.groups)
    else:
        dq, dk = dqhat, dkhat

    dbias = None
    if inp.bias is not None:
        axes = prob.bias_sum_axes
        dbias = np.sum(ds, axis=axes, keepdims=True) if axes else ds
        dbias = dbias.reshape(inp.bias.shape)
    return dq, dk, dv, dbias, dscale


def backward(prob: Problem, inp: Inputs, dout: np.ndarray, out: np.ndarray,
             lse: np.ndarray) -> tuple[np.ndarray, ...]:
    """(dq (B, H, Nq, D), dk (B, Hk, Nk, D), dv (B, Hk, Nk, D) in prob.dtype, dbias (inp.bias's shape and
    dtype) or None, dscale float64 (H,)).

    The probabilities are recomputed in float64; `out` and `lse` are only checked for shape (see the
    module docstring)."""
    _check_shape("out", out, (prob.B, prob.H, prob.Nq, prob.D))
    _check_shape("lse", lse, (prob.B, prob.H, prob.Nq))
    dq, dk, dv, dbias, dscale = backward64(prob, inp, dout)
    dt = prob.dtype
    dbias = None if dbias is None else dbias.astype(inp.bias.dtype)
    return dq.astype(dt), dk.astype(dt), dv.astype(dt), dbias, dscale.astype(np.float64)
