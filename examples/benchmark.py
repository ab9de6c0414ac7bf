#!/usr/bin/env python3
"""Benchmark cupy-cosattn against PyTorch's scaled_dot_product_attention and an unfused torch attention.

What is timed (docs/benchmark.md has the full method):

- ``cosattn``: ``cupy_cosattn.torch.cosine_sim_attention`` on CUDA tensors, called the way users call it
  (autograd forward, ``torch.autograd.grad`` backward);
- ``sdpa_flash``, ``sdpa_cudnn``, ``sdpa_efficient``, ``sdpa_math``: ``F.scaled_dot_product_attention``
  with one backend forced through ``torch.nn.attention.sdpa_kernel``; a backend that does not take a
  case (fp32 on flash, a mask on flash, ...) is recorded as ``skip`` with torch's reason;
- ``unfused``: matmul -> masked_fill -> softmax -> matmul in plain torch.

Every implementation gets the same pre-normalized q, k (l2-normalized over the head dim), the same v,
dout and scale. Cosine-sim attention on pre-normalized inputs is plain softmax attention with that
scale, so all of them compute the same function (checked per case against a float64 reference).

Cases: dtypes x head dims x sequence lengths x masks ('none', 'causal', 'keypad' = per-batch key
padding), with B*H chosen so that B*H*N^2 stays constant (``--work``). Each (case, implementation) is
timed for 'fwd', 'bwd' and 'fwd+bwd' with CUDA events, after warm-up, as the median of ``--repeats``
calls, rotating through enough input buffers that they do not fit in L2.

Outputs in ``--out``: ``benchmark.csv`` (one row per case, implementation and pass), ``benchmark.md``
(a pivot table) and ``benchmark.png`` (TFLOP/s against N).

Without CUDA (or with ``--smoke``) it runs a CPU SMOKE mode: tiny sizes, CPU torch implementations,
wall-clock timers. Its numbers are not performance numbers; it exists so CI runs this file end to end.

    python examples/benchmark.py --quick --out /tmp/bench      # ~1 minute on an H100
    python examples/benchmark.py --out /tmp/bench              # the full grid
    python examples/benchmark.py --smoke --out /tmp/smoke      # CPU smoke (automatic without CUDA)
    python examples/benchmark.py --decode --out /tmp/decode    # the decode section (KV cache, tokens/s)
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import importlib
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent

IMPLS = ("cosattn", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "unfused")
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
PASS_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
# Accepted forward error vs the float64 reference, ||o - ref|| / ||ref|| (DESIGN.md's output tolerances,
# doubled for the rounding of the pre-normalized inputs that every implementation sees).
CHECK_TOL = {"float16": 6e-3, "bfloat16": 4e-2, "float32": 2e-5}

CSV_COLUMNS = [
    "mode", "device", "dtype", "D", "N", "B", "H", "mask", "impl", "pass", "status",
    "ms", "ms_min", "ms_max", "repeats", "tflops", "time_vs_best_sdpa", "best_sdpa",
    "peak_mib", "cupy_pool_mib", "first_call_ms", "rel_err", "check", "note",
]

PRESETS = {
    #          dtypes                              head dims  seqlens                                   masks   work     reps warm
    "full": (("float16", "bfloat16", "float32"), (64, 128), (512, 1024, 2048, 4096, 8192, 16384), MASKS, 2**30, 20, 3),
    "quick": (("bfloat16",), (64, 128), (1024, 4096), MASKS, 2**28, 10, 2),
    "smoke": (("float16", "bfloat16", "float32"), (32,), (32, 64), MASKS, 2**13, 3, 1),
}


class Interrupted(Exception):
    """SIGTERM/SIGINT: stop measuring, still write what was measured."""


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


def split_bh(N: int, work: int, max_heads: int):
    """(B, H) with B*H = max(1, work // N^2): heads first up to max_heads, the rest as batch."""
    bh = max(1, work // (N * N))
    H = min(bh, max_heads)
    while bh % H:
        H -= 1
    return bh // H, H


def make_cases(dtypes, head_dims, seqlens, masks, work, max_heads):
    cases = []
    for dt in dtypes:
        for D in head_dims:
            for mask in masks:
                for N in seqlens:
                    B, H = split_bh(N, work, max_heads)
                    cases.append(Case(dt, D, N, B, H, mask))
    return cases


def keypad_lengths(B: int, N: int, gen: torch.Generator):
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


def make_inputs(case: Case, device, n_sets: int, scale: float, seed: int) -> Inputs:
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


# --------------------------------------------------------------------------------------------------
# Implementations: fn(q, k, v, inputs) -> out


def _cosattn_fn(args):
    mod = importlib.import_module("cupy_cosattn.torch")
    op = mod.cosine_sim_attention
    extra = {"l2norm_qk": args.l2norm_qk == "on"}
    if args.deterministic:
        extra["deterministic"] = True

    def fn(q, k, v, inp: Inputs):
        return op(q, k, v, mask=inp.mask, scale=inp.scale, causal=inp.causal, **extra)

    return fn


def _sdpa_fn(q, k, v, inp: Inputs):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=inp.sdpa_mask, is_causal=inp.causal,
                                          scale=inp.scale)


def _unfused_fn(q, k, v, inp: Inputs):
    s = torch.matmul(q, k.transpose(-1, -2)) * inp.scale
    if inp.unfused_fill is not None:
        s = s.masked_fill(inp.unfused_fill, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)


def impl_context(impl: str):
    """The context an implementation runs in: a forced SDPA backend, or nothing."""
    if impl in SDPA_IMPLS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        member = getattr(SDPBackend, SDPA_IMPLS[impl], None)
        if member is None:
            raise _Skip(f"this torch ({torch.__version__}) has no SDPBackend.{SDPA_IMPLS[impl]}")
        return sdpa_kernel([member])
    import contextlib

    return contextlib.nullcontext()


class _Skip(Exception):
    """The implementation does not take this case (not a failure)."""


def _unavailable_note(caught) -> str:
    """torch explains why a forced SDPA backend refused a case in UserWarnings; keep them as the note."""
    reasons = []
    for w in caught:
        m = " ".join(str(w.message).split())
        if m and m not in reasons:
            reasons.append(m)
    return ("not available: " + "; ".join(reasons))[:300] if reasons else "backend not available for this case"


def _is_unavailable(e: Exception) -> bool:
    msg = str(e)
    return isinstance(e, RuntimeError) and ("No available kernel" in msg or "No viable backend" in msg)


# --------------------------------------------------------------------------------------------------
# Timers


class CudaTimer:
    """Per-call CUDA events on the current stream; the median of the per-call times."""

    kind = "cuda-events"

    def __init__(self):
        self.pairs = []

    def start(self):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def stop(self, token):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        self.pairs.append((token, e))

    def sync(self):
        torch.cuda.synchronize()

    def results_ms(self):
        self.sync()
        return [a.elapsed_time(b) for a, b in self.pairs]


class WallTimer:
    """CPU smoke mode: wall clock around each (synchronous) call."""

    kind = "wall-clock"

    def __init__(self):
        self.times = []

    def start(self):
        return time.perf_counter()

    def stop(self, token):
        self.times.append((time.perf_counter() - token) * 1e3)

    def sync(self):
        pass

    def results_ms(self):
        return list(self.times)


# --------------------------------------------------------------------------------------------------
# Measuring one (case, implementation)


@dataclass
class Row:
    case: Case
    impl: str
    pass_: str
    status: str = "ok"  # ok | skip | error
    ms: Optional[float] = None
    ms_min: Optional[float] = None
    ms_max: Optional[float] = None
    repeats: int = 0
    tflops: Optional[float] = None
    time_vs_best_sdpa: Optional[float] = None
    best_sdpa: str = ""
    peak_mib: Optional[float] = None
    cupy_pool_mib: Optional[float] = None
    first_call_ms: Optional[float] = None
    rel_err: Optional[float] = None
    check: str = ""
    note: str = ""


def _short_error(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}"[:300]


def reference_rows(q, k, v, inp: Inputs, rows_idx):
    """float64 CPU reference for batch 0, head 0, the query rows `rows_idx`."""
    qd = q[0, 0].detach().double().cpu()[rows_idx]
    kd = k[0, 0].detach().double().cpu()
    vd = v[0, 0].detach().double().cpu()
    s = (qd @ kd.T) * inp.scale
    N = kd.shape[0]
    hidden = torch.zeros(len(rows_idx), N, dtype=torch.bool)
    if inp.causal:
        hidden |= torch.arange(N)[None, :] > rows_idx[:, None]
    if inp.mask is not None:
        hidden |= ~inp.mask[0].cpu()[None, :]
    s = s.masked_fill(hidden, float("-inf"))
    return torch.softmax(s, dim=-1) @ vd


class Bench:
    def __init__(self, args, cuda: bool):
        self.args = args
        self.cuda = cuda
        self.device = torch.device("cuda") if cuda else torch.device("cpu")
        self.cosattn_fn = None
        self.cosattn_err = None
        self._cupy = None

    # -- helpers
    def timer(self):
        return CudaTimer() if self.cuda else WallTimer()

    def impl_fn(self, impl: str) -> Callable:
        if impl == "cosattn":
            if self.cosattn_fn is None and self.cosattn_err is None:
                try:
                    self.cosattn_fn = _cosattn_fn(self.args)
                except Exception as e:  # noqa: BLE001 - recorded per case
                    self.cosattn_err = e
            if self.cosattn_err is not None:
                raise self.cosattn_err
            return self.cosattn_fn
        if impl == "unfused":
            return _unfused_fn
        return _sdpa_fn

    def _cupy_pool(self):
        if not self.cuda or "cupy" not in sys.modules:
            return None
        try:
            return sys.modules["cupy"].get_default_memory_pool()
        except Exception:  # noqa: BLE001
            return None

    def mem_begin(self):
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        pool = self._cupy_pool()
        if pool is not None:
            pool.free_all_blocks()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def mem_end(self, base, row: Row):
        if not self.cuda or base is None:
            return
        torch.cuda.synchronize()
        row.peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        pool = self._cupy_pool()
        if pool is not None:
            row.cupy_pool_mib = pool.total_bytes() / 2**20

    # -- one pass
    def run_pass(self, fn, pass_: str, inp: Inputs, n_calls: int, timer) -> None:
        sets = inp.sets
        for i in range(n_calls):
            q, k, v, do = sets[i % len(sets)]
            if pass_ == "fwd":
                t = timer.start()
                o = fn(q, k, v, inp)
                timer.stop(t)
            elif pass_ == "bwd":
                o = fn(q, k, v, inp)
                t = timer.start()
                torch.autograd.grad(o, (q, k, v), do)
                timer.stop(t)
            else:
                t = timer.start()
                o = fn(q, k, v, inp)
                torch.autograd.grad(o, (q, k, v), do)
                timer.stop(t)
            del o

    def measure(self, case: Case, impl: str, inp: Inputs, passes) -> list:
        args = self.args
        rows = [Row(case, impl, p) for p in passes]

        def fail_all(status, note, from_idx=0):
            for r in rows[from_idx:]:
                r.status, r.note = status, note

        try:
            fn = self.impl_fn(impl)
            ctx = impl_context(impl)
        except _Skip as e:
            fail_all("skip", str(e))
            return rows
        except Exception as e:  # noqa: BLE001
            fail_all("error", _short_error(e))
            return rows

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with ctx:
                    # First call (kernel compilation, autotuning, ...): timed alone, output checked.
                    q, k, v, _ = inp.sets[0]
                    self._sync()
                    t0 = time.perf_counter()
                    o = fn(q, k, v, inp)
                    self._sync()
                    first_ms = (time.perf_counter() - t0) * 1e3
                    rel, check = self.check_output(o, q, k, v, inp, case)
                    del o
                    for r in rows:
                        r.first_call_ms, r.rel_err, r.check = first_ms, rel, check
                        if check == "FAIL":
                            r.note = f"forward differs from the float64 reference (rel err {rel:.2e})"
                    for idx, (r, p) in enumerate(zip(rows, passes)):
                        if self.out_of_time():
                            fail_all("skip", "time budget (--max-seconds) used up", idx)
                            break
                        try:
                            self.time_pass(fn, r, p, inp)
                        except Interrupted:
                            raise
                        except Exception as e:  # noqa: BLE001 - e.g. OOM in one pass
                            if _is_unavailable(e):
                                r.status, r.note = "skip", _unavailable_note(caught)
                            else:
                                r.status, r.note = "error", _short_error(e)
                            if args.verbose:
                                traceback.print_exc()
                            self.recover()
            except Interrupted:
                raise
            except Exception as e:  # noqa: BLE001
                if _is_unavailable(e):
                    fail_all("skip", _unavailable_note(caught))
                else:
                    fail_all("error", _short_error(e))
                    if args.verbose:
                        traceback.print_exc()
                self.recover()
        return rows

    def time_pass(self, fn, row: Row, pass_: str, inp: Inputs):
        args = self.args
        base = self.mem_begin()
        warm = self.timer()
        self.run_pass(fn, pass_, inp, args.warmup, warm)
        warm.sync()
        timer = self.timer()
        self.run_pass(fn, pass_, inp, args.repeats, timer)
        times = timer.results_ms()
        self.mem_end(base, row)
        row.ms = statistics.median(times)
        row.ms_min, row.ms_max, row.repeats = min(times), max(times), len(times)
        row.tflops = row.case.flops(pass_) / (row.ms * 1e-3) / 1e12 if row.ms > 0 else None

    def check_output(self, o, q, k, v, inp: Inputs, case: Case):
        if self.args.no_check:
            return None, ""
        n_rows = min(case.N, 256)
        idx = torch.linspace(0, case.N - 1, n_rows).round().long().unique()
        ref = reference_rows(q, k, v, inp, idx)
        got = o[0, 0].detach().double().cpu()[idx]
        if not torch.isfinite(got).all():
            return float("nan"), "FAIL"
        rel = float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref))
        return rel, ("pass" if rel <= CHECK_TOL[case.dtype] else "FAIL")

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def recover(self):
        gc.collect()
        if self.cuda:
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - a sticky CUDA error: later cases will record it
                pass

    def out_of_time(self) -> bool:
        return self.args.max_seconds is not None and time.monotonic() - self.t_start > self.args.max_seconds


