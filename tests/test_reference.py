"""The float64 NumPy reference backend against an independent dense torch float64 autograd model.

The torch model below is written from docs/design.md section 1 on the *user* layouts (4-D, merged 3-D,
multi-query 3-D kv, grouped-query), without any of cupy_cosattn's code: it builds every logit, keeps
only the visible (mask, causal) pairs, takes a max-subtracted softmax, zeroes rows without a visible
key, and lets autograd produce every gradient (q, k, v, bias, scale).

To compare at 1e-10 the reference is called on float64 canonical inputs: the Problem and the canonical
views come from problem.canonicalize on float32 copies, then the arrays are swapped for float64 ones
of the same values (the canonical views are plain reshapes of the user arrays) and Problem.dtype is
set to float64 (reference.py's documented private allowance; the public API still rejects float64).
"""
from __future__ import annotations

import dataclasses
import itertools
import zlib

import ml_dtypes
import numpy as np
import pytest
import torch

import cupy_cosattn as ca
from cupy_cosattn import problem, reference

EPS = 1e-12


@pytest.fixture(autouse=True)
def _float64_by_default():
    """The independent model below computes in float64. Set for this module's tests only: a global
    set_default_dtype at import would leak into every other test file of the session."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# --------------------------------------------------------------------------------------------------
# The independent torch model (user layouts in, user layouts out)
# --------------------------------------------------------------------------------------------------

def torch_attention(q, k, v, *, mask=None, bias=None, bias_batch_dim=False, scale=8.0, groups=1, causal=False,
                    l2norm_qk=True):
    """(out, lse) of cosine-sim attention on torch float64 tensors in the caller's layout."""
    merged = q.dim() == 3
    if merged:  # (BH, N, D): every row its own batch entry with a single head
        q4, k4, v4 = q[:, None], k[:, None], v[:, None]
    else:
        q4 = q
        k4, v4 = (k[:, None], v[:, None]) if k.dim() == 3 else (k, v)
    B, H, Nq, D = q4.shape
    Hk, Nk = k4.shape[1], k4.shape[2]
    k4 = k4.repeat_interleave(H // Hk, dim=1)  # query head h reads kv head h // (H // Hk)
    v4 = v4.repeat_interleave(H // Hk, dim=1)

    def l2(x):
        xs = x.reshape(*x.shape[:-1], groups, D // groups)
        n = torch.linalg.vector_norm(xs, dim=-1, keepdim=True)  # subgradient 0 at x = 0
        return (xs / torch.clamp(n, min=EPS)).reshape(x.shape)

    if l2norm_qk:
        q4, k4 = l2(q4), l2(k4)
    sc = scale.reshape(1, -1, 1, 1) if torch.is_tensor(scale) else scale
    logits = sc * torch.einsum("bhid,bhjd->bhij", q4, k4)
    if bias is not None:
        if merged or bias_batch_dim:
            logits = logits + bias[:, None]
        elif bias.dim() == 3:
            logits = logits + bias[None]
        else:
            logits = logits + bias

    vis = torch.ones(1, 1, Nq, Nk, dtype=torch.bool)
    if causal:
        i = torch.arange(Nq)[:, None]
        j = torch.arange(Nk)[None, :]
        vis = vis & (j <= i + Nk - Nq)
    if mask is not None:
        vis = vis & mask[:, None, None, :]
    vis = vis.expand(logits.shape)

    neg = torch.full_like(logits, -torch.inf)
    row_max = torch.where(vis, logits, neg).amax(-1, keepdim=True).detach()
    has_key = torch.isfinite(row_max)
    row_max = torch.where(has_key, row_max, torch.zeros_like(row_max))
    ex = torch.where(vis, torch.exp(logits - row_max), torch.zeros_like(logits))
    den = ex.sum(-1, keepdim=True)
    good = den > 0
    p = ex / torch.where(good, den, torch.ones_like(den))
    out = p @ v4
    lse = torch.where(good, row_max + torch.log(torch.where(good, den, torch.ones_like(den))),
                      torch.full_like(den, -torch.inf))[..., 0]
    if merged:
        out, lse = out[:, 0], lse[:, 0]
    return out, lse


def torch_grads(inputs, dout):
    """Everything from torch autograd: (out, lse, dq, dk, dv, dbias, dscale) as float64 NumPy."""
    t = {n: (torch.tensor(inputs[n], requires_grad=True) if inputs[n] is not None else None)
         for n in ("q", "k", "v", "bias")}
    scale = inputs["scale"]
    ts = torch.tensor(np.asarray(scale, dtype=np.float64), requires_grad=True)
    mask = None if inputs["mask"] is None else torch.tensor(inputs["mask"])
    out, lse = torch_attention(t["q"], t["k"], t["v"], mask=mask, bias=t["bias"],
                               bias_batch_dim=inputs["bias_batch_dim"], scale=ts, groups=inputs["groups"],
                               causal=inputs["causal"], l2norm_qk=inputs["l2norm_qk"])
    (out * torch.tensor(dout)).sum().backward()

    def g(x):
        return None if x is None else (x.grad.numpy() if x.grad is not None else np.zeros(x.shape))

    return (out.detach().numpy(), lse.detach().numpy(), g(t["q"]), g(t["k"]), g(t["v"]), g(t["bias"]),
            g(ts))


# --------------------------------------------------------------------------------------------------
# Building inputs and calling the reference in float64
# --------------------------------------------------------------------------------------------------

def make_inputs(rng, *, kv="mha", bias="none", mask=False, causal=False, groups=1, per_head=False,
                l2norm_qk=True, Nq=5, Nk=7, D=16, B=2, H=4, empty_batch=False, zero_chunk=False):
    """float64 user-layout arrays plus keywords. kv: 'mha' | 'gqa' | 'mqa3d' (3-D kv) | 'merged' (3-D q)."""
    Hk = {"mha": H, "gqa": 2, "mqa3d": 1, "merged": 1}[kv]
    if kv == "merged":
        qs, ks = (B * H, Nq, D), (B * H, Nk, D)
        Bm, Hm = B * H, 1
    elif kv == "mqa3d":
        qs, ks = (B, H, Nq, D), (B, Nk, D)
        Bm, Hm = B, H
    else:
        qs, ks = (B, H, Nq, D), (B, Hk, Nk, D)
        Bm, Hm = B, H
    amp = 1.0 if l2norm_qk else 0.6
    q = amp * rng.standard_normal(qs)
    k = amp * rng.standard_normal(ks)
    v = rng.standard_normal(ks)
    if zero_chunk:  # an exactly-zero chunk exercises the n <= 1e-12 branch of the norm gradient
        q[..., 0, : D // groups] = 0.0
        k[..., -1, : D // groups] = 0.0
    m = None
    if mask:
        m = rng.random((Bm, Nk)) < 0.7
        m[0, 0] = True
        if empty_batch:
            m[-1, :] = False  # every row of the last batch entry sees nothing
    b, bias_batch_dim = None, False
    if bias != "none":
        if kv == "merged":  # merged inputs only have the (BH, Nq, Nk) layout
            b = rng.standard_normal((Bm, Nq, Nk))
        elif bias == "head":
            b = rng.standard_normal((Hm, Nq, Nk))
        elif bias == "batch":
            b, bias_batch_dim = rng.standard_normal((Bm, Nq, Nk)), True
        else:
            b = rng.standard_normal((Bm, Hm, Nq, Nk))
    scale = rng.uniform(2.0, 10.0, size=Hm) if per_head else float(rng.uniform(2.0, 10.0))
    return dict(q=q, k=k, v=v, mask=m, bias=b, bias_batch_dim=bias_batch_dim, scale=scale, groups=groups,
                causal=causal, l2norm_qk=l2norm_qk)


def api_kwargs(inputs, cast=None):
    """Keyword arguments of the public API (arrays cast with `cast` when given)."""
    c = cast or (lambda x: x)
    scale = inputs["scale"]
    if not isinstance(scale, float):
        scale = c(scale)
    return dict(mask=inputs["mask"], attn_bias=None if inputs["bias"] is None else c(inputs["bias"]),
                attn_bias_batch_dim=inputs["bias_batch_dim"], scale=scale, groups=inputs["groups"],
                causal=inputs["causal"], l2norm_qk=inputs["l2norm_qk"])


def canonical64(inputs):
    """(prob, inp) with float64 arrays and prob.dtype float64, from canonicalize on float32 copies."""
    f32 = lambda x: x.astype(np.float32)  # noqa: E731
    prob, inp = problem.canonicalize(f32(inputs["q"]), f32(inputs["k"]), f32(inputs["v"]), **api_kwargs(inputs, f32))
    inp.q = inputs["q"].reshape(inp.q.shape)
    inp.k = inputs["k"].reshape(inp.k.shape)
    inp.v = inputs["v"].reshape(inp.v.shape)
    if inputs["bias"] is not None:
        inp.bias = inputs["bias"].reshape(inp.bias.shape)
    inp.scale = np.broadcast_to(np.asarray(inputs["scale"], dtype=np.float64), (prob.H,)).copy()
    return dataclasses.replace(prob, dtype=np.dtype(np.float64)), inp


def reference64(inputs, dout):
    """(out, lse, dq, dk, dv, dbias, dscale) from the reference in float64, in the user's layout."""
    prob, inp = canonical64(inputs)
    out, lse = reference.forward64(prob, inp)
    dq, dk, dv, dbias, dscale = reference.backward64(prob, inp, dout.reshape(out.shape))
    q, k, b = inputs["q"], inputs["k"], inputs["bias"]
    dscale = dscale.sum() if isinstance(inputs["scale"], float) else dscale
    return (out.reshape(q.shape), lse.reshape(q.shape[:-1]), dq.reshape(q.shape), dk.reshape(k.shape),
            dv.reshape(k.shape), None if b is None else dbias.reshape(b.shape), dscale)


def rel_err(x, ref):
    x, ref = np.asarray(x, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert x.shape == ref.shape, (x.shape, ref.shape)
    nref = np.linalg.norm(ref)
    nerr = np.linalg.norm(x - ref)
    if nref == 0:
        return nerr
    return nerr / nref


def assert_lse_close(lse, ref, rtol):
    lse, ref = np.asarray(lse, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert lse.shape == ref.shape
    empty = np.isneginf(ref)
    assert np.array_equal(np.isneginf(lse), empty), "lse must be -inf exactly on rows without a visible key"
    assert not np.any(np.isnan(lse))
    if np.any(~empty):
        np.testing.assert_allclose(lse[~empty], ref[~empty], rtol=rtol, atol=rtol)


# --------------------------------------------------------------------------------------------------
# The grid: causal x mask x bias layout x kv layout x l2norm_qk (128 configurations), with groups,
# per-head scale, lengths (Nq < Nk, Nq > Nk, equal, length 1) and D cycled through them.
# --------------------------------------------------------------------------------------------------

LENGTHS = [(5, 9), (11, 6), (7, 7), (1, 13), (9, 1), (3, 8), (13, 4)]
DIMS = [8, 16, 32]
GRID = []
# zero_chunk needs Nk > 1: with one key every visible softmax row is exactly 1, the exact gradients are
# 0, and dx = dx̂/1e-12 of a zero chunk would just amplify the reference's rounding noise.
for n, (causal, mask, bias, kv, l2n) in enumerate(itertools.product(
        (False, True), (False, True), ("none", "head", "batch", "full"), ("mha", "gqa", "mqa3d", "merged"),
        (True, False))):
    Nq, Nk = LENGTHS[n % len(LENGTHS)]
    D = DIMS[(n // 2) % len(DIMS)]
    groups = (1, 2, 4)[(n // 3) % 3] if D % 4 == 0 else 1
    GRID.append(dict(causal=causal, mask=mask, bias=bias, kv=kv, l2norm_qk=l2n, Nq=Nq, Nk=Nk, D=D, groups=groups,
                     per_head=(n // 5) % 2 == 1, empty_batch=mask and (n // 7) % 2 == 0,
                     zero_chunk=l2n and n % 11 == 0 and Nk > 1))


def _grid_id(c):
    return (f"{'causal' if c['causal'] else 'full'}-{'mask' if c['mask'] else 'nomask'}-bias_{c['bias']}-"
            f"{c['kv']}-{'l2' if c['l2norm_qk'] else 'nol2'}-g{c['groups']}-{'hs' if c['per_head'] else 's'}-"
            f"{c['Nq']}x{c['Nk']}-d{c['D']}")


def test_grid_covers_every_feature():
    assert len(GRID) >= 100
    for key in ("causal", "mask", "bias", "kv", "l2norm_qk", "groups", "per_head", "D", "empty_batch"):
        assert len({c[key] for c in GRID}) > 1, key
    assert any(c["Nq"] < c["Nk"] for c in GRID) and any(c["Nq"] > c["Nk"] for c in GRID)


@pytest.mark.parametrize("cfg", GRID, ids=[_grid_id(c) for c in GRID])
def test_reference_matches_torch_autograd(cfg):
    rng = np.random.default_rng(zlib.crc32(_grid_id(cfg).encode()))
    inputs = make_inputs(rng, **cfg)
    dout = rng.standard_normal(inputs["q"].shape)
    got = reference64(inputs, dout)
    want = torch_grads(inputs, dout)
    names = ("out", "lse", "dq", "dk", "dv", "dbias", "dscale")
    for name, x, r in zip(names, got, want):
        if name == "lse":
            assert_lse_close(x, r, 1e-12)
            continue
        if r is None:
            assert x is None, name
            continue
        assert np.all(np.isfinite(x)), name
        # relative 1e-10; the tiny absolute floor only matters where the exact gradient is 0 (e.g.
        # Nk = 1: every visible row's softmax is exactly 1, so dq, dk, dbias, dscale vanish)
        err = np.linalg.norm(np.asarray(x, dtype=np.float64) - r)
        assert err <= 1e-10 * np.linalg.norm(r) + 1e-12, (name, rel_err(x, r), err)
    # rows without a visible key give exactly zero output
    empty = np.isneginf(want[1])
    assert np.all(got[0][empty] == 0)


def test_fully_masked_rows_are_zero_and_contribute_nothing():
    rng = np.random.default_rng(1)
    inputs = make_inputs(rng, mask=True, empty_batch=True, bias="full", per_head=True, causal=True, Nq=6, Nk=4)
    dout = rng.standard_normal(inputs["q"].shape)
    out, lse, dq, dk, dv, dbias, dscale = reference64(inputs, dout)
    # the last batch entry has no visible key; causal with Nq > Nk also empties the first Nq - Nk rows
    assert np.all(out[-1] == 0) and np.all(np.isneginf(lse[-1]))
    assert np.all(dq[-1] == 0) and np.all(dk[-1] == 0) and np.all(dv[-1] == 0) and np.all(dbias[-1] == 0)
    assert np.all(np.isneginf(lse[:, :, :2])) and np.all(out[:, :, :2] == 0)
    assert np.all(dq[:, :, :2] == 0) and np.all(dbias[:, :, :2] == 0)
    for x in (out, dq, dk, dv, dbias, dscale):
        assert np.all(np.isfinite(x))


def test_large_logits_stay_finite_without_l2norm_and_with_bias():
    """l2norm_qk=False and a large bias: logits in the thousands need the max-subtracted softmax."""
    rng = np.random.default_rng(2)
    inputs = make_inputs(rng, l2norm_qk=False, bias="full", Nq=4, Nk=6, D=16)
    inputs["q"] *= 30.0
    inputs["bias"] *= 500.0
    dout = rng.standard_normal(inputs["q"].shape)
    got = reference64(inputs, dout)
    want = torch_grads(inputs, dout)
    for x in got:
        assert np.all(np.isfinite(x))
    # the softmax is nearly one-hot, so dq, dk, dbias, dscale are ~0: compare those absolutely
    for i in (0, 4):
        assert rel_err(got[i], want[i]) <= 1e-10
    for i in (2, 3, 5, 6):
        assert np.max(np.abs(got[i] - want[i])) <= 1e-10
    assert_lse_close(got[1], want[1], 1e-12)
    assert np.max(np.abs(want[1])) > 1000  # the logits really are large


def test_minus_inf_bias_removes_pairs_like_a_mask():
    rng = np.random.default_rng(3)
    inputs = make_inputs(rng, bias="full", Nq=3, Nk=5, D=8, B=1, H=2)
    bias = inputs["bias"]
    bias[0, 0, 1, :] = -np.inf  # a whole row: no visible key
    bias[0, 1, :, 2] = -np.inf  # one key for every row of head 1
    prob, inp = canonical64(inputs)
    out, lse = reference.forward64(prob, inp)
    assert np.all(out[0, 0, 1] == 0) and np.isneginf(lse[0, 0, 1])
    assert np.all(np.isfinite(out))
    inputs2 = dict(inputs, bias=np.where(np.isinf(bias), 0.0, bias))
    inputs2["mask"] = np.ones((1, 5), dtype=bool)
    inputs2["mask"][0, 2] = False
    prob2, inp2 = canonical64(inputs2)
    out2, _ = reference.forward64(prob2, inp2)
    np.testing.assert_allclose(out[0, 1], out2[0, 1], rtol=1e-13, atol=1e-15)


def test_nan_on_a_visible_pair_poisons_exactly_its_row():
    """A NaN bias on a visible pair (i, j) makes row i NaN (out, lse: not 0 and -inf), and the gradients
    it feeds (dq_i, dk and dv of the keys row i sees, dbias on its visible pairs); everything else is
    exactly the clean problem's."""
    rng = np.random.default_rng(4)
    inputs = make_inputs(rng, bias="full", causal=True, Nq=6, Nk=6, D=8, B=1, H=2, per_head=True)
    dout = rng.standard_normal(inputs["q"].shape)
    clean = reference64(inputs, dout)
    bias = inputs["bias"].copy()
    bias[0, 1, 3, 1] = np.nan  # row 3 of head 1 sees keys 0..3
    got = reference64(dict(inputs, bias=bias), dout)
    out, lse, dq, dk, dv, dbias, dscale = got
    assert np.isnan(out[0, 1, 3]).all() and np.isnan(lse[0, 1, 3]) and np.isnan(dq[0, 1, 3]).all()
    assert np.isnan(dk[0, 1, :4]).all() and np.isnan(dv[0, 1, :4]).all() and np.isnan(dscale[1])
    assert np.isnan(dbias[0, 1, 3, :4]).all() and np.all(dbias[0, 1, 3, 4:] == 0)
    assert np.sum(np.isnan(out)) == 8 and np.sum(np.isnan(lse)) == 1 and np.sum(np.isnan(dq)) == 8
    rows = np.arange(6) != 3
    for i, name in enumerate(("out", "lse", "dq")):
        np.testing.assert_array_equal(got[i][0, 1, rows], clean[i][0, 1, rows], err_msg=name)
        np.testing.assert_array_equal(got[i][0, 0], clean[i][0, 0], err_msg=name)
    for i in (3, 4):  # dk, dv: keys 4, 5 (hidden from row 3) and head 0 unchanged
        np.testing.assert_array_equal(got[i][0, 1, 4:], clean[i][0, 1, 4:])
        np.testing.assert_array_equal(got[i][0, 0], clean[i][0, 0])
    np.testing.assert_array_equal(dscale[0], clean[6][0])


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_masked_and_hidden_keys_change_nothing(value):
    """NaN / ±Inf in the k, v and bias of masked keys and on causally hidden pairs: bitwise the clean
    result, every gradient included (a masked key's dk and dv stay exactly 0)."""
    rng = np.random.default_rng(6)
    inputs = make_inputs(rng, bias="full", mask=True, causal=True, kv="gqa", Nq=5, Nk=7, D=8, B=2, H=4,
                         per_head=True)
    inputs["mask"][0, 2] = inputs["mask"][1, 5] = False
    dout = rng.standard_normal(inputs["q"].shape)
    clean = reference64(inputs, dout)
    k, v, b = inputs["k"].copy(), inputs["v"].copy(), inputs["bias"].copy()
    for bb, j in ((0, 2), (1, 5)):
        k[bb, :, j, 1] = value
        v[bb, :, j] = value
        b[bb, :, :, j] = value
    hidden = np.arange(7)[None, :] > np.arange(5)[:, None] + 2
    b[..., hidden] = value
    got = reference64(dict(inputs, k=k, v=v, bias=b), dout)
    for x, c in zip(got, clean):
        np.testing.assert_array_equal(x, c)
    assert np.all(got[3][0, :, 2] == 0) and np.all(got[4][1, :, 5] == 0)


def test_l2norm_backward_without_gradient_is_zero_for_nonfinite_rows():
    """The norm's gradient is 0 for a chunk that receives none, even when its x holds NaN or Inf (the
    formula would give NaN); a chunk that does receive a gradient keeps the formula."""
    x = np.array([[np.nan, 1.0, 2.0, 3.0], [np.inf, 1.0, 1.0, 1.0], [1.0, 2.0, 2.0, 4.0]])
    xhat, n = reference._l2norm(x, 2)
    dxhat = np.array([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0], [0.5, -1.0, 0.0, 0.0]])
    dx = reference._l2norm_backward(xhat, n, dxhat, 2)
    assert np.all(dx[0] == 0) and np.all(dx[1, :2] == 0) and np.all(dx[2, 2:] == 0)
    xc, dc = x[1, 2:], dxhat[1, 2:]
    nc = np.linalg.norm(xc)
    np.testing.assert_allclose(dx[1, 2:], (dc - xc / nc * np.dot(xc / nc, dc)) / nc, rtol=1e-15)


# --------------------------------------------------------------------------------------------------
# Finite differences of the analytic backward (float64, every input including bias and per-head scale)
# --------------------------------------------------------------------------------------------------

FD_CASES = [
    dict(kv="gqa", bias="full", mask=True, causal=True, groups=2, per_head=True, Nq=3, Nk=4, D=4, B=1, H=2),
    dict(kv="mqa3d", bias="head", causal=True, groups=1, per_head=True, Nq=4, Nk=3, D=4, B=2, H=2),
    dict(kv="merged", bias="batch", mask=True, groups=2, per_head=False, Nq=2, Nk=3, D=4, B=1, H=2),
    dict(kv="mha", bias="batch", l2norm_qk=False, per_head=True, Nq=3, Nk=3, D=4, B=2, H=2),
    dict(kv="gqa", bias="none", groups=4, per_head=False, Nq=2, Nk=5, D=8, B=1, H=4),
]


def _fd_loss(inputs, w):
    prob, inp = canonical64(inputs)
    out, _ = reference.forward64(prob, inp)
    return float(np.sum(out.reshape(w.shape) * w))


@pytest.mark.parametrize("case", range(len(FD_CASES)))
def test_backward_matches_central_differences(case):
    rng = np.random.default_rng(100 + case)
    inputs = make_inputs(rng, **FD_CASES[case])
    # moderate scales keep the softmax away from one-hot, so no gradient is tiny against FD noise
    sc = inputs["scale"]
    inputs["scale"] = float(rng.uniform(1.0, 3.0)) if isinstance(sc, float) else rng.uniform(1.0, 3.0, np.shape(sc))
    w = rng.standard_normal(inputs["q"].shape)
    _, _, dq, dk, dv, dbias, dscale = reference64(inputs, w)
    analytic = dict(q=dq, k=dk, v=dv, bias=dbias, scale=dscale)
    h = 1e-5
    for name in ("q", "k", "v", "bias", "scale"):
        if inputs[name] is None:
            assert analytic[name] is None
            continue
        base = inputs[name]
        scalar = isinstance(base, float)
        arr = np.atleast_1d(np.asarray(base, dtype=np.float64))
        num = np.zeros(arr.shape)
        for idx in np.ndindex(arr.shape):
            vals = []
            for sgn in (1.0, -1.0):
                pert = arr.copy()
                pert[idx] += sgn * h
                trial = dict(inputs)
                trial[name] = float(pert[0]) if scalar else pert
                vals.append(_fd_loss(trial, w))
            num[idx] = (vals[0] - vals[1]) / (2 * h)
        got = np.atleast_1d(np.asarray(analytic[name], dtype=np.float64)).reshape(num.shape)
        assert rel_err(got, num) <= 1e-6, (name, rel_err(got, num))


# --------------------------------------------------------------------------------------------------
# The backend interface itself (prob.dtype results, preallocated outputs, documented shape checks)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_backend_interface_dtypes_and_preallocated_outputs(dtype):
    rng = np.random.default_rng(4)
    inputs = make_inputs(rng, kv="gqa", bias="head", mask=True, per_head=True)
    cast = lambda x: x.astype(dtype)  # noqa: E731
    kw = api_kwargs(inputs, cast)
    kw["attn_bias"] = inputs["bias"].astype(np.float32)
    prob, inp = problem.canonicalize(cast(inputs["q"]), cast(inputs["k"]), cast(inputs["v"]), **kw)
    out, lse = reference.forward(prob, inp)
    assert out.dtype == np.dtype(dtype) and out.shape == (prob.B, prob.H, prob.Nq, prob.D)
    assert lse.dtype == np.float32 and lse.shape == (prob.B, prob.H, prob.Nq)
    out2 = np.empty_like(out)
    lse2 = np.empty_like(lse)
    r_out, r_lse = reference.forward(prob, inp, out=out2, lse=lse2)
    assert r_out is out2 and r_lse is lse2
    np.testing.assert_array_equal(out2.astype(np.float32), out.astype(np.float32))
    np.testing.assert_array_equal(lse2, lse)
    dout = cast(rng.standard_normal(out.shape))
    dq, dk, dv, dbias, dscale = reference.backward(prob, inp, dout, out, lse)
    assert dq.dtype == dk.dtype == dv.dtype == np.dtype(dtype)
    assert dq.shape == inp.q.shape and dk.shape == inp.k.shape and dv.shape == inp.v.shape
    assert dbias.shape == inp.bias.shape and dbias.dtype == np.float32
    assert dscale.shape == (prob.H,) and dscale.dtype == np.float64
    with pytest.raises(ValueError, match="lse"):
        reference.backward(prob, inp, dout, out, lse[..., :-1])
    with pytest.raises(ValueError, match="out"):
        reference.forward(prob, inp, out=np.empty((1, 1, 1, 1), dtype=dtype))


def test_public_api_reference_matches_float64_within_rounding():
    """The public API (float32 in/out) equals the float64 reference up to float32 rounding."""
    rng = np.random.default_rng(5)
    inputs = make_inputs(rng, kv="gqa", bias="full", mask=True, causal=True, per_head=True, groups=2, Nq=6, Nk=9)
    inputs = {n: (x.astype(np.float32).astype(np.float64) if isinstance(x, np.ndarray) and x.dtype == np.float64
                  else x) for n, x in inputs.items()}
    dout = rng.standard_normal(inputs["q"].shape).astype(np.float32).astype(np.float64)
    want = reference64(inputs, dout)
    f32 = lambda x: x.astype(np.float32)  # noqa: E731
    kw = api_kwargs(inputs, f32)
    q, k, v = f32(inputs["q"]), f32(inputs["k"]), f32(inputs["v"])
    out, lse = ca.forward(q, k, v, backend="reference", **kw)
    dq, dk, dv, dbias, dscale = ca.backward(f32(dout), q, k, v, out, lse, backend="reference", **kw)
    for x, r in zip((out, dq, dk, dv, dbias, dscale), (want[0],) + want[2:]):
        assert rel_err(x, r) <= 1e-6
    assert_lse_close(lse, want[1], 1e-6)
