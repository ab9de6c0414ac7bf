"""The drop-in names for users of lucidrains/flash-cosine-sim-attention (cupy_cosattn.torch.compat and
the transformer's original keywords), tested on the original project's test grid.

The original's grid (its tests/test.py): causal / key mask / neither, with and without a bias, the bias
per head or per batch (attn_bias_batch_dim), one shared key/value head or one per query head, head dims
32, 64, 96, 128, lengths 63 and 127, float32 and float16, batch 4 and 8 heads. Here every case compares
`flash_cosine_sim_attention` with `plain_cosine_sim_attention` at the original's tolerances (max abs
difference 1e-4 in float32, 1e-1 in float16) and with the float64 NumPy reference at the project's
(relative norm; docs/torch.md), forward and every gradient (the original's gradient test dropped the
shared-kv axis; here it is kept). The full grid runs on the CPU torch path (marked slow and run only
when selected with -m; an unmarked subset holds every pair of values of two axes), a subset that takes
every value of every axis through the emulator, and the full grid on a GPU (marked gpu; the float64
reference there on the pairwise subset).
"""
from __future__ import annotations

import functools
import inspect
import itertools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cupy_cosattn.torch as cat  # noqa: E402
from cupy_cosattn import problem, reference  # noqa: E402
from cupy_cosattn.torch import flash_cosine_sim_attention, l2norm_tensors, plain_cosine_sim_attention  # noqa: E402
from cupy_cosattn.transformer import CosineSimCausalTransformer  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These problems are small: one intra-op thread is fastest, and on a busy machine several threads
    spin against each other (measured: 5x the wall time at a load of 16 on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------
# the grid

BATCH, HEADS = 4, 8
CAUSAL_MASK = [(True, False), (False, True), (False, False)]
BIAS = [True, False]
SEQ_LENS = [63, 127]
DIM_HEADS = [32, 64, 96, 128]
DTYPES = [torch.float32, torch.float16]
BIAS_BATCH_DIM = [False, True]
SINGLE_HEAD_KV = [False, True]
AXES = (CAUSAL_MASK, BIAS, SEQ_LENS, DIM_HEADS, DTYPES, BIAS_BATCH_DIM, SINGLE_HEAD_KV)
GRID = list(itertools.product(*AXES))

# The original's tolerance between its fused and plain paths: max |difference|.
ATOL = {torch.float32: 1e-4, torch.float16: 1e-1, torch.bfloat16: 1e-1}
# Against the float64 reference: ‖x − ref‖ / ‖ref‖ (the project's accuracy contract, docs/torch.md).
REL_OUT = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
REL_GRAD = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def covering(axes):
    """A subset of the product of `axes` in which every pair of values of two axes occurs (greedy)."""
    cases = list(itertools.product(*axes))
    index = {c: tuple(a.index(x) for a, x in zip(axes, c)) for c in cases}

    def pairs(c):
        ix = index[c]
        return {(i, ix[i], j, ix[j]) for i in range(len(axes)) for j in range(i + 1, len(axes))}

    todo = set().union(*(pairs(c) for c in cases))
    chosen = []
    while todo:
        best = max(cases, key=lambda c: len(pairs(c) & todo))
        chosen.append(best)
        todo -= pairs(best)
    return chosen


PAIRWISE = covering(AXES)


def case_id(case):
    (causal, mask), bias, n, d, dt, bbd, shkv = case
    what = "causal" if causal else "mask" if mask else "plain"
    return (f"{what}-{'bias' if bias else 'nobias'}{'-bdim' if bbd else ''}-{'1kv' if shkv else 'hkv'}-"
            f"n{n}-d{d}-{str(dt).replace('torch.', '')}")


def make_inputs(case, batch=BATCH, heads=HEADS, device="cpu", seed=0):
    """q, k, v, mask, bias and a cotangent for one grid case, drawn like the original's test (standard
    normal inputs, a random boolean key mask, a standard normal bias)."""
    (causal, with_mask), with_bias, n, d, dt, bbd, shkv = case
    g = torch.Generator().manual_seed(seed + 1000 * GRID.index(case) if case in GRID else seed)
    kv_shape = (batch, n, d) if shkv else (batch, heads, n, d)
    q = torch.randn(batch, heads, n, d, generator=g).to(dt)
    k = torch.randn(kv_shape, generator=g).to(dt)
    v = torch.randn(kv_shape, generator=g).to(dt)
    mask = torch.randint(0, 2, (batch, n), generator=g, dtype=torch.bool) if with_mask else None
    if mask is not None:
        mask[:, 0] = True  # a row without a visible key is a documented difference, tested apart
    bias = torch.randn(batch if bbd else heads, n, n, generator=g).to(dt) if with_bias else None
    dout = torch.randn(batch, heads, n, d, generator=g).to(dt)
    def move(t):
        return None if t is None else t.to(device)

    return tuple(map(move, (q, k, v, mask, bias, dout))) + (dict(causal=causal, attn_bias_batch_dim=bbd),)


def reference64(q, k, v, mask, bias, dout, kw, scale=problem.DEFAULT_SCALE, groups=1, l2norm_qk=True):
    """(out, dq, dk, dv, dbias) in float64 from the NumPy reference, in the inputs' shapes."""
    def f32(t):  # exact for half inputs
        return None if t is None else t.detach().cpu().float().numpy()

    prob, inp = problem.canonicalize(f32(q), f32(k), f32(v), mask=None if mask is None else mask.cpu().numpy(),
                                     attn_bias=f32(bias), scale=scale, groups=groups, l2norm_qk=l2norm_qk, **kw)
    out, _ = reference.forward64(prob, inp)
    res = [out.reshape(q.shape)]
    if dout is not None:
        dq, dk, dv, db, _ = reference.backward64(prob, inp, f32(dout).reshape(out.shape))
        res += [dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape),
                None if db is None else db.reshape(bias.shape)]
    return res


