"""The function names of lucidrains/flash-cosine-sim-attention, on this package's op.

Code written for that project switches by changing its import line::

    from flash_cosine_sim_attention import flash_cosine_sim_attention, plain_cosine_sim_attention, l2norm_tensors
    # becomes
    from cupy_cosattn.torch import flash_cosine_sim_attention, plain_cosine_sim_attention, l2norm_tensors

The three functions take the original's arguments in the original's order with its defaults (mask,
attn_bias, scale=8, groups=1, causal=False, l2norm_qk=True, attn_bias_batch_dim=False, all of which may
be passed positionally) and its shape conventions:

- q (B, H, Nq, D), or merged batch-heads (BH, Nq, D); k, v (B, H, Nk, D), or (B, Nk, D) for one key/value
  head shared by all query heads; with a merged q, (BH, Nk, D).
- mask: bool (B, Nk) (merged: (BH, Nk)), True = the key may be attended to.
- attn_bias: (H, Nq, Nk) shared over the batch, or (B, Nq, Nk) shared over the heads with
  attn_bias_batch_dim=True (merged q: (BH, Nq, Nk)).
- causal: bottom-right aligned, query i sees key j iff j <= i + Nk - Nq.
- groups: q and k are l2-normalized in `groups` equal chunks of the head dim.

docs/torch.md ("Switching from flash-cosine-sim-attention") lists where this package differs.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import problem as _problem
from .checks import check
from .cpu import compute_dtype, grouped_l2norm
from .functional import cosine_sim_attention

__all__ = ["flash_cosine_sim_attention", "plain_cosine_sim_attention", "l2norm_tensors"]

Scale = float | Tensor


def l2norm_tensors(*tensors: Tensor, groups: int = 1) -> tuple[Tensor, ...]:
    """Each tensor l2-normalized over its last dim in `groups` equal chunks, differentiably.

    Every chunk x becomes x / max(‖x‖, 1e-12), computed in float32 (float64 for float64 input) -- the
    normalization the op applies itself with l2norm_qk=True -- and every result is cast to the *first*
    tensor's dtype, as in the original. (The original's CPU path clamps the norm at 1e-3 for
    non-float32 tensors; this one uses 1e-12 on every device, as the original does on CUDA.)

    Returns a tuple with one tensor per argument, each of its argument's shape.
    """
    if not tensors:
        raise TypeError("l2norm_tensors needs at least one tensor, got none")
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            what = f"a {t.dtype} tensor" if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"l2norm_tensors: argument {i} must be a floating-point torch.Tensor, got {what}")
        if t.ndim < 1:
            raise ValueError(f"l2norm_tensors: argument {i} must have at least one dim, got a 0-d tensor")
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups must be an int, got {type(groups).__name__}")
    for i, t in enumerate(tensors):
        if groups < 1 or t.shape[-1] % groups != 0:
            raise ValueError(f"groups must be a positive int dividing the last dim of every tensor, got "
                             f"groups={groups} and argument {i} of shape {tuple(t.shape)}")
    dtype = tensors[0].dtype
    return tuple(grouped_l2norm(t.to(compute_dtype(t.dtype)), groups)[0].to(dtype) for t in tensors)


def flash_cosine_sim_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None,
                               attn_bias: Optional[Tensor] = None, scale: Scale = _problem.DEFAULT_SCALE,
                               groups: int = 1, causal: bool = False, l2norm_qk: bool = True,
                               attn_bias_batch_dim: bool = False, *, deterministic: bool = False,
                               backend: str = "auto") -> Tensor:
    """The original's fused attention, computed by :func:`cupy_cosattn.torch.cosine_sim_attention`.

    Shapes as in the module docstring; returns out with q's shape and dtype. CUDA tensors run the fused
    kernels, CPU tensors the torch implementation (`backend=` and `deterministic=`, keyword-only, are
    this package's additions). Gradients flow to q, k, v, attn_bias and a tensor scale.

    Where the result differs from the original's fused kernel:

    - The original's kernel exponentiates scale·cos + bias − scale without a running maximum, so with
      l2norm_qk=False on q, k that are not unit vectors, or with biases large enough for exp to
      overflow (about 88 in float32), it returns inf/NaN; this op stays finite and correct there (it
      keeps a running maximum on those paths).
    - It trains on CPU tensors (the original's CPU path is forward-only) and takes mask and causal
      together (the original refuses that combination).

    A row with no visible key (every key masked, or causal with Nq > Nk) gives 0 and no gradient, as
    the original's fused kernel does; :func:`plain_cosine_sim_attention` (here as in the original)
    gives the mean of v over all keys there instead. Beyond the original: grouped-query k, v
    (B, Hk, Nk, D) with Hk dividing H, a full (B, H, Nq, Nk) bias, a float32 bias with half-precision
    inputs, a per-head tensor scale (H,), and bad arguments raise ValueError/TypeError up front.
    """
    return cosine_sim_attention(q, k, v, mask=mask, attn_bias=attn_bias, attn_bias_batch_dim=attn_bias_batch_dim,
                                scale=scale, groups=groups, causal=causal, l2norm_qk=l2norm_qk,
                                deterministic=deterministic, backend=backend)


def plain_cosine_sim_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None,
                               attn_bias: Optional[Tensor] = None, scale: Scale = _problem.DEFAULT_SCALE,
                               groups: int = 1, causal: bool = False, l2norm_qk: bool = True,
                               attn_bias_batch_dim: bool = False) -> Tensor:
    """The original's non-fused attention in plain torch ops: the full (B, H, Nq, Nk) score matrix,
    softmax and autograd, in the inputs' dtype. Same arguments and shapes as
    :func:`flash_cosine_sim_attention`; returns out with q's shape and q's dtype.

    As in the original, masked and causally hidden scores are *filled* with −finfo(dtype).max rather than
    excluded, so a row with no visible key attends uniformly to all keys and returns the mean of v (the
    fused op returns 0 there). Otherwise it computes what the fused op does, and is the slow reference
    to compare it with.
    """
    if not torch.compiler.is_compiling():  # the NumPy-based check cannot be traced; it runs in eager
        check(q, k, v, mask, attn_bias, scale, attn_bias_batch_dim, groups, causal, l2norm_qk, False)
    merged = q.ndim == 3
    if merged:  # (BH, N, D) -> (BH, 1, N, D): each batch-head is a batch of one head
        q = q.unsqueeze(1)
    if k.ndim == 3:
        k, v = k.unsqueeze(1), v.unsqueeze(1)
    if l2norm_qk:
        q, k = l2norm_tensors(q, k, groups=groups)
    B, H, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    G = H // Hk  # query heads per kv head
    sim = torch.einsum("bkgid,bkjd->bkgij", q.reshape(B, Hk, G, Nq, D), k).reshape(B, H, Nq, Nk)
    if isinstance(scale, Tensor):
        scale = scale.reshape(-1, 1, 1)  # per-head: (H, 1, 1) against (B, H, Nq, Nk)
    sim = sim * scale
    if attn_bias is not None:
        if attn_bias.ndim == 3:
            attn_bias = attn_bias.unsqueeze(1 if (merged or attn_bias_batch_dim) else 0)
        sim = sim + attn_bias
    fill = -torch.finfo(sim.dtype).max
    if causal:
        hidden = torch.ones((Nq, Nk), dtype=torch.bool, device=q.device).triu(Nk - Nq + 1)
        sim = sim.masked_fill(hidden, fill)
    if mask is not None:
        sim = sim.masked_fill(~mask[:, None, None, :], fill)
    attn = sim.softmax(dim=-1).to(v.dtype)
    out = torch.einsum("bkgij,bkjd->bkgid", attn.reshape(B, Hk, G, Nq, Nk), v).reshape(B, H, Nq, D)
    return out.squeeze(1) if merged else out
