"""Ring attention (cupy_cosattn.torch.ring) against dense attention on the gathered sequence.

Each test group spawns its processes once (gloo on localhost) and runs a batch of configurations in
them: process start and the torch import cost seconds, the configurations milliseconds. The workers
save every rank's shard of the output and of each gradient; the test process reassembles them and
compares with the single-process dense op (cosine_sim_attention) in float64 on the same inputs, at the
accuracy table's tolerances (docs/design.md, README): float32 1e-5 (out) / 1e-4 (gradients), float16
3e-3 / 1e-2, bfloat16 2e-2 / 5e-2; dscale relative to Σ|dS_ij·cos_ij| as the README explains. float64:
1e-6, because the op's per-block lse is float32.
"""
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

import cupy_cosattn.torch as cat  # noqa: E402
from cupy_cosattn.torch import ring as R  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
OUT_TOL = {"float32": 1e-5, "float16": 3e-3, "bfloat16": 2e-2, "float64": 1e-6}
GRAD_TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2, "float64": 1e-6}


def case(name, *, B=2, H=4, Hk=2, D=16, n=8, layout="zigzag", causal=True, dtype="float32", scale="head", groups=1,
         l2norm_qk=True, mask=None, backend="auto", magnitude=1.0, subgroups=None):
    """A configuration: n = N_local; scale "head" (a per-head tensor with a gradient) or a float; mask
    None, "pad" (the last 3 keys of batch row 0 are padding) or "pad+empty" (and batch row 1 sees no key
    at all); magnitude: q, k rows scaled to this norm (with l2norm_qk=False the logits then exceed the
    scale); subgroups: split the world into rings of this many ranks, running side by side."""
    return dict(name=name, B=B, H=H, Hk=Hk, D=D, n=n, layout=layout, causal=causal, dtype=dtype, scale=scale,
                groups=groups, l2norm_qk=l2norm_qk, mask=mask, backend=backend, magnitude=magnitude,
                subgroups=subgroups)


CASES_2 = [
    case("zigzag-causal-gqa-headscale-f32"),
    case("contiguous-mask-empty-rows-f32", layout="contiguous", causal=False, n=7, H=2, Hk=2, scale=8.0,
         mask="pad+empty"),
    case("contiguous-causal-mqa-groups2-f64", layout="contiguous", dtype="float64", Hk=1, groups=2, scale=10.0),
    case("zigzag-causal-gqa-headscale-bf16", dtype="bfloat16"),
    case("contiguous-mqa-f16", layout="contiguous", causal=False, H=2, Hk=1, dtype="float16", scale=6.0),
    case("zigzag-causal-no-l2norm-running-max-f32", l2norm_qk=False, magnitude=1.5),
    case("zigzag-causal-scale-above-fixed-bound-f32", scale=50.0, H=2, Hk=1),
    case("emulator-zigzag-causal-gqa-headscale-f16", dtype="float16", backend="emulator", B=1),
    case("emulator-contiguous-mask-bf16", layout="contiguous", causal=False, dtype="bfloat16", backend="emulator",
         B=2, H=2, Hk=1, n=5, scale=8.0, mask="pad+empty"),
]
CASES_4 = [
    case("w4-zigzag-causal-gqa-headscale-f32", n=4),
    case("w4-contiguous-mask-bf16", layout="contiguous", causal=False, n=4, dtype="bfloat16", mask="pad"),
    case("w4-contiguous-causal-f16", layout="contiguous", n=4, dtype="float16", H=2, Hk=2),
    case("w4-zigzag-causal-groups2-f64", n=6, dtype="float64", groups=2, Hk=4),
    case("w4-two-rings-of-2-zigzag-causal-f32", n=4, subgroups=2),
]


# --------------------------------------------------------------------------------------------- inputs

