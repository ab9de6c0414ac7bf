"""The decode benchmark section (cupy_cosattn.bench.decode) runs end to end without a GPU: the CPU smoke
mode writes every row of decode.csv and decode.md, checks each cosattn output against SDPA, and records
a failing implementation as an error while the run goes on. examples/benchmark.py --decode runs it."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

REPO = Path(__file__).resolve().parent.parent


def _rows(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_mode_writes_every_row(tmp_path):
    from cupy_cosattn.bench import decode as bd

    out = tmp_path / "dec"
    assert bd.main(["--smoke", "--out", str(out), "--repeats", "2", "--warmup", "0"]) == 0
    rows = _rows(out / "decode.csv")
    assert list(rows[0].keys()) == bd.CSV_COLUMNS
    assert [(int(r["B"]), int(r["Nk"]), r["impl"]) for r in rows] == [
        (B, N, i) for B, N in bd.SMOKE_CASES for i in bd.IMPLS]
    assert all(r["status"] == "ok" and r["mode"] == "cpu-smoke" and float(r["ms"]) > 0 for r in rows)
    for r in rows:
        assert float(r["tokens_per_s"]) == pytest.approx(int(r["B"]) / (float(r["ms"]) * 1e-3), rel=1e-3)
        if r["impl"] != "sdpa":
            assert float(r["rel_err_vs_sdpa"]) < bd.CHECK_TOL["float32"]
    md = (out / "decode.md").read_text()
    assert "CPU SMOKE MODE" in md and md.count("| float32 |") == len(rows)


def test_failing_implementation_is_recorded(tmp_path, monkeypatch):
    from cupy_cosattn.bench import decode as bd

    real = bd.step_fns

    def broken(inp, scale, cpu):
        fns = real(inp, scale, cpu)
        fns["cosattn_paged"] = lambda: (_ for _ in ()).throw(RuntimeError("planted failure"))
        return fns

    monkeypatch.setattr(bd, "step_fns", broken)
    out = tmp_path / "dec"
    assert bd.main(["--smoke", "--out", str(out), "--repeats", "1", "--warmup", "0"]) == 1
    rows = _rows(out / "decode.csv")
    bad = [r for r in rows if r["impl"] == "cosattn_paged"]
    assert bad and all(r["status"] == "error" and "planted failure" in r["note"] for r in bad)
    assert all(r["status"] == "ok" for r in rows if r["impl"] != "cosattn_paged")


def test_benchmark_script_runs_the_decode_section(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "benchmark.py"), "--decode", "--smoke", "--out",
                           str(tmp_path / "d"), "--repeats", "1", "--warmup", "0"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(_rows(tmp_path / "d" / "decode.csv")) == 9
