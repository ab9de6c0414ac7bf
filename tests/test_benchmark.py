"""The benchmark kit runs end to end without a GPU.

- the benchmark (cupy_cosattn.bench, run as examples/benchmark.py) in its CPU smoke mode writes the
  CSV, the markdown table and the PNG with every expected row and column; a failing implementation is
  recorded as an error and the run goes on; a time budget stops it cleanly.
- scripts/gpu_check.sh parses, and without a GPU stops at once with a clear message, writing nothing.
- scripts/emu_vs_gpu.py's comparison accepts identical results and rejects perturbed ones.
"""
from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "examples" / "benchmark.py"
GPU_CHECK = REPO / "scripts" / "gpu_check.sh"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    """The harness's modules, by name."""
    from cupy_cosattn.bench import cases, cli, impls, report

    return types.SimpleNamespace(cases=cases, cli=cli, impls=impls, report=report)


def _read_csv(path: Path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def _cosattn_torch_importable() -> bool:
    try:
        import cupy_cosattn.torch  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def test_smoke_mode_end_to_end(tmp_path, bench):
    out = tmp_path / "bench"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--out", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CPU SMOKE" in proc.stdout
    assert "[   1/" in proc.stdout  # a progress line per case

    header, rows = _read_csv(out / "benchmark.csv")
    assert header == bench.cases.CSV_COLUMNS
    dtypes, dims, lens, masks, *_ = bench.cases.PRESETS["smoke"]
    expected = {(dt, str(D), str(N), m, impl, p) for dt in dtypes for D in dims for N in lens for m in masks
                for impl in bench.cases.IMPLS for p in bench.cases.PASSES}
    got = [(r["dtype"], r["D"], r["N"], r["mask"], r["impl"], r["pass"]) for r in rows]
    assert len(got) == len(expected) and set(got) == expected
    assert {r["mode"] for r in rows} == {"cpu-smoke"}
    assert {r["status"] for r in rows} <= {"ok", "skip", "error"}
    for r in rows:
        if r["status"] == "ok":
            assert float(r["ms"]) > 0 and float(r["tflops"]) > 0 and int(r["repeats"]) >= 1
            assert r["check"] == "pass", r
        if r["status"] != "ok":
            assert r["note"], r  # every skip and error says why
    # The torch baselines always run on the CPU and are checked against the float64 reference.
    for r in rows:
        if r["impl"] in ("sdpa_math", "unfused", "normalize+sdpa"):
            assert r["status"] == "ok", r
            assert r["time_vs_best_sdpa"] != "" and r["time_vs_normalize_sdpa"] != ""
        if r["impl"] == "normalize+sdpa":
            assert float(r["time_vs_normalize_sdpa"]) == 1.0
    if _cosattn_torch_importable():
        bad = [r for r in rows if r["impl"] == "cosattn" and r["status"] != "ok"]
        assert not bad, bad[:3]

    md = (out / "benchmark.md").read_text()
    assert "CPU SMOKE TEST (not performance)" in md
    for col in ("| dtype | D | mask | N | B×H | pass |", "cosattn / best SDPA", "cosattn / normalize+SDPA",
                "normalize+sdpa", "sdpa_flash", "unfused"):
        assert col in md
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| dtype")]
    assert len(table) == len(expected) // len(bench.cases.IMPLS)  # one row per case and pass
    assert f"{len(rows)} rows:" in md

    png = (out / "benchmark.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_failing_case_is_recorded_and_the_run_goes_on(tmp_path, bench, monkeypatch):
    def broken_op(args):
        def fn(q, k, v, inp):
            raise RuntimeError("planted failure of the op under test")

        return fn

    monkeypatch.setattr(bench.impls, "cosattn_fn", broken_op)
    argv = ["--smoke", "--out", str(tmp_path), "--dtypes", "fp32", "--seqlens", "32", "--head-dims", "16",
            "--masks", "none,keypad", "--impls", "cosattn,sdpa_math,unfused"]
    assert bench.cli.main(argv) == 0
    _, rows = _read_csv(tmp_path / "benchmark.csv")
    assert len(rows) == 2 * 3 * 3
    ours = [r for r in rows if r["impl"] == "cosattn"]
    assert ours and all(r["status"] == "error" and "planted failure" in r["note"] for r in ours)
    assert all(r["status"] == "ok" for r in rows if r["impl"] != "cosattn")
    assert "**ERROR**" in (tmp_path / "benchmark.md").read_text()
    assert bench.cli.main(argv + ["--strict"]) == 1


def test_time_budget_stops_cleanly(tmp_path, bench):
    argv = ["--smoke", "--out", str(tmp_path), "--dtypes", "fp32", "--seqlens", "32,64", "--masks", "none",
            "--max-seconds", "0"]
    assert bench.cli.main(argv) == 0
    _, rows = _read_csv(tmp_path / "benchmark.csv")
    assert len(rows) == 2 * len(bench.cases.IMPLS) * len(bench.cases.PASSES)
    assert all(r["status"] == "skip" and "time budget" in r["note"] for r in rows)
    assert (tmp_path / "benchmark.md").exists() and (tmp_path / "benchmark.png").exists()


def test_flop_counting_and_constant_work(bench):
    c = bench.cases.Case("bfloat16", 64, 1024, 2, 8, "none")
    fwd = 4 * 2 * 8 * 1024 * 1024 * 64
    assert c.flops("fwd") == fwd
    assert c.flops("bwd") == 2.5 * fwd
    assert c.flops("fwd+bwd") == 3.5 * fwd
    assert bench.cases.Case("bfloat16", 64, 1024, 2, 8, "causal").flops("fwd") == fwd / 2
    assert bench.cases.Case("bfloat16", 64, 1024, 2, 8, "keypad").flops("fwd") == fwd
    work = 2**28
    for n in (512, 1024, 4096, 16384):
        B, H = bench.cases.split_bh(n, work, 16)
        assert B * H * n * n == max(work, n * n) and H <= 16


def test_versions_line_lists_cupy_not_this_package(bench):
    dists = [("cupy-cosattn", "0.1.0"), ("cupy_cosattn", "0.1.0"), ("cupy-cuda13x", "14.2.0"),
             ("cupy-cuda13x", "14.2.0"), ("numpy", "2.3.0"), ("CuPy", "13.6.0"), (None, "1")]
    assert bench.report._cupy_distributions(dists) == ["CuPy 13.6.0", "cupy-cuda13x 14.2.0"]
    parts = bench.report._versions(cuda=False).split(", ")
    ours = [p for p in parts if p.lower().replace("_", "-").startswith("cupy-cosattn")]
    assert ours == [p for p in parts if p.startswith("cupy_cosattn ")] and len(ours) == 1, parts  # once, its own


def test_gpu_check_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    proc = subprocess.run([bash, "-n", str(GPU_CHECK)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_gpu_check_without_gpu_fails_fast_and_writes_nothing(tmp_path):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["NVIDIA_SMI"] = str(tmp_path / "no-such-dir" / "nvidia-smi")  # as on a machine without a GPU
    dest = tmp_path / "results"
    proc = subprocess.run([bash, str(GPU_CHECK), str(dest)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "nvidia-smi" in proc.stderr and "NVIDIA GPU" in proc.stderr
    assert not dest.exists()


def test_emu_vs_gpu_comparison():
    emu = _load(REPO / "scripts" / "emu_vs_gpu.py", "cosattn_emu_vs_gpu_under_test")
    dtype_name, arrays, keywords = emu.make_inputs("fp16-causal-mask-gqa")
    ref = emu.run_backend("reference", arrays, keywords, lambda a: a)
    ok, lines = emu.compare("x", dtype_name, ref, ref, ref)
    assert ok and any(line.strip().startswith("out") for line in lines)
    bumped = list(ref)
    bumped[2] = (np.asarray(ref[2], dtype=np.float32) * 1.05).astype(ref[2].dtype)  # dq 5% off
    ok, lines = emu.compare("x", dtype_name, bumped, ref, ref)
    assert not ok and any("FAIL" in line and line.strip().startswith("dq") for line in lines)


def test_report_names_the_forward_kernel_of_the_device(bench):
    """The settings line says which of our forwards the timings are of: the sm_90a forward on an H100 for
    the 16-bit cases with D = 64 / 128, forward.cu elsewhere and on other devices."""
    cases = bench.cases.make_cases(("bfloat16", "float32"), (64, 96, 128), (1024,), ("none",), 2**22, 16)
    line = bench.cases.cosattn_forward_kernels(cases, (9, 0), 227 * 1024)
    assert "hopper_fwd.cu (sm_90a: TMA, wgmma) for bf16 D=64, bf16 D=128, forward.cu" in line, line
    assert "fp32" not in line and "D=96" not in line
    for cc, smem in (((8, 0), 163 * 1024), ((10, 0), 227 * 1024), ((9, 0), 100 * 1024)):
        line = bench.cases.cosattn_forward_kernels(cases, cc, smem)
        assert line == "cosattn forward: forward.cu (mma.sync) in every case", (cc, smem, line)


def test_emu_vs_gpu_and_sanitizer_name_the_forward_kernel():
    """On an H100 both GPU scripts print the forward kernel each configuration runs (here: the emulator
    as one), and their configurations include the sm_90a forward's fixed-offset and running-max
    instantiations."""
    from cupy_cosattn.launch import devices, limits

    emu = _load(REPO / "scripts" / "emu_vs_gpu.py", "cosattn_emu_vs_gpu_kernels")
    san = _load(REPO / "scripts" / "sanitize_driver.py", "cosattn_sanitize_driver_kernels")
    with limits.emulated_arch("sm_90a"):
        dev = devices.EmulatedDevice()
        names = {n: emu.forward_kernel(dev, *emu.make_inputs(n)[1:]) for n in emu.CONFIGS}
    hopper = {n for n, k in names.items() if k.startswith("ca::fwd90::attn_fwd_sm90<")}
    assert {names[n].split(", ")[2] for n in hopper} == {"false>", "true>"}, names  # both variants
    assert "fp32-perhead-scale-d128" not in hopper and len(hopper) >= 3
    assert any(c[0] != "float32" and c[6] == 128 and c[7].get("mask") for c in san.CONFIGS.values())


def test_normalize_sdpa_pays_for_the_normalization(bench):
    """normalize+sdpa is the user's alternative: on unit rows it is SDPA's answer, on raw rows it is
    cosine-sim attention (SDPA of the normalized rows), and its backward goes through the normalization."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    inp = SimpleNamespace(sdpa_mask=None, causal=True, scale=8.0)
    got = bench.impls.normalized_sdpa_fn(q, k, v, inp)
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    s = (qn @ kn.transpose(-1, -2)) * 8.0
    s = s.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.softmax(s, dim=-1) @ v
    torch.testing.assert_close(got, want)
    gq, = torch.autograd.grad(got.sum(), q)
    # a gradient through F.normalize is orthogonal to each row of q (scaling a row changes nothing)
    assert torch.allclose((gq * q).sum(-1), torch.zeros(1, 2, 16, dtype=torch.float64), atol=1e-10)
    assert gq.abs().max() > 1e-3