def make_inputs(c, seed=0):
    """Whole-sequence float64 Q, K, V, dO, the scale (tensor or float) and the key mask of case c."""
    g = torch.Generator().manual_seed(seed)
    N = c["n"] * c["world"]
    Q = torch.randn(c["B"], c["H"], N, c["D"], generator=g, dtype=torch.float64)
    K = torch.randn(c["B"], c["Hk"], N, c["D"], generator=g, dtype=torch.float64)
    V = torch.randn(c["B"], c["Hk"], N, c["D"], generator=g, dtype=torch.float64)
    dO = torch.randn(c["B"], c["H"], N, c["D"], generator=g, dtype=torch.float64)
    if c["magnitude"] != 1.0:
        Q = torch.nn.functional.normalize(Q, dim=-1) * c["magnitude"]
        K = torch.nn.functional.normalize(K, dim=-1) * c["magnitude"]
    dt = DTYPES[c["dtype"]]
    Q, K, V, dO = (t.to(dt).to(torch.float64) for t in (Q, K, V, dO))  # the values the ranks see
    if c["scale"] == "head":  # a learned scale: float32 for half inputs (as usual), else q's dtype
        sdt = torch.float32 if dt in (torch.float16, torch.bfloat16) else dt
        scale = (torch.rand(c["H"], generator=g, dtype=torch.float64) * 6 + 4).to(sdt)
    else:
        scale = float(c["scale"])
    mask = None
    if c["mask"]:
        mask = torch.ones(c["B"], N, dtype=torch.bool)
        mask[0, N - 3:] = False
        if c["mask"] == "pad+empty":
            mask[1] = False
    return Q, K, V, dO, scale, mask


# --------------------------------------------------------------------------------------- processes

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world, args, timeout):
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=(world,) + tuple(args), nprocs=world, join=False, start_method="spawn")
    deadline = time.time() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.time() > deadline:
                pytest.fail(f"{world} ring workers did not finish within {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def init(rank, world, port, device="cpu"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if device == "nccl":
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=world, timeout=timedelta(seconds=120),
                                device_id=torch.device("cuda", rank))
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))


def run_case(c, rank, world, device):
    """This rank's shards of (out, dq, dk, dv) and its share of dscale for case c."""
    group, gsize, grank, gid = None, world, rank, 0
    if c["subgroups"]:
        rings = [dist.new_group(list(range(s, s + c["subgroups"]))) for s in range(0, world, c["subgroups"])]
        gid, grank, gsize = rank // c["subgroups"], rank % c["subgroups"], c["subgroups"]
        group = rings[gid]
    Q, K, V, dO, scale, mask = make_inputs(dict(c, world=gsize), seed=gid)
    dt = DTYPES[c["dtype"]]
    idx = R.shard_indices(Q.shape[2], gsize, grank, c["layout"])
    q, k, v = (t[:, :, idx].to(device=device, dtype=dt).requires_grad_() for t in (Q, K, V))
    s = scale.to(device).requires_grad_() if isinstance(scale, torch.Tensor) else scale
    m = None if mask is None else mask[:, idx].to(device)
    out = R.ring_cosine_sim_attention(q, k, v, group=group, causal=c["causal"], layout=c["layout"], scale=s,
                                      groups=c["groups"], l2norm_qk=c["l2norm_qk"], mask=m, backend=c["backend"])
    assert out.shape == q.shape and out.dtype == q.dtype
    out.backward(dO[:, :, idx].to(device=device, dtype=dt))
    res = dict(out=out, dq=q.grad, dk=k.grad, dv=v.grad, dscale=s.grad if isinstance(s, torch.Tensor) else None)
    return {key: None if t is None else t.detach().cpu() for key, t in res.items()}


