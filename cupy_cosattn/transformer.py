"""A small causal transformer language model built on cosine-sim attention.

The model of the original project (flash-cosine-sim-attention's ``CosineSimCausalTransformer``),
made correct and complete:

- token + learned absolute position embeddings, ``depth`` blocks of (attention, feed-forward);
- ``pre_norm=True``: x + f(LayerNorm(x)) and a final LayerNorm; ``pre_norm=False`` (default): DeepNet
  post-norm, LayerNorm(alpha·x + f(x)) with alpha = (2·depth)^(1/4), and the value, output and
  feed-forward weights initialized Xavier-normal with gain beta = (8·depth)^(-1/4) (q and k with gain 1)
  and the embeddings N(0, 1e-5²), the original's initialization;
- ``attn="cosine"``: :func:`cupy_cosattn.torch.cosine_sim_attention` (fused kernels on CUDA, torch on
  the CPU) with a fixed ``attn_scale`` or, with ``learned_scale=True``, a learned positive per-head scale,
  and ``attn_l2norm_groups`` l2norm groups; ``attn="softmax"``: regular scaled-dot-product attention,
  the baseline;
- optional grouped-query attention (``kv_heads`` dividing ``heads``);
- the original's constructor keywords: ``use_cuda_kernel`` (False: the non-fused
  :func:`~cupy_cosattn.torch.plain_cosine_sim_attention`), ``non_cosine_sim_attn`` (the softmax
  baseline) and extra keywords for the attention function (see `CosineSimCausalTransformer`);
- :meth:`CosineSimCausalTransformer.generate` with top-k filtering, temperature (0 = greedy) and a
  preallocated, paged KV cache (:class:`KVCache`: per layer a pool of key and value pages
  (num_pages, Hk, page_size, D) and a block table; or, with page_size=None, a contiguous
  (B, Hk, max_seq_len, D) buffer): the prompt and then each new token are appended in place and attended to by
  :func:`cupy_cosattn.torch.kvcache_attention` (no ``torch.cat`` per token; bottom-right causal, so a new
  token sees every cached key), so cached and uncached generation compute the same thing;
- context parallelism: ``forward(tokens, positions=..., attention_fn=...)`` runs the model on one shard
  of a sequence, with the shard's global positions and an attention function that sees the whole
  sequence, e.g. :func:`cupy_cosattn.torch.ring.ring_cosine_sim_attention` bound to a process group
  (examples/train_toy.py ``--context-parallel``; docs/ring.md);
- packed documents: ``forward(tokens (1, total), cu_seqlens=...)`` runs several documents of different
  lengths as one row without padding: positions restart at 0 in every document, attention is
  :func:`cupy_cosattn.torch.varlen_cosine_sim_attention` (no token sees another document), and the
  loss predicts each token from its own document only (examples/train_toy.py ``--pack``).
"""
from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .torch import cosine_sim_attention, kvcache_attention, plain_cosine_sim_attention, varlen_cosine_sim_attention

__all__ = ["CosineSimCausalTransformer", "Attention", "FeedForward", "KVCache", "top_k_filter"]

LayerCaches = list[tuple[Tensor, Tensor]]  # per layer (k, v) (B, Hk, N, D), grown by torch.cat

# Embedding std of the post-norm (DeepNet) model: the original project's value.
POST_NORM_EMB_STD = 1e-5
# Embedding std of the pre-norm model (the original leaves PyTorch's N(0, 1) there).
PRE_NORM_EMB_STD = 0.02
# Keywords the attention layer itself passes; the model's extra keywords may not override them.
_LAYER_KEYWORDS = ("q", "k", "v", "causal", "scale", "groups")
# The model's extra attention keywords that the packed-document attention takes too.
_VARLEN_KEYWORDS = ("l2norm_qk", "deterministic", "backend")


