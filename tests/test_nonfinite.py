"""Non-finite values: one semantics on every backend (docs/kernels.md "Non-finite values").

- A NaN or Inf on a *visible* pair (in q_i, k_j, v_j or bias_ij; a -inf bias excepted) poisons row i:
  out_i and lse_i are NaN, and so is every gradient the row feeds (dq_i, dk_j and dv_j of its visible
  keys, dbias on its visible pairs, dscale of its head).
- A bias of -inf removes its pair like the mask: a row whose visible pairs are all -inf gives 0 output,
  lse = -inf and zero gradients.
- A masked or causally invisible key never influences anything, even if its k, v or bias hold NaN or
  Inf. The kernels used to multiply such a key's NaN v by a zero probability when it shared a tile
  with visible keys, so the answer depended on tile boundaries; here NaN/Inf sit at the first, middle
  and last key of the tiles of every kernel (forward BN 32/64, bwd_dkdv 64 keys per block, bwd_dq 16/64
  keys per tile) and in tiles with one visible key.

Backends: the float64 reference, the kernels on the CPU emulator (NumPy API, every dtype, both backward
modes), and the torch op on its "torch" CPU implementation and on the emulator; marked ``gpu``, the
same table on CUDA. "Agree" means: the same NaN pattern, the same non-finite pattern, and the finite
values within the contract's tolerance of the dtype.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

import cupy_cosattn as ca
import cupy_cosattn.torch as ctorch
from cupy_cosattn.launch import limits

from attn_results import (
    DTYPES,
    F32,
    NAMES,
    assert_agree,
    assert_identical,
    dscale_terms,
    f64,
    for_torch,
    run_numpy,
    run_torch,
    to_torch,
)


def rng_inputs(seed, *, B=1, H=2, Hk=None, Nq=40, Nk=140, D=32, dtype="float32", bias=False, mask=False):
    """(args, kw, dout) of random normal inputs (NumPy arrays of `dtype`; the bias is float32)."""
    rng = np.random.default_rng(seed)
    dt = DTYPES[dtype]
    Hk = H if Hk is None else Hk
    q = rng.standard_normal((B, H, Nq, D))
    k = rng.standard_normal((B, Hk, Nk, D))
    v = rng.standard_normal((B, Hk, Nk, D))
    kw = {}
    if mask:
        kw["mask"] = np.ones((B, Nk), dtype=bool)
    if bias:
        kw["attn_bias"] = rng.standard_normal((B, H, Nq, Nk)).astype(np.float32)
    dout = rng.standard_normal((B, H, Nq, D)).astype(dt)
    return [q.astype(dt), k.astype(dt), v.astype(dt)], kw, dout


def plant(x, index, value):
    """A copy of x with x[index] = value."""
    y = np.array(x, copy=True)
    y[index] = value
    return y


# ---------------------------------------------------------------------------------------------------
# Masked keys holding NaN / Inf, at every position relative to the kernels' tiles.

NK = 140  # 2 x 64 + a partial tile
BOUNDARY_KEYS = [0, 7, 15, 16, 31, 32, 47, 63, 64, 65, 95, 96, 127, 128, 139]  # first / middle / last of tiles


def masked_layout(layout):
    """(mask (1, NK) bool, the masked keys that get NaN/Inf)."""
    m = np.ones((1, NK), dtype=bool)
    if layout == "boundaries":
        m[0, BOUNDARY_KEYS] = False
    else:  # "one visible key at position p of the tile 64..127", the rest of that tile masked
        pos = int(layout.split("@")[1])
        m[0, 64:128] = False
        m[0, pos] = True
        m[0, [0, 139]] = False
    return m, np.flatnonzero(~m[0])


def poison_keys(args, kw, keys, with_bias):
    """args/kw with NaN, +Inf and -Inf in the k, v (and bias) of `keys`, cycling per key."""
    q, k, v = args
    k, v = k.copy(), v.copy()
    specials = (np.nan, np.inf, -np.inf)
    for n, j in enumerate(keys):
        k[:, :, j, n % k.shape[-1]] = specials[n % 3]
        v[:, :, j, :] = specials[(n + 1) % 3]
        v[:, :, j, 1] = specials[n % 3]
    kw = dict(kw)
    if with_bias:
        b = kw["attn_bias"].copy()
        b[..., keys] = np.array([specials[n % 3] for n in range(len(keys))], dtype=b.dtype)
        kw["attn_bias"] = b
    return [q, k, v], kw


LAYOUTS = ["boundaries", "one@64", "one@100", "one@127"]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_masked_nonfinite_keys_change_nothing_on_the_emulator(dtype, layout, with_bias):
    """NaN/Inf in masked keys' k, v and bias: the emulated kernels give bitwise the result of the same
    problem with finite values there (deterministic backward), and agree with the reference (fast
    backward too); no NaN/Inf anywhere, and the masked keys' dk, dv are exactly 0."""
    args, kw, dout = rng_inputs(11, dtype=dtype, bias=with_bias, mask=True)
    m, bad = masked_layout(layout)
    kw["mask"] = m
    pargs, pkw = poison_keys(args, kw, bad, with_bias)
    ref = run_numpy("reference", args, kw, dout)
    for det in (True, False):
        got = run_numpy("emulator", pargs, pkw, dout, deterministic=det)
        what = f"{dtype} {layout} bias={with_bias} det={det}"
        for name in NAMES:
            if got[name] is not None:
                assert np.all(np.isfinite(got[name])), f"{what}: {name} has NaN/Inf"
        assert np.all(got["dk"][:, :, bad] == 0) and np.all(got["dv"][:, :, bad] == 0), what
        if with_bias:
            assert np.all(got["dbias"][..., bad] == 0), what
        assert_agree(got, ref, dtype, what, dscale_terms(args, kw, dout))
        if det:
            clean = run_numpy("emulator", args, kw, dout, deterministic=True)
            assert_identical(got, clean, what)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["reference", "torch", "torch-emulator"])