def ring_worker(rank, world, port, result_dir, cases, device="cpu", errors=False, overlap=False):
    init(rank, world, port, device)
    try:
        dev = torch.device("cuda", 0 if device == "cuda" else rank) if device in ("cuda", "nccl") else "cpu"
        results = {c["name"]: run_case(c, rank, world, dev) for c in cases}
        if overlap:
            results["overlap"] = overlap_log()
        if errors:
            results["errors"] = error_scenarios(rank, world)
            # nothing is left in flight: the next call computes what the first did
            again = run_case(cases[0], rank, world, dev)
            results["after errors"] = all(torch.equal(again[k], results[cases[0]["name"]][k])
                                          for k in again if again[k] is not None)
        torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def error_scenarios(rank, world):
    """{scenario: (exception type name, message, ring exchanges started)}: every scenario must raise on
    every rank, before any K/V moves."""
    exchanges = []
    real = R._Ring.exchange

    def spy(self, tensors):
        exchanges.append(len(tensors))
        return real(self, tensors)

    R._Ring.exchange = spy
    g = torch.Generator().manual_seed(5)

    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_()

    n_odd = 6 if rank == 1 else 8
    scenarios = {
        "n_local": lambda: R.ring_cosine_sim_attention(t(1, 2, n_odd, 16), t(1, 2, n_odd, 16), t(1, 2, n_odd, 16),
                                                       causal=True),
        "dtype": lambda: R.ring_cosine_sim_attention(
            *(t(1, 2, 8, 16, dtype=torch.float64 if rank == 1 else torch.float32) for _ in range(3))),
        "causal": lambda: R.ring_cosine_sim_attention(t(1, 2, 8, 16), t(1, 2, 8, 16), t(1, 2, 8, 16),
                                                      causal=rank == 0),
        "scale": lambda: R.ring_cosine_sim_attention(t(1, 2, 8, 16), t(1, 2, 8, 16), t(1, 2, 8, 16),
                                                     scale=8.0 + rank),
        "layout": lambda: R.ring_cosine_sim_attention(t(1, 2, 8, 16), t(1, 2, 8, 16), t(1, 2, 8, 16),
                                                      layout="diagonal"),
        "odd zigzag": lambda: R.ring_cosine_sim_attention(t(1, 2, 7, 16), t(1, 2, 7, 16), t(1, 2, 7, 16),
                                                          causal=True),
        "reference": lambda: R.ring_cosine_sim_attention(t(1, 2, 8, 16), t(1, 2, 8, 16), t(1, 2, 8, 16),
                                                         backend="reference"),
        "kv heads": lambda: R.ring_cosine_sim_attention(t(1, 4, 8, 16), t(1, 3, 8, 16), t(1, 3, 8, 16)),
    }
    out = {}
    try:
        for name, call in scenarios.items():
            before = len(exchanges)
            try:
                call()
                out[name] = ("no error", "", len(exchanges) - before)
            except Exception as e:  # noqa: BLE001 - the type is what the test checks
                out[name] = (type(e).__name__, str(e), len(exchanges) - before)
    finally:
        R._Ring.exchange = real
    return out


def load_results(tmp, world):
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


# -------------------------------------------------------------------------------------- reference

def assemble(parts, n, world, layout, dim=2):
    """The whole sequence from the ranks' shards."""
    full = torch.zeros(parts[0].shape[:dim] + (n * world,) + parts[0].shape[dim + 1:], dtype=torch.float64)
    for r, p in enumerate(parts):
        full.index_copy_(dim, R.shard_indices(n * world, world, r, layout), p.double())
    return full


