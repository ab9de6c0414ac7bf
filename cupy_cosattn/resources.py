"""Compile every registered kernel instantiation with NVRTC and report its resources (no GPU needed).

    python -m cupy_cosattn.resources [--arch sm_80 sm_90] [--match REGEX] [--jobs N] [--sass]

For each kernel of ``launch.registry.kernel_registry()`` (grouped into modules exactly as the launch layer
compiles them) and each architecture, NVRTC (CuPy's binding of the pip-wheel library) compiles with
``-arch=sm_XX -Xptxas=-v -std=c++17`` and ptxas' report gives one row: registers, shared memory
(static from ptxas + dynamic as the launch layer requests it), spill stores/loads and stack bytes.
A kernel that needs an arch-specific target (KernelSpec.arch, e.g. the sm_90a Hopper forward) is
compiled for that target whenever its base architecture (sm_90) or the target itself is asked for,
e.g. ``--arch sm_90a``.

With --sass it runs the static SASS profiler instead (``python -m cupy_cosattn.sass``: main-loop
instruction counts and a throughput model; --match then selects its kernels by label, e.g.
'fwd fp16 D=64').

Exit status 1 on any compile error, any spill, any stack frame (local memory: a register array
indexed at run time, or an ABI call), shared memory above the architecture's per-block limit, or a
--match that selects no kernel; 0 otherwise. This is the CI gate of docs/design.md section 4 item 2.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Optional, TextIO

from .launch.limits import SMEM_OPTIN_BY_ARCH as SMEM_LIMIT  # largest shared memory per block, bytes
from .launch.registry import KernelSpec
from .ptxas import parse_ptxas


def compile_group(source: str, names: tuple, arch: str) -> tuple:
    """Compile one module (source + name expressions) for `arch`. Returns (results, error): results
    maps each name expression to its ptxas row; error is the compile log on failure, else None."""
    from cupy.cuda import nvrtc

    from .launch import sources

    code = sources.load_source(source)
    opts = [f"-arch={arch}", "-Xptxas=-v"] + list(sources.compile_options())
    prog = nvrtc.createProgram(code, source, [], [])
    try:
        for n in names:
            nvrtc.addNameExpression(prog, n)
        try:
            nvrtc.compileProgram(prog, opts)
        except Exception as e:  # noqa: BLE001 - NVRTCError: report the log
            return {}, f"{type(e).__name__}: {e}\n{nvrtc.getProgramLog(prog)}"
        log = nvrtc.getProgramLog(prog)
        rows = parse_ptxas(log)
        res = {}
        for n in names:
            lowered = nvrtc.getLoweredName(prog, n)
            if lowered not in rows:
                return {}, f"no ptxas report for {n} ({lowered})\n{log}"
            res[n] = rows[lowered]
        return res, None
    finally:
        nvrtc.destroyProgram(prog)


def spec_archs(spec: KernelSpec, archs: Sequence[str]) -> list[str]:
    """The architectures of `archs` to compile `spec` for: all of them for a portable kernel; for one
    that needs an arch-specific target (spec.arch, e.g. "sm_90a"), that target when `archs` holds it
    or its base architecture ("sm_90")."""
    if spec.arch is None:
        return list(archs)
    return [spec.arch] if any(a in (spec.arch, spec.arch.rstrip("a")) for a in archs) else []


def run(archs: Sequence[str], match: Optional[str] = None, jobs: int = 2, out: Optional[TextIO] = None) -> int:
    """Compile the registry (optionally only names matching regex `match`); print rows to `out`
    (default stdout); return the number of failures (compile errors, spills, stack frames, shared
    memory over the limit; 1 when `match` selects nothing)."""
    from .launch.registry import kernel_registry

    out = sys.stdout if out is None else out
    specs = [s for s in kernel_registry() if (match is None or re.search(match, s.name)) and spec_archs(s, archs)]
    if not specs:
        print(f"no registered kernel matches {match!r}", file=out, flush=True)
        return 1
    by_name = {(s.source, s.name): s for s in specs}
    groups = {}
    for s in specs:
        groups.setdefault((s.source, s.group), []).append(s.name)
    tasks = [(src, tuple(sorted(names)), arch) for (src, _), names in groups.items()
             for arch in spec_archs(by_name[(src, names[0])], archs)]
    print(f"compiling {len(specs)} kernels in {len(groups)} modules for {', '.join(archs)} "
          f"({len(tasks)} NVRTC programs, {jobs} jobs)", file=out, flush=True)
    hdr = f"{'kernel':<58} {'arch':<6} {'regs':>4} {'smem st+dyn':>14} {'spill st/ld':>11} {'stack':>5}  status"
    print(hdr, file=out, flush=True)
    failures = 0
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as ex:
        futs = {ex.submit(compile_group, *t): t for t in tasks}
        for fut in as_completed(futs):
            src, names, arch = futs[fut]
            try:
                res, err = fut.result()
            except Exception as e:  # noqa: BLE001
                res, err = {}, f"{type(e).__name__}: {e}"
            if err is not None:
                failures += len(names)
                for n in names:
                    print(f"{n:<58} {arch:<6} {'':>4} {'':>14} {'':>11} {'':>5}  COMPILE ERROR", file=out, flush=True)
                print(err, file=out, flush=True)
                continue
            for n in names:
                r = res[n]
                dyn = by_name[(src, n)].smem
                total = r["smem"] + dyn
                problems = []
                if r["spill_st"] or r["spill_ld"]:
                    problems.append("SPILL")
                if r["stack"]:
                    problems.append("STACK")
                if total > SMEM_LIMIT.get(arch.rstrip("a"), 227 * 1024):
                    problems.append("SMEM>LIMIT")
                failures += bool(problems)
                print(f"{n:<58} {arch:<6} {r['regs']:>4} {r['smem']:>6}+{dyn:<7} {r['spill_st']:>5}/{r['spill_ld']:<5} "
                      f"{r['stack']:>5}  {' '.join(problems) or 'ok'}", file=out, flush=True)
    rows = sum(len(spec_archs(s, archs)) for s in specs)
    print(f"{rows} rows, {failures} failures, {time.time() - t0:.0f} s", file=out, flush=True)
    return failures


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cupy_cosattn.resources", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"], help="target architectures (default: sm_80 sm_90)")
    ap.add_argument("--match", default=None, help="only kernels whose name expression matches this regex")
    ap.add_argument("--jobs", type=int, default=2, help="parallel NVRTC processes (default 2)")
    ap.add_argument("--sass", action="store_true", help="run the static SASS profiler (cupy_cosattn.sass) instead")
    args = ap.parse_args(argv)
    if args.sass:
        from . import sass

        sel = ["--kernels", args.match] if args.match else []
        return sass.main(["--arch", *args.arch, "--jobs", str(args.jobs)] + sel)
    try:
        from cupy.cuda import nvrtc  # noqa: F401
    except Exception as e:  # noqa: BLE001
        print(f"NVRTC is not available through CuPy ({type(e).__name__}: {e}); install cupy-cuda12x and "
              f"nvidia-cuda-nvrtc-cu12", file=sys.stderr)
        return 1
    return 1 if run(args.arch, args.match, args.jobs) else 0


if __name__ == "__main__":
    sys.exit(main())
