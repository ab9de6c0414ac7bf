"""CosineSimCausalTransformer on packed documents (forward(tokens (1, T), cu_seqlens=...)): the same
logits as each document run alone (positions restart, nothing crosses a boundary), the loss over
each document's own next tokens, and the argument checks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cupy_cosattn.transformer import CosineSimCausalTransformer

LENGTHS = (5, 1, 16, 0, 9)


def model_and_docs(attn, pre_norm, seed=0):
    torch.manual_seed(seed)
    m = CosineSimCausalTransformer(num_tokens=50, dim=32, max_seq_len=16, depth=2, heads=4, dim_head=8, kv_heads=2,
                                   attn=attn, learned_scale=True, pre_norm=pre_norm).double()
    docs = [torch.randint(0, 50, (n,)) for n in LENGTHS]
    cu = torch.tensor([0] + list(torch.cumsum(torch.tensor(LENGTHS), 0)), dtype=torch.int32)
    return m, docs, torch.cat(docs)[None], cu


@pytest.mark.parametrize("attn, pre_norm", [("cosine", True), ("cosine", False), ("softmax", True)])
def test_packed_equals_each_document_alone(attn, pre_norm):
    m, docs, tokens, cu = model_and_docs(attn, pre_norm)
    packed = m(tokens, cu_seqlens=cu)
    assert packed.shape == (1, tokens.shape[1], 50)
    for d, start in zip(docs, cu[:-1].tolist()):
        if len(d):
            torch.testing.assert_close(packed[0, start:start + len(d)], m(d[None])[0], rtol=1e-9, atol=1e-9)
    loss = m(tokens, cu_seqlens=cu, return_loss=True)
    per_doc = torch.cat([F.cross_entropy(m(d[None])[0, :-1].float(), d[1:], reduction="none") for d in docs
                         if len(d) > 1])
    torch.testing.assert_close(loss, per_doc.mean(), rtol=1e-6, atol=1e-6)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert m.layers[0]["attn"].to_q.weight.grad.abs().sum() > 0


def test_packed_arguments_are_checked():
    m, docs, tokens, cu = model_and_docs("cosine", True)
    with pytest.raises(ValueError, match="must be the number of tokens"):
        m(tokens[:, :-1], cu_seqlens=cu)
    with pytest.raises(ValueError, match="exceeds max_seq_len=16"):
        m(torch.zeros((1, 20), dtype=torch.long), cu_seqlens=torch.tensor([0, 20], dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        m(tokens, cu_seqlens=cu.long())
    with pytest.raises(ValueError, match=r"shape \(1, total\)"):
        m(tokens.expand(2, -1), cu_seqlens=cu)