def dscale_term_norm(Q, K, V, dO, scale, mask, c):
    """T_h = Σ_bij |dS_bhij·cos_bhij| in float64: the size of dscale's rounding error (README)."""
    B, H, N, D = Q.shape
    rep = H // K.shape[1]
    G = c["groups"]

    def nrm(x):
        xs = x.reshape(*x.shape[:-1], G, D // G)
        return (xs / xs.norm(dim=-1, keepdim=True).clamp_min(1e-12)).reshape(x.shape) if c["l2norm_qk"] else x

    qh, kh = nrm(Q), nrm(K).repeat_interleave(rep, 1)
    Vx = V.repeat_interleave(rep, 1)
    cos = qh @ kh.transpose(-1, -2)
    s = cos * scale.double().view(1, H, 1, 1)
    vis = torch.ones(N, N, dtype=torch.bool)
    if c["causal"]:
        vis = torch.ones(N, N, dtype=torch.bool).tril()
    vis = vis.view(1, 1, N, N) & (mask.view(B, 1, 1, N) if mask is not None else True)
    P = torch.nan_to_num(torch.softmax(s.masked_fill(~vis, float("-inf")), -1), nan=0.0)
    out = P @ Vx
    dS = P * (dO @ Vx.transpose(-1, -2) - (dO * out).sum(-1, keepdim=True))
    return (dS * cos).abs().sum(dim=(0, 2, 3))


def dense(c, Q, K, V, dO, scale, mask, dtype=torch.float64):
    """Single-process dense attention (cupy_cosattn.torch.cosine_sim_attention) and its gradients."""
    q, k, v = (t.detach().to(dtype).clone().requires_grad_() for t in (Q, K, V))
    s = scale.detach().to(dtype if dtype == torch.float64 else scale.dtype).clone().requires_grad_() \
        if isinstance(scale, torch.Tensor) else scale
    out = cat.cosine_sim_attention(q, k, v, causal=c["causal"], scale=s, groups=c["groups"], l2norm_qk=c["l2norm_qk"],
                                   mask=mask)
    out.backward(dO.to(dtype))
    return dict(out=out, dq=q.grad, dk=k.grad, dv=v.grad, dscale=s.grad if isinstance(s, torch.Tensor) else None)


def rel(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / max(float(ref.norm()), 1e-30))


def check_case(c, results, world):
    """Assert ring == dense for case c; returns the relative errors."""
    gsize = c["subgroups"] or world
    errs = {}
    for gid in range(world // gsize):
        ranks = range(gid * gsize, (gid + 1) * gsize)
        got = [results[r][c["name"]] for r in ranks]
        Q, K, V, dO, scale, mask = make_inputs(dict(c, world=gsize), seed=gid)
        ref = dense(c, Q, K, V, dO, scale, mask)
        dt = c["dtype"]
        for key in ("out", "dq", "dk", "dv"):
            parts = [g[key] for g in got]
            assert all(p.dtype == DTYPES[dt] and torch.isfinite(p.double()).all() for p in parts), key
            full = assemble(parts, c["n"], gsize, c["layout"])
            errs[key] = rel(full, ref[key])
            assert errs[key] <= (OUT_TOL if key == "out" else GRAD_TOL)[dt], (c["name"], key, errs[key])
        if mask is not None and c["mask"] == "pad+empty":  # batch row 1 sees no key: output 0, no gradient
            for key in ("out", "dq", "dk", "dv"):
                assert all(float(g[key][1].abs().max()) == 0.0 for g in got), key
        if ref["dscale"] is not None:
            shares = [g["dscale"] for g in got]
            assert all(s.dtype == scale.dtype and s.shape == scale.shape for s in shares)
            total = torch.stack([s.double() for s in shares]).sum(0)  # the sum over the group
            T = dscale_term_norm(Q, K, V, dO, scale, mask, c)
            errs["dscale"] = float((total - ref["dscale"]).norm() / T.norm())
            assert errs["dscale"] <= GRAD_TOL[dt], (c["name"], "dscale", errs["dscale"])
        if dt == "float32":  # and against the dense op in the same dtype
            same = dense(c, Q, K, V, dO, scale, mask, dtype=torch.float32)
            for key in ("out", "dq", "dk", "dv"):
                full = assemble([g[key] for g in got], c["n"], gsize, c["layout"])
                assert rel(full, same[key]) <= (OUT_TOL if key == "out" else GRAD_TOL)[dt], (c["name"], key)
    return errs


# ------------------------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ring2")
    spawn(ring_worker, 2, (free_port(), str(tmp), CASES_2, "cpu", True), timeout=240)
    return load_results(tmp, 2)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ring4")
    spawn(ring_worker, 4, (free_port(), str(tmp), CASES_4, "cpu", False, True), timeout=300)
    return load_results(tmp, 4)


@pytest.mark.parametrize("c", CASES_2, ids=[c["name"] for c in CASES_2])
def test_two_ranks_match_dense(two_ranks, c):
    check_case(c, two_ranks, 2)


@pytest.mark.parametrize("c", CASES_4, ids=[c["name"] for c in CASES_4])
def test_four_ranks_match_dense(four_ranks, c):
    check_case(c, four_ranks, 4)


def test_mismatched_ranks_raise_on_every_rank_before_any_exchange(two_ranks):
    want = {  # scenario: (type, words the message must hold)
        "n_local": ("ValueError", ["rank 1", "q differs", "(1, 2, 6, 16)", "(1, 2, 8, 16)",
                                   "N_local must be the same on every rank", "pad the global sequence at its end"]),
        "dtype": ("ValueError", ["q differs", "rank 1", "torch.float64", "rank 0", "torch.float32"]),
        "causal": ("ValueError", ["causal differs", "rank 0: 1", "rank 1: 0"]),
        "scale": ("ValueError", ["scale differs", "rank 0: 8.0", "rank 1: 9.0"]),
        "layout": ("ValueError", ["layout must be one of", "'diagonal'"]),
        "odd zigzag": ("ValueError", ["N_local must be even", "q.shape[2] = 7"]),
        "reference": ("ValueError", ["backend 'reference' cannot run a ring"]),
        "kv heads": ("ValueError", ["H=4", "Hk=3"]),
    }
    for rank, res in enumerate(two_ranks):
        for name, (typ, words) in want.items():
            got_type, msg, exchanges = res["errors"][name]
            assert got_type == typ, (rank, name, got_type, msg)
            assert exchanges == 0, (rank, name)  # raised before any K/V left the rank
            for w in words:
                assert w in msg, (rank, name, w, msg)
            if name in ("n_local", "dtype", "causal", "scale"):
                assert f"this is rank {rank} of 2" in msg
        assert res["after errors"] is True, rank  # no message stranded: the ring still computes exactly


def test_gloo_result_is_the_same_on_every_split(two_ranks, four_ranks):
    """The same whole-sequence problem over 2 and 4 ranks agrees with itself to rounding (one more
    guard that the zigzag assembly and the block plan are right for every W)."""
    c2 = dict(CASES_2[0], n=8)
    c4 = dict(CASES_4[0], n=4)
    full2 = assemble([r[c2["name"]]["out"] for r in two_ranks], 8, 2, "zigzag")
    full4 = assemble([r[c4["name"]]["out"] for r in four_ranks], 4, 4, "zigzag")
    assert full2.shape == full4.shape
    assert rel(full4, full2) <= 1e-6


# ------------------------------------------------------------------- unit tests (no process group)

def test_shard_indices_layouts_and_padding_advice():
    assert R.shard_indices(8, 2, 0, "zigzag").tolist() == [0, 1, 6, 7]
    assert R.shard_indices(8, 2, 1, "zigzag").tolist() == [2, 3, 4, 5]
    assert R.shard_indices(12, 3, 1, "zigzag").tolist() == [2, 3, 8, 9]
    assert R.shard_indices(6, 3, 2, "contiguous").tolist() == [4, 5]
    for layout, world in (("zigzag", 2), ("zigzag", 4), ("contiguous", 3)):
        every = torch.cat([R.shard_indices(24, world, r, layout) for r in range(world)])
        assert sorted(every.tolist()) == list(range(24))
    with pytest.raises(ValueError, match=r"does not split into 8 equal chunks.*pad the global sequence at its end"):
        R.shard_indices(12, 4, 0, "zigzag")
    with pytest.raises(ValueError, match="layout must be one of"):
        R.shard_indices(8, 2, 0, "striped")
    with pytest.raises(ValueError, match="rank"):
        R.shard_indices(8, 2, 2, "zigzag")


def test_zigzag_blocks_balance_causal_work():
    """Zigzag: every rank computes the same number of query-key pairs; contiguous: rank r computes r + 1
    blocks. Each pair a rank computes is causally visible, and all visible pairs are covered
    exactly once across the ranks."""
    n, W = 8, 4
    N = n * W
    for layout in ("zigzag", "contiguous"):
        work, seen = [], torch.zeros(N, N, dtype=torch.int64)
        for r in range(W):
            ring = R._Ring(None, r, W, 0, 0, "gloo")
            cfg = R._Config(ring, True, layout, 8.0, 1, True, False, "auto", False)
            pos = R.shard_indices(N, W, r, layout)
            pairs = 0
            for step in range(W):
                src = (r - step) % W
                kpos = R.shard_indices(N, W, src, layout)
                for rows, cols, causal in R._blocks(cfg, src, n):
                    qi, kj = pos[rows].view(-1, 1), kpos[cols].view(1, -1)
                    vis = (kj <= qi) if causal else torch.ones(qi.numel(), kj.numel(), dtype=torch.bool)
                    assert bool((kj <= qi)[vis].all())  # nothing hidden is attended
                    seen[qi.expand_as(vis)[vis], kj.expand_as(vis)[vis]] += 1
                    pairs += qi.numel() * kj.numel()
            work.append(pairs)
        assert torch.equal(seen, torch.ones(N, N, dtype=torch.int64).tril()), layout  # each visible pair once
        if layout == "zigzag":
            assert len(set(work)) == 1, work
        else:
            assert work == sorted(work) and work[0] < work[-1], work


@pytest.mark.parametrize("big", [False, True])
def test_combine_fixed_offset_and_running_max_agree(big):
    """The two ways to add blocks' (out, lse) give the logsumexp combination, including blocks whose rows
    see nothing (lse −inf, out 0): no NaN, and a row that sees nothing in any block stays 0 / −inf."""
    g = torch.Generator().manual_seed(3)
    B, H, N, D = 2, 3, 5, 4
    q = torch.zeros(B, H, N, D)
    offset = torch.tensor([8.0, 10.0, 39.0])
    outs = [torch.randn(B, H, N, D, generator=g) for _ in range(3)]
    # a block's lse lies in [log(n_keys) - b, log(n_keys) + b]; big: all near the lower end (the
    # smallest weights exp(lse - b) ~ exp(-2b) the fixed offset meets)
    lo, width = (-1.0, 0.1) if big else (-1.0, 2.0)
    lses = [(lo + width * torch.rand(B, H, N, generator=g)) * offset.view(1, H, 1) for _ in outs]
    for o, ls in zip(outs[1:], lses[1:]):  # some rows see nothing in some blocks
        ls[0, :, 1] = float("-inf")
        o[0, :, 1] = 0.0
    for o, ls in zip(outs, lses):  # and one row sees nothing at all
        ls[1, 0, 2] = float("-inf")
        o[1, 0, 2] = 0.0
    lse_ref = torch.logsumexp(torch.stack(lses).double(), 0)
    w = torch.exp(torch.stack(lses).double() - lse_ref.unsqueeze(0)).nan_to_num(0.0)
    out_ref = (w.unsqueeze(-1) * torch.stack(outs).double()).sum(0)
    for off in (offset, None):
        acc = R._Combine(q, off)
        rows = slice(0, N)
        for o, ls in zip(outs, lses):
            acc.add(rows, o, ls)
        out, lse = acc.result()
        assert torch.isfinite(out).all()
        assert float(out[1, 0, 2].abs().max()) == 0.0 and lse[1, 0, 2] == float("-inf")
        fin = torch.isfinite(lse_ref)
        assert torch.allclose(lse[fin].double(), lse_ref[fin], rtol=1e-6, atol=1e-5)
        assert torch.allclose(out.double(), out_ref.nan_to_num(0.0), rtol=1e-5, atol=1e-6)


def test_fixed_offset_is_used_only_where_it_bounds_every_logit():
    q = torch.zeros(1, 2, 4, 8)
    assert torch.equal(R._offset(8.0, q, 1, True), torch.tensor([8.0, 8.0]))
    assert torch.equal(R._offset(torch.tensor([5.0, 6.0]), q, 2, True), torch.tensor([10.0, 12.0]))
    assert R._offset(8.0, q, 1, False) is None  # q, k not normalized here: nothing bounds the logits
    assert R._offset(41.0, q, 1, True) is None  # exp(lse - offset) could leave float32's normal range
    assert R._offset(torch.tensor([5.0, 21.0]), q, 2, True) is None


def test_ring_needs_an_initialized_process_group():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    x = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        cat.ring_cosine_sim_attention(x, x, x)
    with pytest.raises(RuntimeError, match="init_process_group"):
        R.shard_sequence(x)


# --------------------------------------------------------------------------- overlap (structure)

def overlap_log():
    """The order of ring exchanges, block computations and waits in one forward and backward (bf16
    K/V, so the float32 dK/dV partials tell themselves apart by dtype)."""
    log = []
    real_exchange, real_wait = R._Ring.exchange, R._Exchange.wait
    real_fwd, real_bwd = R._block_forward, R._block_backward

    def exchange(self, tensors):
        kind = "kv" if tensors[0].dtype == torch.bfloat16 else "dkv"
        log.append("send " + kind)
        ex = real_exchange(self, tensors)
        ex.kind = kind
        return ex

    def wait(self):
        log.append("wait " + self.kind)
        return real_wait(self)

    def block(real):
        def run(*a, **k):
            log.append("block")
            return real(*a, **k)
        return run

    R._Ring.exchange, R._Exchange.wait = exchange, wait
    R._block_forward, R._block_backward = block(real_fwd), block(real_bwd)
    try:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, 8, 16, generator=g).to(torch.bfloat16).requires_grad_() for _ in range(3))
        out = R.ring_cosine_sim_attention(q, k, v, causal=True)
        log.append("backward")
        out.float().sum().backward()
    finally:
        R._Ring.exchange, R._Exchange.wait = real_exchange, real_wait
        R._block_forward, R._block_backward = real_fwd, real_bwd
    return log