def test_masked_nonfinite_keys_change_nothing_on_the_other_backends(layout, backend):
    """The same on the reference (exactly) and the torch op (CPU implementation and emulator)."""
    args, kw, dout = rng_inputs(12, bias=True, mask=True, Nq=24)
    kw["mask"], bad = masked_layout(layout)
    pargs, pkw = poison_keys(args, kw, bad, True)
    if backend == "reference":
        got, want = run_numpy("reference", pargs, pkw, dout), run_numpy("reference", args, kw, dout)
        assert_identical(got, want, f"reference {layout}")
        return
    tb = "torch" if backend == "torch" else "emulator"
    got, want = run_torch(tb, pargs, pkw, dout), run_torch(tb, args, kw, dout)
    for name in NAMES:
        assert np.all(np.isfinite(got[name])), f"{backend} {layout}: {name} has NaN/Inf"
    assert np.all(got["dk"][:, :, bad] == 0) and np.all(got["dv"][:, :, bad] == 0)
    assert_agree(got, want, "float32", f"{backend} {layout}")
    assert_agree(got, for_torch(run_numpy("reference", args, kw, dout)), "float32", f"{backend} {layout} vs reference",
                 dscale_terms(args, kw, dout))


def test_masked_nonfinite_query_only_rows_and_l2norm_off():
    """l2norm_qk=False (the backward copies q, k with their non-finite elements zeroed) and GQA: NaN in
    a masked key's k and v changes nothing; a batch entry with every key masked and NaN queries gives
    0 output, lse -inf and zero gradients."""
    rng = np.random.default_rng(5)
    B, H, Hk, Nq, D = 2, 4, 2, 20, 16
    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(rng.standard_normal((B, H, Nq, D))).astype(F32)
    k = unit(rng.standard_normal((B, Hk, NK, D))).astype(F32)
    v = rng.standard_normal((B, Hk, NK, D)).astype(F32)
    dout = rng.standard_normal(q.shape).astype(F32)
    m, bad = masked_layout("boundaries")
    mask = np.concatenate([m, np.zeros((1, NK), dtype=bool)])
    kw = dict(mask=mask, l2norm_qk=False, scale=4.0)
    pq = plant(q, (1, 0, 3), np.nan)  # batch entry 1 sees nothing
    pk, pv = plant(k, (0, slice(None), bad, 0), np.nan), plant(v, (0, slice(None), bad), np.inf)
    ref = run_numpy("reference", [q, k, v], kw, dout)
    for det in (True, False):
        got = run_numpy("emulator", [pq, pk, pv], kw, dout, deterministic=det)
        for name in NAMES:
            if got[name] is not None:
                finite = ~np.isnan(got[name]) if name == "lse" else np.isfinite(got[name])  # lse: -inf
                assert np.all(finite), f"{name} has NaN/Inf ({det=})"
        assert np.all(got["out"][1] == 0) and np.all(np.isneginf(got["lse"][1])) and np.all(got["dq"][1] == 0)
        assert_agree(got, ref, "float32", f"l2norm off det={det}", dscale_terms([q, k, v], kw, dout))
    assert_agree(run_numpy("reference", [pq, pk, pv], kw, dout), ref, "float32", "reference")
    assert_agree(run_torch("torch", [pq, pk, pv], kw, dout), for_torch(ref), "float32", "torch",
                 dscale_terms([q, k, v], kw, dout))


