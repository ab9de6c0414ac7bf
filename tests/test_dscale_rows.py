"""The backward kernels' per-row sums for dscale, checked row by row on the CPU emulator.

dscale_h is taken as sum_i (<qhat_i, dqhat_i> - c_i r_i) / scale_h with c_i = sum_j P_ij S_ij and
r_i = sum_j scale_h dS_ij (launch/backward.py, backward.cu's file comment). r_i is of the order of
the rounding of D_i, so dscale itself barely depends on which row a c_i lands on or on a lost range
factor in r_i; these tests read the (c, r) buffer the kernels fill (shape (2, B*H, nq_pad)) and
compare each row with float64:

- c_i within 1e-4 sum_j P_ij |S_ij| (fp32 products of exact S, P);
- r_i within 2 eps sum_j |scale_h dS_ij| (+ a subnormal floor): the kernels sum the dS operand as
  rounded to the dtype's mma precision eps, each term off by at most eps of itself.

Unit q, k rows already rounded to the dtype go in with ``l2norm_qk=False``, so the kernels and the
float64 values share S.
"""
from __future__ import annotations

import numpy as np
import pytest

from cupy_cosattn import api, problem, reference
from cupy_cosattn.launch import backward as LB
from cupy_cosattn.launch import devices

from kernel_cases import DTYPES

# Rounding unit of the operand the kernels sum r_i from (float32: tf32's 10 mantissa bits).
OPERAND_EPS = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-11}
C_REL = 1e-4


def _unit(rng, shape, dt, common=None):
    x = rng.standard_normal(shape) + (0.0 if common is None else common)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(dt)


def random_case(seed, dtype, B=2, H=2, Nq=100, Nk=90, D=64):
    rng = np.random.default_rng(seed)
    dt = DTYPES[dtype]
    q, k = _unit(rng, (B, H, Nq, D), dt), _unit(rng, (B, H, Nk, D), dt)
    v = rng.standard_normal((B, H, Nk, D)).astype(dt)
    dout = rng.standard_normal((B, H, Nq, D)).astype(dt)
    return (q, k, v), dict(l2norm_qk=False, scale=rng.uniform(4.0, 12.0, size=H)), dout


def midstream_case(seed):
    """float16 with V of keys 64.. fifty times larger: |scale dS| stays under the range limit 2^15 on
    bwd_dq's first key tile (64 keys) and exceeds it on the second, so the range factor shrinks
    while r_i is under way (backward.cu DsRange)."""
    rng = np.random.default_rng(seed)
    B, H, Nq, Nk, D = 1, 2, 64, 128, 64
    q, k = _unit(rng, (B, H, Nq, D), np.float16), _unit(rng, (B, H, Nk, D), np.float16)
    vscale = np.where(np.arange(Nk) < 64, 60.0, 3000.0)
    v = (rng.standard_normal((B, H, Nk, D)) * vscale[:, None]).astype(np.float16)
    # dO_i orthogonal to O_i: D_i is near 0, so the first tile's dS = P (dP - D) follows its small V
    # (D_i of the large values would otherwise put every tile out of range).
    kw = dict(l2norm_qk=False, scale=8.0)
    o = reference.forward64(*problem.canonicalize(q, k, v, **kw))[0]
    do = 10.0 * rng.standard_normal((B, H, Nq, D))
    do -= np.sum(do * o, -1, keepdims=True) / np.sum(o * o, -1, keepdims=True) * o
    return (q, k, v), kw, do.astype(np.float16)


