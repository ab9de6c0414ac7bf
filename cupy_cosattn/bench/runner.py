"""Measuring one (case, implementation): warm-up, timed passes, memory, the output check."""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from .. import tolerances
from ..problem import Problem, visible
from . import impls
from .cases import NORMALIZED_SDPA, PASSES, SDPA_IMPLS, Case, Inputs
from .impls import Impl, Skip, impl_context, is_unavailable, normalized_sdpa_fn, sdpa_fn, unavailable_note, unfused_fn
from .timers import CudaTimer, WallTimer


class Interrupted(Exception):
    """SIGTERM/SIGINT: stop measuring, still write what was measured."""



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
    time_vs_normalize_sdpa: Optional[float] = None
    best_sdpa: str = ""
    peak_mib: Optional[float] = None
    cupy_pool_mib: Optional[float] = None
    first_call_ms: Optional[float] = None
    rel_err: Optional[float] = None
    check: str = ""
    note: str = ""


def short_error(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}"[:300]


def reference_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inp: Inputs,
                   rows_idx: torch.Tensor) -> torch.Tensor:
    """float64 CPU reference for batch 0, head 0, the query rows `rows_idx` (attention on the
    benchmark's pre-normalized q, k: plain softmax attention with the scale)."""
    qd = q[0, 0].detach().double().cpu()[rows_idx]
    kd = k[0, 0].detach().double().cpu()
    vd = v[0, 0].detach().double().cpu()
    s = (qd @ kd.T) * inp.scale
    N, D = kd.shape
    prob = Problem(B=1, H=1, Hk=1, Nq=N, Nk=N, D=D, dtype=np.dtype(np.float32), causal=inp.causal,
                   has_mask=inp.mask is not None)
    vis = visible(prob, rows_idx[:, None], torch.arange(N)[None, :], None if inp.mask is None else inp.mask[:1].cpu())
    if vis is not None:
        s = s.masked_fill(~vis[0, 0], float("-inf"))
    return torch.softmax(s, dim=-1) @ vd


class Bench:
    def __init__(self, args: argparse.Namespace, cuda: bool) -> None:
        self.args = args
        self.cuda = cuda
        self.device = torch.device("cuda") if cuda else torch.device("cpu")
        self.cosattn_fn = None
        self.cosattn_err = None
        self._cupy = None

    # -- helpers
    def timer(self) -> CudaTimer | WallTimer:
        return CudaTimer() if self.cuda else WallTimer()

    def impl_fn(self, impl: str) -> Impl:
        if impl == "cosattn":
            if self.cosattn_fn is None and self.cosattn_err is None:
                try:
                    self.cosattn_fn = impls.cosattn_fn(self.args)
                except Exception as e:  # noqa: BLE001 - recorded per case
                    self.cosattn_err = e
            if self.cosattn_err is not None:
                raise self.cosattn_err
            return self.cosattn_fn
        if impl == "unfused":
            return unfused_fn
        if impl == NORMALIZED_SDPA:
            return normalized_sdpa_fn
        return sdpa_fn

    def _cupy_pool(self) -> Any:
        if not self.cuda or "cupy" not in sys.modules:
            return None
        try:
            return sys.modules["cupy"].get_default_memory_pool()
        except Exception:  # noqa: BLE001
            return None

    def mem_begin(self) -> Optional[int]:
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        pool = self._cupy_pool()
        if pool is not None:
            pool.free_all_blocks()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def mem_end(self, base: Optional[int], row: Row) -> None:
        if not self.cuda or base is None:
            return
        torch.cuda.synchronize()
        row.peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        pool = self._cupy_pool()
        if pool is not None:
            row.cupy_pool_mib = pool.total_bytes() / 2**20

    # -- one pass
    def run_pass(self, fn: Impl, pass_: str, inp: Inputs, n_calls: int, timer: CudaTimer | WallTimer) -> None:
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

    def measure(self, case: Case, impl: str, inp: Inputs, passes: Sequence[str]) -> list[Row]:
        args = self.args
        rows = [Row(case, impl, p) for p in passes]

        def fail_all(status: str, note: str, from_idx: int = 0) -> None:
            for r in rows[from_idx:]:
                r.status, r.note = status, note

        try:
            fn = self.impl_fn(impl)
            ctx = impl_context(impl)
        except Skip as e:
            fail_all("skip", str(e))
            return rows
        except Exception as e:  # noqa: BLE001
            fail_all("error", short_error(e))
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
                            if is_unavailable(e):
                                r.status, r.note = "skip", unavailable_note(caught)
                            else:
                                r.status, r.note = "error", short_error(e)
                            if args.verbose:
                                traceback.print_exc()
                            self.recover()
            except Interrupted:
                raise
            except Exception as e:  # noqa: BLE001
                if is_unavailable(e):
                    fail_all("skip", unavailable_note(caught))
                else:
                    fail_all("error", short_error(e))
                    if args.verbose:
                        traceback.print_exc()
                self.recover()
        return rows

    def time_pass(self, fn: Impl, row: Row, pass_: str, inp: Inputs) -> None:
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

    def check_output(self, o: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inp: Inputs,
                     case: Case) -> tuple[Optional[float], str]:
        if self.args.no_check:
            return None, ""
        n_rows = min(case.N, 256)
        idx = torch.linspace(0, case.N - 1, n_rows).round().long().unique()
        ref = reference_rows(q, k, v, inp, idx)
        got = o[0, 0].detach().double().cpu()[idx]
        if not torch.isfinite(got).all():
            return float("nan"), "FAIL"
        rel = float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref))
        return rel, ("pass" if rel <= tolerances.BENCH_CHECK[case.dtype] else "FAIL")

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def recover(self) -> None:
        gc.collect()
        if self.cuda:
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - a sticky CUDA error: later cases will record it
                pass

    def out_of_time(self) -> bool:
        return self.args.max_seconds is not None and time.monotonic() - self.t_start > self.args.max_seconds


def fill_ratios(rows: Sequence[Row]) -> None:
    """time_vs_best_sdpa for every row of one case: ms / (fastest ok SDPA backend's ms) per pass, and
    time_vs_normalize_sdpa: ms / (normalize+sdpa's ms)."""
    for p in PASSES:
        norm = [r for r in rows if r.pass_ == p and r.impl == NORMALIZED_SDPA and r.status == "ok" and r.ms]
        for r in rows:
            if norm and r.pass_ == p and r.status == "ok" and r.ms:
                r.time_vs_normalize_sdpa = r.ms / norm[0].ms
        sd = [r for r in rows if r.pass_ == p and r.impl in SDPA_IMPLS and r.status == "ok" and r.ms]
        if not sd:
            continue
        best = min(sd, key=lambda r: r.ms)
        for r in rows:
            if r.pass_ == p and r.status == "ok" and r.ms:
                r.time_vs_best_sdpa = r.ms / best.ms
                r.best_sdpa = best.impl