def test_next_slice_is_in_flight_while_the_current_block_computes(four_ranks):
    """Forward: each step posts the next K/V exchange, computes its block, then waits for the slice.
    Backward: the K/V exchange is posted before the step's block; the dK/dV partials are sent after it
    and waited for only after the next step's block. (Zigzag causal: one block per step.)"""
    W = 4
    fwd = ["send kv", "block", "wait kv"] * (W - 1) + ["block"]
    bwd = ["send kv", "block", "send dkv", "wait kv"]
    bwd += ["send kv", "block", "wait dkv", "send dkv", "wait kv"] * (W - 2)
    bwd += ["block", "wait dkv", "send dkv", "wait dkv"]
    for r, res in enumerate(four_ranks):
        assert res["overlap"] == fwd + ["backward"] + bwd, (r, res["overlap"])


# --------------------------------------------------------------------------------- toy trainer

def run_trainer(args, cwd, nproc=1, timeout=240):
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    cmd = launcher + [str(ROOT / "examples" / "train_toy.py")] + [str(a) for a in args]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r.stdout + r.stderr


def test_train_toy_context_parallel_2_matches_single_process(tmp_path):
    pytest.importorskip("tqdm")
    pytest.importorskip("matplotlib")
    small = ["--steps", 5, "--val-every", 5, "--dim", 32, "--depth", 2, "--heads", 2, "--seq-len", 32,
             "--batch-size", 4, "--sample-len", 4, "--data-mb", 1, "--device", "cpu"]
    run_trainer(small + ["--out", tmp_path / "one"], tmp_path)
    log = run_trainer(small + ["--out", tmp_path / "cp", "--context-parallel", 2], tmp_path, nproc=2)
    assert "x2 processes" in log
    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)
    cp = torch.load(tmp_path / "cp" / "checkpoint.pt", weights_only=False)
    for what in ("train", "val"):
        a, b = one["history"][what], cp["history"][what]
        assert [s for s, _ in a] == [s for s, _ in b] and len(a) >= 2
        for (_, x), (_, y) in zip(a, b):
            assert abs(x - y) <= 1e-5 * abs(x), (what, a, b)
    assert a[-1][1] < a[0][1]  # it trains
    # and ends with the same weights, in the accuracy table's norm-wise measure (Adam divides by the
    # root of the squared gradients, so an almost-unused weight's rounding-level gradient can move it by
    # more than rounding, element by element)
    for name, p in one["model"].items():
        assert rel(cp["model"][name], p) <= 1e-5, name