def kernel_rows(monkeypatch, args, kw, dout, deterministic):
    """(c, r) as the emulated kernels leave them, as (2, B, H, nq_pad) float64, and (prob, out, lse)."""
    kw = dict(kw, deterministic=deterministic)
    prob, inp = problem.canonicalize(*args, **kw)
    out, lse = api.forward(*args, backend="reference", **kw)
    dev = devices.EmulatedDevice()
    seen = []
    real_zeros = dev.zeros

    def zeros(shape, dtype):
        x = real_zeros(shape, dtype)
        if len(shape) == 3 and shape[0] == prob.B * prob.H and shape[1] == 2:
            seen.append(x)
        return x

    monkeypatch.setattr(dev, "zeros", zeros)
    with np.errstate(over="ignore"):  # the midstream case's dq exceeds float16 (unit rows: no 1/|q|)
        LB.run_backward(dev, prob, inp, dout, out, lse)
    assert len(seen) == 1, f"expected one (c, r) buffer, saw {len(seen)}"
    rows = np.asarray(dev.to_host(seen[0]), dtype=np.float64)
    return rows.reshape(prob.B, prob.H, 2, -1).transpose(2, 0, 1, 3), prob, inp, out, lse


def expected_rows(prob, inp, dout, out, lse):
    """float64 c, r and their error scales sum_j P|S|, sum_j |scale dS|, each (B, H, Nq), from the
    stored out (D_i = <dO_i, out_i> as the kernels read it) and the stored lse."""
    c = reference._compute(prob, inp)
    scale = c["scale"][None, :, None, None]
    cos = c["cos"]
    p = np.exp(scale * cos - np.asarray(lse, dtype=np.float64)[..., None])
    do = np.asarray(dout, dtype=np.float64)
    dp = do @ np.swapaxes(c["v_x"], -1, -2)
    d = np.sum(do * np.asarray(out, dtype=np.float64), axis=-1, keepdims=True)
    sds = scale * p * (dp - d)
    return np.sum(p * cos, -1), np.sum(sds, -1), np.sum(p * np.abs(cos), -1), np.sum(np.abs(sds), -1)


def check_rows(rows, prob, inp, dout, out, lse, dtype, what):
    c_ref, r_ref, c_scale, r_scale = expected_rows(prob, inp, dout, out, lse)
    Nq = prob.Nq
    assert not np.any(rows[..., Nq:]), f"{what}: rows past Nq are not zero"
    c_err = np.abs(rows[0, ..., :Nq] - c_ref) / (C_REL * c_scale)
    r_err = np.abs(rows[1, ..., :Nq] - r_ref) / (2 * OPERAND_EPS[dtype] * r_scale + prob.Nk * 2.0**-24)
    assert c_err.max() <= 1.0, f"{what}: c_i off by up to {c_err.max():.3g} x its bound"
    assert r_err.max() <= 1.0, f"{what}: r_i off by up to {r_err.max():.3g} x its bound"
    return c_err.max(), r_err.max()


@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "deterministic"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_row_sums_match_float64(monkeypatch, dtype, deterministic):
    """Every row's c_i and r_i, fast mode (bwd_dkdv: row-group reductions and atomics over key-tile
    blocks) and deterministic mode (bwd_dq: one writer per row)."""
    args, kw, dout = random_case(5, dtype)
    rows, prob, inp, out, lse = kernel_rows(monkeypatch, args, kw, dout, deterministic)
    check_rows(rows, prob, inp, dout, out, lse, dtype, f"{dtype} det={deterministic}")


@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "deterministic"])
def test_row_sums_when_the_range_factor_shrinks(monkeypatch, deterministic):
    """float16 r_i stays in the units of the final range factor when the factor shrinks mid-row."""
    args, kw, dout = midstream_case(6)
    rows, prob, inp, out, lse = kernel_rows(monkeypatch, args, kw, dout, deterministic)
    check_rows(rows, prob, inp, dout, out, lse, "float16", f"midstream det={deterministic}")
    # precondition: the first key tile stays in range, the second does not
    c = reference._compute(prob, inp)
    p = c["p"]
    do = np.asarray(dout, dtype=np.float64)
    sds = 8.0 * np.abs(p * (do @ np.swapaxes(c["v_x"], -1, -2) - np.sum(do * np.asarray(out, np.float64), -1,
                                                                        keepdims=True)))
    assert np.max(sds[..., :64]) < 32768 < np.max(sds[..., 64:]) / 2