def rel(x, ref):
    x = x.detach().cpu().double().numpy()
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def max_abs(a, b):
    return (a.detach().float() - b.detach().float()).abs().max().item()


def finite(t):
    return bool(torch.isfinite(t).all())


def run(fn, q, k, v, mask, bias, dout, kw, **extra):
    """out and the gradients (dq, dk, dv, dbias) of <out, dout> through `fn`."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    b = None if bias is None else bias.detach().clone().requires_grad_()
    out = fn(*leaves, mask, b, **kw, **extra)
    out.backward(dout)
    return out.detach(), [t.grad for t in leaves] + [None if b is None else b.grad]


def check_case(case, device="cpu", batch=BATCH, heads=HEADS, with_reference=True, **extra):
    """flash vs plain (the original's tolerance) and, with_reference, vs the float64 reference, forward
    and gradients."""
    q, k, v, mask, bias, dout, kw = make_inputs(case, batch, heads, device)
    dt = q.dtype
    out, grads = run(flash_cosine_sim_attention, q, k, v, mask, bias, dout, kw, **extra)
    pout, pgrads = run(plain_cosine_sim_attention, q, k, v, mask, bias, dout, kw)
    refs = reference64(q, k, v, mask, bias, dout, kw) if with_reference else [None] * 5
    names = ("out", "dq", "dk", "dv", "dbias")
    assert out.shape == q.shape and out.dtype == dt
    for name, x, p, r in zip(names, [out] + grads, [pout] + pgrads, refs):
        if name == "dbias" and bias is None:
            assert x is None and p is None
            continue
        assert x.dtype == dt and finite(x), name
        assert max_abs(x, p) <= ATOL[dt], (name, max_abs(x, p))
        if r is not None:
            tol = REL_OUT[dt] if name == "out" else REL_GRAD[dt]
            assert rel(x, r) <= tol, (name, rel(x, r))


def test_pairwise_subset_covers_the_grid():
    for axis_index, axis in enumerate(AXES):
        assert {c[axis_index] for c in PAIRWISE} == set(axis)
    assert len(PAIRWISE) < len(GRID) / 8


@pytest.mark.parametrize("case", PAIRWISE, ids=case_id)
def test_grid_pairwise_cpu(case):
    """Every pair of axis values of the original's grid, on the CPU torch path."""
    check_case(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in GRID if c not in PAIRWISE], ids=case_id)
