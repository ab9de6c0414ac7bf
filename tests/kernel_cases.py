"""Inputs and error measures shared by the kernel tests (test_kernels_forward.py,
test_kernels_backward.py): one random problem generator, so forward and backward are checked on the
same kinds of cases."""
from __future__ import annotations

import numpy as np

from cupy_cosattn.problem import BFLOAT16

F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
DTYPES = {"float16": F16, "bfloat16": BFLOAT16, "float32": F32}


def make_case(seed, *, B=1, H=2, Hk=None, Nq=63, Nk=None, D=64, dtype="float16", merged=False, kv_3d=False,
              causal=False, mask=None, bias=None, bias_f32=False, scale=8.0, per_head_scale=False, groups=1,
              l2norm_qk=True, bias_scale=1.0, deterministic=None, with_dout=False):
    """(args, kwargs) for cupy_cosattn.forward / backward on NumPy arrays (args = q, k, v), and a
    random dout of q's shape as a third element when with_dout.

    mask: None | "random" (a random mask with batch row 0 fully masked: its queries see nothing; for
    B > 1 another row masked on its first 64 keys when Nk >= 96, so whole key tiles are skipped, else
    on its first half); bias: None | "head" | "batch" | "full". l2norm_qk=False feeds q, k that are
    already normalized (the caller's promise). deterministic=None leaves the keyword out."""
    rng = np.random.default_rng(seed)
    dt = DTYPES[dtype]
    Nk = Nq if Nk is None else Nk
    Hk = H if Hk is None else Hk
    if merged:
        q = rng.standard_normal((B * H, Nq, D))
        k = rng.standard_normal((B * H, Nk, D))
        Bm = B * H
    else:
        q = rng.standard_normal((B, H, Nq, D))
        k = rng.standard_normal((B, Nk, D) if kv_3d else (B, Hk, Nk, D))
        Bm = B
    v = rng.standard_normal(k.shape)
    if not l2norm_qk:
        def norm(x):
            c = x.reshape(x.shape[:-1] + (groups, D // groups))
            c = c / np.linalg.norm(c, axis=-1, keepdims=True)
            return c.reshape(x.shape)
        q, k = norm(q), norm(k)
    kw = dict(causal=causal, groups=groups, l2norm_qk=l2norm_qk)
    if deterministic is not None:
        kw["deterministic"] = deterministic
    if mask == "random":
        m = rng.random((Bm, Nk)) < 0.7
        m[0] = False
        if Bm > 1:  # keep enough keys visible for a non-degenerate row
            m[1, : 64 if Nk >= 96 else Nk // 2] = False
            m[1, -1] = True
        kw["mask"] = m
    if bias is not None:
        bdt = F32 if bias_f32 else dt
        shape = (B * H, Nq, Nk) if merged else {"head": (H, Nq, Nk), "batch": (B, Nq, Nk), "full": (B, H, Nq, Nk)}[bias]
        kw["attn_bias"] = (bias_scale * rng.standard_normal(shape)).astype(bdt)
        kw["attn_bias_batch_dim"] = bias == "batch"
    if per_head_scale:
        kw["scale"] = rng.uniform(0.5 * scale, 1.5 * scale, size=(1 if merged else H,))
    else:
        kw["scale"] = scale
    args = (q.astype(dt), k.astype(dt), v.astype(dt))
    if with_dout:
        return args, kw, rng.standard_normal(q.shape).astype(dt)
    return args, kw


def rel_err(x, ref) -> float:
    """||x - ref|| / ||ref|| in float64 (docs/design.md's accuracy measure); ||x - ref|| when ref is 0."""
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(x - ref) / (den if den > 0 else 1.0))