# ---------------------------------------------------------------------------------------------------
# Causally invisible keys and pairs.

CAUSAL_SHAPES = [(100, 100), (90, 130), (130, 70)]  # (Nq, Nk): diagonal offsets 0, +40, -60


def causal_rows_seeing(j, Nq, Nk):
    """Bool (Nq,): which query rows see key j (bottom-right aligned)."""
    return j <= np.arange(Nq) + (Nk - Nq)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", CAUSAL_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_causal_nan_bias_on_invisible_pairs_changes_nothing(dtype, shape):
    """NaN / Inf bias on every pair above the causal diagonal: bitwise the clean result (emulator,
    deterministic) and the reference's."""
    Nq, Nk = shape
    args, kw, dout = rng_inputs(21, dtype=dtype, bias=True, Nq=Nq, Nk=Nk)
    kw["causal"] = True
    hidden = np.arange(Nk)[None, :] > np.arange(Nq)[:, None] + (Nk - Nq)
    b = kw["attn_bias"].copy()
    b[..., hidden] = np.where(np.arange(hidden.sum()) % 2, np.nan, np.inf)
    pkw = dict(kw, attn_bias=b)
    ref = run_numpy("reference", args, kw, dout)
    assert_identical(run_numpy("reference", args, pkw, dout), ref, "reference")
    for det in (True, False):
        got = run_numpy("emulator", args, pkw, dout, deterministic=det)
        assert_agree(got, ref, dtype, f"{dtype} {shape} det={det}", dscale_terms(args, kw, dout))
        assert np.all(got["dbias"][..., hidden] == 0)
        if det:
            assert_identical(got, run_numpy("emulator", args, kw, dout, deterministic=True), f"{dtype} {shape}")


