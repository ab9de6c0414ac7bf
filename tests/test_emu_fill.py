"""Emulator: fresh device memory holds garbage (emulator.set_fill), as recycled pool memory does on a
GPU. The planted fault: an l2norm_fwd that stops writing the padding columns D..DP of its output
(which the attention kernels read) must be caught by the forward tests' checks with the fill on, and
is invisible with it off (fresh pages are zero), which is why the fill is the default."""
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from cupy_cosattn import api
from cupy_cosattn import emulator as emu

import kernel_cases
from planting import plant

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.int32, np.uint8])
def test_fresh_device_arrays_hold_the_fill_byte(dtype):
    a = emu.device_empty((3, 5), dtype)
    assert (a.view(np.uint8) == 0xFF).all()
    if np.dtype(dtype).kind == "f" or dtype is ml_dtypes.bfloat16:
        assert np.isnan(a.astype(np.float32)).all()  # 0xFF bytes are a NaN in every float format
    with emu.fill(0x5A):
        assert (emu.device_empty(7, dtype).view(np.uint8) == 0x5A).all()
    with emu.fill(None):
        assert (emu.device_empty(7, dtype).view(np.uint8) == 0).all()  # as the OS maps it
    assert emu.get_fill() == 0xFF


def test_zeros_and_copies_are_not_filled():
    with emu.fill(0xFF):
        assert (emu.device_zeros((4, 3), np.float32) == 0).all()
        x = np.arange(12, dtype=np.float16).reshape(3, 4)
        np.testing.assert_array_equal(emu.to_device(x), x)
        assert emu.device_empty((), np.float32).shape == () and np.isnan(emu.device_empty((), np.float32))
        assert emu.device_empty(0, np.float32).size == 0


@pytest.mark.parametrize("bad", [-1, 256, 1.5, "0xff", True])
def test_fill_setting_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="set_fill"):
        emu.set_fill(bad)
    assert emu.get_fill() == 0xFF


@pytest.mark.parametrize("value,expect", [("", "255"), ("off", "None"), ("0x5a", "90"), ("7", "7")])
def test_fill_environment_variable(value, expect):
    code = "from cupy_cosattn import emulator; print(emulator.get_fill())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "CUPY_COSATTN_EMU_FILL": value})
    assert r.stdout.strip() == expect, r.stderr


def test_fill_environment_variable_rejects_garbage():
    code = "from cupy_cosattn import emulator"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "CUPY_COSATTN_EMU_FILL": "lots"})
    assert r.returncode != 0 and "CUPY_COSATTN_EMU_FILL" in r.stderr


# The planted fault: l2norm_fwd writes only the first D columns of its padded output.
NORM_STORE = "if (e < p.xhat_cols) y[e] = from_float<T>(v[i]);"
NORM_STORE_NO_PADDING = "if (e < p.D) y[e] = from_float<T>(v[i]);"


@pytest.fixture
def norm_without_padding(monkeypatch):
    """norm.cu with the planted fault, in a scratch copy of the source (the file is untouched)."""
    plant(monkeypatch, "norm.cu", NORM_STORE, NORM_STORE_NO_PADDING)


def _forward_error(dtype):
    # D = 40: the kernels run with DP = 48, so l2norm_fwd owes 8 zero columns per row
    args, kw = kernel_cases.make_case(3, Nq=20, Nk=36, D=40, dtype=dtype)
    out, lse = api.forward(*args, backend="emulator", **kw)
    ref_out, ref_lse = api.forward(*args, backend="reference", **kw)
    return kernel_cases.rel_err(out, ref_out), kernel_cases.rel_err(lse, ref_lse)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_unwritten_norm_padding_is_caught(norm_without_padding, dtype):
    err_out, err_lse = _forward_error(dtype)
    assert not (err_out < 1e-2 and err_lse < 1e-2)  # NaN or garbage reaches the logits
    with emu.fill(None):  # zeroed fresh memory hides the fault
        err_out, err_lse = _forward_error(dtype)
        assert err_out < 1e-2 and err_lse < 1e-2