def fill_ratios(rows):
    """time_vs_best_sdpa for every row of one case: ms / (fastest ok SDPA backend's ms) per pass."""
    for p in PASSES:
        sd = [r for r in rows if r.pass_ == p and r.impl in SDPA_IMPLS and r.status == "ok" and r.ms]
        if not sd:
            continue
        best = min(sd, key=lambda r: r.ms)
        for r in rows:
            if r.pass_ == p and r.status == "ok" and r.ms:
                r.time_vs_best_sdpa = r.ms / best.ms
                r.best_sdpa = best.impl


# --------------------------------------------------------------------------------------------------
# Output


def _fmt(x, nd=5):
    """A CSV number: `nd` significant digits, empty for None."""
    if x is None:
        return ""
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{nd}g}"
    return str(x)


def _tf(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def row_dict(r: Row, meta) -> dict:
    c = r.case
    return {
        "mode": meta["mode"], "device": meta["device"], "dtype": c.dtype, "D": c.D, "N": c.N, "B": c.B,
        "H": c.H, "mask": c.mask, "impl": r.impl, "pass": r.pass_, "status": r.status,
        "ms": _fmt(r.ms), "ms_min": _fmt(r.ms_min), "ms_max": _fmt(r.ms_max), "repeats": r.repeats,
        "tflops": _fmt(r.tflops), "time_vs_best_sdpa": _fmt(r.time_vs_best_sdpa), "best_sdpa": r.best_sdpa,
        "peak_mib": _fmt(r.peak_mib), "cupy_pool_mib": _fmt(r.cupy_pool_mib),
        "first_call_ms": _fmt(r.first_call_ms),
        "rel_err": "" if r.rel_err is None else f"{r.rel_err:.2e}", "check": r.check, "note": r.note,
    }


class CsvSink:
    def __init__(self, path: Path, meta):
        self.path, self.meta = path, meta
        self.f = open(path, "w", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=CSV_COLUMNS)
        self.w.writeheader()
        self.f.flush()

    def add(self, rows):
        for r in rows:
            self.w.writerow(row_dict(r, self.meta))
        self.f.flush()

    def close(self):
        self.f.close()


def write_markdown(path: Path, rows, meta, impls):
    smoke = meta["mode"] != "gpu"
    lines = []
    if smoke:
        lines += ["# cupy-cosattn benchmark: CPU SMOKE TEST (not performance)", "",
                  "> **CPU smoke mode**: tiny sizes, CPU torch implementations, wall-clock timers. These numbers "
                  "only show that the benchmark runs end to end; they say nothing about GPU performance.", ""]
    else:
        lines += ["# cupy-cosattn benchmark", ""]
    lines += [f"- date: {meta['date']}", f"- device: {meta['device']}", f"- versions: {meta['versions']}",
              f"- settings: {meta['settings']}",
              "- cells: median ms (TFLOP/s); TFLOP/s counts 4·B·H·N²·D per forward, 2.5× that per backward, "
              "3.5× per forward+backward, half of it for causal; key-padding masks count in full",
              "- `cosattn / best SDPA`: our median time over the fastest SDPA backend's (< 1 = faster); "
              "peak MiB: memory allocated above the inputs during the pass (torch allocator"
              + ("; plus CuPy's pool where it was used" if not smoke else "") + ")", ""]
    notes: dict = {}

    def note_ref(text):
        if text not in notes:
            notes[text] = len(notes) + 1
        return notes[text]

    by_key = {}
    for r in rows:
        by_key.setdefault((r.case, r.pass_), {})[r.impl] = r
    header = ["dtype", "D", "mask", "N", "B×H", "pass"] + list(impls) + \
             ["cosattn / best SDPA", "peak MiB cosattn / best SDPA / unfused"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for (case, p), d in by_key.items():
        cells = [SHORT[case.dtype], str(case.D), case.mask, str(case.N), str(case.B * case.H), p]
        for impl in impls:
            r = d.get(impl)
            if r is None:
                cells.append("")
            elif r.status == "ok":
                cell = f"{r.ms:.3f} ({_tf(r.tflops)})" if r.tflops is not None else f"{r.ms:.3f}"
                if r.check == "FAIL":
                    cell += f" ⚠{note_ref(r.note)}"
                cells.append(cell)
            else:
                label = "n/a" if r.status == "skip" else "**ERROR**"
                cells.append(f"{label}<sup>{note_ref(r.note or r.status)}</sup>")
        ours = d.get("cosattn")
        if ours is not None and ours.time_vs_best_sdpa is not None:
            cells.append(f"{ours.time_vs_best_sdpa:.2f}× ({ours.best_sdpa.replace('sdpa_', '')})")
        else:
            cells.append("")
        best = d.get(ours.best_sdpa) if ours is not None and ours.best_sdpa else None
        if best is None:
            sd = [r for r in d.values() if r.impl in SDPA_IMPLS and r.status == "ok" and r.ms]
            best = min(sd, key=lambda r: r.ms) if sd else None
        mem = [d.get("cosattn"), best, d.get("unfused")]
        cells.append(" / ".join("–" if r is None or r.peak_mib is None else f"{r.peak_mib:.0f}" for r in mem))
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"{n}. {text}" for text, n in notes.items()]
    n_err = sum(r.status == "error" for r in rows)
    n_bad = sum(r.check == "FAIL" for r in rows)
    lines += ["", f"{len(rows)} rows: {sum(r.status == 'ok' for r in rows)} ok, "
                  f"{sum(r.status == 'skip' for r in rows)} skipped, {n_err} errors, {n_bad} failed checks.", ""]
    path.write_text("\n".join(lines))


def write_png(path: Path, rows, meta, impls, plot_dtype, plot_d):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masks = [m for m in MASKS if any(r.case.mask == m for r in rows)] or list(MASKS)
    passes = [p for p in PASSES if any(r.pass_ == p for r in rows)] or list(PASSES)
    fig, axes = plt.subplots(len(passes), len(masks), figsize=(4.2 * len(masks), 3.2 * len(passes)),
                             squeeze=False)
    sel = [r for r in rows if r.case.dtype == plot_dtype and r.case.D == plot_d]
    colors = {impl: f"C{i}" for i, impl in enumerate(IMPLS)}  # the same colour in every panel
    ns = sorted({r.case.N for r in sel})
    for i, p in enumerate(passes):
        for j, m in enumerate(masks):
            ax = axes[i][j]
            for impl in impls:
                pts = sorted((r.case.N, r.tflops) for r in sel
                             if r.pass_ == p and r.case.mask == m and r.impl == impl and r.status == "ok"
                             and r.tflops is not None)
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color=colors[impl],
                            lw=2.2 if impl == "cosattn" else 1.2, label=impl)
            ax.set_xscale("log", base=2)
            if ns:
                ax.set_xticks(ns, [str(n) for n in ns])
                ax.minorticks_off()
            ax.set_title(f"{p}, mask={m}", fontsize=9)
            ax.set_xlabel("N (B·H·N² constant)", fontsize=8)
            ax.set_ylabel("TFLOP/s", fontsize=8)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    title = f"cupy-cosattn vs SDPA: {plot_dtype}, D={plot_d}, {meta['device']}"
    if meta["mode"] != "gpu":
        title = "CPU SMOKE TEST, NOT PERFORMANCE: " + title
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Main