CAUSAL_KEYS = [1, 15, 16, 31, 63, 64, 65, 69]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("key", CAUSAL_KEYS)
@pytest.mark.parametrize("where", ["k", "v"])
def test_causal_nonfinite_key_poisons_exactly_the_rows_that_see_it(dtype, key, where):
    """NaN/Inf in k_j or v_j of kv head 0 under causal: the rows that see key j are NaN (out, lse, dq),
    every other row is bitwise its clean value (emulator, deterministic), kv head 1 is untouched, and
    the reference and torch agree. Key j sits at tile boundaries of every kernel."""
    Nq, Nk = 130, 70  # 60 rows see no key; row i sees keys j <= i - 60
    args, kw, dout = rng_inputs(31, dtype=dtype, Nq=Nq, Nk=Nk)
    kw["causal"] = True
    q, k, v = args
    if where == "k":
        k = plant(k, (0, 0, key, 3), np.inf)
    else:
        v = plant(plant(v, (0, 0, key, 5), np.nan), (0, 0, key, 6), -np.inf)
    pargs = [q, k, v]
    sees = causal_rows_seeing(key, Nq, Nk)
    ref = run_numpy("reference", pargs, kw, dout)
    assert np.all(np.isnan(ref["out"][0, 0][sees])) and np.all(np.isnan(ref["lse"][0, 0][sees]))
    assert np.all(np.isfinite(ref["out"][0, 0][~sees])) and np.all(np.isfinite(ref["out"][0, 1]))
    clean = run_numpy("emulator", args, kw, dout, deterministic=True)
    for det in (True, False):
        got = run_numpy("emulator", pargs, kw, dout, deterministic=det)
        what = f"{dtype} {where}[{key}] det={det}"
        assert_agree(got, ref, dtype, what, dscale_terms(args, kw, dout))
        if det:  # the rows that do not see the key, and the other head, are bitwise unchanged
            for name in ("out", "lse", "dq"):
                assert np.array_equal(got[name][0, 0][~sees], clean[name][0, 0][~sees]), (what, name)
                assert np.array_equal(got[name][0, 1], clean[name][0, 1]), (what, name)
            for name in ("dk", "dv"):
                assert np.array_equal(got[name][0, 1], clean[name][0, 1]), (what, name)
    if dtype == "float32":
        assert_agree(run_torch("torch", pargs, kw, dout), for_torch(ref), dtype, f"torch {where}[{key}]",
                     dscale_terms(args, kw, dout))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_a_warp_seeing_a_whole_scrubbed_tile_is_poisoned(dtype):
    """Causal, Nq = Nk = 96: the first key tile crosses the first rows' diagonal, so the block zeroes
    its non-finite V elements, while the block's later warps see the whole tile (16-bit: 32 rows per
    warp, 64 keys). A NaN in v_40 must still poison every row that sees key 40 (rows 40..95) and no
    other."""
    Nq = Nk = 96
    args, kw, dout = rng_inputs(37, dtype=dtype, Nq=Nq, Nk=Nk)
    kw["causal"] = True
    q, k, v = args
    pargs = [q, k, plant(v, (0, 0, 40, 5), np.nan)]
    sees = causal_rows_seeing(40, Nq, Nk)
    ref = run_numpy("reference", pargs, kw, dout)
    got = run_numpy("emulator", pargs, kw, dout, deterministic=True)
    assert np.all(np.isnan(got["out"][0, 0][sees])) and np.all(np.isnan(got["lse"][0, 0][sees]))
    assert_agree(got, ref, dtype, f"{dtype} v[40]", dscale_terms(args, kw, dout))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_causal_nan_query_leaves_the_keys_it_cannot_see_alone(dtype):
    """A NaN query row i under causal: dk, dv of the keys j > i + Nk - Nq are bitwise unchanged (the
    backward zeroes that row of qhat in the dK product), the keys it sees get NaN."""
    Nq, Nk, i = 100, 100, 40
    args, kw, dout = rng_inputs(41, dtype=dtype, Nq=Nq, Nk=Nk, H=1)
    kw["causal"] = True
    pargs = [plant(args[0], (0, 0, i, 0), np.nan)] + args[1:]
    ref = run_numpy("reference", pargs, kw, dout)
    clean = run_numpy("emulator", args, kw, dout, deterministic=True)
    for det in (True, False):
        got = run_numpy("emulator", pargs, kw, dout, deterministic=det)
        assert_agree(got, ref, dtype, f"{dtype} det={det}", dscale_terms(args, kw, dout))
        assert np.all(np.isnan(got["dk"][0, 0, : i + 1])) and np.all(np.isnan(got["dv"][0, 0, : i + 1]))
        if det:
            assert np.array_equal(got["dk"][0, 0, i + 1:], clean["dk"][0, 0, i + 1:])
            assert np.array_equal(got["dv"][0, 0, i + 1:], clean["dv"][0, 0, i + 1:])
            rows = np.arange(Nq) != i
            assert np.array_equal(got["out"][0, 0, rows], clean["out"][0, 0, rows])


# ---------------------------------------------------------------------------------------------------
# -inf bias.