def test_grid_rest_cpu(case):
    """The rest of the original's grid on the CPU torch path."""
    check_case(case)


# Through the emulator the kernels run on the CPU thread by thread: batch 2, heads 2, and five cases
# that between them take every value of the axes that change what the kernels do (head dim, length,
# dtype incl. bfloat16, mask/causal/neither, no/per-head/per-batch bias, shared or per-head kv).
EMU_AXES = (CAUSAL_MASK, BIAS, SEQ_LENS, DIM_HEADS, [torch.float32, torch.float16, torch.bfloat16],
            BIAS_BATCH_DIM, SINGLE_HEAD_KV)
EMU_CASES = [
    ((True, False), True, 127, 32, torch.float32, False, False),
    ((False, True), True, 63, 64, torch.float16, True, True),
    ((False, False), False, 63, 96, torch.bfloat16, False, False),
    ((False, True), True, 63, 128, torch.float16, False, True),
    ((True, False), True, 63, 128, torch.bfloat16, True, False),
]


def test_emulator_subset_covers_every_value():
    for axis_index, axis in enumerate(EMU_AXES):
        assert {c[axis_index] for c in EMU_CASES} == set(axis), axis_index
    assert {(c[1], c[5]) for c in EMU_CASES} >= {(True, False), (True, True)}  # both bias kinds


@pytest.mark.parametrize("case", EMU_CASES, ids=case_id)
def test_grid_emulator(case):
    check_case(case, batch=2, heads=2, backend="emulator")


@pytest.mark.gpu
@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_grid_cuda(case):
    """The whole grid on CUDA against plain_cosine_sim_attention, as the original tested its kernel; the
    pairwise subset also against the float64 reference (computed on the host, the slow part)."""
    check_case(case, device="cuda", with_reference=case in PAIRWISE)


# ---------------------------------------------------------------------------------------------------
# the names, argument order and defaults

# The original's signatures (flash_cosine_sim_attention/flash_cosine_sim_attention.py at 0.1.40).
ORIGINAL_PARAMS = [("q", inspect.Parameter.empty), ("k", inspect.Parameter.empty), ("v", inspect.Parameter.empty),
                   ("mask", None), ("attn_bias", None), ("scale", 8), ("groups", 1), ("causal", False),
                   ("l2norm_qk", True), ("attn_bias_batch_dim", False)]


