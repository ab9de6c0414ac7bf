"""The NVRTC gate (DESIGN.md section 4 item 2): every registered kernel instantiation compiles for
sm_80 and sm_90 without spills and within the shared-memory limit. Needs CuPy's NVRTC binding and
the NVRTC library (pip: cupy-cuda12x, nvidia-cuda-nvrtc-cu12), not a GPU."""
from __future__ import annotations

import io

import pytest

from cupy_cosattn import launch, resources


def _nvrtc_unavailable():
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception as e:  # noqa: BLE001
        return f"NVRTC not available ({type(e).__name__}: {e})"
    return None


pytestmark = pytest.mark.skipif(_nvrtc_unavailable() is not None, reason=str(_nvrtc_unavailable()))


def test_every_registered_kernel_compiles_spill_free():
    """The whole registry (forward, norm and backward kernels) for sm_80 and sm_90: about a minute or
    two on two cores. Exit status 0 means no compile error, no spill, shared memory within limits."""
    buf = io.StringIO()
    failures = resources.run(["sm_80", "sm_90"], jobs=2, out=buf)
    report = buf.getvalue()
    assert failures == 0, report
    n = len(launch.kernel_registry())
    rows = [l for l in report.splitlines() if l.rstrip().endswith(" ok")]
    assert len(rows) == 2 * n, report


def test_compile_error_fails(monkeypatch):
    monkeypatch.setattr(launch, "load_source", lambda name: "this is not CUDA;")
    buf = io.StringIO()
    failures = resources.run(["sm_80"], match=r"l2norm_fwd<float>", jobs=1, out=buf)
    assert failures == 1 and "COMPILE ERROR" in buf.getvalue()


def test_main_exit_status(capsys):
    assert resources.main(["--arch", "sm_80", "--match", r"l2norm_fwd<ca::half_t>"]) == 0
    out = capsys.readouterr().out
    assert "ca::norm::l2norm_fwd<ca::half_t>" in out and " ok" in out


def test_parse_ptxas():
    log = """ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'
ptxas info    : Function properties for _Z1kv
ptxas         .     8 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, 400 bytes cmem[0]
"""
    r = resources.parse_ptxas(log)["_Z1kv"]
    assert r == {"regs": 40, "smem": 1024, "stack": 8, "spill_st": 4, "spill_ld": 8}
