"""float16 backward with large-magnitude inputs (values up to 1e4, queries and keys up to 1e3, as
training with loss scaling produces them): the gradients are small enough for float16, and so must the
kernels' results be.

The backward's float16 operand scale_h dS has magnitude |dO| |V| scale_h, unrelated to the gradients'
own (which the l2 norm divides by |q| and |k|). The kernels keep it in range with a per-warp
power-of-two factor (cuda_src/backward.cu, DsRange): these tests reproduce the defect that factor
fixes (dq, dk, dscale came back inf while the true max |dq| is a few thousand) and check every gradient
against the float64 reference, in both backward modes, including problems where the factor changes
mid-stream (later query tiles of bwd_dkdv, later key tiles of bwd_dq, and different factors per warp in
the fast mode's dQ atomics).
"""
from __future__ import annotations

import numpy as np
import pytest

from cupy_cosattn import problem, reference

from attn_results import F16, assert_agree, dscale_terms, run_numpy

FP16_MAX = 65504.0


def signed_uniform(rng, shape, lo, hi):
    return rng.choice([-1.0, 1.0], size=shape) * rng.uniform(lo, hi, size=shape)


def check(args, kw, dout, what):
    """Forward and every gradient of the emulated kernels (both backward modes) against the reference;
    the reference's own results fit float16 (else the test would ask for the impossible)."""
    ref = run_numpy("reference", args, kw, dout)
    for name in ("out", "dq", "dk", "dv"):
        assert np.max(np.abs(ref[name])) < FP16_MAX / 2, f"{what}: the reference {name} does not fit float16"
    terms = dscale_terms(args, kw, dout)
    for det in (True, False):
        got = run_numpy("emulator", args, kw, dout, deterministic=det)
        for name, x in got.items():
            if x is not None:
                assert np.all(np.isfinite(x)), f"{what} det={det}: {name} has NaN/Inf"
        assert_agree(got, ref, "float16", f"{what} det={det}", terms)
    return ref


