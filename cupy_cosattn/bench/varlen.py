"""The benchmark's varlen training section: packed documents vs the same documents padded.

One training step's attention (forward + backward, causal) over a batch of documents of different
lengths, two ways:

- packed: ``varlen_cosine_sim_attention`` on q, k, v (total, H, D) with cu_seqlens: every FLOP is
  useful work;
- padded: ``cosine_sim_attention`` on (docs, H, longest, D) with a key-padding mask: what a
  padding-based loader runs.

Reported per (dtype, head dim, length distribution): the median ms of each, tokens/s (real tokens),
the useful TFLOP/s (causal FLOPs of the real documents: 2 matmuls of 2·n²/2·D each per document and
head, x3.5 for forward + backward) and the speedup of packing. Each case also checks that packed and
padded outputs agree on the real rows. GPU numbers only; the CPU smoke mode (tiny sizes, wall clock)
only exercises the code.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..torch import cosine_sim_attention, varlen_cosine_sim_attention
from .cases import DTYPES, SHORT

# Packed and padded outputs on the real rows: the same kernels and tiles on the same rows, so they
# differ by at most the dtype's rounding of an output of magnitude <= 1 (the padded path masks keys).
AGREE = {"float16": 4e-3, "bfloat16": 3e-2, "float32": 1e-5}
FWD_BWD_FLOP_FACTOR = 3.5  # forward + backward = 3.5 forward matmul FLOPs (as the main section counts)
# Document length distributions: name -> (seed-independent) description and a sampler of lengths.
DISTRIBUTIONS = ("uniform", "long-tail")


def doc_lengths(kind: str, total: int, longest: int, gen: torch.Generator) -> list[int]:
    """Lengths summing to `total`, each at most `longest`: "uniform" in [longest/16, longest];
    "long-tail": 70 % short (<= longest/16), 25 % medium, 5 % up to `longest`."""
    out, left = [], total
    while left > 0:
        u = float(torch.rand((), generator=gen))
        if kind == "uniform":
            n = int(longest / 16 + u * (longest - longest / 16))
        else:
            v = float(torch.rand((), generator=gen))
            hi = longest // 16 if u < 0.7 else (longest // 4 if u < 0.95 else longest)
            n = int(1 + v * (hi - 1))
        n = max(1, min(n, left))
        out.append(n)
        left -= n
    return out


@dataclass
class VarlenRow:
    dtype: str
    D: int
    dist: str
    docs: int
    total: int
    longest: int
    packed_ms: Optional[float] = None
    padded_ms: Optional[float] = None
    useful_flops: float = 0.0
    max_err: Optional[float] = None
    note: str = ""

    def tokens_per_s(self, ms: Optional[float]) -> Optional[float]:
        return None if not ms else self.total / (ms * 1e-3)

    def tflops(self, ms: Optional[float]) -> Optional[float]:
        return None if not ms else self.useful_flops / (ms * 1e-3) / 1e12


def _median_ms(fn, repeats: int, warmup: int, cuda: bool) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def measure(dtype: str, D: int, dist: str, total: int, longest: int, H: int, repeats: int, warmup: int,
            device: torch.device, seed: int = 0) -> VarlenRow:
    """One case: packed and padded forward + backward over the same documents."""
    gen = torch.Generator().manual_seed(seed)
    lens = doc_lengths(dist, total, longest, gen)
    dt = DTYPES[dtype]
    cuda = device.type == "cuda"
    row = VarlenRow(dtype, D, dist, len(lens), total, max(lens))
    row.useful_flops = FWD_BWD_FLOP_FACTOR * sum(4 * H * D * n * (n + 1) / 2 for n in lens)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    q, k, v = (torch.randn(total, H, D, generator=gen).to(device=device, dtype=dt).requires_grad_() for _ in range(3))
    do = torch.randn(total, H, D, generator=gen).to(device=device, dtype=dt)
    cu_d = cu.to(device)
    N, B = max(lens), len(lens)
    idx = torch.cat([b * N + torch.arange(n) for b, n in enumerate(lens)]).to(device)  # real rows in (B N)
    mask = torch.zeros(B * N, dtype=torch.bool, device=device)
    mask[idx] = True
    mask = mask.view(B, N)

    def padded_view(x):
        p = x.new_zeros(B * N, H, D)
        p[idx] = x
        return p.view(B, N, H, D).transpose(1, 2)

    qp, kp, vp = (padded_view(x.detach()).requires_grad_() for x in (q, k, v))
    dop = padded_view(do)

    def packed():
        o = varlen_cosine_sim_attention(q, k, v, cu_d, cu_d, causal=True, max_seqlen_q=N, max_seqlen_k=N)
        o.backward(do)
        return o

    def padded():
        o = cosine_sim_attention(qp, kp, vp, mask=mask, causal=True)
        o.backward(dop)
        return o

    o_packed, o_padded = packed(), padded()
    real = o_padded.detach().transpose(1, 2).reshape(B * N, H, D)[idx]
    row.max_err = float((o_packed.detach().float() - real.float()).abs().max())
    row.packed_ms = _median_ms(packed, repeats, warmup, cuda)
    row.padded_ms = _median_ms(padded, repeats, warmup, cuda)
    return row


def _f(x: Optional[float], fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def write_markdown(path: Path, rows: list[VarlenRow], header: str) -> None:
    lines = [f"# Varlen training section: packed vs padded ({header})", "",
             "Causal forward + backward of one batch of documents; tokens/s counts real tokens, TFLOP/s the "
             "useful (causal, per-document) FLOPs. speedup = padded ms / packed ms. max |diff| compares the "
             "packed and padded outputs on the real rows.", "",
             "| dtype | D | lengths | docs | tokens | longest | packed ms | padded ms | packed tokens/s | "
             "padded tokens/s | packed TFLOP/s | padded TFLOP/s | speedup | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = None if not (r.packed_ms and r.padded_ms) else r.padded_ms / r.packed_ms
        lines.append(
            f"| {SHORT[r.dtype]} | {r.D} | {r.dist} | {r.docs} | {r.total} | {r.longest} | {_f(r.packed_ms, '.3f')} | "
            f"{_f(r.padded_ms, '.3f')} | {_f(r.tokens_per_s(r.packed_ms), '.3g')} | "
            f"{_f(r.tokens_per_s(r.padded_ms), '.3g')} | {_f(r.tflops(r.packed_ms), '.1f')} | "
            f"{_f(r.tflops(r.padded_ms), '.1f')} | {_f(speed, '.2f')} | {_f(r.max_err, '.2e')} |"
            + (f" {r.note}" if r.note else ""))
    path.write_text("\n".join(lines) + "\n")


def run(out: Path, cuda: bool, dtypes: tuple, head_dims: tuple, repeats: int, warmup: int,
        seed: int = 0) -> list[VarlenRow]:
    """The section: GPU sizes (32768 tokens, documents up to 4096, H = 16), or the CPU smoke sizes."""
    device = torch.device("cuda" if cuda else "cpu")
    total, longest, H = (32768, 4096, 16) if cuda else (96, 32, 2)
    rows = []
    for dtype in dtypes:
        for D in head_dims:
            for dist in DISTRIBUTIONS:
                try:
                    r = measure(dtype, D, dist, total, longest, H, repeats, warmup, device, seed)
                except Exception as e:  # noqa: BLE001 - a failing case is recorded, the section goes on
                    r = VarlenRow(dtype, D, dist, 0, total, longest, note=f"error: {type(e).__name__}: {e}"[:200])
                rows.append(r)
                print(f"varlen {SHORT[dtype]} D={D} {dist}: packed {_f(r.packed_ms, '.3f')} ms, padded "
                      f"{_f(r.padded_ms, '.3f')} ms {r.note}", flush=True)
    write_markdown(out / "varlen.md", rows, "GPU" if cuda else "CPU SMOKE: not performance")
    return rows
