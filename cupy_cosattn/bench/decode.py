"""Decode benchmark: single-token decoding from a KV cache, cupy-cosattn against torch's SDPA.

    python -m cupy_cosattn.bench --decode --out /tmp/decode          # GPU: B x Nk in {1x128k, 8x32k, 64x4k}
    python examples/benchmark.py --decode --out /tmp/decode          # the same, from the benchmark script
    python -m cupy_cosattn.bench --decode --smoke --out /tmp/smoke   # CPU smoke (automatic without CUDA)

One decode step per sequence: q (B, H, 1, D), GQA 8:1 (H = 64, Hk = 8), D = 128, every sequence
holding Nk keys after the step. Implementations:

- ``cosattn_paged``: :func:`cupy_cosattn.torch.kvcache_attention` with a paged cache (``--page-size``,
  default 16; pages of a sequence scattered over the pool) appending the step's key and value, as a
  server calls it: the call includes the append, the host copy of cache_seqlens and of the block-table
  entries in use (the argument checks and the split heuristic read them), the attention and the
  split combine;
- ``cosattn_contiguous``: the same with a contiguous (B, Hk, N_max, D) cache;
- ``sdpa``: ``F.scaled_dot_product_attention(q, k, v, enable_gqa=True)`` over the same keys gathered
  into a contiguous cache, pre-normalized (cosine-sim attention on normalized q, k is softmax attention
  with that scale), torch's own backend choice. It does not append.

Each is timed with CUDA events (median of ``--repeats`` calls after ``--warmup``); the caches (2 x 512
MB at the default sizes) are far larger than L2, so every call streams its keys from HBM. Reported:
ms per step, tokens/s (B tokens per step) and the effective bandwidth of the K/V reads (2 B Hk Nk D
bytes per element size / time). Each cosattn output is checked against SDPA's.

Outputs in ``--out``: ``decode.csv`` and ``decode.md``. Without CUDA (or with ``--smoke``): tiny sizes,
CPU tensors (cosattn's torch CPU implementation), wall clock: not performance numbers; it exists so CI
runs the section end to end.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

GPU_CASES = ((1, 131072), (8, 32768), (64, 4096))  # (B, Nk)
SMOKE_CASES = ((1, 512), (2, 256), (4, 128))
GPU_HEADS, SMOKE_HEADS = (64, 8, 128), (8, 1, 32)  # (H, Hk, D): GQA 8:1
IMPLS = ("cosattn_paged", "cosattn_contiguous", "sdpa")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
CHECK_TOL = {"float16": 6e-3, "bfloat16": 4e-2, "float32": 2e-5}
CSV_COLUMNS = ["mode", "device", "dtype", "B", "Nk", "H", "Hk", "D", "page_size", "impl", "status", "ms", "ms_min",
               "ms_max", "repeats", "tokens_per_s", "kv_gb_per_s", "rel_err_vs_sdpa", "note"]


@dataclass
class DecodeRow:
    mode: str
    device: str
    dtype: str
    B: int
    Nk: int
    H: int
    Hk: int
    D: int
    page_size: int
    impl: str
    status: str = "ok"
    ms: Optional[float] = None
    ms_min: Optional[float] = None
    ms_max: Optional[float] = None
    repeats: int = 0
    tokens_per_s: Optional[float] = None
    kv_gb_per_s: Optional[float] = None
    rel_err_vs_sdpa: Optional[float] = None
    note: str = ""


@dataclass
class DecodeInputs:
    """One case's tensors: the step's q, k_new, v_new; the paged and the contiguous cache (raw keys,
    the step's slot not yet written); SDPA's normalized contiguous keys (the step's key included)."""

    q: torch.Tensor
    k_new: torch.Tensor
    v_new: torch.Tensor
    seqlens: torch.Tensor
    paged: tuple  # (k_cache, v_cache, block_table)
    contiguous: tuple  # (k_cache, v_cache)
    sdpa: tuple  # (q_hat, k_hat, v)
    extras: dict = field(default_factory=dict)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / x.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)).to(x.dtype)


