"""Benchmark cases, their inputs, and the constants of the grid."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent.parent

# "normalize+sdpa" is what a user writes without this library: F.normalize on q and k, then SDPA with torch's
# own backend choice, its time including the normalization (and its gradient in the backward).
IMPLS = ("cosattn", "normalize+sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "unfused")
NORMALIZED_SDPA = "normalize+sdpa"
SDPA_IMPLS = {  # our name -> SDPBackend member name
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_math": "MATH",
}
PASSES = ("fwd", "bwd", "fwd+bwd")
MASKS = ("none", "causal", "keypad")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
# FLOPs of a pass, in units of the forward's 4*B*H*Nq*Nk*D (two matmuls, 2 FLOPs per multiply-add).
# FLOPs of a pass, in units of the forward's 4*B*H*Nq*Nk*D (two matmuls, 2 FLOPs per multiply-add).
PASS_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}

CSV_COLUMNS = [
    "mode", "device", "dtype", "D", "N", "B", "H", "mask", "impl", "pass", "status",
    "ms", "ms_min", "ms_max", "repeats", "tflops", "time_vs_best_sdpa", "best_sdpa", "time_vs_normalize_sdpa",
    "peak_mib", "cupy_pool_mib", "first_call_ms", "rel_err", "check", "note",
]

# preset: (dtypes, head dims, seqlens, masks, work = B*H*N^2, repeats, warm-up calls)
PRESETS = {
    "full": (("float16", "bfloat16", "float32"), (64, 128), (512, 1024, 2048, 4096, 8192, 16384), MASKS, 2**30, 20, 3),
    "quick": (("bfloat16",), (64, 128), (1024, 4096), MASKS, 2**28, 10, 2),
    "smoke": (("float16", "bfloat16", "float32"), (32,), (32, 64), MASKS, 2**13, 3, 1),
}


# --------------------------------------------------------------------------------------------------
# Cases and inputs


@dataclass(frozen=True)
class Case:
    dtype: str
    D: int
    N: int
    B: int
    H: int
    mask: str

    @property
    def label(self) -> str:
        return f"{SHORT[self.dtype]} D={self.D} N={self.N} B={self.B} H={self.H} {self.mask}"

    def flops(self, pass_: str) -> float:
        f = 4.0 * self.B * self.H * self.N * self.N * self.D * PASS_FLOP_FACTOR[pass_]
        return f / 2 if self.mask == "causal" else f


def cosattn_forward_kernels(cases: Sequence[Case], compute_capability: tuple[int, int], smem_optin: int) -> str:
    """Which cupy_cosattn forward kernel the cases run on a device of this compute capability and opt-in
    shared memory per block (launch.sm90.fallback_reason): the sm_90a forward (hopper_fwd.cu) on 9.0 for
    16-bit cases whose D pads to 64 or 128, forward.cu (mma.sync) otherwise; one line for the report."""
    from cupy_cosattn.launch import sm90, tiles

    hopper = sorted({(c.D, c.dtype) for c in cases
                     if sm90.fallback_reason(c.dtype, c.D, tiles.fwd_head_dim_pad(c.D), c.B * c.H,
                                             compute_capability, smem_optin) is None})
    if not hopper:
        return "cosattn forward: forward.cu (mma.sync) in every case"
    which = ", ".join(f"{SHORT[dt]} D={D}" for D, dt in hopper)
    return (f"cosattn forward: hopper_fwd.cu (sm_90a: TMA, wgmma) for {which}, forward.cu (mma.sync) otherwise; "
            "backward: backward.cu (mma.sync)")


def split_bh(N: int, work: int, max_heads: int) -> tuple[int, int]:
    """(B, H) with B*H = max(1, work // N^2): heads first up to max_heads, the rest as batch."""
    bh = max(1, work // (N * N))
    H = min(bh, max_heads)
    while bh % H:
        H -= 1
    return bh // H, H


def make_cases(dtypes: Sequence[str], head_dims: Sequence[int], seqlens: Sequence[int], masks: Sequence[str],
               work: int, max_heads: int) -> list[Case]:
    cases = []
    for dt in dtypes:
        for D in head_dims:
            for mask in masks:
                for N in seqlens:
                    B, H = split_bh(N, work, max_heads)
                    cases.append(Case(dt, D, N, B, H, mask))
    return cases


def keypad_lengths(B: int, N: int, gen: torch.Generator) -> torch.Tensor:
    """Visible keys per batch element: uniform in [3N/4, N], and N for the first element."""
    lo = (3 * N) // 4
    lens = torch.randint(lo, N + 1, (B,), generator=gen)
    lens[0] = N
    return lens


@dataclass
class Inputs:
    sets: list  # [(q, k, v, dout)], leaves with requires_grad
    mask: Optional[torch.Tensor]  # (B, N) bool, True = visible
    sdpa_mask: Optional[torch.Tensor]  # (B, 1, 1, N) bool view
    unfused_fill: Optional[torch.Tensor]  # broadcastable bool, True = hidden
    causal: bool
    scale: float
    bytes_per_set: int = 0


def make_inputs(case: Case, device: torch.device, n_sets: int, scale: float, seed: int) -> Inputs:
    dtype = DTYPES[case.dtype]
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (case.B, case.H, case.N, case.D)
    sets = []
    for _ in range(n_sets):
        # Drawn on the device in float32 (random normal: never zeros), q and k l2-normalized there, then
        # cast: every implementation gets the same pre-normalized q, k in the benchmark's dtype.
        ts = []
        for normalize in (True, True, False, False):
            t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
            if normalize:
                t = F.normalize(t, dim=-1)
            ts.append(t.to(dtype))
            del t
        for t in ts[:3]:
            t.requires_grad_(True)
        sets.append(tuple(ts))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    mask = sdpa_mask = fill = None
    causal = case.mask == "causal"
    if case.mask == "keypad":
        lens = keypad_lengths(case.B, case.N, gen)
        mask = (torch.arange(case.N)[None, :] < lens[:, None]).to(device)
        sdpa_mask = mask[:, None, None, :]
        fill = ~sdpa_mask
    elif causal:
        fill = torch.ones(case.N, case.N, dtype=torch.bool, device=device).triu(1)
    elem = torch.tensor([], dtype=dtype).element_size()
    return Inputs(sets, mask, sdpa_mask, fill, causal, scale, 4 * math.prod(shape) * elem)


def n_rotation_sets(case: Case, l2_bytes: int, requested: Optional[int]) -> int:
    """Enough buffer sets that together they exceed 4x the L2 cache (at least 2, at most 16)."""
    if requested:
        return requested
    elem = torch.tensor([], dtype=DTYPES[case.dtype]).element_size()
    per_set = 4 * case.B * case.H * case.N * case.D * elem
    return int(min(16, max(2, math.ceil(4 * l2_bytes / per_set))))