def _cupy_distributions(name_versions) -> list:
    """"name version" of the installed CuPy distributions (cupy, cupy-cuda12x, cupy-cuda13x, ...) among
    (name, version) pairs: not this package (cupy-cosattn / cupy_cosattn), each listed once (a
    distribution visible on two sys.path entries is reported twice by importlib.metadata)."""
    found = set()
    for name, version in name_versions:
        norm = re.sub(r"[-_.]+", "-", (name or "").lower())
        if norm.startswith("cupy") and not norm.startswith("cupy-cosattn"):
            found.add(f"{name} {version}")
    return sorted(found)


def _versions(cuda: bool) -> str:
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    if cuda:
        parts.append(f"CUDA (torch) {torch.version.cuda}")
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        parts.append(f"cuDNN {cudnn}")
    try:
        from importlib import metadata

        parts += _cupy_distributions((d.metadata["Name"], d.version) for d in metadata.distributions())
    except Exception:  # noqa: BLE001
        pass
    try:
        import cupy_cosattn

        parts.append(f"cupy_cosattn {cupy_cosattn.__version__}")
    except Exception:  # noqa: BLE001
        parts.append("cupy_cosattn not importable")
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        if rev:
            parts.append(f"commit {rev}")
    except Exception:  # noqa: BLE001
        pass
    return ", ".join(parts)


