"""cupy_cosattn.transformer: the model learns a task that needs attention, cached generation equals
uncached generation, the DeepNet constants, the softmax baseline, and argument checks."""
import math
import time

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from cupy_cosattn.transformer import CosineSimCausalTransformer, softmax_attention, top_k_filter  # noqa: E402


def copy_batch(n, length, vocab, gen):
    """[x_1..x_L, SEP, x_1..x_L]: the second half can only be predicted by looking back L+1 positions."""
    x = torch.randint(0, vocab, (n, length), generator=gen)
    return torch.cat([x, torch.full((n, 1), vocab), x], dim=1)


@pytest.mark.parametrize("pre_norm", [False, True], ids=["deepnet-post-norm", "pre-norm"])
def test_learns_copy_task(pre_norm):
    torch.manual_seed(0)
    V, L = 16, 10
    model = CosineSimCausalTransformer(num_tokens=V + 1, dim=64, max_seq_len=2 * L + 1, depth=2, heads=4,
                                       dim_head=16, pre_norm=pre_norm, learned_scale=True, attn_scale=10.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    t0 = time.time()
    for _ in range(120):
        s = copy_batch(32, L, V, gen)
        logits = model(s[:, :-1])[:, L:]
        loss = F.cross_entropy(logits.reshape(-1, V + 1), s[:, L + 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    s = copy_batch(512, L, V, torch.Generator().manual_seed(99))
    with torch.no_grad():
        acc = (model(s[:, :-1])[:, L:].argmax(-1) == s[:, L + 1:]).float().mean().item()
    assert acc >= 0.95, f"copy accuracy {acc:.3f} after 120 steps ({time.time() - t0:.0f} s)"


@pytest.mark.parametrize("attn,kv_heads,pre_norm", [("cosine", None, False), ("cosine", 2, True),
                                                    ("softmax", 2, False)])
def test_cached_generation_equals_uncached(attn, kv_heads, pre_norm):
    torch.manual_seed(0)
    model = CosineSimCausalTransformer(num_tokens=50, dim=32, max_seq_len=24, depth=2, heads=4, dim_head=8,
                                       kv_heads=kv_heads, attn=attn, pre_norm=pre_norm, attn_l2norm_groups=2)
    prompt = torch.randint(0, 50, (3, 5))
    # 30 new tokens: past max_seq_len, so the window slides and the cache is rebuilt
    cached = model.generate(prompt, 30, temperature=0.0, use_cache=True)
    uncached = model.generate(prompt, 30, temperature=0.0, use_cache=False)
    assert cached.shape == (3, 30)
    assert torch.equal(cached, uncached)


def test_cached_logits_match_full_forward():
    torch.manual_seed(0)
    model = CosineSimCausalTransformer(num_tokens=40, dim=32, max_seq_len=16, depth=2, heads=4, dim_head=8).eval()
    x = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        full = model(x)
        logits, cache = model(x[:, :7], return_cache=True)
        steps = [logits]
        for i in range(7, 12):  # one query against the cache: bottom-right causal alignment
            logits, cache = model(x[:, i:i + 1], cache=cache, return_cache=True)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)
    assert cache[0][0].shape == (2, 4, 12, 8)


def test_sampling_and_top_k():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    kept = top_k_filter(logits, thres=0.5)
    assert torch.isfinite(kept).sum() == 2 and kept[0, 1] == 3.0 and kept[0, 3] == 2.0
    assert torch.isfinite(top_k_filter(logits, thres=0.99)).sum() == 1  # never zero tokens
    torch.manual_seed(0)
    model = CosineSimCausalTransformer(num_tokens=30, dim=32, max_seq_len=16, depth=1, heads=2, dim_head=16)
    model.train()
    out = model.generate(torch.randint(0, 30, (2, 3)), 8, temperature=0.7, filter_thres=0.9)
    assert out.shape == (2, 8) and out.min() >= 0 and out.max() < 30
    assert model.training  # generate restores the mode


def test_deepnet_constants_and_init():
    depth = 6
    m = CosineSimCausalTransformer(num_tokens=10, dim=64, max_seq_len=8, depth=depth, heads=2, dim_head=32)
    assert m.alpha == pytest.approx((2 * depth) ** 0.25)
    assert m.beta == pytest.approx((8 * depth) ** -0.25)
    w = m.layers[0]["attn"].to_v.weight
    xavier_std = math.sqrt(2.0 / (w.shape[0] + w.shape[1]))
    assert w.std().item() == pytest.approx(m.beta * xavier_std, rel=0.1)
    p = CosineSimCausalTransformer(num_tokens=10, dim=64, max_seq_len=8, depth=depth, heads=2, dim_head=32,
                                   pre_norm=True)
    assert p.alpha == 1.0 and isinstance(p.final_norm, torch.nn.LayerNorm)


def test_loss_and_learned_scale_gradient():
    torch.manual_seed(0)
    m = CosineSimCausalTransformer(num_tokens=20, dim=32, max_seq_len=9, depth=2, heads=4, dim_head=8,
                                   learned_scale=True, kv_heads=1)
    x = torch.randint(0, 20, (3, 9))
    loss = m(x, return_loss=True)
    assert loss.ndim == 0 and abs(loss.item() - math.log(20)) < 1.5
    loss.backward()
    for layer in m.layers:
        g = layer["attn"].log_scale.grad
        assert g is not None and g.shape == (4,) and torch.isfinite(g).all() and g.abs().sum() > 0
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.randint(0, 20, (1, 10)))
    with pytest.raises(ValueError, match="attn"):
        CosineSimCausalTransformer(num_tokens=5, dim=8, max_seq_len=4, depth=1, attn="linear")


def test_softmax_attention_is_bottom_right_causal():
    q = torch.randn(1, 2, 3, 8)
    k = torch.randn(1, 2, 5, 8)
    v = torch.randn(1, 2, 5, 8)
    out = softmax_attention(q, k, v)
    sim = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    i, j = torch.arange(3).unsqueeze(1), torch.arange(5).unsqueeze(0)
    ref = sim.masked_fill(j > i + 2, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(out, ref)