@pytest.mark.parametrize("dtype", list(DTYPES))
def test_minus_inf_bias_is_a_mask(dtype):
    """A -inf bias column is the same problem as masking that key (out, lse, every gradient; dbias is 0
    on the -inf pairs). A row of -inf gives out 0, lse -inf, dq 0 and dbias 0. Emulator (both modes),
    reference and torch agree."""
    Nq, Nk = 70, 100
    args, kw, dout = rng_inputs(51, dtype=dtype, bias=True, Nq=Nq, Nk=Nk)
    cols, rows = [0, 31, 32, 63, 64, 99], [3, 64]
    b_cols = plant(kw["attn_bias"], (Ellipsis, cols), -np.inf)
    mask = np.ones((1, Nk), dtype=bool)
    mask[0, cols] = False
    kw_cols = dict(kw, attn_bias=b_cols)
    kw_mask = dict(kw, mask=mask)
    for backend in ("reference", "emulator"):
        got, want = run_numpy(backend, args, kw_cols, dout, True), run_numpy(backend, args, kw_mask, dout, True)
        assert np.all(got["dbias"][..., cols] == 0)
        assert_agree(got, want | {"dbias": got["dbias"]}, dtype if backend == "emulator" else "float32",
                     f"{backend}: -inf columns vs mask", dscale_terms(args, kw_mask, dout))
    kw_rows = dict(kw, attn_bias=plant(b_cols, (0, 0, rows), -np.inf))  # two rows of head 0 see nothing
    ref = run_numpy("reference", args, kw_rows, dout)
    for det in (True, False):
        got = run_numpy("emulator", args, kw_rows, dout, deterministic=det)
        what = f"{dtype} det={det}"
        assert_agree(got, ref, dtype, what, dscale_terms(args, kw_rows, dout))
        for r in (ref, got):
            assert np.all(r["out"][0, 0, rows] == 0) and np.all(np.isneginf(r["lse"][0, 0, rows])), what
            assert np.all(r["dq"][0, 0, rows] == 0) and np.all(r["dbias"][0, 0, rows] == 0), what
            assert np.all(r["dbias"][..., cols] == 0), what
            assert all(np.all(np.isfinite(r[n])) for n in NAMES if n != "lse"), what
    assert_agree(run_torch("torch", args, kw_rows, dout), for_torch(ref), dtype, "torch",
                 dscale_terms(args, kw_rows, dout))


# ---------------------------------------------------------------------------------------------------
# The acceptance table: non-finite inputs on which every backend gives the same answer.

def _case(name, *, Nq=40, Nk=72, H=2, Hk=None, causal=False, mask=None, bias=False, l2norm_qk=True, edit):
    return dict(name=name, Nq=Nq, Nk=Nk, H=H, Hk=Hk, causal=causal, mask=mask, bias=bias, l2norm_qk=l2norm_qk,
                edit=edit)


def _set(arr, index, value):
    def edit(a, kw):
        a = list(a)
        if arr == "bias":
            kw["attn_bias"] = plant(kw["attn_bias"], index, value)
        else:
            i = "qkv".index(arr)
            a[i] = plant(a[i], index, value)
        return a, kw
    return edit


def _chain(*edits):
    def edit(a, kw):
        for e in edits:
            a, kw = e(a, kw)
        return a, kw
    return edit


def _half_mask(Nk):
    m = np.ones((2, Nk), dtype=bool)
    m[0, 1::3] = False
    m[1, 40:] = False
    return m


TABLE = [
    _case("nan q row", edit=_set("q", (0, 1, 7, 3), np.nan)),
    _case("inf k visible", edit=_set("k", (1, 0, 33, 0), np.inf)),
    _case("nan v visible element", edit=_set("v", (0, 0, 64, 9), np.nan)),
    _case("-inf v visible, causal", causal=True, Nq=72, edit=_set("v", (0, 1, 20, 2), -np.inf)),
    _case("nan bias on one pair", bias=True, edit=_set("bias", (1, 0, 5, 17), np.nan)),
    _case("+inf bias on one pair", bias=True, edit=_set("bias", (0, 1, 30, 71), np.inf)),
    _case("-inf bias rows and columns", bias=True,
          edit=_chain(_set("bias", (0, 0, 2, slice(None)), -np.inf), _set("bias", (1, 1, slice(None), 40), -np.inf))),
    _case("-inf bias row seeing a nan v", bias=True,
          edit=_chain(_set("bias", (0, 0, 2, slice(None)), -np.inf), _set("v", (0, 0, 5, 3), np.nan))),
    _case("nan and inf in masked keys", mask=_half_mask,
          edit=_chain(_set("k", (0, 0, 1, 0), np.nan), _set("v", (0, 1, 4), np.inf), _set("v", (1, 0, 50), np.nan))),
    _case("masked nan bias", mask=_half_mask, bias=True,
          edit=_chain(_set("bias", (0, 0, slice(None), 1), np.nan), _set("bias", (1, 1, 3, 60), np.inf))),
    _case("nan q of a row that sees nothing", mask=_half_mask, causal=True, Nq=80,
          edit=_chain(_set("q", (1, 0, 2, 5), np.nan), _set("q", (0, 1, 79, 0), np.nan))),
    _case("causal hidden nan k and v", causal=True, Nq=60, Nk=100,
          edit=_chain(_set("k", (0, 0, 99, 1), np.nan), _set("v", (1, 1, 70), np.inf))),
    _case("gqa nan v, masked", H=4, Hk=2, mask=_half_mask, edit=_set("v", (0, 1, 36, 0), np.nan)),
    _case("l2norm off, nan q and masked nan k", l2norm_qk=False, mask=_half_mask,
          edit=_chain(_set("q", (1, 1, 9, 2), np.nan), _set("k", (0, 0, 7), np.nan))),
]


