#!/usr/bin/env python3
"""The CPU emulator against the GPU: the same kernels on the same inputs must agree to rounding.

For each small configuration, one forward and one backward run through ``backend='emulator'`` on NumPy
arrays and through ``backend='cuda'`` on CuPy arrays (copies of the very same NumPy inputs). Every
output (out, lse, dq, dk, dv, dbias, dscale) is compared:

- emulator vs GPU: ||emu - gpu|| / ||gpu|| must be at most AGREE_TOL[dtype] (about one unit of the
  output dtype's rounding: the two differ only in accumulation order, float atomics and the hardware
  matrix units' internal rounding); the share of bitwise-equal elements is printed too;
- each of them vs the float64 reference (``backend='reference'``), against docs/design.md's tolerances.

Prints one block per configuration as it finishes and a summary line; exit status 0 when every
comparison passed, 1 otherwise, 2 when there is no GPU or CuPy. Run from the source tree:

    PYTHONPATH=. python3 scripts/emu_vs_gpu.py [--only NAME ...] [--max-seconds S]
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
from cupy_cosattn import tolerances  # noqa: E402

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = None

DTYPES = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}
if BF16 is not None:
    DTYPES["bfloat16"] = BF16

# Agreement, emulator vs GPU, relative to the norm (out and gradients in their dtype).
AGREE_TOL = tolerances.AGREE
AGREE_TOL_LSE = 1e-5  # lse is float32 in both
AGREE_TOL_DSCALE = 1e-4  # a sum over every logit
# docs/design.md, section 2: vs the float64 reference.
REF_TOL_OUT = tolerances.OUT
REF_TOL_GRAD = tolerances.GRAD

# name: (dtype, B, H, Hk, Nq, Nk, D, keywords). Sizes not multiples of any tile, to reach the edges.
CONFIGS = {
    "fp16-causal-mask-gqa": ("float16", 2, 2, 1, 77, 77, 64, dict(causal=True, mask=True)),
    "bf16-bias-cross": ("bfloat16", 1, 2, 2, 40, 96, 64, dict(bias=True)),
    "fp32-perhead-scale-d128": ("float32", 1, 2, 2, 65, 65, 128, dict(per_head_scale=True)),
    # the sm_90a forward on an H100: several 128-key tiles, the fix-up and mask warps, running max
    "bf16-hopper-d128-causal-mask-bias": ("bfloat16", 2, 1, 1, 200, 300, 128, dict(causal=True, mask=True, bias=True)),
    # and in float16 (CuPy without bfloat16 still reaches it): GQA, a bias (running max), D = 128
    "fp16-hopper-d128-bias-gqa": ("float16", 1, 2, 1, 130, 260, 128, dict(bias=True)),
}


def make_inputs(name, seed=0):
    dtype_name, B, H, Hk, Nq, Nk, D, kw = CONFIGS[name]
    dt = DTYPES[dtype_name]
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, Nq, D)).astype(np.float32).astype(dt)
    k = rng.standard_normal((B, Hk, Nk, D)).astype(np.float32).astype(dt)
    v = rng.standard_normal((B, Hk, Nk, D)).astype(np.float32).astype(dt)
    dout = rng.standard_normal((B, H, Nq, D)).astype(np.float32).astype(dt)
    keywords = dict(causal=bool(kw.get("causal", False)), scale=8.0)
    if kw.get("mask"):
        mask = rng.random((B, Nk)) < 0.8
        mask[:, 0] = True
        keywords["mask"] = mask
    if kw.get("bias"):
        keywords["attn_bias"] = (0.5 * rng.standard_normal((H, Nq, Nk))).astype(np.float32)
    if kw.get("per_head_scale"):
        keywords["scale"] = np.linspace(6.0, 10.0, H).astype(np.float32)
    return dtype_name, (q, k, v, dout), keywords


def forward_kernel(device, arrays, keywords):
    """The forward kernel the launch layer picks for these inputs on `device` (a launch.devices Device):
    on an H100 / H200 the report shows which configurations ran the sm_90a forward."""
    from cupy_cosattn import problem
    from cupy_cosattn.launch import dispatch

    prob, inp = problem.canonicalize(*arrays[:3], **keywords)
    return dispatch.select(prob, device.capabilities(), dispatch.FORWARD, scale=inp.scale).spec.name


def run_backend(backend, arrays, keywords, to_device):
    q, k, v, dout = (to_device(a) for a in arrays)
    kw = {key: (to_device(val) if isinstance(val, np.ndarray) else val) for key, val in keywords.items()}
    out, lse = ca.forward(q, k, v, backend=backend, **kw)
    grads = ca.backward(dout, q, k, v, out, lse, backend=backend, **kw)
    return (out, lse) + tuple(grads)


NAMES = ("out", "lse", "dq", "dk", "dv", "dbias", "dscale")


def to_host(x):
    if x is None:
        return None
    if hasattr(x, "get"):
        x = x.get()
    return np.asarray(x)


def rel(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    finite = np.isfinite(a) & np.isfinite(b)
    if not np.array_equal(np.isfinite(a), np.isfinite(b)):
        return float("inf")  # e.g. NaN in one of them; -inf lse rows must match exactly
    d = np.where(finite, a - b, 0.0)
    nb = np.linalg.norm(np.where(finite, b, 0.0))
    return float(np.linalg.norm(d) / nb) if nb > 0 else float(np.linalg.norm(d))


def compare(name, dtype_name, emu, gpu, ref):
    lines, ok = [], True
    for what, e, g, r in zip(NAMES, emu, gpu, ref):
        e, g, r = to_host(e), to_host(g), to_host(r)
        if e is None and g is None:
            continue
        if e is None or g is None or np.shape(e) != np.shape(g):
            lines.append(f"  {what:6s} MISMATCH: emulator {None if e is None else np.shape(e)} vs gpu "
                         f"{None if g is None else np.shape(g)}")
            ok = False
            continue
        tol = AGREE_TOL_LSE if what == "lse" else AGREE_TOL_DSCALE if what == "dscale" else AGREE_TOL[dtype_name]
        agree = rel(e, g)
        eq = float(np.mean(np.asarray(e) == np.asarray(g))) if np.ndim(e) else float(e == g)
        reftol = None
        if what in ("out", "dq", "dk", "dv", "dbias"):
            reftol = REF_TOL_OUT[dtype_name] if what == "out" else REF_TOL_GRAD[dtype_name]
        rerr_e = rel(e, r) if r is not None else None
        rerr_g = rel(g, r) if r is not None else None
        good = agree <= tol and (reftol is None or (rerr_e <= reftol and rerr_g <= reftol))
        ok &= good
        s = f"  {what:6s} emu~gpu {agree:9.2e} (tol {tol:.0e}, {100 * eq:5.1f}% equal)"
        if reftol is not None:
            s += f" | vs float64: emu {rerr_e:.2e} gpu {rerr_g:.2e} (tol {reftol:.0e})"
        lines.append(s + ("" if good else "   <-- FAIL"))
    return ok, lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", choices=sorted(CONFIGS), help="run only these configurations")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="do not start another configuration after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
        if n < 1:
            raise RuntimeError("no CUDA device")
        props = cupy.cuda.runtime.getDeviceProperties(0)
        dev = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        print(f"emu_vs_gpu: GPU {dev}, CuPy {cupy.__version__}", flush=True)
        if cupy.cuda.Device(0).compute_capability == "90":
            # the emulator runs the GPU's kernels: on an H100 / H200 the sm_90a forward too
            from cupy_cosattn.launch import limits

            limits.set_emulated_arch("sm_90a")
            print("emu_vs_gpu: the emulator runs as sm_90a (the Hopper forward on both sides)", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"emu_vs_gpu: needs CuPy and a CUDA GPU ({type(e).__name__}: {e})", flush=True)
        return 2

    def to_cupy(a):
        return cupy.asarray(a)

    t_start = time.monotonic()
    results = {}
    for name in args.only or list(CONFIGS):
        if args.max_seconds is not None and time.monotonic() - t_start > args.max_seconds:
            print(f"[{name}] NOT RUN: --max-seconds {args.max_seconds} used up", flush=True)
            results[name] = None
            continue
        dtype_name, arrays, keywords = make_inputs(name, args.seed)
        dt, B, H, Hk, Nq, Nk, D, _ = CONFIGS[name]
        print(f"[{name}] {dt} B={B} H={H} Hk={Hk} Nq={Nq} Nk={Nk} D={D} "
              f"{sorted(k for k in keywords if k not in ('scale',))}", flush=True)
        from cupy_cosattn.launch import devices

        print(f"  forward kernel: {forward_kernel(devices.CudaDevice(), arrays, keywords)}", flush=True)
        try:
            if dtype_name == "bfloat16":
                try:
                    cupy.asarray(arrays[0])
                except Exception as e:  # noqa: BLE001
                    print(f"  SKIP: this CuPy cannot hold bfloat16 arrays ({type(e).__name__}: {e}); "
                          f"bfloat16 on the GPU is covered through cupy_cosattn.torch by the GPU tests", flush=True)
                    results[name] = "skip"
                    continue
            t0 = time.monotonic()
            gpu = run_backend("cuda", arrays, keywords, to_cupy)
            cupy.cuda.runtime.deviceSynchronize()
            t1 = time.monotonic()
            emu = run_backend("emulator", arrays, keywords, lambda a: a)
            t2 = time.monotonic()
            ref = run_backend("reference", arrays, keywords, lambda a: a)
            ok, lines = compare(name, dtype_name, emu, gpu, ref)
            print("\n".join(lines), flush=True)
            print(f"  {'PASS' if ok else 'FAIL'}  (gpu {t1 - t0:.1f} s incl. compile, emulator {t2 - t1:.1f} s)",
                  flush=True)
            results[name] = ok
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            print(f"  ERROR: {type(e).__name__}: {e}", flush=True)
            results[name] = False
    n_pass = sum(r is True for r in results.values())
    n_fail = sum(r is False for r in results.values())
    n_other = len(results) - n_pass - n_fail
    print(f"emu_vs_gpu: {n_pass} passed, {n_fail} failed, {n_other} skipped/not run "
          f"({time.monotonic() - t_start:.1f} s)", flush=True)
    return 1 if n_fail or n_pass == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