# ------------------------------------------------------------------------------------------ GPU

GPU_CASES = [
    case("gpu-zigzag-causal-gqa-headscale-bf16", dtype="bfloat16", n=64, D=64),
    case("gpu-contiguous-mask-f16", layout="contiguous", causal=False, dtype="float16", n=48, D=64, mask="pad+empty",
         scale=8.0),
    case("gpu-zigzag-causal-f32", dtype="float32", n=32, D=32),
]


def _check_gpu_results(tmp, world):
    results = load_results(tmp, world)
    for c in GPU_CASES:
        check_case(c, results, world)


@pytest.mark.gpu
def test_gpu_kernels_two_processes_sharing_one_gpu_over_gloo(tmp_path):
    """The fused kernels in the ring: two processes on GPU 0, K/V staged through the host by gloo."""
    spawn(ring_worker, 2, (free_port(), str(tmp_path), GPU_CASES, "cuda"), timeout=300)
    _check_gpu_results(tmp_path, 2)


@pytest.mark.gpu
def test_gpu_nccl_two_gpus(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"NCCL ring needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    spawn(ring_worker, 2, (free_port(), str(tmp_path), GPU_CASES, "nccl"), timeout=300)
    _check_gpu_results(tmp_path, 2)


def test_transformer_positions_and_attention_fn_hooks():
    """The hooks the context-parallel trainer uses: explicit positions and a replaced attention give
    what the defaults give; a shard's positions pick the right embeddings; bad uses raise."""
    from cupy_cosattn.transformer import CosineSimCausalTransformer

    torch.manual_seed(0)
    model = CosineSimCausalTransformer(num_tokens=20, dim=16, max_seq_len=12, depth=1, heads=2, dim_head=8,
                                       learned_scale=True)
    x = torch.randint(0, 20, (2, 9))
    calls = []

    def attend(q, k, v, **kw):
        calls.append(kw)
        return cat.cosine_sim_attention(q, k, v, **kw)

    ref = model(x, return_loss=True)
    got = model(x, return_loss=True, positions=torch.arange(9), attention_fn=attend)
    assert torch.equal(got, ref) and calls and calls[0]["causal"] is True and calls[0]["groups"] == 1
    # a shard embeds its own global positions (with return_loss, the last token is only a label)
    seen = []
    hook = model.pos_emb.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].tolist()))
    pos = torch.tensor([0, 1, 2, 7, 8, 9, 10, 11, 3])
    model(x, return_loss=True, positions=pos)
    model(x[:, :4], positions=pos[3:7])
    hook.remove()
    assert seen == [pos[:8].tolist(), [7, 8, 9, 10]]
    with pytest.raises(ValueError, match="positions must be"):
        model(x, positions=torch.arange(8))
    with pytest.raises(ValueError, match="positions must be"):
        model(x, positions=torch.arange(9) + 4)  # past max_seq_len
    soft = CosineSimCausalTransformer(num_tokens=20, dim=16, max_seq_len=12, depth=1, heads=2, dim_head=8,
                                      attn="softmax")
    with pytest.raises(ValueError, match="attention_fn replaces cosine attention"):
        soft(x, attention_fn=attend)