@pytest.mark.parametrize("fn", [flash_cosine_sim_attention, plain_cosine_sim_attention])
def test_signature_is_the_originals(fn):
    params = list(inspect.signature(fn).parameters.values())
    positional = [(p.name, p.default) for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional == ORIGINAL_PARAMS
    assert all(p.kind == p.KEYWORD_ONLY for p in params[len(ORIGINAL_PARAMS):])  # additions: keyword-only
    lp = inspect.signature(l2norm_tensors).parameters
    assert [(p.name, p.kind) for p in lp.values()] == [("tensors", inspect.Parameter.VAR_POSITIONAL),
                                                        ("groups", inspect.Parameter.KEYWORD_ONLY)]
    assert lp["groups"].default == 1
    assert {"flash_cosine_sim_attention", "plain_cosine_sim_attention", "l2norm_tensors"} <= set(cat.__all__)


def test_positional_arguments_mean_what_they_meant():
    """mask, attn_bias, scale, groups, causal, l2norm_qk, attn_bias_batch_dim in the original's order."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=g) for _ in range(3))
    mask = torch.rand(2, 9, generator=g) > 0.3
    mask[:, 0] = True
    bias = torch.randn(2, 9, 9, generator=g)
    for fn in (flash_cosine_sim_attention, plain_cosine_sim_attention):
        by_position = fn(q, k, v, mask, bias, 5.0, 2, False, True, True)
        by_name = fn(q, k, v, mask=mask, attn_bias=bias, scale=5.0, groups=2, causal=False, l2norm_qk=True,
                     attn_bias_batch_dim=True)
        assert torch.equal(by_position, by_name)
        ref = reference64(q, k, v, mask, bias, None, dict(attn_bias_batch_dim=True), scale=5.0, groups=2)[0]
        assert rel(by_position, ref) <= 1e-5
        # the defaults: scale 8, whole-head l2norm
        assert rel(fn(q, k, v), reference64(q, k, v, None, None, None, {})[0]) <= 1e-5


@pytest.mark.parametrize("groups", [2, 4])
def test_groups(groups):
    q, k, v, mask, bias, dout, kw = make_inputs(((True, False), True, 63, 32, torch.float32, True, True), 2, 4)
    out, grads = run(flash_cosine_sim_attention, q, k, v, mask, bias, dout, kw, groups=groups)
    pout, pgrads = run(functools.partial(plain_cosine_sim_attention, groups=groups), q, k, v, mask, bias, dout, kw)
    refs = reference64(q, k, v, mask, bias, dout, kw, groups=groups)
    assert rel(out, reference64(q, k, v, mask, bias, None, kw)[0]) > 1e-3  # groups change the result
    for x, p, r in zip([out] + grads, [pout] + pgrads, refs):
        assert max_abs(x, p) <= 1e-4 and rel(x, r) <= 1e-4


def test_readme_layouts():
    """The original README's other layouts: merged batch-heads with causal cross attention, a key mask
    longer than the queries, one shared kv head with causal, a per-head tensor scale (an addition)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(6, 10, 32, generator=g)
    k, v = torch.randn(6, 17, 32, generator=g), torch.randn(6, 17, 32, generator=g)
    bias = torch.randn(6, 10, 17, generator=g)
    out = flash_cosine_sim_attention(q, k, v, attn_bias=bias, causal=True)
    assert out.shape == (6, 10, 32)
    # the original forces attn_bias_batch_dim for merged q: the (BH, Nq, Nk) bias is per batch-head
    assert max_abs(out, plain_cosine_sim_attention(q, k, v, attn_bias=bias, causal=True)) <= 1e-5
    assert rel(out, reference64(q, k, v, None, bias, None, dict(causal=True))[0]) <= 1e-5
    q4 = torch.randn(2, 4, 10, 32, generator=g)
    k3, v3 = torch.randn(2, 17, 32, generator=g), torch.randn(2, 17, 32, generator=g)
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[1, 5:] = False
    for kw in (dict(mask=mask), dict(causal=True)):
        out = flash_cosine_sim_attention(q4, k3, v3, **kw)
        assert max_abs(out, plain_cosine_sim_attention(q4, k3, v3, **kw)) <= 1e-5
        ref = reference64(q4, k3, v3, kw.get("mask"), None, None, dict(causal=kw.get("causal", False)))[0]
        assert rel(out, ref) <= 1e-5
    scale = torch.tensor([2.0, 4.0, 8.0, 16.0], requires_grad=True)
    out = flash_cosine_sim_attention(q4, k3, v3, None, None, scale)
    pout = plain_cosine_sim_attention(q4, k3, v3, None, None, scale)
    assert max_abs(out, pout) <= 1e-5
    (g1,) = torch.autograd.grad(out.sum(), scale)
    (g2,) = torch.autograd.grad(pout.sum(), scale)
    assert torch.allclose(g1, g2, rtol=1e-4, atol=1e-5)


def test_l2norm_tensors():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 3, 5, 16, generator=g, dtype=torch.float16)
    k = torch.randn(2, 5, 16, generator=g, dtype=torch.float32)
    qn, kn = l2norm_tensors(q, k, groups=4)
    assert qn.dtype == kn.dtype == torch.float16  # the first tensor's dtype, as in the original
    assert qn.shape == q.shape and kn.shape == k.shape
    chunks = kn.float().reshape(2, 5, 4, 4)
    assert torch.allclose(chunks.norm(dim=-1), torch.ones(2, 5, 4), atol=2e-3)
    want = k.reshape(2, 5, 4, 4) / k.reshape(2, 5, 4, 4).norm(dim=-1, keepdim=True)
    assert torch.allclose(chunks, want, atol=1e-3)
    # a zero vector stays zero (its norm is clamped), never NaN
    (z,) = l2norm_tensors(torch.zeros(3, 8))
    assert torch.equal(z, torch.zeros(3, 8))
    # normalizing first and passing l2norm_qk=False is what l2norm_qk=True does
    q32 = torch.randn(2, 3, 5, 16, generator=g)
    k32, v32 = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    a = flash_cosine_sim_attention(*l2norm_tensors(q32, k32, groups=2), v32, groups=2, l2norm_qk=False)
    b = flash_cosine_sim_attention(q32, k32, v32, groups=2)
    assert torch.allclose(a, b, atol=1e-6)
    # differentiable
    x = torch.randn(4, 8, generator=g, requires_grad=True)
    (y,) = l2norm_tensors(x)
    y[:, 0].sum().backward()
    assert x.grad is not None and finite(x.grad) and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="groups"):
        l2norm_tensors(q, groups=3)
    with pytest.raises(TypeError, match="at least one tensor"):
        l2norm_tensors()
    with pytest.raises(TypeError, match="argument 1"):
        l2norm_tensors(q, [1.0, 2.0])