@pytest.mark.parametrize("seed", range(4))
def test_float16_backward_with_large_values_reported_case(seed):
    """The reported case: B = H = 1, Nq = 16, Nk = 2, D = 64, scale 8, |v| in [1000, 2000]."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, 1, 16, 64)).astype(F16)
    k = rng.standard_normal((1, 1, 2, 64)).astype(F16)
    v = signed_uniform(rng, (1, 1, 2, 64), 1000, 2000).astype(F16)
    dout = rng.standard_normal(q.shape).astype(F16)
    ref = check([q, k, v], {"scale": 8.0}, dout, f"seed {seed}")
    assert np.max(np.abs(ref["dq"])) > 1000  # large, but within float16


FEATURES = {
    "plain": {},
    "causal+mask": {"causal": True, "mask": "random"},
    "bias": {"bias": True},
    "gqa+per-head scale": {"Hk": 1, "per_head_scale": True},
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_float16_large_magnitude_inputs(feature):
    """v up to 1e4, q and k up to 1e3 (dout of unit scale, as a loss-scaled gradient after its
    unscaling, or a loss scale applied to small activations): forward and every gradient."""
    f = FEATURES[feature]
    rng = np.random.default_rng(7)
    B, H, Hk, Nq, Nk, D = 2, 2, f.get("Hk", 2), 80, 96, 64
    q = signed_uniform(rng, (B, H, Nq, D), 0, 1e3)
    k = signed_uniform(rng, (B, Hk, Nk, D), 0, 1e3)
    v = signed_uniform(rng, (B, Hk, Nk, D), 0, 1e4)
    dout = rng.standard_normal((B, H, Nq, D))
    kw = {"causal": f.get("causal", False)}
    kw["scale"] = rng.uniform(4.0, 8.0, size=H) if f.get("per_head_scale") else 8.0
    if f.get("mask"):
        m = rng.random((B, Nk)) < 0.7
        m[:, -1] = True
        kw["mask"] = m
    if f.get("bias"):
        kw["attn_bias"] = rng.standard_normal((B, H, Nq, Nk)).astype(np.float32)
    args = [x.astype(F16) for x in (q, k, v)]
    check(args, kw, dout.astype(F16), feature)
    # the case is one that overflowed: |scale_h dS| beyond float16 somewhere
    prob, inp = problem.canonicalize(*args, **kw)
    c = reference._compute(prob, inp)
    do = dout.reshape(prob.B, prob.H, prob.Nq, prob.D)
    ds = c["p"] * (do @ np.swapaxes(c["v_x"], -1, -2) - np.sum(do * c["o"], -1, keepdims=True))
    assert np.max(np.abs(ds) * np.asarray(kw["scale"]).reshape(-1, 1, 1)[:H]) > FP16_MAX


def test_float16_range_factor_changes_midstream():
    """The factor shrinks while a block is under way, and differs between warps:
    - bwd_dkdv streams query tiles of 64 rows (D = 64): dout rows 64.. are 8x larger, so the second
      query tile needs a smaller factor than the first and dK accumulated so far must be rescaled;
    - bwd_dq streams key tiles of 64 keys: keys 64.. have 6x larger values, likewise for dQ;
    - keys 0..15 (warp 0 of a bwd_dkdv block) hold the largest values, keys 16..63 small ones, so the
      warps of one block use different factors in the fast mode's dQ atomics.
    The first tiles' contributions are of the same order as the later ones', so a missing rescale
    shows up as an error far above the tolerance."""
    rng = np.random.default_rng(3)
    B, H, Hk, Nq, Nk, D = 1, 2, 1, 128, 128, 64
    q = rng.standard_normal((B, H, Nq, D)) * 300
    k = rng.standard_normal((B, Hk, Nk, D)) * 300
    vscale = np.full(Nk, 300.0)
    vscale[:16] = 3000.0
    vscale[64:] = 1800.0
    v = rng.standard_normal((B, Hk, Nk, D)) * vscale[:, None]
    rows = np.where(np.arange(Nq) < 64, 1.0, 8.0)
    dout = rng.standard_normal((B, H, Nq, D)) * rows[:, None]
    args = [x.astype(F16) for x in (q, k, v)]
    kw = {"scale": 8.0}
    check(args, kw, dout.astype(F16), "midstream")
    # preconditions: the first query tile stays in range, the second does not (per the reference)
    prob, inp = problem.canonicalize(*args, **kw)
    c = reference._compute(prob, inp)
    do = dout.astype(F16).astype(np.float64)
    sds = 8.0 * np.abs(c["p"] * (do @ np.swapaxes(c["v_x"], -1, -2) - np.sum(do * c["o"], -1, keepdims=True)))
    assert np.max(sds[:, :, :64, 16:]) < 32768 < np.max(sds[:, :, 64:, :]) / 2


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [True, False])
def test_float16_large_values_on_cuda(deterministic):
    """GPU twin: the reported case and the mid-stream case on the CUDA kernels."""
    import cupy

    import cupy_cosattn as ca

    rng = np.random.default_rng(0)
    cases = []
    q = rng.standard_normal((1, 1, 16, 64)).astype(F16)
    k = rng.standard_normal((1, 1, 2, 64)).astype(F16)
    v = signed_uniform(rng, (1, 1, 2, 64), 1000, 2000).astype(F16)
    cases.append(([q, k, v], rng.standard_normal(q.shape).astype(F16)))
    q = (rng.standard_normal((1, 2, 128, 64)) * 300).astype(F16)
    k = (rng.standard_normal((1, 1, 128, 64)) * 300).astype(F16)
    v = (rng.standard_normal((1, 1, 128, 64)) * np.where(np.arange(128) < 16, 3000.0, 300.0)[:, None]).astype(F16)
    cases.append(([q, k, v], (rng.standard_normal(q.shape) * np.where(np.arange(128) < 64, 1, 8)[:, None]).astype(F16)))
    for args, dout in cases:
        ref = run_numpy("reference", args, {}, dout)
        dq, dk, dv = (cupy.asnumpy(x) for x in run_cuda(ca, cupy, args, dout, deterministic))
        for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
            g = g.astype(np.float64)
            assert np.all(np.isfinite(g)), name
            err = np.linalg.norm(g - ref[name]) / np.linalg.norm(ref[name])
            assert err <= 1e-2, (name, err)


def run_cuda(ca, cupy, args, dout, deterministic):
    q, k, v = (cupy.asarray(a) for a in args)
    out, lse = ca.forward(q, k, v, backend="cuda")
    return ca.backward(cupy.asarray(dout), q, k, v, out, lse, backend="cuda", deterministic=deterministic)[:3]