def make_inputs(B: int, Nk: int, H: int, Hk: int, D: int, dtype: torch.dtype, page_size: int,
                device: torch.device, seed: int) -> DecodeInputs:
    """Random keys and values for sequences of Nk - 1 cached keys plus the step's one."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q, k_new, v_new = rand(B, H, 1, D), rand(B, Hk, 1, D), rand(B, Hk, 1, D)
    k = torch.empty((B, Hk, Nk, D), dtype=dtype, device=device)
    v = torch.empty_like(k)
    for b in range(B):  # per sequence: keeps the host-side random tensors small
        k[b, :, :Nk - 1] = rand(Hk, Nk - 1, D)
        v[b, :, :Nk - 1] = rand(Hk, Nk - 1, D)
    k[:, :, Nk - 1:], v[:, :, Nk - 1:] = k_new, v_new
    seqlens = torch.full((B,), Nk - 1, dtype=torch.int32, device=device)
    pages = -(-Nk // page_size)
    perm = torch.randperm(B * pages, generator=g).to(device=device, dtype=torch.int32).view(B, pages)
    kp = torch.zeros((B * pages, Hk, page_size, D), dtype=dtype, device=device)
    vp = torch.zeros_like(kp)
    padded = pages * page_size
    for b in range(B):
        for cache, src in ((kp, k), (vp, v)):
            blocks = torch.zeros((Hk, padded, D), dtype=dtype, device=device)
            blocks[:, :Nk - 1] = src[b, :, :Nk - 1]
            cache[perm[b].long()] = blocks.view(Hk, pages, page_size, D).transpose(0, 1)
    kc = k.clone()
    vc = v.clone()
    kc[:, :, Nk - 1:] = 0  # the step's slot: written by the append
    vc[:, :, Nk - 1:] = 0
    return DecodeInputs(q, k_new, v_new, seqlens, (kp, vp, perm), (kc, vc), (_normalize(q), _normalize(k), v))


def step_fns(inp: DecodeInputs, scale: float, cpu: bool) -> dict[str, Callable[[], torch.Tensor]]:
    """impl -> a no-argument call of one decode step, returning its output (B, H, 1, D)."""
    from cupy_cosattn.torch import kvcache_attention

    backend = "torch" if cpu else "auto"
    kp, vp, table = inp.paged
    kc, vc = inp.contiguous
    qh, kh, vv = inp.sdpa
    return {
        "cosattn_paged": lambda: kvcache_attention(inp.q, kp, vp, inp.seqlens, block_table=table, k_new=inp.k_new,
                                                   v_new=inp.v_new, scale=scale, backend=backend),
        "cosattn_contiguous": lambda: kvcache_attention(inp.q, kc, vc, inp.seqlens, k_new=inp.k_new,
                                                        v_new=inp.v_new, scale=scale, backend=backend),
        "sdpa": lambda: F.scaled_dot_product_attention(qh, kh, vv, scale=scale, enable_gqa=True),
    }


def _time(fn: Callable[[], Any], cuda: bool, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    if cuda:
        pairs = []
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            pairs.append((a, b))
        torch.cuda.synchronize()
        times = [a.elapsed_time(b) for a, b in pairs]
    else:
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return times


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def run_cases(cases: Sequence[tuple[int, int]], heads: tuple[int, int, int], dtypes: Sequence[str],
              impls: Sequence[str], *, cuda: bool, page_size: int, repeats: int, warmup: int, scale: float = 8.0,
              seed: int = 0, max_seconds: Optional[float] = None, device_name: str = "",
              log: Callable[[str], None] = print) -> list[DecodeRow]:
    """Measure every (dtype, case, impl); a failing implementation is recorded as an error row."""
    H, Hk, D = heads
    mode = "gpu" if cuda else "cpu-smoke"
    device = torch.device("cuda" if cuda else "cpu")
    rows = []
    t0 = time.monotonic()
    for dt in dtypes:
        for ci, (B, Nk) in enumerate(cases):
            base = dict(mode=mode, device=device_name, dtype=dt, B=B, Nk=Nk, H=H, Hk=Hk, D=D, page_size=page_size)
            if max_seconds is not None and time.monotonic() - t0 > max_seconds:
                rows += [DecodeRow(**base, impl=i, status="skip", note="time budget used up") for i in impls]
                continue
            try:
                inp = make_inputs(B, Nk, H, Hk, D, DTYPES[dt], page_size, device, seed + ci)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory
                rows += [DecodeRow(**base, impl=i, status="error", note=f"inputs: {type(e).__name__}: {e}"[:300])
                         for i in impls]
                continue
            fns = step_fns(inp, scale, not cuda)
            ref = None
            try:
                ref = fns["sdpa"]()
            except Exception as e:  # noqa: BLE001
                log(f"  sdpa failed: {type(e).__name__}: {e}")
            nbytes = 2 * B * Hk * Nk * D * torch.empty((), dtype=DTYPES[dt]).element_size()
            for impl in impls:
                row = DecodeRow(**base, impl=impl)
                try:
                    out = fns[impl]()
                    if ref is not None and impl != "sdpa":
                        row.rel_err_vs_sdpa = _rel_err(out, ref)
                        if row.rel_err_vs_sdpa > CHECK_TOL[dt]:
                            row.note = f"CHECK FAILED: rel err {row.rel_err_vs_sdpa:.2e} vs sdpa"
                    ms = _time(fns[impl], cuda, warmup, repeats)
                    row.ms, row.ms_min, row.ms_max = statistics.median(ms), min(ms), max(ms)
                    row.repeats = len(ms)
                    row.tokens_per_s = B / (row.ms * 1e-3)
                    row.kv_gb_per_s = nbytes / (row.ms * 1e-3) / 1e9
                except Exception as e:  # noqa: BLE001 - record and go on
                    row.status, row.note = "error", f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]
                rows.append(row)
                log(progress_line(row))
            del inp, fns, ref
            if cuda:
                torch.cuda.empty_cache()
    return rows


def progress_line(r: DecodeRow) -> str:
    head = f"{r.dtype:<9} B={r.B:<3} Nk={r.Nk:<7} {r.impl:<19}"
    if r.status != "ok":
        return f"{head} {r.status.upper()}: {r.note}"
    return (f"{head} {r.ms:9.4f} ms {r.tokens_per_s:12.1f} tokens/s {r.kv_gb_per_s:8.1f} GB/s"
            + (f"  err {r.rel_err_vs_sdpa:.1e}" if r.rel_err_vs_sdpa is not None else "")
            + (f"  {r.note}" if r.note else ""))


def _fmt(x: Optional[float], nd: int = 4) -> str:
    return "" if x is None else f"{x:.{nd}g}"


def write_csv(path: Path, rows: list[DecodeRow]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            d = asdict(r)
            w.writerow({k: (_fmt(v, 6) if isinstance(v, float) else v) for k, v in d.items()})


def write_markdown(path: Path, rows: list[DecodeRow], meta: dict[str, str]) -> None:
    lines = [f"# Decode benchmark ({meta['mode']})", "", f"- device: {meta['device']}", f"- date: {meta['date']}",
             f"- {meta['settings']}", "",
             "| dtype | B x Nk | impl | ms / step | tokens/s | K/V GB/s | vs sdpa (time) | rel err vs sdpa | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    sdpa = {(r.dtype, r.B, r.Nk): r.ms for r in rows if r.impl == "sdpa" and r.status == "ok"}
    for r in rows:
        ratio = ""
        if r.status == "ok" and sdpa.get((r.dtype, r.B, r.Nk)):
            ratio = f"{r.ms / sdpa[(r.dtype, r.B, r.Nk)]:.2f}x"
        cells = [r.dtype, f"{r.B} x {r.Nk}", r.impl, _fmt(r.ms), _fmt(r.tokens_per_s, 6), _fmt(r.kv_gb_per_s),
                 ratio, "" if r.rel_err_vs_sdpa is None else f"{r.rel_err_vs_sdpa:.1e}",
                 r.note if r.status == "ok" else f"{r.status}: {r.note}"]
        lines.append("| " + " | ".join(cells) + " |")
    if meta["mode"] != "gpu":
        lines += ["", "CPU SMOKE MODE: tiny sizes on the CPU, wall clock. These are not performance numbers."]
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="decode_out")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke mode even where CUDA exists")
    ap.add_argument("--dtypes", default=None, help="comma-separated, default float16 (GPU) / float32 (smoke)")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=None, help="default 50 (GPU), 3 (smoke)")
    ap.add_argument("--warmup", type=int, default=None, help="default 5 (GPU), 1 (smoke)")
    ap.add_argument("--scale", type=float, default=8.0)
    ap.add_argument("--max-seconds", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.impls = tuple(i for i in args.impls.split(",") if i)
    bad = [i for i in args.impls if i not in IMPLS]
    if bad:
        ap.error(f"--impls: unknown {bad}; choose from {', '.join(IMPLS)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    dtypes = tuple(args.dtypes.split(",")) if args.dtypes else (("float16",) if cuda else ("float32",))
    repeats = args.repeats or (50 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.machine()}), CPU SMOKE"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    heads = GPU_HEADS if cuda else SMOKE_HEADS
    cases = GPU_CASES if cuda else SMOKE_CASES
    meta = dict(mode="gpu" if cuda else "cpu-smoke", device=device,
                date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                settings=(f"H = {heads[0]}, Hk = {heads[1]}, D = {heads[2]}, one query per sequence, page size "
                          f"{args.page_size}, scale {args.scale}; {'CUDA events' if cuda else 'wall clock'}, median "
                          f"of {repeats} after {warmup} warm-up calls; torch {torch.__version__}"))
    print(f"decode benchmark: {meta['device']}; {len(cases)} cases x {len(args.impls)} impls -> {out}", flush=True)
    rows = run_cases(cases, heads, dtypes, args.impls, cuda=cuda, page_size=args.page_size, repeats=repeats,
                     warmup=warmup, scale=args.scale, seed=args.seed, max_seconds=args.max_seconds,
                     device_name=device)
    write_csv(out / "decode.csv", rows)
    write_markdown(out / "decode.md", rows, meta)
    n_err = sum(r.status == "error" for r in rows)
    n_bad = sum("CHECK FAILED" in r.note for r in rows)
    print(f"wrote {out / 'decode.csv'}, {out / 'decode.md'}: {n_err} errors, {n_bad} failed checks", flush=True)
    return 1 if n_err or n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
