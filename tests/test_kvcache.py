"""KV-cache attention (cupy_cosattn.kvcache_forward; cuda_src/decode.cu through launch/decode.py) on the CPU
emulator and the reference backend, and, marked ``gpu``, on CuPy.

Every case is built from per-sequence logical keys (cached + appended), scattered into a contiguous or
a paged cache whose every other slot (and every unused page) holds NaN, so a kernel that reads a key
at or past a sequence's length, or a page the block table does not map, returns NaN. The expected
result is the dense float64 reference (reference.forward64) of each sequence over its own keys, built
independently of kvcache.py's gather. After the call the cache must hold exactly the appended rows in
their slots and be bitwise unchanged elsewhere.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cupy_cosattn import emulator as emu
from cupy_cosattn import kvcache, launch, problem, reference
from cupy_cosattn.api import kvcache_forward
from cupy_cosattn.launch import dispatch, limits, registry, tiles
from cupy_cosattn.problem import BFLOAT16

from kernel_cases import DTYPES, rel_err
from planting import plant

OUT_TOL = {"float16": 3e-3, "bfloat16": 2e-2, "float32": 1e-5}
LSE_TOL = {"float16": 1e-3, "bfloat16": 8e-3, "float32": 1e-6}


@dataclasses.dataclass
class KVCase:
    """Arguments of one call, the per-sequence logical keys and the cache expected after it."""

    args: tuple  # q, k_cache, v_cache, cache_seqlens
    kw: dict
    keys: list  # per sequence (Hk, L_b, D) in the dtype: cached then appended
    vals: list
    k_after: np.ndarray
    v_after: np.ndarray
    dtype: str

    @property
    def q(self):
        return self.args[0]


def make_kv_case(seed, *, B=2, H=8, Hk=1, Nq=1, D=64, dtype="float16", cached=(250, 37), append=True,
                 paged=False, page_size=16, spare=20, causal=True, scale=8.0, per_head_scale=False, groups=1,
                 l2norm_qk=True, num_splits=0, bad_table_entries=-1, edit=None) -> KVCase:
    """A random call: sequence b has cached[b] keys in the cache and, with append, Nq new ones.

    The cache holds `spare` slots past the longest sequence (paged: whole pages, plus 3 pages no
    sequence maps); every slot that is not a valid key is NaN. Block-table entries past a sequence's
    pages are `bad_table_entries` (an index no kernel may read). `edit(q, keys, vals)`, if given,
    changes the random values in place before they are placed (e.g. plants NaN in a valid key)."""
    rng = np.random.default_rng(seed)
    dt = DTYPES[dtype]
    assert len(cached) == B
    cached = np.asarray(cached, dtype=np.int64)
    lengths = cached + (Nq if append else 0)

    def rand(*shape):
        x = rng.standard_normal(shape)
        if not l2norm_qk:  # the caller's promise: q, k already normalized (groups chunks)
            c = x.reshape(x.shape[:-1] + (groups, D // groups))
            x = (c / np.linalg.norm(c, axis=-1, keepdims=True)).reshape(shape)
        return x.astype(dt)

    q = rand(B, H, Nq, D)
    keys = [rand(Hk, int(L), D) for L in lengths]
    vals = [rng.standard_normal((Hk, int(L), D)).astype(dt) for L in lengths]
    if edit is not None:
        edit(q, keys, vals)
    cap = int(lengths.max()) + spare
    if paged:
        max_pages = -(-cap // page_size)
        num_pages = B * max_pages + 3
        table = np.full((B, max_pages), bad_table_entries, dtype=np.int32)
        order = rng.permutation(num_pages)  # pages scattered; the last 3 of the order stay unmapped
        used = [-(-int(L) // page_size) for L in lengths]
        it = iter(order)
        for b in range(B):
            for j in range(used[b]):
                table[b, j] = next(it)
        shape = (num_pages, Hk, page_size, D)
    else:
        table = None
        shape = (B, Hk, cap, D)

    def scatter(seqs, n_valid):
        c = np.full(shape, np.nan, dtype=np.float32).astype(dt)
        for b, x in enumerate(seqs):
            for j in range(int(n_valid[b])):
                if paged:
                    c[table[b, j // page_size], :, j % page_size] = x[:, j]
                else:
                    c[b, :, j] = x[:, j]
        return c

    k_cache, v_cache = scatter(keys, cached), scatter(vals, cached)
    k_after, v_after = scatter(keys, lengths), scatter(vals, lengths)
    kw = dict(causal=causal, groups=groups, l2norm_qk=l2norm_qk, num_splits=num_splits)
    kw["scale"] = rng.uniform(0.5 * scale, 1.5 * scale, size=(H,)) if per_head_scale else scale
    if paged:
        kw["block_table"] = table
    if append:
        kw["k_new"] = np.ascontiguousarray(np.stack([k[:, -Nq:] for k in keys]) if Nq else np.zeros((B, Hk, 0, D), dt))
        kw["v_new"] = np.ascontiguousarray(np.stack([v[:, -Nq:] for v in vals]) if Nq else np.zeros((B, Hk, 0, D), dt))
    args = (q, k_cache, v_cache, cached.astype(np.int32))
    return KVCase(args, kw, keys, vals, k_after, v_after, dtype)


def expected(case: KVCase):
    """(out, lse) float64 (B, H, Nq, D), (B, H, Nq): the dense reference of each sequence."""
    q = case.q
    B, H, Nq, D = q.shape
    Hk = case.args[1].shape[1]
    _, scale = problem._scale_vector(case.kw["scale"], H, False)
    out = np.zeros((B, H, Nq, D))
    lse = np.full((B, H, Nq), -np.inf)
    for b in range(B):
        L = case.keys[b].shape[1]
        if L == 0 or Nq == 0:
            continue
        prob = problem.Problem(B=1, H=H, Hk=Hk, Nq=Nq, Nk=L, D=D, dtype=np.dtype(q.dtype),
                               groups=case.kw["groups"], causal=case.kw["causal"], l2norm_qk=case.kw["l2norm_qk"])
        o, ls = reference.forward64(prob, problem.Inputs(q=q[b:b + 1], k=case.keys[b][None], v=case.vals[b][None],
                                                         scale=scale))
        out[b], lse[b] = o[0], ls[0]
    return out, lse


def _bits(x):
    return np.ascontiguousarray(x).view(np.uint8)


def run_case(case: KVCase, backend="emulator", caches=None, **overrides):
    """(out, lse, k_cache, v_cache) as NumPy arrays after the call; the case's own caches are appended to
    in place (CuPy: copies of them). `caches`: (k_cache, v_cache) to pass instead of the case's."""
    q, kc, vc, sl = case.args
    if caches is not None:
        kc, vc = caches
    kw = {**case.kw, **overrides}
    if backend == "cuda":
        import cupy

        dev = {k: (cupy.asarray(v) if isinstance(v, np.ndarray) and k != "scale" else v) for k, v in kw.items()}
        kc_d, vc_d = cupy.asarray(kc), cupy.asarray(vc)
        out, lse = kvcache_forward(cupy.asarray(q), kc_d, vc_d, cupy.asarray(sl), backend="cuda", **dev)
        return cupy.asnumpy(out), cupy.asnumpy(lse), cupy.asnumpy(kc_d), cupy.asnumpy(vc_d)
    out, lse = kvcache_forward(q, kc, vc, sl, backend=backend, **kw)
    return out, lse, kc, vc


