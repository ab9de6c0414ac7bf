#!/usr/bin/env python3
"""A small forward and backward on the GPU, for compute-sanitizer (memcheck, racecheck, synccheck).

    PYTHONPATH=. compute-sanitizer --tool memcheck --error-exitcode 86 python3 scripts/sanitize_driver.py

CuPy's memory pool is switched off, so every array is its own cudaMalloc and memcheck sees an access
past the end of any of them (inside a pooled block it would not). Sizes are small and not multiples of
any tile, so the edge paths run; the configurations cover the kernel variants a sanitizer should see
(masks, causal, bias, grouped-query heads, each dtype, deterministic and atomic backward). Exit status:
0 when every call returned finite results, 1 otherwise (the sanitizer's own exit code reports what it
found).
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cupy_cosattn as ca  # noqa: E402

# name: (dtype, B, H, Hk, Nq, Nk, D, keywords)
CONFIGS = {
    "fp16-causal-mask": ("float16", 1, 2, 1, 70, 83, 64, dict(causal=True, mask=True)),
    "fp16-bias-det": ("float16", 2, 2, 2, 33, 47, 128, dict(bias=True, deterministic=True)),
    "fp32-plain": ("float32", 1, 1, 1, 65, 65, 64, dict()),
    "bf16-plain": ("bfloat16", 1, 2, 2, 40, 40, 64, dict()),
    # on an H100 / H200 the 16-bit D = 64 / 128 configurations above run the sm_90a forward (TMA,
    # mbarriers, wgmma); this one adds its mask and fix-up warps over several 128-key tiles
    "fp16-hopper-mask-causal-d128": ("float16", 1, 1, 1, 150, 300, 128, dict(causal=True, mask=True)),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", choices=sorted(CONFIGS))
    args = ap.parse_args(argv)

    import cupy

    cupy.cuda.set_allocator(None)  # plain cudaMalloc per array: memcheck sees every array's bounds
    cupy.cuda.set_pinned_memory_allocator(None)
    failures = 0
    for name in args.only or list(CONFIGS):
        dt_name, B, H, Hk, Nq, Nk, D, kw = CONFIGS[name]
        t0 = time.monotonic()
        try:
            if dt_name == "bfloat16":
                import ml_dtypes

                dt = np.dtype(ml_dtypes.bfloat16)
                try:
                    cupy.asarray(np.zeros(2, dtype=dt))
                except Exception as e:  # noqa: BLE001
                    print(f"[{name}] SKIP: this CuPy cannot hold bfloat16 arrays ({type(e).__name__}: {e})",
                          flush=True)
                    continue
            else:
                dt = np.dtype(dt_name)
            rng = np.random.default_rng(1)

            def arr(*shape, rng=rng, dt=dt):
                host = rng.standard_normal(shape).astype(np.float32).astype(dt)
                return cupy.asarray(host)

            q, k, v, dout = arr(B, H, Nq, D), arr(B, Hk, Nk, D), arr(B, Hk, Nk, D), arr(B, H, Nq, D)
            keywords = dict(causal=kw.get("causal", False), deterministic=kw.get("deterministic", False))
            if kw.get("mask"):
                m = rng.random((B, Nk)) < 0.7
                m[:, 0] = True
                keywords["mask"] = cupy.asarray(m)
            if kw.get("bias"):
                keywords["attn_bias"] = cupy.asarray((0.5 * rng.standard_normal((H, Nq, Nk))).astype(np.float32))
            from cupy_cosattn import problem
            from cupy_cosattn.launch import devices, dispatch

            prob, inp = problem.canonicalize(q, k, v, **keywords)
            fwd = dispatch.select(prob, devices.CudaDevice().capabilities(), dispatch.FORWARD, scale=inp.scale)
            print(f"[{name}] forward kernel: {fwd.spec.name}", flush=True)
            out, lse = ca.forward(q, k, v, backend="cuda", **keywords)
            dq, dk, dv, dbias, dscale = ca.backward(dout, q, k, v, out, lse, backend="cuda", **keywords)
            cupy.cuda.runtime.deviceSynchronize()
            finite = all(bool(cupy.isfinite(x.astype(cupy.float32)).all()) for x in (out, dq, dk, dv)) \
                and bool(np.isfinite(dscale))
            print(f"[{name}] forward+backward {'ok' if finite else 'NON-FINITE RESULTS'} "
                  f"({time.monotonic() - t0:.1f} s)", flush=True)
            failures += not finite
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            print(f"[{name}] ERROR {type(e).__name__}: {e}", flush=True)
            failures += 1
    print(f"sanitize_driver: {failures} failing configuration(s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
