"""Shared test configuration.

GPU tests are marked ``@pytest.mark.gpu``; on a machine without CuPy or a CUDA device they are
skipped with the reason. Their CPU twins run the same kernels through the emulator.
"""
import functools
import os

import pytest

# The CPU emulator runs in its interleaving mode under the tests: at every scheduling point the next
# thread of a block is chosen at random (seeded), so a missing __syncthreads() changes results.
# Set CUPY_COSATTN_EMU_INTERLEAVE=off to run in the fixed round-robin order instead.
os.environ.setdefault("CUPY_COSATTN_EMU_INTERLEAVE", "1")


@functools.lru_cache(maxsize=1)
def gpu_unavailable_reason():
    """None when a CUDA device is usable through CuPy, else why not."""
    try:
        import cupy
    except Exception as e:  # noqa: BLE001 - any import failure means no CUDA path
        return f"CuPy is not importable ({type(e).__name__}: {e})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001
        return f"no CUDA device ({type(e).__name__})"
    return None if n > 0 else "no CUDA device"


def pytest_collection_modifyitems(config, items):
    # Exhaustive grids are marked slow: they run only when a -m expression names them (`-m slow`),
    # so the plain CI command keeps to the covering subsets.
    if "slow" not in (config.getoption("markexpr") or ""):
        skip_slow = pytest.mark.skip(reason="slow exhaustive grid: select it with -m slow")
        for item in items:
            if item.get_closest_marker("slow") is not None:
                item.add_marker(skip_slow)
    reason = gpu_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"GPU test: {reason}")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


# A run in which nothing passed proves nothing: fail it (pytest itself already fails when no test
# was collected). `pytest -m gpu` on a CPU-only machine, where every test is skipped, is such a run.
_PASSED = {"n": 0}


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed:
        _PASSED["n"] += 1


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 0 and session.testscollected and _PASSED["n"] == 0:
        session.exitstatus = 1
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line("no test passed (all skipped or deselected): failing the run", red=True)


@pytest.fixture(autouse=True)
def _torch_default_dtype_unchanged():
    """A test that changes torch's default dtype must restore it: a leak silently changes what every
    later test computes in (torch.randn without a dtype)."""
    torch = __import__("sys").modules.get("torch")
    before = torch.get_default_dtype() if torch is not None else None
    yield
    torch = __import__("sys").modules.get("torch")
    if torch is not None and before is not None:
        after = torch.get_default_dtype()
        torch.set_default_dtype(before)
        assert after == before, f"the test left torch's default dtype at {after} (was {before})"