def table_inputs(case, dtype, D=16):
    rng = np.random.default_rng(zlib.crc32(case["name"].encode()))
    H, Hk, Nq, Nk = case["H"], case["Hk"] or case["H"], case["Nq"], case["Nk"]
    q = rng.standard_normal((2, H, Nq, D))
    k = rng.standard_normal((2, Hk, Nk, D))
    if not case["l2norm_qk"]:
        q = q / np.linalg.norm(q, axis=-1, keepdims=True)
        k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((2, Hk, Nk, D))
    dt = DTYPES[dtype]
    kw = dict(causal=case["causal"], l2norm_qk=case["l2norm_qk"])
    if case["mask"] is not None:
        kw["mask"] = case["mask"](Nk)
    if case["bias"]:
        kw["attn_bias"] = rng.standard_normal((2, H, Nq, Nk)).astype(np.float32)
    args = [q.astype(dt), k.astype(dt), v.astype(dt)]
    dout = rng.standard_normal(q.shape).astype(dt)
    clean = (args, dict(kw))
    args, kw = case["edit"](args, dict(kw))
    return args, kw, dout, clean


@pytest.mark.parametrize("case", TABLE, ids=[c["name"] for c in TABLE])
def test_backends_agree_on_nonfinite_inputs(case):
    """Acceptance: reference, emulator (both backward modes) and the torch op ("torch" and "emulator")
    give the same NaN pattern and the same values elsewhere on every row of the table (float32)."""
    args, kw, dout, clean = table_inputs(case, "float32")
    ref = run_numpy("reference", args, kw, dout)
    assert not all(np.isfinite(x).all() for x in args + [kw.get("attn_bias", 0.0)]), "the case plants nothing"
    scale = dscale_terms(*clean, dout)
    for det in (True, False):
        assert_agree(run_numpy("emulator", args, kw, dout, deterministic=det), ref, "float32",
                     f"emulator det={det}", scale)
    ref_t = for_torch(ref)
    assert_agree(run_torch("torch", args, kw, dout), ref_t, "float32", "torch", scale)
    assert_agree(run_torch("emulator", args, kw, dout), ref_t, "float32", "torch emulator", scale)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", TABLE, ids=[c["name"] for c in TABLE])
def test_emulator_agrees_on_nonfinite_inputs_in_16_bit(case, dtype):
    """The table through the emulator in float16 and bfloat16 (both backward modes)."""
    args, kw, dout, clean = table_inputs(case, dtype)
    ref = run_numpy("reference", args, kw, dout)
    scale = dscale_terms(*clean, dout)
    for det in (True, False):
        assert_agree(run_numpy("emulator", args, kw, dout, deterministic=det), ref, dtype, f"det={det}", scale)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", TABLE, ids=[c["name"] for c in TABLE])
