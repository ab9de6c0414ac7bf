"""Random configurations of the fused kernels through the emulator: shapes, head layouts, features and
flags drawn by a seeded sampler (so every run checks the same cases, and a failure names its seed),
forward and every gradient against the float64 reference within docs/design.md's tolerances. The grids in
test_kernels_forward.py / test_kernels_backward.py cross the features systematically at fixed shapes;
these cover the shapes in between."""
from __future__ import annotations

import time

import numpy as np
import pytest

from cupy_cosattn import api

import kernel_cases
from test_kernels_backward import check_grads
from test_kernels_forward import check_forward

CASES_PER_DTYPE = 8


def sample_config(seed: int, dtype: str) -> dict:
    """Keyword arguments of kernel_cases.make_case for one random problem."""
    rng = np.random.default_rng(seed)
    merged = rng.random() < 0.15
    kv_3d = not merged and rng.random() < 0.2
    H = int(rng.integers(1, 5))
    Hk = H if merged or kv_3d else int(rng.choice([d for d in range(1, H + 1) if H % d == 0]))
    D = 8 * int(rng.integers(1, 33))  # 8 .. 256
    groups = int(rng.choice([g for g in (1, 2, 4) if D % g == 0 and D // g >= 4]))
    cfg = dict(B=int(rng.integers(1, 3)), H=H, Hk=Hk, Nq=int(rng.integers(1, 161)), Nk=int(rng.integers(1, 161)),
               D=D, dtype=dtype, merged=merged, kv_3d=kv_3d, causal=bool(rng.random() < 0.4),
               mask="random" if rng.random() < 0.35 else None,
               bias=[None, None, "head", "batch", "full"][int(rng.integers(0, 5))],
               bias_f32=bool(rng.random() < 0.5), scale=float(rng.uniform(2.0, 16.0)),
               per_head_scale=bool(rng.random() < 0.3), groups=groups, l2norm_qk=bool(rng.random() < 0.85))
    if cfg["merged"] and cfg["bias"] == "batch":
        cfg["bias"] = "head"
    # Exactly one visible key per row makes dS, hence dq, dk and dscale, vanish: relative errors
    # against an exact zero measure nothing (test_kernels_backward.test_single_key checks that case).
    # Keep at least two keys, and with the random mask (which hides half of one batch row's keys)
    # enough that a row keeps several.
    cfg["Nk"] = max(cfg["Nk"], 16 if cfg["mask"] else 2)
    return cfg


SEEDS = [(dt, 1000 * i + j) for i, dt in enumerate(kernel_cases.DTYPES) for j in range(CASES_PER_DTYPE)]


@pytest.mark.parametrize("dtype,seed", SEEDS, ids=[f"{dt}-{s}" for dt, s in SEEDS])
def test_random_config_forward_and_backward(dtype, seed):
    cfg = sample_config(seed, dtype)
    det = bool(seed % 2)
    try:
        args, kw, dout = kernel_cases.make_case(seed, deterministic=det, with_dout=True, **cfg)
        fwd_kw = {k: v for k, v in kw.items() if k != "deterministic"}
        check_forward(args, fwd_kw)
        check_grads(args, kw, dout)
    except AssertionError as e:
        raise AssertionError(f"config {cfg}, deterministic={det}: {e}") from None


def test_sampler_covers_the_features():
    """The drawn cases do exercise what they are meant to (a change to the sampler cannot quietly
    drop a feature)."""
    cfgs = [sample_config(s, dt) for dt, s in SEEDS]
    assert {c["D"] % 16 != 0 for c in cfgs} == {True, False}
    assert any(c["Hk"] < c["H"] for c in cfgs) and any(c["kv_3d"] for c in cfgs) and any(c["merged"] for c in cfgs)
    assert any(c["causal"] for c in cfgs) and any(c["mask"] for c in cfgs)
    assert {c["bias"] for c in cfgs} >= {None, "head", "batch", "full"}
    assert any(c["Nq"] != c["Nk"] for c in cfgs) and any(c["groups"] > 1 for c in cfgs)
    assert any(not c["l2norm_qk"] for c in cfgs) and any(c["per_head_scale"] for c in cfgs)
    assert max(c["D"] for c in cfgs) > 128


def test_emulator_forward_backward_speed():
    """The emulator's speed target (B=1, H=2, N=128, D=64, forward + backward once the modules are
    built) is 10 s; a regression that makes CI crawl shows up here first."""
    args, kw, dout = kernel_cases.make_case(5, B=1, H=2, Nq=128, D=64, dtype="float16", with_dout=True)
    out, lse = api.forward(*args, backend="emulator", **kw)  # builds the modules
    api.backward(dout, *args, out, lse, backend="emulator", **kw)
    t0 = time.perf_counter()
    out, lse = api.forward(*args, backend="emulator", **kw)
    api.backward(dout, *args, out, lse, backend="emulator", **kw)
    assert time.perf_counter() - t0 < 10.0