def _csv_list(kind, conv=str):
    def parse(s):
        try:
            return tuple(conv(x) for x in s.split(",") if x.strip())
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"bad {kind} list {s!r}: {e}") from None

    return parse


def _dtype_name(s):
    s = s.strip().lower()
    s = DTYPE_ALIASES.get(s, s)
    if s not in DTYPES:
        raise ValueError(f"unknown dtype {s!r} (float16/fp16, bfloat16/bf16, float32/fp32)")
    return s


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmark_out", help="output folder (default ./benchmark_out)")
    ap.add_argument("--quick", action="store_true", help="small grid, ~1 minute on an H100")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU smoke mode even where CUDA exists (automatic without CUDA)")
    ap.add_argument("--dtypes", type=_csv_list("dtype", _dtype_name), help="e.g. fp16,bf16,fp32")
    ap.add_argument("--head-dims", type=_csv_list("head dim", int), help="e.g. 64,128")
    ap.add_argument("--seqlens", type=_csv_list("seqlen", int), help="e.g. 512,1024,...,16384")
    ap.add_argument("--masks", type=_csv_list("mask"), help=f"subset of {','.join(MASKS)}")
    ap.add_argument("--passes", type=_csv_list("pass"), help=f"subset of {','.join(PASSES)}")
    ap.add_argument("--impls", type=_csv_list("impl"), help=f"subset of {','.join(IMPLS)}")
    ap.add_argument("--work", type=int, help="B*H*N^2 kept constant (full 2^30, quick 2^28)")
    ap.add_argument("--max-heads", type=int, default=16, help="H = min(B*H, this); the rest is batch")
    ap.add_argument("--repeats", type=int, help="timed calls per pass (median; full 20, quick 10)")
    ap.add_argument("--warmup", type=int, help="untimed calls per pass before timing")
    ap.add_argument("--rotate", type=int, help="input buffer sets to rotate (default: > 4x L2, 2..16)")
    ap.add_argument("--scale", type=float, default=8.0, help="softmax scale for every implementation")
    ap.add_argument("--l2norm-qk", choices=("on", "off"), default="on",
                    help="cosattn's l2norm_qk: 'on' (default) normalizes q, k again inside the op, as users "
                         "call it; 'off' takes the pre-normalized inputs as they are")
    ap.add_argument("--deterministic", action="store_true", help="cosattn with deterministic=True")
    ap.add_argument("--no-check", action="store_true", help="skip the per-case float64 check of the output")
    ap.add_argument("--max-seconds", type=float, help="stop starting new cases after this many seconds "
                                                       "(the rest are recorded as skipped); outputs are written")
    ap.add_argument("--require-gpu", action="store_true",
                    help="exit 2 instead of falling back to the CPU smoke mode when CUDA is not available")
    ap.add_argument("--strict", action="store_true", help="exit 1 if any case errored or failed its check")
    ap.add_argument("--plot-dtype", help="dtype of the PNG chart (default bf16 if measured)")
    ap.add_argument("--plot-d", type=int, help="head dim of the PNG chart (default the largest measured)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failing cases")
    ap.add_argument("--decode", action="store_true",
                    help="run the decode section instead (cupy_cosattn.bench_decode: KV-cache decoding, "
                         "tokens/s against SDPA; writes decode.csv and decode.md)")
    args = ap.parse_args(argv)
    for name, allowed in (("masks", MASKS), ("passes", PASSES), ("impls", IMPLS)):
        bad = [x for x in (getattr(args, name) or ()) if x not in allowed]
        if bad:
            ap.error(f"--{name}: unknown {bad}; choose from {', '.join(allowed)}")
    return args