def test_bad_arguments_raise_like_the_op():
    q = torch.randn(2, 4, 9, 16)
    for fn in (flash_cosine_sim_attention, plain_cosine_sim_attention):
        with pytest.raises(ValueError, match="mask"):
            fn(q, q, q, torch.ones(2, 8, dtype=torch.bool))
        with pytest.raises(ValueError, match="attn_bias_batch_dim"):
            fn(q, q, q, None, torch.zeros(2, 9, 9))  # a per-batch bias without attn_bias_batch_dim
        with pytest.raises(ValueError, match="groups"):
            fn(q, q, q, groups=3)


def test_plain_compiles_without_graph_breaks():
    """plain_cosine_sim_attention traces whole under torch.compile (fullgraph) and gives the eager result
    (the op under flash_cosine_sim_attention has its compile tests in test_torch.py)."""
    g = torch.Generator().manual_seed(17)
    q = torch.randn(2, 4, 9, 16, generator=g, requires_grad=True)
    k, v = torch.randn(2, 9, 16, generator=g), torch.randn(2, 9, 16, generator=g)
    bias = torch.randn(4, 9, 9, generator=g)
    compiled = torch.compile(plain_cosine_sim_attention, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v, None, bias, 8, 2, True)
    assert torch.allclose(out, plain_cosine_sim_attention(q, k, v, None, bias, 8, 2, True), atol=1e-6)
    (grad,) = torch.autograd.grad(out.sum(), q)
    assert finite(grad) and grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------
# documented differences

