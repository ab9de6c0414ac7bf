"""The public functions of ``cupy_cosattn.torch``: autocast, eager argument checks, the custom op."""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from .. import problem as _problem
from . import ops  # noqa: F401  (registers the custom ops this module calls through torch.ops)
from .backends import check_backend
from .checks import check


def _autocast(x: Optional[Tensor], dtype: Optional[torch.dtype], keep_float32: bool = False):
    """x cast to the autocast dtype (float32/16 tensors only, as autocast does; a float32 bias may stay)."""
    if x is None or dtype is None or not x.is_floating_point() or x.dtype in (dtype, torch.float64):
        return x
    if keep_float32 and x.dtype == torch.float32:
        return x
    return x.to(dtype)


def _autocast_available(device_type: str) -> bool:
    """Whether autocast knows this device type (torch.is_autocast_enabled raises for e.g. "meta")."""
    check = getattr(torch.amp, "is_autocast_available", None)
    return True if check is None else bool(check(device_type))


def forward(q: Tensor, k: Tensor, v: Tensor, *, mask: Optional[Tensor] = None, attn_bias: Optional[Tensor] = None,
            attn_bias_batch_dim: bool = False, scale: float | Tensor = _problem.DEFAULT_SCALE, groups: int = 1,
            causal: bool = False, l2norm_qk: bool = True, deterministic: bool = False,
            backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(out, lse) with autograd through out; see `cosine_sim_attention`. lse (q.shape[:-1], float32) is
    the log-sum-exp of each row's visible logits (-inf for a row without one); it has no gradient."""
    if isinstance(q, Tensor):
        dev = q.device.type
        if _autocast_available(dev) and torch.is_autocast_enabled(dev):
            dt = torch.get_autocast_dtype(dev)
            q, k, v = _autocast(q, dt), _autocast(k, dt), _autocast(v, dt)
            attn_bias = _autocast(attn_bias, dt, keep_float32=True)
    scale_t = scale if isinstance(scale, Tensor) else None
    if not torch.compiler.is_compiling():  # eager: check here, before autograd records anything
        check(q, k, v, mask, attn_bias, scale, attn_bias_batch_dim, groups, causal, l2norm_qk, deterministic)
        if scale_t is None and not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a float or a torch.Tensor of shape (H,), got {type(scale).__name__}")
    check_backend(backend, q)  # also while tracing: the value is a constant of the graph
    scale_f = 1.0 if scale_t is not None else float(scale)
    return torch.ops.cupy_cosattn.attn_fwd(q, k, v, mask, attn_bias, scale_t, scale_f, bool(attn_bias_batch_dim),
                                           int(groups), bool(causal), bool(l2norm_qk), bool(deterministic), backend)


def cosine_sim_attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Optional[Tensor] = None,
                         attn_bias: Optional[Tensor] = None, attn_bias_batch_dim: bool = False,
                         scale: float | Tensor = _problem.DEFAULT_SCALE, groups: int = 1, causal: bool = False,
                         l2norm_qk: bool = True, deterministic: bool = False, backend: str = "auto") -> Tensor:
    """Cosine-sim attention with autograd (docs/design.md section 1).

    q: (B, H, Nq, D) or merged (BH, Nq, D); k, v: (B, Hk, Nk, D) with H % Hk == 0, (B, Nk, D) (one shared
    kv head) or, with a merged q, (BH, Nk, D). mask: bool (B, Nk) (merged: (BH, Nk)), True = may attend.
    attn_bias: (H, Nq, Nk), (B, Nq, Nk) with attn_bias_batch_dim=True, or (B, H, Nq, Nk) (merged:
    (BH, Nq, Nk)); q's dtype or float32; receives a gradient. scale: a float, or a tensor of shape (H,)
    or () that receives a gradient; values finite and > 0 (a tensor's values are checked when the op
    runs, eager or compiled, with the NumPy API's ValueError). groups: l2-normalize `groups` chunks of
    the head dim. causal: bottom-right aligned (query i sees key j iff j <= i + Nk - Nq). l2norm_qk=False: q, k are
    already normalized. Rows without a visible key give 0 and contribute no gradient.

    backend: "auto" (default): CUDA tensors run the fused kernels, CPU tensors the torch implementation
    (or what `set_cpu_backend` chose). "cuda": the fused kernels (CUDA tensors only). "torch": the torch
    implementation, "emulator" / "reference": the package's kernels on the CPU emulator / the float64
    NumPy reference (CPU tensors only). Anything else raises ValueError.

    Returns out with q's shape and dtype. Under autocast, q, k, v (and a non-float32 bias) are cast to
    the autocast dtype first. CUDA tensors run the fused kernels; CPU tensors a torch implementation
    (float16, bfloat16, float32, and float64 for gradcheck).
    """
    return forward(q, k, v, mask=mask, attn_bias=attn_bias, attn_bias_batch_dim=attn_bias_batch_dim, scale=scale,
                   groups=groups, causal=causal, l2norm_qk=l2norm_qk, deterministic=deterministic,
                   backend=backend)[0]
