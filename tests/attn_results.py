"""Running one attention problem on several backends and comparing the results (shared by
tests/test_nonfinite.py and tests/test_fp16_range.py).

A result is a dict {out, lse, dq, dk, dv, dbias, dscale} of float64 NumPy values. "Agree" means: the
same NaN pattern, the same non-finite (and -inf) pattern, and the finite values within the contract's
accuracy for the dtype (DESIGN.md section 2): ||x - ref|| / ||ref|| on the finite entries, with dscale
measured against T = sum_ij |dS_ij <qhat_i, khat_j>| (an ill-conditioned sum; see
tests/test_kernels_backward.py) and lse by its absolute error.
"""
from __future__ import annotations

import numpy as np
import torch

import cupy_cosattn as ca
import cupy_cosattn.torch as ctorch
from cupy_cosattn import problem, reference
from cupy_cosattn.problem import BFLOAT16

F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
DTYPES = {"float16": F16, "bfloat16": BFLOAT16, "float32": F32}
TORCH_DTYPES = {F16: torch.float16, BFLOAT16: torch.bfloat16, F32: torch.float32}
# The contract's accuracy (rel. error on the finite entries): (out, gradients) per dtype.
TOL = {"float16": (3e-3, 1e-2), "bfloat16": (2e-2, 5e-2), "float32": (1e-5, 1e-4)}
LSE_TOL = {"float16": 1e-2, "bfloat16": 5e-2, "float32": 1e-4}  # absolute, on the finite entries
NAMES = ("out", "lse", "dq", "dk", "dv", "dbias", "dscale")


# ---------------------------------------------------------------------------------------------------
# Running one problem on every backend.

def f64(x):
    return None if x is None else np.asarray(x, dtype=np.float64)


def run_numpy(backend, args, kw, dout, deterministic=False):
    """{name: float64 array} of out, lse and every gradient through the NumPy API on `backend`."""
    q, k, v = args
    out, lse = ca.forward(q, k, v, backend=backend, **kw)
    dq, dk, dv, db, ds = ca.backward(dout, q, k, v, out, lse, backend=backend, deterministic=deterministic, **kw)
    return dict(out=f64(out), lse=f64(lse), dq=f64(dq), dk=f64(dk), dv=f64(dv), dbias=f64(db), dscale=f64(ds))


def to_torch(x, grad=False, device="cpu"):
    """A torch copy of a NumPy array (bool, or a float dtype; bfloat16 through float32, exactly)."""
    x = np.asarray(x)
    t = torch.from_numpy(x) if x.dtype == np.bool_ else torch.from_numpy(x.astype(np.float32)).to(TORCH_DTYPES[x.dtype])
    return t.to(device).requires_grad_(grad)


def for_torch(ref):
    """A NumPy-API result with dscale summed over heads (run_torch reports the sum)."""
    return ref | {"dscale": float(np.sum(ref["dscale"]))}


def run_torch(backend, args, kw, dout, deterministic=False):
    """The same through cupy_cosattn.torch (backend "torch" or "emulator"); the scale is a tensor of
    per-head scales, so that dscale comes back too."""
    q, k, v = (to_torch(a, True) for a in args)
    tkw = dict(kw)
    if kw.get("mask") is not None:
        tkw["mask"] = to_torch(kw["mask"])
    bias = None
    if kw.get("attn_bias") is not None:
        bias = tkw["attn_bias"] = to_torch(kw["attn_bias"], True)
    H = q.shape[1]
    scale = tkw["scale"] = torch.full((H,), float(np.mean(kw.get("scale", 8.0))), dtype=torch.float32,
                                      requires_grad=True)
    out, lse = ctorch.forward(q, k, v, backend=backend, deterministic=deterministic, **tkw)
    out.backward(to_torch(dout))
    g = lambda t: None if t is None else f64(t.grad.float().numpy())  # noqa: E731
    return dict(out=f64(out.detach().float().numpy()), lse=f64(lse.numpy()), dq=g(q), dk=g(k), dv=g(v),
                dbias=g(bias), dscale=float(scale.grad.sum()))


def dscale_terms(args, kw, dout):
    """T = sum_ij |dS_ij <qhat_i, khat_j>| over the finite terms (the error scale of dscale, an
    ill-conditioned sum; see tests/test_kernels_backward.py), in float64 from the reference."""
    prob, inp = problem.canonicalize(*args, **kw)
    c = reference._compute(prob, inp)
    do = f64(dout).reshape(prob.B, prob.H, prob.Nq, prob.D)
    with np.errstate(invalid="ignore"):
        vt = np.where(np.isfinite(c["v_x"]), c["v_x"], 0.0)
        ds = np.where(c["vis"], c["p"] * (do @ np.swapaxes(vt, -1, -2) - np.sum(do * c["o"], -1, keepdims=True)), 0)
        t = np.abs(ds * c["cos"])
    return float(np.sum(t[np.isfinite(t)]))


def assert_agree(got, ref, dtype_name, what, dscale_scale=None):
    """Same NaN and non-finite patterns as `ref`, and the finite values within the dtype's tolerance."""
    out_tol, grad_tol = TOL[dtype_name]
    for name in NAMES:
        g, r = got[name], ref[name]
        if r is None:
            assert g is None, f"{what}: {name} should be None"
            continue
        g, r = np.asarray(g, dtype=np.float64), np.asarray(r, dtype=np.float64)
        assert g.shape == r.shape, f"{what}: {name} shape {g.shape}, want {r.shape}"
        nan_g, nan_r = np.isnan(g), np.isnan(r)
        assert np.array_equal(nan_g, nan_r), (
            f"{what}: {name} NaN pattern differs: {np.argwhere(nan_g != nan_r)[:5].tolist()} "
            f"(got {int(nan_g.sum())} NaN, want {int(nan_r.sum())})")
        fin_g, fin_r = np.isfinite(g), np.isfinite(r)
        assert np.array_equal(fin_g, fin_r), f"{what}: {name} non-finite pattern differs"
        assert np.array_equal(np.isneginf(g), np.isneginf(r)), f"{what}: {name} -inf pattern differs"
        gf, rf = g[fin_r], r[fin_r]
        if name == "lse":
            err = float(np.max(np.abs(gf - rf))) if gf.size else 0.0
            assert err <= LSE_TOL[dtype_name], f"{what}: lse max abs err {err:.3g}"
            continue
        if name == "dscale":
            den = dscale_scale if dscale_scale else max(float(np.abs(rf).sum()), 1e-30)
            err = float(np.abs(gf - rf).sum()) / den if gf.size else 0.0
        else:
            den = np.linalg.norm(rf)
            err = float(np.linalg.norm(gf - rf) / (den if den > 0 else 1.0))
        tol = out_tol if name == "out" else grad_tol
        assert err <= tol, f"{what}: {name} rel err {err:.3g} > {tol} on the finite entries"


def assert_identical(got, ref, what, names=NAMES):
    """Bitwise-equal values (NaN where NaN) for the names given."""
    for name in names:
        g, r = got[name], ref[name]
        if r is None:
            continue
        assert np.array_equal(np.asarray(g), np.asarray(r), equal_nan=True), (
            f"{what}: {name} differs at {np.argwhere(~((g == r) | (np.isnan(g) & np.isnan(r))))[:5].tolist()}")
