"""The implementations under test, each fn(q, k, v, inputs) -> out."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .cases import SDPA_IMPLS, Inputs

# An implementation under test: fn(q, k, v, inputs) -> out.
Impl = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Inputs], torch.Tensor]

# --------------------------------------------------------------------------------------------------
# Implementations: fn(q, k, v, inputs) -> out


def cosattn_fn(args: argparse.Namespace) -> Impl:
    mod = importlib.import_module("cupy_cosattn.torch")
    op = mod.cosine_sim_attention
    extra = {"l2norm_qk": args.l2norm_qk == "on"}
    if args.deterministic:
        extra["deterministic"] = True

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inp: Inputs) -> torch.Tensor:
        return op(q, k, v, mask=inp.mask, scale=inp.scale, causal=inp.causal, **extra)

    return fn


def sdpa_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inp: Inputs) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=inp.sdpa_mask, is_causal=inp.causal,
                                          scale=inp.scale)


def normalized_sdpa_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inp: Inputs) -> torch.Tensor:
    """The user's alternative as written: l2-normalize q and k over the head dim, then SDPA with torch's
    own backend choice. q, k are already unit rows, so the result is the same attention; the time pays
    for the normalization as the user would."""
    return sdpa_fn(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, inp)


def unfused_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inp: Inputs) -> torch.Tensor:
    s = torch.matmul(q, k.transpose(-1, -2)) * inp.scale
    if inp.unfused_fill is not None:
        s = s.masked_fill(inp.unfused_fill, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)


def impl_context(impl: str) -> contextlib.AbstractContextManager:
    """The context an implementation runs in: a forced SDPA backend, or nothing."""
    if impl in SDPA_IMPLS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        member = getattr(SDPBackend, SDPA_IMPLS[impl], None)
        if member is None:
            raise Skip(f"this torch ({torch.__version__}) has no SDPBackend.{SDPA_IMPLS[impl]}")
        return sdpa_kernel([member])
    return contextlib.nullcontext()


class Skip(Exception):
    """The implementation does not take this case (not a failure)."""


def unavailable_note(caught: Sequence[warnings.WarningMessage]) -> str:
    """torch explains why a forced SDPA backend refused a case in UserWarnings; keep them as the note."""
    reasons = []
    for w in caught:
        m = " ".join(str(w.message).split())
        if m and m not in reasons:
            reasons.append(m)
    return ("not available: " + "; ".join(reasons))[:300] if reasons else "backend not available for this case"


def is_unavailable(e: Exception) -> bool:
    msg = str(e)
    return isinstance(e, RuntimeError) and ("No available kernel" in msg or "No viable backend" in msg)