def cosine_attention_function(use_cuda_kernel: Optional[bool] = None, **kwargs: Any) -> Callable[..., Tensor]:
    """The cosine attention a layer calls as f(q, k, v, causal=True, scale=..., groups=...).

    use_cuda_kernel None or True: :func:`cupy_cosattn.torch.cosine_sim_attention` (the fused kernels on
    CUDA, the torch implementation elsewhere); False: :func:`cupy_cosattn.torch.plain_cosine_sim_attention`
    (the full score matrix in plain torch, the original's non-fused path). kwargs are bound to it (e.g.
    l2norm_qk, backend, deterministic); a name it does not take raises TypeError here."""
    if use_cuda_kernel is not None and not isinstance(use_cuda_kernel, bool):
        raise TypeError(f"use_cuda_kernel must be a bool or None, got {type(use_cuda_kernel).__name__}")
    fn = plain_cosine_sim_attention if use_cuda_kernel is False else cosine_sim_attention
    takes = [n for n in inspect.signature(fn).parameters if n not in _LAYER_KEYWORDS]
    bad = sorted(set(kwargs) - set(takes))
    if bad:
        raise TypeError(f"unexpected keyword argument(s) {bad}: extra keywords go to the attention function "
                        f"{fn.__name__} (use_cuda_kernel={use_cuda_kernel}), which takes {takes}")
    return functools.partial(fn, **kwargs) if kwargs else fn


def top_k_filter(logits: Tensor, thres: float = 0.9) -> Tensor:
    """Keep the top ceil((1 − thres)·vocab) logits (at least one) of each row; the rest become -inf."""
    k = max(1, math.ceil((1.0 - thres) * logits.shape[-1]))
    val, ind = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter_(-1, ind, val)