def check_case(case: KVCase, backend="emulator", caches=None, **overrides):
    """Run the call and assert the accuracy contract, the empty rows and the cache after the append;
    returns (out, lse). `caches`: (k_cache, v_cache) to pass instead of the case's (e.g. emulator device
    arrays)."""
    q = case.q
    kw = {**case.kw, **overrides}
    out, lse, kc, vc = run_case(case, backend, caches, **overrides)
    assert out.shape == q.shape and np.dtype(out.dtype) == np.dtype(q.dtype)
    assert lse.shape == q.shape[:-1] and lse.dtype == np.float32
    ref_o, ref_l = expected(case)
    o64 = np.asarray(out, dtype=np.float64)
    assert np.isfinite(o64).all(), ("NaN/Inf in out: a key past a sequence's length or an unmapped page was read, "
                                      "or a tile was used before it landed")
    empty = ~np.isfinite(ref_l)
    assert np.all(np.isneginf(lse[empty])), "rows without a visible key must have lse = -inf"
    assert np.all(o64[empty] == 0), "rows without a visible key must be 0"
    assert np.isfinite(lse[~empty]).all(), "NaN/Inf in lse"
    err = rel_err(o64, ref_o)
    assert err <= OUT_TOL[case.dtype], f"out rel err {err:.3e} > {OUT_TOL[case.dtype]:.0e}"
    if (~empty).any():
        bound = float(np.max(kw["scale"])) * kw["groups"]
        lerr = np.max(np.abs(lse[~empty] - ref_l[~empty])) / max(1.0, bound)
        assert lerr <= LSE_TOL[case.dtype], f"lse err {lerr:.3e}"
    assert np.array_equal(_bits(kc), _bits(case.k_after)), "k_cache after the call differs from the expected append"
    assert np.array_equal(_bits(vc), _bits(case.v_after)), "v_cache after the call differs from the expected append"
    return out, lse


@dataclasses.dataclass
class Plan:
    """What the dispatch picks for a call: decode_fwd's shape, split count and variant."""

    wm: int
    bn: int
    n_row_tiles: int
    splits: int
    running_max: bool