def test_row_without_visible_key():
    """The fused op gives 0 (and no gradient) for a row that sees no key, as the original's kernel does;
    plain_cosine_sim_attention gives the mean of v there, as the original's plain function does."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 2, 6, 16, generator=g)
    k, v = torch.randn(2, 2, 8, 16, generator=g), torch.randn(2, 2, 8, 16, generator=g)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1] = False  # batch 1 sees no key at all
    v_ = v.clone().requires_grad_()
    out = flash_cosine_sim_attention(q, k, v_, mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    assert torch.equal(v_.grad[1], torch.zeros_like(v_.grad[1]))
    plain = plain_cosine_sim_attention(q, k, v, mask)
    assert torch.allclose(plain[1], v[1].mean(dim=1, keepdim=True).expand(2, 6, 16), atol=1e-6)
    assert torch.allclose(plain[0], out[0], atol=1e-5)  # rows with a visible key agree
    # causal with more queries than keys: the first Nq - Nk queries see nothing
    qc = torch.randn(2, 2, 11, 16, generator=g)
    out = flash_cosine_sim_attention(qc, k, v, causal=True)
    plain = plain_cosine_sim_attention(qc, k, v, causal=True)
    assert torch.equal(out[:, :, :3], torch.zeros(2, 2, 3, 16))
    assert torch.allclose(plain[:, :, :3], v.mean(dim=2, keepdim=True).expand(2, 2, 3, 16), atol=1e-6)
    assert torch.allclose(plain[:, :, 3:], out[:, :, 3:], atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "emulator"])
def test_finite_where_the_originals_kernel_overflows(backend):
    """Where the original's fixed-offset exponent scale·cos + bias − scale passes float32's exp range
    (about 88) it returns inf/NaN; the op returns the reference's finite result: q, k of norm about 10
    with l2norm_qk=False (cos up to about 100, scale 1), and a bias of 100."""
    g = torch.Generator().manual_seed(13)
    u = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
    q, k = (10 * u + torch.randn(1, 2, 20, 32, generator=g) / math.sqrt(32) for _ in range(2))
    v, dout = torch.randn(1, 2, 20, 32, generator=g), torch.randn(1, 2, 20, 32, generator=g)
    big_bias = torch.full((2, 20, 20), 100.0) + torch.randn(2, 20, 20, generator=g)
    for bias, l2, scale in ((None, False, 1.0), (big_bias, True, 8.0)):
        out, grads = run(flash_cosine_sim_attention, q, k, v, None, bias, dout, {}, scale=scale, l2norm_qk=l2,
                         backend=backend)
        refs = reference64(q, k, v, None, bias, dout, {}, scale=scale, l2norm_qk=l2)
        for x, r in zip([out] + grads, refs):
            if r is not None:
                assert finite(x) and rel(x, r) <= (1e-5 if x is out else 1e-4), rel(x, r)


# ---------------------------------------------------------------------------------------------------
# the transformer's original keywords

def small_model(**kw):
    base = dict(num_tokens=40, dim=32, max_seq_len=16, depth=2, heads=4, dim_head=8)
    base.update(kw)
    return CosineSimCausalTransformer(**base)


def same_weights(a, b):
    b.load_state_dict(a.state_dict())
    return b


def test_use_cuda_kernel_and_non_cosine_sim_attn():
    torch.manual_seed(0)
    x = torch.randint(0, 40, (2, 16))
    default = small_model()
    fused = same_weights(default, small_model(use_cuda_kernel=True))
    plain = same_weights(default, small_model(use_cuda_kernel=False))
    for layer in plain.layers:
        assert layer["attn"].attend is plain_cosine_sim_attention
    for layer in fused.layers:
        assert layer["attn"].attend is cat.cosine_sim_attention
    ref = default(x)
    assert torch.allclose(fused(x), ref, atol=1e-5) and torch.allclose(plain(x), ref, atol=1e-4)
    softmax = small_model(attn="softmax")
    assert all(layer["attn"].attn == "softmax" for layer in small_model(non_cosine_sim_attn=True).layers)
    assert torch.equal(same_weights(softmax, small_model(non_cosine_sim_attn=True))(x), softmax(x))
    with pytest.raises(TypeError, match="use_cuda_kernel"):
        small_model(use_cuda_kernel="yes")


def test_extra_keywords_reach_the_attention():
    torch.manual_seed(0)
    x = torch.randint(0, 40, (2, 16))
    default = small_model()
    kw_model = same_weights(default, small_model(l2norm_qk=False))
    assert kw_model.layers[0]["attn"].attend.keywords == dict(l2norm_qk=False)
    hooked = default(x, attention_fn=functools.partial(cat.cosine_sim_attention, l2norm_qk=False))
    assert torch.equal(kw_model(x), hooked)
    assert not torch.allclose(kw_model(x), default(x), atol=1e-3)  # the keyword changed the attention
    plain_kw = same_weights(default, small_model(use_cuda_kernel=False, l2norm_qk=False))
    assert torch.allclose(plain_kw(x), hooked, atol=1e-4)
    with pytest.raises(TypeError, match="backend"):
        small_model(use_cuda_kernel=False, backend="torch")  # the plain function has no backend
    with pytest.raises(TypeError, match="dropout"):
        small_model(dropout=0.1)
    with pytest.raises(TypeError, match="causal"):
        small_model(causal=False)  # the layer passes causal itself


def test_l2norm_groups_take_effect():
    """attn_l2norm_groups reaches the attention (the original's transformer dropped it)."""
    torch.manual_seed(0)
    x = torch.randint(0, 40, (2, 16))
    one = small_model()
    eight = same_weights(one, small_model(attn_l2norm_groups=8))
    assert all(layer["attn"].l2norm_groups == 8 for layer in eight.layers)
    groups8 = functools.partial(cat.cosine_sim_attention, groups=8)
    assert torch.equal(eight(x), one(x, attention_fn=lambda *a, groups, **kw: groups8(*a, **kw)))
    assert not torch.allclose(eight(x), one(x), atol=1e-3)


def test_post_norm_initialization_is_the_originals():
    depth, dim = 3, 64
    m = CosineSimCausalTransformer(num_tokens=300, dim=dim, max_seq_len=200, depth=depth, heads=2, dim_head=32)
    for emb in (m.token_emb, m.pos_emb):
        assert emb.weight.std().item() == pytest.approx(1e-5, rel=0.1)
        assert abs(emb.weight.mean().item()) < 1e-6
    assert m.alpha == pytest.approx((2 * depth) ** 0.25)
    beta = (8 * depth) ** -0.25

    def xavier(w, gain):
        return gain * math.sqrt(2.0 / (w.shape[0] + w.shape[1]))

    a, ff = m.layers[0]["attn"], m.layers[0]["ff"]
    for lin, gain in ((a.to_q, 1.0), (a.to_k, 1.0), (a.to_v, beta), (a.to_out, beta), (ff[0], beta), (ff[2], beta),
                      (m.to_logits, 1.0)):
        assert lin.weight.std().item() == pytest.approx(xavier(lin.weight, gain), rel=0.1)
    p = CosineSimCausalTransformer(num_tokens=300, dim=dim, max_seq_len=200, depth=depth, heads=2, dim_head=32,
                                   pre_norm=True)
    assert p.token_emb.weight.std().item() == pytest.approx(0.02, rel=0.1)


def train_script_replica(device, use_cuda_kernel, amp_dtype=None, steps=3):
    """What the original's train.py does with the model, at a small size: the same constructor keywords
    (grouped l2norm, attn_scale 1, pre-norm, use_cuda_kernel from its flag), Adam, gradient accumulation
    under autocast with a GradScaler, gradient clipping, a validation loss and `generate`. (A float16
    GradScaler skips the steps whose gradients overflow at its first scales: give it more steps.)"""
    seq_len, batch, accumulate = 32, 4, 2
    torch.manual_seed(0)
    model = CosineSimCausalTransformer(
        num_tokens=256, dim=64, depth=2, attn_scale=1, attn_l2norm_groups=8, dim_head=64, pre_norm=True,
        non_cosine_sim_attn=False, max_seq_len=seq_len, use_cuda_kernel=use_cuda_kernel)
    model.to(device)
    data = torch.randint(0, 256, (batch, seq_len + 1), generator=torch.Generator().manual_seed(1)).to(device)
    optim = torch.optim.Adam(model.parameters(), lr=2e-4)
    use_amp = amp_dtype is not None
    scaler = torch.amp.GradScaler(device, enabled=use_amp and amp_dtype == torch.float16)
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for _ in range(steps):
        model.train()
        optim.zero_grad()
        for _ in range(accumulate):
            with torch.autocast(device, dtype=amp_dtype or torch.float32, enabled=use_amp):
                loss = model(data, return_loss=True)
            scaler.scale(loss / accumulate).backward()
        losses.append(loss.item())
        scaler.unscale_(optim)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        scaler.step(optim)
        scaler.update()
    model.eval()
    with torch.no_grad():
        val = model(data, return_loss=True).item()
    sample = model.generate(data[0, :-1][None, ...], 8)
    assert all(math.isfinite(x) for x in losses + [val])
    assert losses[-1] < losses[0] and val < losses[0]  # a few steps on one batch lower its loss
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert sample.shape == (1, 8) and sample.min() >= 0 and sample.max() < 256
    assert model.layers[0]["attn"].l2norm_groups == 8


@pytest.mark.parametrize("use_cuda_kernel", [False, True])
def test_train_script_runs_cpu(use_cuda_kernel):
    train_script_replica("cpu", use_cuda_kernel)


def test_train_script_runs_cpu_bfloat16_autocast():
    train_script_replica("cpu", True, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("use_cuda_kernel", [False, True])
def test_train_script_runs_cuda_float16(use_cuda_kernel):
    train_script_replica("cuda", use_cuda_kernel, torch.float16, steps=12)