def packed_softmax_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Causal softmax attention within each packed document: q (T, H, D), k, v (T, Hk, D) -> (T, H, D)."""
    T = q.shape[0]
    doc = document_index(cu_seqlens, T)
    i = torch.arange(T, device=q.device)
    allowed = (doc.unsqueeze(1) == doc.unsqueeze(0)) & (i.unsqueeze(0) <= i.unsqueeze(1))
    return softmax_attention_masked(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                                    v.transpose(0, 1).unsqueeze(0), allowed)[0].transpose(0, 1)


def softmax_attention_masked(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
    H, Hk = q.shape[1], k.shape[1]
    if Hk != H:
        k = k.repeat_interleave(H // Hk, dim=1)
        v = v.repeat_interleave(H // Hk, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def document_index(cu_seqlens: Tensor, total: int) -> Tensor:
    """(total,) the document of every packed position (cu_seqlens int32 (docs + 1,))."""
    pos = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(torch.int64), pos, right=True)


def softmax_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Regular causal softmax attention (1/sqrt(D) scaling), bottom-right aligned like the cosine op.

    q (B, H, Nq, D); k, v (B, Hk, Nk, D) with H % Hk == 0."""
    H, Hk = q.shape[1], k.shape[1]
    if Hk != H:
        k = k.repeat_interleave(H // Hk, dim=1)
        v = v.repeat_interleave(H // Hk, dim=1)
    Nq, Nk = q.shape[-2], k.shape[-2]
    if Nq == Nk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    i = torch.arange(Nq, device=q.device).unsqueeze(1)
    j = torch.arange(Nk, device=q.device).unsqueeze(0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=j <= i + (Nk - Nq))


DEFAULT_PAGE_SIZE = 16  # KVCache's page size (the KV-cache kernels take multiples of 16)


class KVCache:
    """A preallocated key/value cache for :meth:`CosineSimCausalTransformer.generate`.

    Paged (the default, ``page_size`` a multiple of 16): per layer a pool of k and v pages of shape
    (num_pages, Hk, page_size, D) with num_pages = B * pages_per_seq, pages_per_seq = ceil(max_len /
    page_size), and one ``block_table`` int32 (B, pages_per_seq) for all layers: page j of sequence b
    is pool page j * B + b, so a sequence's pages are not adjacent (as a server's allocator leaves
    them) and the kernels find them through the table. ``page_size=None``: a contiguous (B, Hk,
    max_len, D) buffer per layer and no table. Buffers are allocated at a layer's first append in the
    dtype of its keys (so autocast works). ``seqlens`` int32 (B,): the positions cached so far (the
    same for every sequence of the batch; ``length`` is that number). A forward call with ``cache=``
    appends its tokens' keys and values in place in every layer, then advances ``seqlens`` by its
    token count (:meth:`advance`)."""

    def __init__(self, depth: int, batch: int, max_len: int, device: Optional[torch.device] = None,
                 page_size: Optional[int] = DEFAULT_PAGE_SIZE) -> None:
        if page_size is not None and (page_size < 1 or page_size % 16 != 0):
            raise ValueError(f"page_size must be a positive multiple of 16 or None, got {page_size}")
        self.max_len, self.batch, self.page_size = max_len, batch, page_size
        self.layers: list[Optional[tuple[Tensor, Tensor]]] = [None] * depth
        self.seqlens = torch.zeros((batch,), dtype=torch.int32, device=device)
        self.length = 0
        self.block_table: Optional[Tensor] = None
        if page_size is not None:
            pages = -(-max_len // page_size)
            self.block_table = (torch.arange(pages, dtype=torch.int32, device=device).view(1, -1) * batch
                                + torch.arange(batch, dtype=torch.int32, device=device).view(-1, 1))

    def buffers(self, i: int, k: Tensor) -> tuple[Tensor, Tensor]:
        """Layer i's (k, v) buffers, allocated like k (B, Hk, N, D) at the first call: pages
        (num_pages, Hk, page_size, D), or (B, Hk, max_len, D) without paging."""
        if self.layers[i] is None:
            B, Hk, _, D = k.shape
            shape = ((B, Hk, self.max_len, D) if self.block_table is None
                     else (self.block_table.numel(), Hk, self.page_size, D))
            self.layers[i] = tuple(k.new_zeros(shape) for _ in range(2))
        return self.layers[i]

    def write(self, i: int, k: Tensor, v: Tensor) -> None:
        """Store k, v (B, Hk, N, D) at positions length .. length + N - 1 of layer i, in place."""
        kc, vc = self.buffers(i, k)
        end = self.length + k.shape[2]
        if self.block_table is None:
            kc[:, :, self.length:end] = k
            vc[:, :, self.length:end] = v
            return
        pos = torch.arange(self.length, end, device=k.device)
        page = self.block_table[:, pos // self.page_size].long()  # (B, N)
        row = (pos % self.page_size).expand_as(page)
        kc[page, :, row] = k.transpose(1, 2)  # (B, N, Hk, D) into the slots
        vc[page, :, row] = v.transpose(1, 2)

    def prefix(self, i: int, end: int) -> tuple[Tensor, Tensor]:
        """Layer i's first `end` positions as (B, Hk, end, D) k and v (views, or gathered pages)."""
        kc, vc = self.layers[i]
        if self.block_table is None:
            return kc[:, :, :end], vc[:, :, :end]
        pages = self.block_table[:, :-(-end // self.page_size)].long()  # (B, n)

        def gather(c: Tensor) -> Tensor:
            g = c[pages]  # (B, n, Hk, page_size, D)
            return g.transpose(1, 2).reshape(g.shape[0], g.shape[2], -1, g.shape[4])[:, :, :end]

        return gather(kc), gather(vc)

    def advance(self, n: int) -> None:
        self.seqlens += n
        self.length += n

    def reset(self) -> None:
        """Forget the cached positions (the buffers stay allocated)."""
        self.seqlens.zero_()
        self.length = 0


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: float = 4.0) -> None:
        hidden = int(dim * mult)
        super().__init__(nn.Linear(dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, dim, bias=False))


class Attention(nn.Module):
    """Causal multi-head (or grouped-query) self-attention with an optional KV cache."""

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int = 64, kv_heads: Optional[int] = None,
                 attn: str = "cosine", scale: float = 8.0, learned_scale: bool = False, l2norm_groups: int = 1,
                 attend: Optional[Callable[..., Tensor]] = None,
                 varlen_attend: Optional[Callable[..., Tensor]] = None) -> None:
        """attend: the cosine attention function (default :func:`cupy_cosattn.torch.cosine_sim_attention`;
        see `cosine_attention_function`); varlen_attend: that of packed documents (default
        :func:`cupy_cosattn.torch.varlen_cosine_sim_attention`)."""
        super().__init__()
        if attn not in ("cosine", "softmax"):
            raise ValueError(f"attn must be 'cosine' or 'softmax', got {attn!r}")
        kv_heads = heads if kv_heads is None else kv_heads
        if kv_heads < 1 or heads % kv_heads != 0:
            raise ValueError(f"kv_heads ({kv_heads}) must divide heads ({heads})")
        self.heads, self.kv_heads, self.dim_head = heads, kv_heads, dim_head
        self.attn, self.l2norm_groups = attn, l2norm_groups
        self.attend = cosine_sim_attention if attend is None else attend
        self.varlen_attend = varlen_cosine_sim_attention if varlen_attend is None else varlen_attend
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_k = nn.Linear(dim, kv_heads * dim_head, bias=False)
        self.to_v = nn.Linear(dim, kv_heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.fixed_scale = float(scale)
        # A learned scale stays positive: it is exp of a learned per-head log.
        self.log_scale = nn.Parameter(torch.full((heads,), math.log(scale))) if learned_scale else None

    @property
    def scale(self) -> Tensor:
        return self.fixed_scale if self.log_scale is None else self.log_scale.exp()

    def forward(self, x: Tensor, cache: Optional[tuple[Tensor, Tensor]] = None,
                attention_fn: Optional[Callable[..., Tensor]] = None,
                kv_cache: Optional[tuple[KVCache, int]] = None, cu_seqlens: Optional[Tensor] = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor] | KVCache]:
        """x (B, N, dim) -> (B, N, dim), plus the (k, v) cache extended by these N positions.

        attention_fn (cosine attention only): called as attention_fn(q, k, v, causal=True, scale=...,
        groups=...) in place of cosine_sim_attention, e.g. ring attention over a sharded sequence.
        kv_cache (KVCache, layer index): append k, v to the preallocated cache in place and attend over
        it (returned in place of the (k, v) pair).
        cu_seqlens: x (1, T, dim) holds packed documents (int32 (docs + 1,) offsets); each attends
        causally within itself (no cache, no attention_fn)."""
        if cu_seqlens is not None:
            return self._forward_packed(x, cu_seqlens)
        B, N, _ = x.shape
        q = self.to_q(x).view(B, N, self.heads, self.dim_head).transpose(1, 2)
        k = self.to_k(x).view(B, N, self.kv_heads, self.dim_head).transpose(1, 2)
        v = self.to_v(x).view(B, N, self.kv_heads, self.dim_head).transpose(1, 2)
        if kv_cache is not None:
            return self._attend_cached(q, k, v, *kv_cache), kv_cache[0]
        if cache is not None:
            k = torch.cat((cache[0], k), dim=2)
            v = torch.cat((cache[1], v), dim=2)
        if attention_fn is not None and self.attn != "cosine":
            raise ValueError(f"attention_fn replaces cosine attention; this layer uses attn={self.attn!r}")
        if self.attn == "cosine":
            attend = self.attend if attention_fn is None else attention_fn
            o = attend(q, k, v, causal=True, scale=self.scale, groups=self.l2norm_groups)
        else:
            o = softmax_attention(q, k, v)
        o = o.transpose(1, 2).reshape(B, N, self.heads * self.dim_head)
        return self.to_out(o), (k, v)

    def _forward_packed(self, x: Tensor, cu_seqlens: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        T = x.shape[1]
        q = self.to_q(x[0]).view(T, self.heads, self.dim_head)
        k = self.to_k(x[0]).view(T, self.kv_heads, self.dim_head)
        v = self.to_v(x[0]).view(T, self.kv_heads, self.dim_head)
        if self.attn == "cosine":
            o = self.varlen_attend(q, k, v, cu_seqlens, cu_seqlens, causal=True, scale=self.scale,
                                   groups=self.l2norm_groups)
        else:
            o = packed_softmax_attention(q, k, v, cu_seqlens)
        return self.to_out(o.reshape(1, T, self.heads * self.dim_head)), (k, v)

    def _attend_cached(self, q: Tensor, k: Tensor, v: Tensor, cache: KVCache, layer: int) -> Tensor:
        """Append k, v (B, Hk, N, D) at positions cache.length.. of layer `layer` and attend over the
        cache: the KV-cache op when this layer's attention is the fused op, else (softmax, the plain
        function, other bound keywords) that attention over the cache's valid prefix."""
        B, N = q.shape[0], q.shape[2]
        kc, vc = cache.buffers(layer, k)
        kw = kvcache_keywords(self.attend) if self.attn == "cosine" else None
        if kw is not None:
            o = kvcache_attention(q, kc, vc, cache.seqlens, block_table=cache.block_table, k_new=k.contiguous(),
                                  v_new=v.contiguous(), causal=True, scale=self.scale, groups=self.l2norm_groups,
                                  **kw)
        else:
            cache.write(layer, k, v)
            kp, vp = cache.prefix(layer, cache.length + N)
            if self.attn == "cosine":
                o = self.attend(q, kp, vp, causal=True, scale=self.scale, groups=self.l2norm_groups)
            else:
                o = softmax_attention(q, kp, vp)
        return self.to_out(o.transpose(1, 2).reshape(B, N, self.heads * self.dim_head))


def kvcache_keywords(attend: Callable[..., Tensor]) -> Optional[dict[str, Any]]:
    """The keywords for :func:`cupy_cosattn.torch.kvcache_attention` that compute what `attend` does,
    when it is the fused op, possibly with keywords the KV-cache op shares (l2norm_qk, backend) or that
    do not change a forward (deterministic) bound to it; None otherwise."""
    fn, kw = (attend.func, dict(attend.keywords)) if isinstance(attend, functools.partial) else (attend, {})
    if fn is not cosine_sim_attention or not set(kw) <= {"l2norm_qk", "backend", "deterministic"}:
        return None
    kw.pop("deterministic", None)
    return kw


class CosineSimCausalTransformer(nn.Module):
    """Causal language model; see the module docstring.

    forward(tokens (B, N) long) -> logits (B, N, num_tokens); forward(tokens, return_loss=True) -> the
    mean next-token cross-entropy over tokens[:, 1:] (natural log).

    The original project's keywords keep their meaning: ``use_cuda_kernel`` False runs
    :func:`~cupy_cosattn.torch.plain_cosine_sim_attention` (the full score matrix; the original's
    default), True or None (default) the op; ``non_cosine_sim_attn=True`` is ``attn="softmax"``; further
    keywords go to the cosine attention function (`cosine_attention_function`; a name it does not take
    raises TypeError). Unlike the original, ``attn_l2norm_groups`` takes effect (the original's
    attention always normalized whole heads). Initialization: with ``pre_norm=False`` the original's
    (embeddings N(0, 1e-5²), Xavier-normal gains as in the module docstring); with ``pre_norm=True``
    embeddings N(0, 0.02²) (the original: N(0, 1)) and PyTorch's default for the linear layers.
    """

    def __init__(self, *, num_tokens: int, dim: int, max_seq_len: int, depth: int, heads: int = 8,
                 dim_head: int = 64, kv_heads: Optional[int] = None, attn: str = "cosine", attn_scale: float = 8.0,
                 learned_scale: bool = False, attn_l2norm_groups: int = 1, pre_norm: bool = False,
                 ff_mult: float = 4.0, use_cuda_kernel: Optional[bool] = None, non_cosine_sim_attn: bool = False,
                 **kwargs: Any) -> None:
        super().__init__()
        if non_cosine_sim_attn:
            attn = "softmax"
        attend = cosine_attention_function(use_cuda_kernel, **kwargs)
        varlen_kw = {name: value for name, value in kwargs.items() if name in _VARLEN_KEYWORDS}
        varlen_attend = functools.partial(varlen_cosine_sim_attention, **varlen_kw)
        self.num_tokens, self.max_seq_len, self.depth, self.pre_norm = num_tokens, max_seq_len, depth, pre_norm
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pos_emb = nn.Embedding(max_seq_len, dim)
        # DeepNet (Wang et al. 2022), decoder-only with N = depth blocks: alpha = (2N)^(1/4), beta = (8N)^(-1/4)
        self.alpha = 1.0 if pre_norm else (2.0 * depth) ** 0.25
        self.beta = 1.0 if pre_norm else (8.0 * depth) ** -0.25
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleDict(dict(
                attn=Attention(dim, heads=heads, dim_head=dim_head, kv_heads=kv_heads, attn=attn, scale=attn_scale,
                               learned_scale=learned_scale, l2norm_groups=attn_l2norm_groups, attend=attend,
                               varlen_attend=varlen_attend),
                attn_norm=nn.LayerNorm(dim),
                ff=FeedForward(dim, ff_mult),
                ff_norm=nn.LayerNorm(dim),
            )))
        self.final_norm = nn.LayerNorm(dim) if pre_norm else nn.Identity()
        self.to_logits = nn.Linear(dim, num_tokens, bias=False)
        self._init_weights()

    def _init_weights(self):
        std = PRE_NORM_EMB_STD if self.pre_norm else POST_NORM_EMB_STD
        nn.init.normal_(self.token_emb.weight, std=std)
        nn.init.normal_(self.pos_emb.weight, std=std)
        if self.pre_norm:
            return
        for layer in self.layers:
            a, ff = layer["attn"], layer["ff"]
            nn.init.xavier_normal_(a.to_q.weight, gain=1.0)
            nn.init.xavier_normal_(a.to_k.weight, gain=1.0)
            for lin in (a.to_v, a.to_out, ff[0], ff[2]):
                nn.init.xavier_normal_(lin.weight, gain=self.beta)
        nn.init.xavier_normal_(self.to_logits.weight, gain=1.0)

    def forward(self, tokens: Tensor, *, return_loss: bool = False,
                cache: Optional[LayerCaches | KVCache] = None, return_cache: bool = False,
                positions: Optional[Tensor] = None, attention_fn: Optional[Callable[..., Tensor]] = None,
                cu_seqlens: Optional[Tensor] = None) -> Tensor | tuple[Tensor, LayerCaches | KVCache]:
        """Logits (B, N, num_tokens) for tokens (B, N); with `cache` (from a previous call with
        return_cache=True, or a :class:`KVCache`, which is appended to in place) the tokens continue
        that sequence. return_loss: next-token cross-entropy.

        Context parallelism: `positions` (N,) int64 are the positions of `tokens` in the whole sequence
        (default: consecutive, after the cache) and `attention_fn` replaces each layer's attention
        (see `Attention.forward`).

        Packed documents: `cu_seqlens` int32 (docs + 1,) splits tokens (1, T) into documents of
        different lengths (each at most max_seq_len); positions restart per document, no position
        attends across a boundary, and return_loss averages over the tokens that have a successor in
        their own document (logits (1, T, num_tokens) otherwise)."""
        if cu_seqlens is not None:
            return self._forward_packed(tokens, cu_seqlens, return_loss)
        n_given = tokens.shape[1]
        if return_loss:
            tokens, labels = tokens[:, :-1], tokens[:, 1:]
        preallocated = isinstance(cache, KVCache)
        if preallocated and attention_fn is not None:
            raise ValueError("attention_fn cannot be combined with a preallocated KVCache")
        offset = 0 if cache is None else cache.length if preallocated else cache[0][0].shape[2]
        N = tokens.shape[1]
        if offset + N > self.max_seq_len:
            raise ValueError(f"sequence of {offset + N} positions exceeds max_seq_len={self.max_seq_len}")
        if positions is None:
            pos = torch.arange(offset, offset + N, device=tokens.device)
        else:
            if positions.shape != (n_given,) or int(positions.max()) >= self.max_seq_len:
                raise ValueError(f"positions must be ({n_given},) indices below max_seq_len={self.max_seq_len}, "
                                 f"got shape {tuple(positions.shape)}")
            pos = positions[:N]  # with return_loss the last token is only a label
        x = self.token_emb(tokens) + self.pos_emb(pos)
        new_cache: LayerCaches = []
        for i, layer in enumerate(self.layers):
            c = None if cache is None or preallocated else cache[i]
            kvc = (cache, i) if preallocated else None
            if self.pre_norm:
                y, kv = layer["attn"](layer["attn_norm"](x), c, attention_fn, kvc)
                x = x + y
                x = x + layer["ff"](layer["ff_norm"](x))
            else:
                y, kv = layer["attn"](x, c, attention_fn, kvc)
                x = layer["attn_norm"](x * self.alpha + y)
                x = layer["ff_norm"](x * self.alpha + layer["ff"](x))
            new_cache.append(kv)
        if preallocated:
            cache.advance(N)
            new_cache = cache
        logits = self.to_logits(self.final_norm(x))
        if return_loss:
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
        return (logits, new_cache) if return_cache else logits

    def _forward_packed(self, tokens: Tensor, cu_seqlens: Tensor, return_loss: bool) -> Tensor:
        if tokens.dim() != 2 or tokens.shape[0] != 1:
            raise ValueError(f"packed tokens must have shape (1, total), got {tuple(tokens.shape)}")
        T = tokens.shape[1]
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
            raise ValueError(f"cu_seqlens must be an int32 tensor of shape (docs + 1,), got {cu_seqlens.dtype} "
                             f"{tuple(cu_seqlens.shape)}")
        if not torch.compiler.is_compiling():  # values: eager only (a traced tensor has none)
            lengths = torch.diff(cu_seqlens)
            if int(cu_seqlens[-1]) != T:
                raise ValueError(f"cu_seqlens[-1] = {int(cu_seqlens[-1])} must be the number of tokens {T}")
            if lengths.numel() and int(lengths.max()) > self.max_seq_len:
                raise ValueError(f"a document of {int(lengths.max())} tokens exceeds max_seq_len={self.max_seq_len}")
        doc = document_index(cu_seqlens, T)
        pos = torch.arange(T, device=tokens.device) - cu_seqlens.to(torch.int64)[doc]
        x = self.token_emb(tokens) + self.pos_emb(pos)
        for layer in self.layers:
            if self.pre_norm:
                y, _ = layer["attn"](layer["attn_norm"](x), cu_seqlens=cu_seqlens)
                x = x + y
                x = x + layer["ff"](layer["ff_norm"](x))
            else:
                y, _ = layer["attn"](x, cu_seqlens=cu_seqlens)
                x = layer["attn_norm"](x * self.alpha + y)
                x = layer["ff_norm"](x * self.alpha + layer["ff"](x))
        logits = self.to_logits(self.final_norm(x))
        if not return_loss:
            return logits
        # the target of position i is token i + 1 of the same document; a document's last token has none
        labels = torch.roll(tokens[0], -1)
        ends = cu_seqlens[1:].to(torch.int64)  # one past each document's last token
        last = torch.isin(torch.arange(T, device=tokens.device) + 1, ends)
        labels = labels.masked_fill(last, -100)
        return F.cross_entropy(logits[0].float(), labels, ignore_index=-100)

    @torch.no_grad()
    def generate(self, prompt: Tensor, seq_len: int, temperature: float = 1.0, filter_thres: float = 0.9,
                 use_cache: bool = True, page_size: Optional[int] = DEFAULT_PAGE_SIZE) -> Tensor:
        """Sample `seq_len` tokens after `prompt` (B, N); returns them (B, seq_len).

        temperature 0 is greedy decoding; otherwise the top ceil((1 − filter_thres)·num_tokens) logits are
        sampled at `temperature`. With use_cache a preallocated :class:`KVCache` of max_seq_len positions
        (pages of `page_size` slots; None: one contiguous buffer per layer) takes the prompt, then each
        step runs only the newest token against it; once the sequence outgrows max_seq_len the window
        slides and positions shift, so every later step refills the cache with the window (exactly what
        the uncached path computes)."""
        was_training = self.training
        self.eval()
        try:
            B, P = prompt.shape
            tokens = prompt.new_empty((B, P + seq_len))  # filled one column per step
            tokens[:, :P] = prompt
            cache = KVCache(self.depth, B, self.max_seq_len, prompt.device, page_size) if use_cache else None
            for n in range(P, P + seq_len):
                window = tokens[:, max(0, n - self.max_seq_len):n]
                if use_cache and cache.length > 0 and n <= self.max_seq_len:
                    logits = self(tokens[:, n - 1:n], cache=cache)
                elif use_cache:
                    cache.reset()
                    logits = self(window, cache=cache)
                else:
                    logits = self(window)
                logits = logits[:, -1].float()
                if temperature == 0:
                    sample = logits.argmax(dim=-1, keepdim=True)
                else:
                    probs = F.softmax(top_k_filter(logits, filter_thres) / temperature, dim=-1)
                    sample = torch.multinomial(probs, 1)
                tokens[:, n] = sample[:, 0]
            return tokens[:, P:]
        finally:
            self.train(was_training)