def plan(case: KVCase, caps=limits.EMULATED_DEVICE, **overrides) -> Plan:
    q, kc, vc, sl = case.args
    prob, inp = kvcache.check_kvcache(q, kc.copy(), vc.copy(), sl, **{**case.kw, **overrides})
    c = dispatch.select(prob, caps, dispatch.DECODE, scale=inp.scale)
    wm = int(c.spec.name.split(",")[3])
    return Plan(wm, c.tile, c.grid[0] // c.nsplit, c.nsplit, not dispatch.decode_fixed_offset(prob, inp.scale))


BACKENDS = ["emulator", "reference"]

# ---------------------------------------------------------------------------------------------------
# Splits: every count, contiguous and paged caches (GQA 8:1 single-token decode, two very different
# lengths: 251 keys = 4 tiles of 64, and 38).


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("splits", [1, 2, 3, "tiles", 5, 7, "max", 0])
def test_num_splits(paged, splits):
    """1 .. 3 splits of the 4 tiles (uneven ranges), one tile each, more splits than tiles (empty
    splits write l = 0), the largest count, and the heuristic."""
    n = {"tiles": 4, "max": kvcache.MAX_NUM_SPLITS}.get(splits, splits)
    case = make_kv_case(1, paged=paged, num_splits=n)
    p = plan(case)
    assert p.wm == 1 and p.bn == 64
    assert p.splits == (n or 2)  # auto: 2 blocks of 108 SMs' slots -> as many splits as 4 tiles allow
    check_case(case)


@pytest.mark.parametrize("splits", [1, 3])
def test_num_splits_reference(splits):
    check_case(make_kv_case(1, paged=True, num_splits=splits), backend="reference")


# ---------------------------------------------------------------------------------------------------
# Query counts and GQA ratios: both row regimes (G*Nq <= 16: warps split the keys; more: 64-row tiles,
# several per kv head).

NQ_CASES = [  # (Nq, H, Hk)
    (1, 8, 1), (2, 8, 1), (7, 8, 2), (16, 4, 1), (64, 2, 2), (2, 4, 1), (1, 2, 2),
]


@pytest.mark.parametrize("Nq,H,Hk", NQ_CASES, ids=[f"nq{n}-h{h}-hk{k}" for n, h, k in NQ_CASES])
def test_query_counts_and_gqa(Nq, H, Hk):
    case = make_kv_case(2, Nq=Nq, H=H, Hk=Hk, cached=(120, 230 - Nq), paged=True, page_size=32, num_splits=2)
    p = plan(case)
    rows = (H // Hk) * Nq
    assert p.wm == (1 if rows <= 16 else 4) and p.n_row_tiles == -(-rows // (16 * p.wm))
    check_case(case)


@pytest.mark.parametrize("Nq", [pytest.param(n, marks=() if n in (1, 4, 5, 16, 17, 33, 64) else pytest.mark.slow)
                                for n in range(1, 65)])
def test_every_query_count(Nq):
    """Nq = 1 .. 64 at GQA 4:1: 4 Nq rows per kv head, WM = 1 up to Nq = 4, then 64-row tiles (a second
    one from Nq = 17, a fifth at 64); unequal lengths, an append crossing pages of 16, two splits."""
    case = make_kv_case(29, B=2, H=4, Hk=1, Nq=Nq, D=32, cached=(37, 150 - Nq), paged=True, num_splits=2)
    p = plan(case)
    assert p.wm == (1 if 4 * Nq <= 16 else 4) and p.n_row_tiles == -(-4 * Nq // (16 * p.wm))
    check_case(case)


@pytest.mark.parametrize("ratio", [8, 4, 1])
def test_gqa_ratio_contiguous(ratio):
    check_case(make_kv_case(3, H=ratio * 2, Hk=2, Nq=3, cached=(70, 199), num_splits=3))


# ---------------------------------------------------------------------------------------------------
# Appends at page boundaries: cache_seqlens = 0, 15, 16 (mod page size) and 47 (the append crosses a
# page), for pages of 16 and 32 slots; 40 new keys span two or three pages.


@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("Nq", [1, 3, 40])
def test_append_at_page_boundaries(page_size, Nq):
    case = make_kv_case(4, B=4, H=4, Hk=1, Nq=Nq, cached=(2 * page_size, page_size - 1, page_size + 16, 47),
                        paged=True, page_size=page_size, num_splits=2)
    check_case(case)


def test_page_size_not_a_power_of_two():
    check_case(make_kv_case(5, B=2, H=4, Hk=1, Nq=2, cached=(95, 48), paged=True, page_size=48, num_splits=2))


# ---------------------------------------------------------------------------------------------------
# Very different lengths, empty sequences, no append.


@pytest.mark.parametrize("backend", BACKENDS)
def test_unequal_lengths_with_empty_cache(backend):
    case = make_kv_case(6, B=4, H=2, Hk=1, Nq=4, cached=(0, 1, 290, 63), paged=True, num_splits=3)
    check_case(case, backend=backend)


@pytest.mark.parametrize("causal", [True, False])
def test_without_append(causal):
    # sequence 0 holds no key at all: its rows are empty; sequence 1 holds fewer keys than queries
    case = make_kv_case(7, B=3, H=4, Hk=1, Nq=5, cached=(0, 3, 200), append=False, causal=causal, num_splits=2)
    out_empty = expected(case)[1]
    assert np.isneginf(out_empty[0]).all() and (np.isneginf(out_empty[1]).any() == causal)
    check_case(case)


# ---------------------------------------------------------------------------------------------------
# Dtypes, causal or not, both softmax variants.


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Nq", [1, 6])
def test_dtypes(dtype, causal, Nq):
    case = make_kv_case(8, dtype=dtype, H=4, Hk=2, Nq=Nq, D=32, cached=(140, 77), paged=Nq > 1, causal=causal,
                        num_splits=2)
    assert not plan(case).running_max
    check_case(case)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("variant", ["unnormalized", "large_scale"])
def test_running_max(dtype, variant):
    """l2norm_qk=False (logits unbounded) and a logit bound above the fixed offset's limit take the
    running-max instantiation; its partials combine by the log-sum-exp rule."""
    kw = dict(l2norm_qk=False) if variant == "unnormalized" else dict(scale=25.0 if dtype == "float16" else 45.0)
    case = make_kv_case(9, dtype=dtype, H=4, Hk=1, Nq=2, D=48, cached=(180, 20), paged=True, num_splits=3,
                        per_head_scale=True, **kw)
    assert plan(case).running_max
    check_case(case)


@pytest.mark.parametrize("groups,Nq", [(2, 3), (4, 1)])
def test_groups_and_per_head_scale(groups, Nq):
    """Per-head scales (each head's own fixed offset, also in the split combine) with l2norm groups."""
    case = make_kv_case(10, H=8, Hk=2, Nq=Nq, D=64, groups=groups, per_head_scale=True, cached=(100, 33),
                        scale=2.5, num_splits=2)
    # fixed offset while the largest bound scale_h * groups stays within fp16's limit of 10
    assert plan(case).running_max == (float(np.max(case.kw["scale"])) * groups > 10)
    check_case(case)


@pytest.mark.parametrize("D", [8, 24, 136])
def test_head_dims(D):
    """D not a multiple of 16 (the tiles pad to DP), and DP > 128 (Q fragments re-read per k-step)."""
    check_case(make_kv_case(11, H=4, Hk=1, Nq=2, D=D, cached=(90, 150), paged=True, num_splits=2))


def test_fp32_small_head_dim_rows_of_16_bytes():
    check_case(make_kv_case(12, dtype="float32", H=2, Hk=1, Nq=3, D=4, cached=(64, 17), num_splits=2))


# ---------------------------------------------------------------------------------------------------
# Non-finite values (docs/kernels.md "Non-finite values"): a NaN or Inf in a key's k or v, or in a
# query, that a row sees poisons that row (all of out and lse NaN), through the warps' join and the
# split combine; a key a row does not see changes nothing, even on a tile (and a split) it shares with
# keys the row sees. (Keys past a sequence's length are NaN in every case of this file.)

NF_SHAPES = {  # (H, Hk, Nq, cached): G*Nq = 8 rows per kv head (WM = 1), 80 rows (WM = 4, 2 row tiles)
    "wm1": (4, 2, 4, (126, 60, 200)),
    "wm4": (8, 2, 20, (110, 44, 200)),
}
NF_PATHS = {  # fixed offset; running max with normalized q, k; running max on raw (unit) q, k
    "fixed": {},
    "running_max": {"scale": "large"},
    "raw": {"l2norm_qk": False},
}


def nonfinite_plants(Nq, raw):
    """edit(q, keys, vals) for make_kv_case: NaN / Inf at keys that only some rows see, at tile edges.

    L = cached + Nq keys per sequence; row i of a head sees keys j <= L - Nq + i (bottom-right causal).
    Sequence 0 (L = 130): v of key L - Nq + 1 (seen by rows i >= 1), k of key L - 2 = 128 (the first key
    of the third 64-key tile; rows i >= Nq - 2), v of key L - 1 (row Nq - 1 only). Sequence 1 (L = 64):
    k of key 62, v of key 63 (the last key of the first tile). Sequence 2: v of key 5 (every row of kv
    head 1's query heads) and q of head 0, row 0. Raw q, k (l2norm_qk=False) get NaN only: an Inf there
    is a +-inf logit, specified only as IEEE arithmetic."""
    inf = np.nan if raw else np.inf

    def edit(q, keys, vals):
        L0, L1 = keys[0].shape[1], keys[1].shape[1]
        vals[0][0, L0 - Nq + 1, 3] = np.nan
        keys[0][1, L0 - 2, 0] = inf
        vals[0][0, L0 - 1, :] = -np.inf
        keys[1][0, L1 - 2, 5] = np.nan
        vals[1][1, L1 - 1, :] = np.inf
        vals[2][1, 5, 7] = np.nan
        q[2, 0, 0, 1] = np.nan

    return edit


def nonfinite_cases(dtype, shape, splits, path, paged=True):
    """(clean case, planted case): the same random call, the second with nonfinite_plants."""
    H, Hk, Nq, cached = NF_SHAPES[shape]
    kw = dict(NF_PATHS[path])
    if kw.get("scale") == "large":
        kw["scale"] = 25.0 if dtype == "float16" else 45.0
    make = lambda edit: make_kv_case(50, B=3, H=H, Hk=Hk, Nq=Nq, D=32, dtype=dtype, cached=cached,  # noqa: E731
                                     paged=paged, page_size=32, num_splits=splits, edit=edit, **kw)
    return make(None), make(nonfinite_plants(Nq, path == "raw"))


def check_nonfinite(clean, planted, got, backend="emulator"):
    """`got` (out, lse, k_cache, v_cache) of the planted call: its NaN rows are exactly the reference's
    poisoned rows, all NaN (out and lse); every other row is bitwise the clean call's result (run here
    on `backend`), which is within the contract of the reference; the cache holds the planted append."""
    out, lse, kc, vc = got
    H, Nq = planted.q.shape[1], planted.q.shape[2]
    _, ref_l = expected(planted)
    poisoned = np.isnan(ref_l)
    G = H // planted.args[1].shape[1]
    # the plants are meaningful: hidden from row 0 in sequences 0 and 1, seen by the last row of head 0
    assert not poisoned[:2, :, 0].any() and poisoned[0, :G, Nq - 1].all() and poisoned[1, :G, Nq - 1].all()
    assert poisoned[2, G:].all() and poisoned[2, 0, 0] and not poisoned[2, 1:G].any()
    o64 = np.asarray(out, dtype=np.float64)
    nan_rows = np.isnan(o64)
    assert np.array_equal(nan_rows.any(-1), poisoned), (
        f"NaN rows {np.argwhere(nan_rows.any(-1)).tolist()} != poisoned rows {np.argwhere(poisoned).tolist()}")
    assert nan_rows[poisoned].all(), "a poisoned row must be NaN in every column"
    assert np.array_equal(np.isnan(lse), poisoned), "lse must be NaN exactly on the poisoned rows"
    assert np.isfinite(o64[~poisoned]).all() and np.isfinite(lse[~poisoned]).all()
    c_out, c_lse = check_case(clean, backend=backend)
    assert np.array_equal(_bits(out[~poisoned]), _bits(c_out[~poisoned])), "a row that sees no planted value changed"
    assert np.array_equal(lse[~poisoned], c_lse[~poisoned])
    assert np.array_equal(_bits(kc), _bits(planted.k_after)) and np.array_equal(_bits(vc), _bits(planted.v_after))


NF_GRID = [(dt, shape, splits, path) for dt in ("float16", "bfloat16", "float32") for shape in NF_SHAPES
           for splits in (1, 3) for path in NF_PATHS]


@pytest.mark.parametrize("dtype,shape,splits,path", NF_GRID)
def test_nonfinite_values_poison_exactly_the_rows_that_see_them(dtype, shape, splits, path):
    clean, planted = nonfinite_cases(dtype, shape, splits, path)
    p = plan(planted)
    assert (p.wm, p.splits, p.running_max) == ({"wm1": 1, "wm4": 4}[shape], splits, path != "fixed")
    check_nonfinite(clean, planted, run_case(planted))


def test_nonfinite_values_contiguous_cache_and_reference():
    """The same on a contiguous cache, and the reference backend's own NaN rows."""
    clean, planted = nonfinite_cases("float16", "wm1", 3, "fixed", paged=False)
    check_nonfinite(clean, planted, run_case(planted))
    clean, planted = nonfinite_cases("float32", "wm1", 1, "fixed")
    out, lse, kc, vc = run_case(planted, backend="reference")
    assert np.array_equal(np.isnan(lse), np.isnan(expected(planted)[1]))


# ---------------------------------------------------------------------------------------------------
# The cache in place, through emulator device arrays; race mode; interleavings.


def test_device_arrays_are_appended_in_place():
    case = make_kv_case(13, B=2, H=8, Hk=1, Nq=2, cached=(30, 64), paged=True, num_splits=2)
    kd, vd = emu.to_device(case.args[1]), emu.to_device(case.args[2])
    check_case(case, caches=(kd, vd))
    assert emu.is_device_array(kd)


def test_strided_cache_view():
    """A (B, N, Hk, D) buffer viewed as (B, Hk, N, D): rows 16-byte aligned, any strides."""
    case = make_kv_case(14, B=2, H=4, Hk=2, Nq=1, D=16, cached=(40, 9), num_splits=2)
    kc = np.ascontiguousarray(case.args[1].transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    vc = np.ascontiguousarray(case.args[2].transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    assert not kc.flags.c_contiguous
    check_case(case, caches=(kc, vc))


def test_strided_queries_and_new_keys():
    """q, k_new and v_new as non-contiguous views (the kernels get contiguous copies)."""
    case = make_kv_case(28, B=2, H=4, Hk=2, Nq=3, D=16, cached=(40, 9), paged=True, num_splits=2)
    strided = lambda a: np.ascontiguousarray(a.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)  # noqa: E731
    kw = dict(case.kw, k_new=strided(case.kw["k_new"]), v_new=strided(case.kw["v_new"]))
    q = strided(case.q)
    assert not (q.flags.c_contiguous or kw["k_new"].flags.c_contiguous)
    check_case(dataclasses.replace(case, args=(q,) + case.args[1:], kw=kw))


@pytest.mark.parametrize("kw", [dict(Nq=1, H=8, Hk=1), dict(Nq=20, H=2, Hk=1, l2norm_qk=False)])
def test_race_check_clean(kw):
    case = make_kv_case(15, B=2, cached=(100, 70), paged=True, num_splits=3, **kw)
    with emu.race_check():
        check_case(case)


@pytest.mark.parametrize("seed", [2, 3])
def test_interleavings_agree(seed):
    case = make_kv_case(16, B=2, H=8, Hk=1, Nq=2, cached=(150, 90), paged=True, num_splits=2)
    with emu.interleave(seed):
        check_case(case)


def test_grid_limits_loop(monkeypatch):
    """(batch, kv head) pairs beyond the grid's y extent, and combine rows and append pieces beyond its x
    extent: the kernels loop (decode_fwd over gridDim.y, the combine and the append grid-stride)."""
    monkeypatch.setattr(limits, "GRID_YZ_LIMIT", 2)
    monkeypatch.setattr(limits, "GRID_X_LIMIT", 3)  # decode_fwd: 1 row tile (36 rows) x 3 splits
    case = make_kv_case(27, B=3, H=8, Hk=2, Nq=9, cached=(150, 64, 0), paged=True, num_splits=3)
    prob, inp = kvcache.check_kvcache(case.q, case.args[1].copy(), case.args[2].copy(), case.args[3],
                                      **case.kw)
    caps = limits.EMULATED_DEVICE
    grids = {kind: dispatch.select(prob, caps, kind, scale=inp.scale).grid for kind in dispatch.DECODE_KINDS}
    assert grids[dispatch.DECODE][1] == 2 < prob.B * prob.Hk
    assert grids[dispatch.DECODE][0] == grids[dispatch.DECODE_COMBINE][0] == grids[dispatch.KV_APPEND][0] == 3
    assert 3 * 4 < prob.B * prob.H * prob.Nq and 3 * 128 < prob.B * prob.Hk * prob.Nq * prob.D // 8  # rows, pieces
    check_case(case)


# ---------------------------------------------------------------------------------------------------
# Planted faults: a scratch copy of decode.cu with one synchronization bug must fail the checks.

LANDED_BARRIER = "__syncthreads();    // tile `tile` (and, on the first one, Q) has landed for every thread"
NORMALIZED_BARRIER = "if (p.norm_qk || scrub) __syncthreads();"
COMBINE_ALL = "      for (int s = 0; s < S; ++s) {"
COMBINE_DROP = "      for (int s = 0; s < S - 1; ++s) {"


def _scratch_decode(monkeypatch, old, new):
    """decode.cu with `old` replaced by `new` (tests/planting.py); the snippet is checked here first, so
    that a stale snippet is not mistaken for a caught fault (the checks raise AssertionError too)."""
    from cupy_cosattn.launch import sources

    if sources.load_source("decode.cu").count(old) != 1:
        raise RuntimeError(f"the planted fault's snippet must occur once in decode.cu: {old!r}")
    plant(monkeypatch, "decode.cu", old, new)


@pytest.mark.parametrize("barrier,l2norm_qk", [(LANDED_BARRIER, True), (LANDED_BARRIER, False),
                                               (NORMALIZED_BARRIER, True)],
                         ids=["landed-normalized", "landed-raw", "normalized"])
def test_planted_missing_barrier_is_caught(monkeypatch, barrier, l2norm_qk):
    case = make_kv_case(17, B=2, H=8, Hk=1, Nq=2, cached=(200, 130), paged=True, num_splits=2, l2norm_qk=l2norm_qk)
    check_case(case)  # the real kernel passes
    _scratch_decode(monkeypatch, barrier, "// (barrier removed)")
    with pytest.raises(AssertionError, match="NaN/Inf in out|out rel err|lse err"):
        check_case(make_kv_case(17, B=2, H=8, Hk=1, Nq=2, cached=(200, 130), paged=True, num_splits=2,
                                l2norm_qk=l2norm_qk))


# The barrier after the tile's products: the next iteration's prefetch refills this buffer.
REUSE_BARRIER = ("else tile_pv<T, DP, KT>(o, lsum, s, sVw, lane);\n\n        __syncthreads();",
                 "else tile_pv<T, DP, KT>(o, lsum, s, sVw, lane);\n")
# The barrier between staging the warps' partials and joining them.
STAGED_BARRIER = ("      }\n    }\n    __syncthreads();\n\n    // Join", "      }\n    }\n\n    // Join")
# The barrier at the end of a (batch, kv head) iteration: the next one's tiles overwrite the staging.
FINAL_BARRIER = ("__syncthreads();  // the staging area is the next (batch, kv head)'s Q/K/V tiles", "")


@pytest.mark.parametrize("fault", ["reuse", "staged", "final"])
def test_planted_missing_loop_and_epilogue_barriers_are_caught(monkeypatch, fault):
    """Each barrier removed, on a case that needs it: many tiles per block with every warp reading every
    key of a tile (WM = 4: a buffer refilled while another warp reads it), the warps' join (WM = 1: four
    warps per row), and the loop over (batch, kv head) pairs beyond the grid's y extent."""
    monkeypatch.setattr(limits, "GRID_YZ_LIMIT", 2)
    rows = dict(Hk=2, Nq=8) if fault == "reuse" else dict(Hk=1, Nq=2)
    make = lambda: make_kv_case(19, B=3, H=8, cached=(700, 90, 5), num_splits=1, **rows)  # noqa: E731
    p = plan(make())
    assert p.wm == (4 if fault == "reuse" else 1) and p.splits == 1 and 700 // p.bn >= 3
    check_case(make())  # the real kernel passes
    old, new = {"reuse": REUSE_BARRIER, "staged": STAGED_BARRIER, "final": FINAL_BARRIER}[fault]
    _scratch_decode(monkeypatch, old, new)
    with pytest.raises(AssertionError, match="NaN/Inf in out|out rel err|lse err"):
        check_case(make())


@pytest.mark.parametrize("fault", ["scrub", "poison"])
def test_planted_nonfinite_faults_are_caught(monkeypatch, fault):
    """Without the scrub of V on tiles with hidden keys, a hidden NaN poisons rows that do not see it;
    without the poison of a non-finite O, an Inf value gives a row of Inf / NaN columns, not a NaN row."""
    old, new = {"scrub": ("if (scrub) scrub_v<T, DP, BN, ROW>(sV + buf * KV);", ""),
                "poison": ("+ quad_sum(poison);", ";")}[fault]
    _scratch_decode(monkeypatch, old, new)
    clean, planted = nonfinite_cases("float16", "wm1", 3, "fixed")
    with pytest.raises(AssertionError, match="NaN rows|poisoned row must be NaN|NaN/Inf in out"):
        check_nonfinite(clean, planted, run_case(planted))


@pytest.mark.parametrize("running_max", [False, True])
def test_planted_combine_dropping_a_split_is_caught(monkeypatch, running_max):
    kw = dict(cached=(200, 130), paged=True, num_splits=3, l2norm_qk=not running_max)
    _scratch_decode(monkeypatch, COMBINE_ALL, COMBINE_DROP)
    with pytest.raises(AssertionError, match="out rel err"):
        check_case(make_kv_case(18, **kw))


# ---------------------------------------------------------------------------------------------------
# The split heuristic.


def test_split_heuristic():
    def choose(base, n_tiles, sm_count):
        return tiles.choose_num_splits(base, n_tiles, sm_count, kvcache.MAX_NUM_SPLITS)

    sms = 108
    assert choose(sms * 2, 1000, sms) == 1  # the unsplit grid fills the SMs
    assert choose(8, 1, sms) == 1  # one key tile: nothing to split
    assert choose(8, 3, sms) == 1  # fewer than 2 tiles per split
    s = choose(8, 2048, sms)  # B = 1, Hk = 8, 128k keys
    assert 20 <= s <= kvcache.MAX_NUM_SPLITS and 8 * s <= 2 * sms
    waves = 8 * s / (2 * sms)
    assert waves / np.ceil(waves) >= tiles.SPLIT_EFFICIENCY
    assert choose(64, 512, sms) >= 2  # B = 8, Hk = 8, 32k keys: 64 blocks under-fill 216 slots
    assert choose(512, 64, sms) == 1  # B = 64, Hk = 8, 4k keys
    for base in (1, 3, 8, 50):
        for n in (2, 10, 100, 5000):
            s = choose(base, n, sms)
            assert 1 <= s <= max(1, min(kvcache.MAX_NUM_SPLITS, n // tiles.SPLIT_MIN_TILES))


def test_auto_splits_use_the_device_sm_count():
    case = make_kv_case(19, B=2, H=8, Hk=1, cached=(290, 290), spare=0)
    few = limits.DeviceCaps((8, 0), 163 * 1024, 1)
    assert plan(case, caps=few).splits == 1  # 2 blocks fill a 1-SM device's 2 slots
    assert plan(case).splits == 2  # 108 SMs: as many as 5 tiles / 2 allow


def test_tile_choice_by_shared_memory():
    """WM = 1 needs 64-key tiles; where they exceed the device, the 64-row shape with smaller tiles."""
    case = make_kv_case(20, dtype="float32", H=8, Hk=1, D=256, cached=(10, 10))
    assert plan(case).wm == 4  # 272 rows of fp32 D = 256 exceed 163 KB
    case = make_kv_case(20, dtype="float16", H=8, Hk=1, D=256, cached=(10, 10))
    assert plan(case).wm == 1
    sm86 = limits.DeviceCaps((8, 6), 99 * 1024, 84)
    assert plan(case, caps=sm86).wm == 4


# fp32 above DP = 192 on the 99 KB architectures: even 16-key tiles of 64 rows exceed the device (Q,
# 2 K, 2 V of 64 + 64 rows of 208+ floats), so the decode kernels refuse those problems there.
DECODE_NO_FIT = {(arch, "float32", dp) for arch in ("sm_86", "sm_89") for dp in (208, 224, 240, 256)}


def test_every_decode_tile_fits_its_architecture():
    """decode_config's pick for every architecture, dtype, padded head dim and row regime fits the
    architecture's shared memory per block (except DECODE_NO_FIT, which nothing fits); the 64-row
    shape takes the widest tile that fits, up to its register bound `widest`."""
    for arch, lim in limits.SMEM_OPTIN_BY_ARCH.items():
        for dt in limits.KERNEL_DTYPES:
            for dp in range(16, limits.MAX_HEAD_DIM + 1, 16):
                for rows in (1, tiles.MMA_ROWS, tiles.MMA_ROWS + 1, 64):
                    wm, bn = tiles.decode_config(dt, dp, rows, lim)
                    need = tiles.decode_smem_bytes(dt, dp, bn, wm)
                    fits = need <= lim
                    assert fits != ((arch, dt, dp) in DECODE_NO_FIT), (arch, dt, dp, rows, wm, bn, need, lim)
                    widest = (32 if dp <= 128 else 16) if dt == "float32" else (64 if dp <= 128 else 32)
                    if wm == 4 and fits and bn < widest:  # halved only where twice the keys do not fit
                        assert tiles.decode_smem_bytes(dt, dp, 2 * bn, 4) > lim, (arch, dt, dp, bn)
    # 99 KB devices: the 16-bit D = 256 and fp32 D = 128 tiles of 64 rows shrink to 16 keys; 163 KB
    # keeps 64 keys at fp16 D = 128
    sm86, sm80 = limits.SMEM_OPTIN_BY_ARCH["sm_86"], limits.SMEM_OPTIN_BY_ARCH["sm_80"]
    assert tiles.decode_config("float16", 256, 17, sm86) == (4, 16)
    assert tiles.decode_config("float32", 128, 17, sm86) == (4, 16)
    assert tiles.decode_config("float16", 128, 17, sm80) == (4, 64)


@pytest.mark.parametrize("dtype,D", [("float16", 256), ("float32", 128)])
def test_many_rows_on_a_99kb_device(dtype, D):
    """sm_86 (99 KB per block): 24 rows (WM = 4) of 16-bit D = 256 or fp32 D = 128 run with 16-key tiles;
    fp32 D = 256 fits no tile there and is refused before anything is launched."""
    with limits.emulated_arch("sm_86"):
        case = make_kv_case(22, dtype=dtype, H=8, Hk=1, Nq=3, D=D, cached=(40, 21), paged=True, num_splits=2)
        p = plan(case, caps=limits.EMULATED_DEVICE)
        assert (p.wm, p.bn) == (4, 16)
        check_case(case)
        big = make_kv_case(22, dtype="float32", H=8, Hk=1, Nq=3, D=256, cached=(40, 21))
        with pytest.raises(ValueError, match="needs 133248 bytes of shared memory per block; this device allows"):
            run_case(big)


def test_every_decode_choice_is_a_registry_entry():
    """dispatch.select's choices for KV-cache problems (every dtype, padded head dim, row regime and
    device the tiles are chosen for) are registry entries with the registry's block and shared memory,
    on grids within the launch limits."""
    reg = {(s.source, s.name): s for s in registry.kernel_registry()}
    devices = [limits.DeviceCaps((8, 0), lim, 108) for lim in sorted(set(limits.SMEM_OPTIN_BY_ARCH.values()))]
    for dt in limits.KERNEL_DTYPES:
        for D in range(16, 257, 16):
            for caps in devices:
                for Nq, H, splits in ((1, 8, 0), (1, 16, 3), (5, 8, 0), (64, 4, 2)):
                    prob = kvcache.KVCacheProblem(B=2, H=H, Hk=H // 4 or 1, Nq=Nq, D=D, dtype=DTYPES[dt], paged=True,
                                                  page_size=16, num_pages=40, max_pages=20, append=True,
                                                  num_splits=splits, max_len=300)
                    for kind in dispatch.DECODE_KINDS:
                        for scale in (8.0, 100.0):  # fixed offset, running max
                            c = dispatch.select(prob, caps, kind, scale=np.full(H, scale))
                            assert reg.get((c.spec.source, c.spec.name)) == c.spec, (kind, dt, D, c.spec)
                            assert all(g >= 1 for g in c.grid) and c.grid[1] <= limits.GRID_YZ_LIMIT
    with pytest.raises(ValueError, match="kernel kind must be one of"):
        dispatch.select(prob, devices[0], dispatch.FORWARD, scale=np.full(prob.H, 8.0))


# ---------------------------------------------------------------------------------------------------
# Argument checks: each bad input raises before anything is launched or written.


@pytest.fixture
def no_launch(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(launch.KernelBackend, "kvcache", refuse)


def _good(**kw):
    case = make_kv_case(21, B=2, H=4, Hk=2, Nq=2, D=16, cached=(20, 30), paged=True, spare=4, **kw)
    q, kc, vc, sl = case.args
    return dict(q=q, k_cache=kc, v_cache=vc, cache_seqlens=sl, **case.kw)


def _call(args, backend="emulator"):
    a = dict(args)
    return kvcache_forward(a.pop("q"), a.pop("k_cache"), a.pop("v_cache"), a.pop("cache_seqlens"), backend=backend,
                           **a)


def _bad_cases():
    f16 = np.float16
    yield "q torch-like", dict(q=[[1.0]]), TypeError, "q must be a NumPy or CuPy array"
    yield "q 3-D", dict(q=np.zeros((2, 4, 16), f16)), ValueError, "q must be 4-D"
    yield "q float64", dict(q=np.zeros((2, 4, 2, 16))), TypeError, "k_cache must have q's dtype float64"
    yield "q int", dict(q=np.zeros((2, 4, 2, 16), np.int32)), TypeError, "q has dtype int32"
    yield "k_cache list", dict(k_cache=[[1.0]]), TypeError, "k_cache must be a NumPy or CuPy array"
    yield "k_cache 3-D", dict(k_cache=np.zeros((4, 2, 16), f16)), ValueError, "k_cache must be 4-D"
    yield "v_cache 5-D", dict(v_cache=np.zeros((4, 2, 16, 16, 1), f16)), ValueError, "v_cache must be 4-D"
    yield "k_cache dtype", dict(k_cache="f32"), TypeError, "k_cache must have q's dtype"
    yield "v_cache shape", dict(v_cache="short"), ValueError, "k_cache and v_cache must have the same shape"
    yield "head dim", dict(q=np.zeros((2, 4, 2, 8), f16)), ValueError, "k_cache must have q's head dim D=8"
    yield "kv heads", dict(q=np.zeros((2, 3, 2, 16), f16)), ValueError, "q has H=3 heads"
    yield "seqlens dtype", dict(cache_seqlens=np.array([20, 30], np.int64)), TypeError, \
        "cache_seqlens must have dtype int32"
    yield "seqlens shape", dict(cache_seqlens=np.array([20], np.int32)), ValueError, \
        "cache_seqlens must have shape (B,)"
    yield "seqlens negative", dict(cache_seqlens=np.array([20, -1], np.int32)), ValueError, "cache_seqlens[1] = -1"
    yield "over capacity", dict(cache_seqlens=np.array([20, 47], np.int32)), ValueError, "exceeds the cache capacity"
    yield "seqlens list", dict(cache_seqlens=[20, 30]), TypeError, "cache_seqlens must be a NumPy or CuPy array"
    yield "seqlens 2-D", dict(cache_seqlens=np.array([[20, 30]], np.int32)), ValueError, "cache_seqlens must be 1-D"
    yield "table dtype", dict(block_table="i64"), TypeError, "block_table must have dtype int32"
    yield "table 1-D", dict(block_table=np.arange(6, dtype=np.int32)), ValueError, "block_table must be 2-D"
    yield "table rows", dict(block_table="rows"), ValueError, "block_table must have shape (B, max_pages)"
    yield "table out of range", dict(block_table="range"), ValueError, "block_table[1, 1] = 99"
    yield "table negative", dict(block_table="negative"), ValueError, "block_table[0, 0] = -1"
    yield "page size", dict(k_cache="page24", v_cache="page24"), ValueError, "page_size"
    yield "contiguous batch", dict(block_table=None, k_cache="contig3", v_cache="contig3"), ValueError, \
        "a contiguous k_cache must have shape"
    yield "k_new alone", dict(v_new=None), ValueError, "k_new and v_new must be given together"
    yield "v_new alone", dict(k_new=None), ValueError, "k_new and v_new must be given together"
    yield "k_new shape", dict(k_new="nq3"), ValueError, "k_new must have shape (B, Hk, Nq, D)"
    yield "k_new 3-D", dict(k_new=np.zeros((2, 2, 16), f16)), ValueError, "k_new must be 4-D"
    yield "v_new dtype", dict(v_new="f32"), TypeError, "v_new must have q's dtype"
    yield "groups", dict(groups=3), ValueError, "groups must be a positive int dividing"
    yield "groups type", dict(groups=2.0), TypeError, "groups must be an int"
    yield "groups zero", dict(groups=0), ValueError, "groups must be a positive int dividing"
    yield "causal", dict(causal=1), TypeError, "causal must be a bool"
    yield "l2norm_qk", dict(l2norm_qk=np.int32(1)), TypeError, "l2norm_qk must be a bool"
    yield "num_splits negative", dict(num_splits=-1), ValueError, "num_splits must be in [0, 128]"
    yield "num_splits large", dict(num_splits=129), ValueError, "num_splits must be in [0, 128]"
    yield "num_splits bool", dict(num_splits=True), TypeError, "num_splits must be an int"
    yield "num_splits float", dict(num_splits=2.0), TypeError, "num_splits must be an int"
    yield "scale", dict(scale=-1.0), ValueError, "scale must be finite and > 0"
    yield "scale nan", dict(scale=np.array([8.0, np.nan, 8.0, 8.0])), ValueError, "scale must be finite and > 0"
    yield "scale shape", dict(scale=np.ones(3)), ValueError, "scale must be a scalar or have shape (4,)"
    yield "backend", dict(backend_="gpu"), ValueError, "backend must be one of"


def _bad_value(tag, x, good):
    """The bad argument named by `tag`, made from the good argument `x` (or the good call)."""
    kc, q = good["k_cache"], good["q"]
    if tag == "f32":
        return x.astype(np.float32)
    if tag == "short":
        return x[:, :, :8]
    if tag == "i64":
        return x.astype(np.int64)
    if tag == "rows":
        return x[:1]
    if tag == "range":
        return _set(good["block_table"], (1, 1), 99)
    if tag == "negative":
        return _set(good["block_table"], (0, 0), -1)
    if tag == "page24":
        return np.zeros((kc.shape[0], kc.shape[1], 24, kc.shape[3]), kc.dtype)
    if tag == "contig3":
        return np.zeros((3,) + kc.shape[1:], kc.dtype)
    assert tag == "nq3"
    return np.zeros((2, 2, 3, 16), q.dtype)


def _materialize(good, bad):
    out = dict(good)
    for k, v in bad.items():
        if k != "backend_":
            out[k] = _bad_value(v, good.get(k), good) if isinstance(v, str) else v
    return out


def _set(a, idx, value):
    a = a.copy()
    a[idx] = value
    return a


@pytest.mark.parametrize("what,bad,exc,msg", list(_bad_cases()), ids=[c[0] for c in _bad_cases()])
def test_argument_checks(no_launch, what, bad, exc, msg):
    good = _good()
    args = _materialize(good, bad)
    before = (_bits(good["k_cache"]).copy(), _bits(good["v_cache"]).copy())
    with pytest.raises(exc) as ei:
        if "backend_" in bad:
            _call(args, backend=bad["backend_"])
        else:
            _call(args)
    assert msg in str(ei.value)
    # nothing was written: the append did not happen
    assert np.array_equal(_bits(good["k_cache"]), before[0]) and np.array_equal(_bits(good["v_cache"]), before[1])


def test_argument_checks_reference_backend_too(monkeypatch):
    good = _good()
    monkeypatch.setattr(kvcache, "reference_kvcache", lambda *a: pytest.fail("the reference ran"))
    monkeypatch.setattr(launch.KernelBackend, "kvcache", lambda *a: pytest.fail("a kernel ran"))
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = 99"):
        _call(_materialize(good, dict(block_table="range")), backend="reference")


def test_unused_table_entries_are_not_checked():
    """Entries past a sequence's pages may hold anything (here -1 and a huge index)."""
    for bad in (-1, 10**9):
        check_case(make_kv_case(22, B=2, H=4, Hk=1, Nq=1, cached=(17, 40), paged=True, spare=40,
                                bad_table_entries=bad, num_splits=2))


@pytest.mark.parametrize("D,dtype", [(12, "float16"), (6, "float32"), (264, "bfloat16")])
def test_kernel_head_dim_limits(D, dtype):
    """Head dims the kernels cannot read in whole 16-byte pieces (or above 256) are refused before
    the append; the reference takes them."""
    case = make_kv_case(23, B=1, H=2, Hk=1, Nq=1, D=D, dtype=dtype, cached=(5,))
    q, kc, vc, sl = case.args
    before = _bits(kc).copy()
    with pytest.raises(ValueError, match=f"head dim D={D}"):
        kvcache_forward(q, kc, vc, sl, backend="emulator", **case.kw)
    assert np.array_equal(_bits(kc), before)
    check_case(case, backend="reference")


def test_misaligned_cache_rows_are_refused():
    case = make_kv_case(24, B=2, H=2, Hk=1, Nq=1, D=16, cached=(5, 6))
    q, kc, vc, sl = case.args
    wide = np.zeros(kc.shape[:-1] + (20,), kc.dtype)  # rows of 40 bytes: not 16-byte aligned
    before = _bits(vc).copy()
    with pytest.raises(ValueError, match="16-byte aligned"):
        kvcache_forward(q, wide[..., :16], vc, sl, backend="emulator", **case.kw)
    assert np.array_equal(_bits(vc), before)  # the append did not happen


def test_empty_query_count_and_batch():
    case = make_kv_case(25, B=2, H=4, Hk=1, Nq=0, cached=(5, 6))
    for backend in BACKENDS:
        q, kc, vc, sl = case.args
        out, lse = kvcache_forward(q, kc.copy(), vc.copy(), sl, backend=backend, **case.kw)
        assert out.shape == (2, 4, 0, 64) and lse.shape == (2, 4, 0)


# ---------------------------------------------------------------------------------------------------
# GPU twins.


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("splits", [1, 3, 0])
def test_gpu_matches_reference(paged, dtype, splits):
    check_case(make_kv_case(30, H=8, Hk=1, Nq=1, D=128, dtype=dtype, cached=(1000, 37), paged=paged,
                            num_splits=splits), backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("Nq,H,Hk", NQ_CASES)
def test_gpu_query_counts(Nq, H, Hk):
    check_case(make_kv_case(31, Nq=Nq, H=H, Hk=Hk, cached=(300, 900), paged=True, num_splits=0), backend="cuda")


@pytest.mark.gpu
def test_gpu_running_max_and_lengths():
    check_case(make_kv_case(32, B=4, H=4, Hk=1, Nq=3, cached=(0, 1, 2000, 64), paged=True, l2norm_qk=False,
                            num_splits=5), backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("shape", list(NF_SHAPES))
@pytest.mark.parametrize("path", list(NF_PATHS))
def test_gpu_nonfinite_values(dtype, shape, path):
    clean, planted = nonfinite_cases(dtype, shape, 3, path)
    check_nonfinite(clean, planted, run_case(planted, backend="cuda"), backend="cuda")


# ---------------------------------------------------------------------------------------------------
# torch: the custom op (CPU tensors: the torch implementation, the emulator, the reference), its
# mutation declaration, torch.compile without graph breaks, and the model's cached generation.


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def _tensors(torch, case: KVCase):
    t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16) \
        if np.dtype(a.dtype) == BFLOAT16 else torch.from_numpy(np.array(a, copy=True))  # noqa: E731
    q, kc, vc, sl = case.args
    kw = {k: (t(v) if isinstance(v, np.ndarray) and k != "scale" else v) for k, v in case.kw.items()}
    return t(q), t(kc), t(vc), t(sl), kw


def _check_torch_result(torch, case, out, lse, kc, vc):
    as_np = lambda x: (x.view(torch.int16).numpy().view(BFLOAT16) if x.dtype == torch.bfloat16  # noqa: E731
                       else x.numpy())
    ref_o, ref_l = expected(case)
    assert rel_err(out.double().numpy(), ref_o) <= OUT_TOL[case.dtype]
    fin = np.isfinite(ref_l)
    assert np.all(np.isneginf(lse.numpy()[~fin])) and np.allclose(lse.numpy()[fin], ref_l[fin], atol=1e-2)
    assert np.array_equal(_bits(as_np(kc)), _bits(case.k_after)) and np.array_equal(_bits(as_np(vc)),
                                                                                   _bits(case.v_after))


@pytest.mark.parametrize("backend", ["torch", "emulator", "reference"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_torch_op_backends(torch, backend, dtype):
    import cupy_cosattn.torch as cat

    case = make_kv_case(40, B=2, H=8, Hk=2, Nq=3, D=32, dtype=dtype, cached=(40, 17), paged=True, num_splits=2,
                        per_head_scale=True)
    q, kc, vc, sl, kw = _tensors(torch, case)
    kw["scale"] = torch.from_numpy(kw["scale"])  # a tensor scale (H,)
    out, lse = cat.kvcache_attention(q, kc, vc, sl, backend=backend, return_lse=True, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == torch.float32
    _check_torch_result(torch, case, out, lse, kc, vc)


@pytest.mark.parametrize("backend", ["torch", "emulator"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_torch_op_nonfinite_values(torch, backend, dtype):
    """The op's CPU implementation and the emulator through the op: the reference's poisoned rows are
    NaN (out and lse), every other row within the contract, the planted append in the cache."""
    import cupy_cosattn.torch as cat

    _, planted = nonfinite_cases(dtype, "wm1", 3, "fixed")
    q, kc, vc, sl, kw = _tensors(torch, planted)
    out, lse = cat.kvcache_attention(q, kc, vc, sl, backend=backend, return_lse=True, **kw)
    ref_o, ref_l = expected(planted)
    poisoned = np.isnan(ref_l)
    o, ls = out.double().numpy(), lse.numpy()
    assert np.array_equal(np.isnan(o).any(-1), poisoned) and np.isnan(o[poisoned]).all()
    assert np.array_equal(np.isnan(ls), poisoned)
    assert rel_err(o[~poisoned], ref_o[~poisoned]) <= OUT_TOL[dtype]
    assert np.allclose(ls[~poisoned], ref_l[~poisoned], atol=1e-2)
    assert np.array_equal(_bits(kc.numpy()), _bits(planted.k_after))


def test_torch_op_declares_its_mutations(torch):
    import cupy_cosattn.torch  # noqa: F401  (registers the op)

    schema = torch.ops.cupy_cosattn.kvcache_fwd.default._schema
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == {"k_cache", "v_cache"}


@pytest.mark.parametrize("append", [True, False])
def test_torch_compile_fullgraph(torch, append):
    import cupy_cosattn.torch as cat

    case = make_kv_case(41, B=2, H=4, Hk=1, Nq=2, D=16, cached=(30, 9), paged=True, append=append, num_splits=2)
    q, kc, vc, sl, kw = _tensors(torch, case)
    bt, kn, vn = kw["block_table"], kw.get("k_new"), kw.get("v_new")

    def step(q, kc, vc, sl, bt, kn, vn):
        out, lse = cat.kvcache_attention(q, kc, vc, sl, block_table=bt, k_new=kn, v_new=vn, num_splits=2,
                                         return_lse=True)
        return out * 2.0, lse, torch.nan_to_num(kc.float()).sum()  # a read of the cache after the op

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    out2, lse, ksum = compiled(q, kc, vc, sl, bt, kn, vn)
    _check_torch_result(torch, case, out2 / 2.0, lse, kc, vc)
    # the read inside the graph saw the appended keys (the op's mutation is ordered before it)
    assert ksum == torch.nan_to_num(torch.from_numpy(case.k_after).float()).sum()


def test_torch_argument_checks(torch):
    import cupy_cosattn.torch as cat

    case = make_kv_case(42, B=2, H=4, Hk=1, Nq=1, D=16, cached=(3, 4))
    q, kc, vc, sl, kw = _tensors(torch, case)
    with pytest.raises(TypeError, match="cache_seqlens must have dtype int32"):
        cat.kvcache_attention(q, kc, vc, sl.long(), **kw)
    with pytest.raises(TypeError, match="k_cache must be a torch.Tensor"):
        cat.kvcache_attention(q, kc.numpy(), vc, sl, **kw)
    with pytest.raises(ValueError, match="cache_seqlens\\[1\\] = -2"):
        cat.kvcache_attention(q, kc, vc, torch.tensor([1, -2], dtype=torch.int32), **kw)
    with pytest.raises(ValueError, match="backend must be one of"):
        cat.kvcache_attention(q, kc, vc, sl, backend="gpu", **kw)
    before = kc.clone()
    with pytest.raises(ValueError, match="exceeds the cache capacity"):
        cat.kvcache_attention(q, kc, vc, torch.tensor([1, kc.shape[2]], dtype=torch.int32), **kw)
    assert torch.equal(kc.nan_to_num(0), before.nan_to_num(0))  # nothing appended


def _model(torch, **kw):
    from cupy_cosattn.transformer import CosineSimCausalTransformer

    torch.manual_seed(0)
    return CosineSimCausalTransformer(num_tokens=50, dim=32, max_seq_len=24, depth=2, heads=8, dim_head=16,
                                      **kw)


@pytest.mark.parametrize("kv_heads,page_size", [
    (1, 16), (8, None), pytest.param(8, 16, marks=pytest.mark.slow), pytest.param(1, 32, marks=pytest.mark.slow),
    pytest.param(1, None, marks=pytest.mark.slow)], ids=["hk1-pages16", "hk8-contiguous", "hk8-pages16",
                                                          "hk1-pages32", "hk1-contiguous"])
def test_generation_with_and_without_the_cache(torch, kv_heads, page_size):
    """Greedy tokens agree, through the prompt prefill, single-token steps (across the page boundary at
    16 of a 24-position window) and the window slide."""
    model = _model(torch, kv_heads=kv_heads, attn_l2norm_groups=2)
    prompt = torch.randint(0, 50, (3, 5))
    cached = model.generate(prompt, 30, temperature=0.0, use_cache=True, page_size=page_size)
    assert torch.equal(cached, model.generate(prompt, 30, temperature=0.0, use_cache=False))


def test_generation_through_the_kernels(torch):
    """The same with every attention call (dense and KV-cache) run by the emulated kernels."""
    import cupy_cosattn.torch as cat

    model = _model(torch, kv_heads=2)
    prompt = torch.randint(0, 50, (2, 4))
    with cat.cpu_backend("emulator"):
        cached = model.generate(prompt, 8, temperature=0.0, use_cache=True)
        uncached = model.generate(prompt, 8, temperature=0.0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_generation_cache_is_preallocated(torch, monkeypatch):
    """No torch.cat while generating with the cache; every layer's buffers are allocated once and
    appended to in place."""
    from cupy_cosattn import transformer

    model = _model(torch, kv_heads=2)
    seen = []
    real_init = transformer.KVCache.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        seen.append(self)

    monkeypatch.setattr(transformer.KVCache, "__init__", spy)
    calls = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: calls.append(1) or real_cat(*a, **k))
    spy_write = []
    real_op = transformer.kvcache_attention
    monkeypatch.setattr(transformer, "kvcache_attention",
                        lambda *a, **k: spy_write.append(k["block_table"]) or real_op(*a, **k))
    model.generate(torch.randint(0, 50, (2, 4)), 10, temperature=0.0)
    assert calls == [] and len(seen) == 1
    cache = seen[0]
    assert cache.length == 13 and cache.seqlens.tolist() == [13, 13]
    # paged: 2 pages of 16 slots per sequence, page j of sequence b at pool page 2 j + b
    assert cache.block_table.tolist() == [[0, 2], [1, 3]]
    assert all(k.shape == v.shape == (4, 2, 16, 16) for k, v in cache.layers)
    assert len(spy_write) == 2 * 10 and all(t is cache.block_table for t in spy_write)  # every layer, step


@pytest.mark.parametrize("kw", [dict(use_cuda_kernel=False), dict(l2norm_qk=True, backend="torch"),
                                dict(non_cosine_sim_attn=True)], ids=["plain", "bound-keywords", "softmax"])
def test_generation_other_attention_functions(torch, kw):
    """Layers whose attention is not the plain fused op attend over the preallocated (paged) cache's
    prefix, gathered through the block table."""
    from cupy_cosattn import transformer

    model = _model(torch, kv_heads=4, **kw)
    layer = model.layers[0]["attn"]
    uses_op = layer.attn == "cosine" and transformer.kvcache_keywords(layer.attend) is not None
    assert uses_op == ("backend" in kw)
    prompt = torch.randint(0, 50, (2, 5))
    assert torch.equal(model.generate(prompt, 25, temperature=0.0, use_cache=True),
                       model.generate(prompt, 25, temperature=0.0, use_cache=False))


def test_kv_cache_pages_hold_the_positions(torch):
    """KVCache.write puts position j of sequence b at slot j % page_size of page block_table[b, j //
    page_size], and prefix reads them back in order, across a page boundary."""
    from cupy_cosattn.transformer import KVCache

    cache = KVCache(1, 2, 40, page_size=16)
    assert cache.block_table.tolist() == [[0, 2, 4], [1, 3, 5]]
    k = torch.randn(2, 3, 20, 8)
    cache.write(0, k[:, :, :15], -k[:, :, :15])
    cache.advance(15)
    cache.write(0, k[:, :, 15:], -k[:, :, 15:])  # crosses into the second page
    kc, vc = cache.layers[0]
    assert kc.shape == (6, 3, 16, 8)
    assert torch.equal(kc[3, :, 1], k[1, :, 17]) and torch.equal(vc[0, :, 15], -k[0, :, 15])
    kp, vp = cache.prefix(0, 20)
    assert torch.equal(kp, k) and torch.equal(vp, -k)
    with pytest.raises(ValueError, match="page_size must be a positive multiple of 16"):
        KVCache(1, 2, 40, page_size=24)


def test_float64_runs_on_the_reference_only():
    case = make_kv_case(26, B=2, H=4, Hk=1, Nq=2, D=16, cached=(9, 20), paged=True)
    q, kc, vc, sl = case.args
    kw = {k: (v.astype(np.float64) if k in ("k_new", "v_new") else v) for k, v in case.kw.items()}
    args64 = (q.astype(np.float64), kc.astype(np.float64), vc.astype(np.float64), sl)
    with pytest.raises(TypeError, match="backend='emulator' does not take"):
        kvcache_forward(*args64, backend="emulator", **kw)
    out, lse = kvcache_forward(*args64, backend="reference", **kw)
    assert out.dtype == np.float64
    ref_o, _ = expected(dataclasses.replace(case, args=args64, keys=[k.astype(np.float64) for k in case.keys],
                                            vals=[v.astype(np.float64) for v in case.vals]))
    assert rel_err(out, ref_o) < 1e-12
