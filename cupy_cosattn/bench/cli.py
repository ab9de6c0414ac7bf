"""The benchmark's command line: python -m cupy_cosattn.bench (or examples/benchmark.py)."""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from . import __doc__ as _DOC
from .cases import (
    DTYPE_ALIASES,
    DTYPES,
    IMPLS,
    MASKS,
    PASSES,
    PRESETS,
    cosattn_forward_kernels,
    make_cases,
    make_inputs,
    n_rotation_sets,
)
from .report import CsvSink, _tf, _versions, write_markdown, write_png
from .runner import Bench, Interrupted, Row, fill_ratios, short_error


def _csv_list(kind: str, conv: Callable[[str], Any] = str) -> Callable[[str], tuple]:
    def parse(s: str) -> tuple:
        try:
            return tuple(conv(x) for x in s.split(",") if x.strip())
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"bad {kind} list {s!r}: {e}") from None

    return parse


def _dtype_name(s: str) -> str:
    s = s.strip().lower()
    s = DTYPE_ALIASES.get(s, s)
    if s not in DTYPES:
        raise ValueError(f"unknown dtype {s!r} (float16/fp16, bfloat16/bf16, float32/fp32)")
    return s


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=_DOC.split("\n\n")[0],
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
    ap.add_argument("--varlen", choices=("off", "on", "only"), default="off",
                    help="the varlen training section (packed vs padded documents, bench/varlen.py; GPU numbers, "
                         "tiny sizes in the smoke mode): 'on' after the main grid, 'only' instead of it")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failing cases")
    ap.add_argument("--decode", action="store_true",
                    help="run the decode section instead (bench.decode: KV-cache decoding, tokens/s against SDPA; "
                         "writes decode.csv and decode.md; takes --out, --smoke, --dtypes, --repeats, --warmup, "
                         "--scale, --max-seconds, --seed)")
    args = ap.parse_args(argv)
    for name, allowed in (("masks", MASKS), ("passes", PASSES), ("impls", IMPLS)):
        bad = [x for x in (getattr(args, name) or ()) if x not in allowed]
        if bad:
            ap.error(f"--{name}: unknown {bad}; choose from {', '.join(allowed)}")
    return args



def run_decode_section(args: argparse.Namespace) -> int:
    """The decode section (bench.decode) with this command line's common options."""
    from . import decode

    argv = ["--out", str(args.out), "--scale", str(args.scale), "--seed", str(args.seed)]
    argv += ["--smoke"] if args.smoke else []
    argv += ["--dtypes", ",".join(args.dtypes)] if args.dtypes else []
    argv += ["--repeats", str(args.repeats)] if args.repeats else []
    argv += ["--warmup", str(args.warmup)] if args.warmup is not None else []
    argv += ["--max-seconds", str(args.max_seconds)] if args.max_seconds is not None else []
    return decode.main(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
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
    if args.varlen == "only":
        return _varlen_section(args, out, cuda, dtypes, head_dims)
    cases = make_cases(dtypes, head_dims, seqlens, masks, args.work, args.max_heads)
    if cuda:  # the report says which of our kernels the timings are of
        meta["settings"] += "; " + cosattn_forward_kernels(
            cases, (props.major, props.minor), int(getattr(props, "shared_memory_per_block_optin", 0)))
    n_total = len(cases) * len(impls) * len(passes)
    banner = "CPU SMOKE MODE (tiny sizes, wall clock; NOT performance)" if not cuda else f"GPU: {device}"
    print(f"benchmark: {banner}; {len(cases)} cases x {len(impls)} impls x {len(passes)} passes = {n_total} "
          f"rows -> {out}", flush=True)
    print(f"  {meta['versions']}", flush=True)

    bench = Bench(args, cuda)
    bench.t_start = time.monotonic()

    def on_signal(signum: int, frame: Any) -> None:
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
                    status, note = "error", f"inputs: {short_error(e)}"
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
            print(f"warning: could not draw benchmark.png: {short_error(e)}", flush=True)
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
    varlen_status = _varlen_section(args, out, cuda, dtypes, head_dims) if args.varlen == "on" else 0
    return 1 if args.strict and (n_err or n_bad or varlen_status) else 0


def _varlen_section(args: argparse.Namespace, out: Path, cuda: bool, dtypes: Sequence[str],
                    head_dims: Sequence[int]) -> int:
    """Run bench/varlen.py's section (16-bit dtypes; float32 packed batches run per sequence); 1 if a
    case errored or packed and padded disagree."""
    from . import varlen

    rows = varlen.run(out, cuda, tuple(d for d in dtypes if d != "float32") or ("bfloat16",), tuple(head_dims),
                      args.repeats, args.warmup, args.seed)
    print(f"wrote {out / 'varlen.md'}" + ("  [CPU SMOKE: not performance]" if not cuda else ""), flush=True)
    bad = [r for r in rows if r.note or r.max_err is None or r.max_err > varlen.AGREE[r.dtype]]
    return 1 if bad else 0


def progress_line(i: int, n: int, r: Row) -> str:
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