def _ensure_importable():
    """Let `python examples/benchmark.py` find the package in a source checkout without PYTHONPATH."""
    try:
        importlib.import_module("cupy_cosattn")
    except ImportError:
        if (REPO / "cupy_cosattn").is_dir() and str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))


def run_decode_section(args) -> int:
    """The decode section: cupy_cosattn.bench_decode with this script's common options."""
    from cupy_cosattn import bench_decode

    argv = ["--out", str(args.out), "--scale", str(args.scale), "--seed", str(args.seed)]
    argv += ["--smoke"] if args.smoke else []
    argv += ["--dtypes", ",".join(args.dtypes)] if args.dtypes else []
    argv += ["--repeats", str(args.repeats)] if args.repeats else []
    argv += ["--warmup", str(args.warmup)] if args.warmup is not None else []
    argv += ["--max-seconds", str(args.max_seconds)] if args.max_seconds is not None else []
    return bench_decode.main(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    _ensure_importable()
    if args.decode:
        return run_decode_section(args)
    cuda = torch.cuda.is_available() and not args.smoke
    threads = None
    if args.require_gpu and not cuda:
        why = "--smoke was given" if args.smoke else f"torch {torch.__version__} sees no CUDA device"
        print(f"benchmark: --require-gpu, but {why}; nothing measured", file=sys.stderr, flush=True)
        return 2
    preset = "smoke" if not cuda else ("quick" if args.quick else "full")
    p_dtypes, p_dims, p_lens, p_masks, p_work, p_reps, p_warm = PRESETS[preset]
    dtypes = args.dtypes or p_dtypes
    head_dims = args.head_dims or p_dims
    seqlens = args.seqlens or p_lens
    masks = args.masks or p_masks
    passes = tuple(p for p in PASSES if p in (args.passes or PASSES))
    impls = tuple(i for i in IMPLS if i in (args.impls or IMPLS))
    args.work = args.work or p_work
    args.repeats = args.repeats or p_reps
    args.warmup = p_warm if args.warmup is None else args.warmup
    if cuda and args.repeats < 10:
        print(f"note: --repeats {args.repeats} < 10; medians of fewer than 10 calls are noisy", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the unfused/math baselines
        props = torch.cuda.get_device_properties(0)
        device = props.name
        l2 = int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    else:
        device = f"CPU ({platform.machine()}, {os.cpu_count()} cores), CPU SMOKE"
        l2 = 32 * 2**20
        # One thread: tiny CPU ops only lose to a thread pool (and CI machines are shared).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
    mode = "gpu" if cuda else "cpu-smoke"
    timer_kind = "CUDA events" if cuda else "wall clock"
    meta = {
        "mode": mode, "device": device, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": _versions(cuda),
        "settings": (f"preset {preset}; B·H·N² = {args.work}; H ≤ {args.max_heads}; scale {args.scale}; "
                     f"{timer_kind}; median of {args.repeats} after {args.warmup} warm-up calls; "
                     f"cosattn l2norm_qk={args.l2norm_qk}" + ("; deterministic" if args.deterministic else "")),
    }
    cases = make_cases(dtypes, head_dims, seqlens, masks, args.work, args.max_heads)
    n_total = len(cases) * len(impls) * len(passes)
    banner = "CPU SMOKE MODE (tiny sizes, wall clock; NOT performance)" if not cuda else f"GPU: {device}"
    print(f"benchmark: {banner}; {len(cases)} cases x {len(impls)} impls x {len(passes)} passes = {n_total} "
          f"rows -> {out}", flush=True)
    print(f"  {meta['versions']}", flush=True)

    bench = Bench(args, cuda)
    bench.t_start = time.monotonic()

    def on_signal(signum, frame):  # noqa: ARG001
        raise Interrupted(f"signal {signum}")

    old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            old[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread: no clean stop on signals, nothing else changes
            pass
    sink = CsvSink(out / "benchmark.csv", meta)
    all_rows = []
    done = 0
    interrupted = None
    try:
        for ci, case in enumerate(cases):
            if interrupted is not None or bench.out_of_time():
                why = f"not run: {interrupted}" if interrupted else "time budget (--max-seconds) used up"
                rows = [Row(case, i, p, status="skip", note=why) for i in impls for p in passes]
                sink.add(rows)
                all_rows += rows
                done += len(rows)
                continue
            case_rows = []
            inp = None
            try:
                n_sets = n_rotation_sets(case, l2, args.rotate) if cuda else 2
                inp = make_inputs(case, bench.device, n_sets, args.scale, args.seed + ci)
                for impl in impls:
                    if interrupted is None and not bench.out_of_time():
                        try:
                            rows = bench.measure(case, impl, inp, passes)
                        except Interrupted as e:
                            interrupted = str(e)
                            rows = [Row(case, impl, p, status="skip", note=f"not run: {e}") for p in passes]
                    else:
                        why = f"not run: {interrupted}" if interrupted else "time budget (--max-seconds) used up"
                        rows = [Row(case, impl, p, status="skip", note=why) for p in passes]
                    for r in rows:
                        done += 1
                        print(progress_line(done, n_total, r), flush=True)
                    case_rows += rows
            except (Interrupted, Exception) as e:  # noqa: BLE001 - e.g. out of memory making the inputs
                if isinstance(e, Interrupted):
                    interrupted = str(e)
                    status, note = "skip", f"not run: {e}"
                else:
                    status, note = "error", f"inputs: {_short_error(e)}"
                have = {(r.impl, r.pass_) for r in case_rows}
                for impl in impls:
                    for p in passes:
                        if (impl, p) not in have:
                            r = Row(case, impl, p, status=status, note=note)
                            case_rows.append(r)
                            done += 1
                            print(progress_line(done, n_total, r), flush=True)
            finally:
                del inp
                bench.recover()
            fill_ratios(case_rows)
            sink.add(case_rows)
            all_rows += case_rows
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if threads is not None:
            torch.set_num_threads(threads)
        sink.close()
        plot_dtype = _dtype_name(args.plot_dtype) if args.plot_dtype else \
            ("bfloat16" if "bfloat16" in dtypes else dtypes[0])
        plot_d = args.plot_d or max(head_dims)
        write_markdown(out / "benchmark.md", all_rows, meta, impls)
        try:
            write_png(out / "benchmark.png", all_rows, meta, impls, plot_dtype, plot_d)
        except Exception as e:  # noqa: BLE001 - never lose the table for the chart
            print(f"warning: could not draw benchmark.png: {_short_error(e)}", flush=True)
    elapsed = time.monotonic() - bench.t_start
    n_err = sum(r.status == "error" for r in all_rows)
    n_bad = sum(r.check == "FAIL" for r in all_rows)
    n_ok = sum(r.status == "ok" for r in all_rows)
    print(f"done in {elapsed:.1f} s: {n_ok} ok, {sum(r.status == 'skip' for r in all_rows)} skipped, "
          f"{n_err} errors, {n_bad} failed checks; wrote {out / 'benchmark.csv'}, {out / 'benchmark.md'}, "
          f"{out / 'benchmark.png'}" + ("  [CPU SMOKE: not performance]" if not cuda else ""), flush=True)
    if interrupted:
        print(f"interrupted ({interrupted}); partial results written", flush=True)
        return 1
    return 1 if args.strict and (n_err or n_bad) else 0


def progress_line(i, n, r: Row) -> str:
    head = f"[{i:>4}/{n}] {r.case.label:<40} {r.impl:<15} {r.pass_:<8}"
    if r.status != "ok":
        return f"{head} {r.status.upper()}: {r.note}"
    s = f"{head} {r.ms:9.3f} ms"
    if r.tflops is not None:
        s += f" {_tf(r.tflops):>8} TFLOP/s"
    if r.peak_mib is not None:
        s += f"  peak {r.peak_mib:8.1f} MiB"
    if r.check == "FAIL":
        s += f"  CHECK FAILED (rel err {r.rel_err:.2e})"
    return s


if __name__ == "__main__":
    sys.exit(main())