def test_hopper_forward_agrees_on_nonfinite_inputs(case, dtype, monkeypatch):
    """The table at D = 64 with the emulator as an H100: out and lse from the sm_90a forward
    (cuda_src/hopper_fwd.cu; a spy asserts it ran), the gradients from the backward fed by them (both
    modes)."""
    from test_kernels_hopper import SM90, _spy

    monkeypatch.setattr(limits, "EMULATED_DEVICE", SM90)
    ran = _spy(monkeypatch)
    args, kw, dout, clean = table_inputs(case, dtype, D=64)
    ref = run_numpy("reference", args, kw, dout)
    scale = dscale_terms(*clean, dout)
    for det in (True, False):
        assert_agree(run_numpy("emulator", args, kw, dout, deterministic=det), ref, dtype, f"sm_90a det={det}", scale)
    assert len(ran) == 2, "the Hopper forward did not run"


def test_table_rows_poison_what_the_semantics_say():
    """The reference's patterns on two rows of the table, written out: a NaN query poisons its row and
    the keys of its kv head; a visible NaN bias pair poisons exactly its row (not zeros, not -inf)."""
    args, kw, dout, _ = table_inputs(TABLE[0], "float32")  # q[0, 1, 7] NaN
    r = run_numpy("reference", args, kw, dout)
    nan_rows = np.zeros(r["lse"].shape, dtype=bool)
    nan_rows[0, 1, 7] = True
    assert np.array_equal(np.isnan(r["lse"]), nan_rows)
    assert np.array_equal(np.isnan(r["out"]).any(-1), nan_rows) and np.isnan(r["out"][0, 1, 7]).all()
    assert np.array_equal(np.isnan(r["dq"]).any(-1), nan_rows)
    assert np.isnan(r["dk"][0, 1]).all() and np.isfinite(r["dk"][[0, 1], [0, 0]]).all()
    assert np.isfinite(r["dk"][1]).all()
    args, kw, dout, _ = table_inputs(TABLE[4], "float32")  # bias[1, 0, 5, 17] NaN
    r = run_numpy("reference", args, kw, dout)
    assert np.isnan(r["out"][1, 0, 5]).all() and np.isnan(r["lse"][1, 0, 5])
    assert np.isnan(r["dbias"][1, 0, 5]).all() and np.sum(np.isnan(r["dbias"])) == r["dbias"].shape[-1]


@pytest.mark.gpu
@pytest.mark.parametrize("case", TABLE, ids=[c["name"] for c in TABLE])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_cuda_agrees_on_nonfinite_inputs(case, dtype):
    """GPU twin of the table: the CUDA kernels (NumPy-API on CuPy arrays, both backward modes, and the
    torch op on CUDA tensors) against the reference."""
    import cupy

    args, kw, dout, clean = table_inputs(case, dtype)
    ref = run_numpy("reference", args, kw, dout)
    scale = dscale_terms(*clean, dout)
    dev = lambda x: cupy.asarray(x) if isinstance(x, np.ndarray) else x  # noqa: E731
    for det in (True, False):
        q, k, v = (dev(a) for a in args)
        dkw = {n: dev(x) for n, x in kw.items()}
        out, lse = ca.forward(q, k, v, backend="cuda", **dkw)
        grads = ca.backward(dev(dout), q, k, v, out, lse, backend="cuda", deterministic=det, **dkw)
        host = lambda x: None if x is None else f64(cupy.asnumpy(x) if isinstance(x, cupy.ndarray) else x)  # noqa: E731
        got = dict(zip(NAMES, [host(out), host(lse)] + [host(g) for g in grads]))
        assert_agree(got, ref, dtype, f"cuda det={det}", scale)
    if dtype != "bfloat16":
        tq, tk, tv = (to_torch(a, True, "cuda") for a in args)
        tkw = {n: (to_torch(x, device="cuda") if isinstance(x, np.ndarray) else x) for n, x in kw.items()}
        out = ctorch.cosine_sim_attention(tq, tk, tv, **tkw)
        out.backward(to_torch(dout, device="cuda"))
        got = dict(out=f64(out.detach().float().cpu().numpy()), dq=f64(tq.grad.float().cpu().numpy()),
                   dk=f64(tk.grad.float().cpu().numpy()), dv=f64(tv.grad.float().cpu().numpy()))
        for name in ("out", "dq", "dk", "dv"):
            assert np.array_equal(np.isnan(got[name]), np.isnan(ref[name])), f"torch cuda {name} NaN pattern"
