"""The NumPy parameter records (cupy_cosattn/launch/params.py) have the C++ layout of
cuda_src/params.cuh: every field's offset and every struct's size, as the emulator's host compiler
lays them out (g++ with -DCA_EMULATOR and the shim, exactly as the emulator compiles the kernels), and
the same field names in the same order as the header declares them.

NVRTC lays the structs out by the same rules (the CUDA ABI requires host and device layouts of a
kernel argument to agree); where NVRTC is installed, the offsets and sizes it compiles into PTX are
compared too (it needs no GPU).
"""
from __future__ import annotations

import os
import re
import subprocess

import numpy as np
import pytest

from cupy_cosattn import _paths, emulator
from cupy_cosattn.launch import params
from cupy_cosattn.launch.sources import load_source


def _offset_expr(struct: str, field: str) -> str:
    # offsetof on a derived struct is only conditionally supported, so measure on an object
    return (f"(long)(reinterpret_cast<const char*>(&ca_layout_probe_{struct}.{field}) - "
            f"reinterpret_cast<const char*>(&ca_layout_probe_{struct}))")


def _probe_source() -> str:
    lines = ['#include "params.cuh"', "#include <cstdio>", "using namespace ca;"]
    lines += [f"static {s} ca_layout_probe_{s};" for s in params.STRUCTS]
    lines.append("int main() {")
    for s in params.STRUCTS:
        dt = params.record_dtype(s)
        lines.append(f'  std::printf("{s} sizeof %ld\\n", (long)sizeof({s}));')
        for f in dt.names:
            lines.append(f'  std::printf("{s} {f} %ld\\n", {_offset_expr(s, f)});')
    lines.append("  return 0;\n}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def cxx_layout(tmp_path_factory):
    """{(struct, field or 'sizeof'): bytes} as g++ lays them out."""
    d = tmp_path_factory.mktemp("layout")
    src, exe = d / "layout.cpp", d / "layout"
    src.write_text(_probe_source())
    emu_dir = _paths.CUDA_SRC / "emu"
    cmd = [emulator._cxx(), "-std=c++17", "-DCA_EMULATOR", f"-I{emu_dir}", f"-I{_paths.CUDA_SRC}",
           "-include", str(emu_dir / "shim.h"), str(src), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return {(s, f): int(n) for s, f, n in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("struct", list(params.STRUCTS))
def test_record_layout_matches_cxx(struct, cxx_layout):
    dt = params.record_dtype(struct)
    assert dt.itemsize == cxx_layout[(struct, "sizeof")]
    got = {f: dt.fields[f][1] for f in dt.names}
    want = {f: cxx_layout[(struct, f)] for f in dt.names}
    assert got == want


def _declared_fields(struct: str) -> list[str]:
    """Field names of `struct` in params.cuh in declaration order, its base struct's first."""
    text = re.sub(r"//[^\n]*", "", _paths.read_source("params.cuh"))
    m = re.search(rf"struct\s+{struct}\s*(?::\s*(\w+)\s*)?\{{(.*?)\}};", text, re.S)
    assert m, f"struct {struct} not found in params.cuh"
    base, body = m.group(1), m.group(2)
    names = []
    for decl in body.split(";"):
        decl = decl.strip()
        if decl:
            # "int64_t q_sb, q_sh, q_sn" or "const void* q": the names follow the type
            first, *more = [p.strip() for p in decl.split(",")]
            names += [re.split(r"[\s*&]+", first)[-1]] + more
    return (_declared_fields(base) if base else []) + names


@pytest.mark.parametrize("struct", list(params.STRUCTS))
def test_record_fields_are_the_declared_fields(struct):
    """A field added to the header but not to the table (or the reverse) fails here, even where it
    would hide in padding."""
    assert list(params.record_dtype(struct).names) == _declared_fields(struct)


def test_derived_structs_start_with_their_base():
    base = params.record_dtype("AttnParams")
    for name in ("FwdParams", "BwdParams"):
        dt = params.record_dtype(name)
        assert [(f, dt.fields[f][1]) for f in base.names] == [(f, base.fields[f][1]) for f in base.names]
        assert min(dt.fields[f][1] for f in dt.names if f not in base.names) >= base.itemsize


def _offset_expr_of(obj: str, field: str) -> str:
    return f"(long long)(reinterpret_cast<const char*>(&{obj}.{field}) - reinterpret_cast<const char*>(&{obj}))"


def test_layout_under_nvrtc():
    """The same offsets and sizes as NVRTC lays them out for sm_80 (no GPU needed): one tiny kernel per
    field stores the field's offset in its struct parameter, a constant in the PTX, which also
    declares the parameter's size."""
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception as e:  # noqa: BLE001 - no CuPy or no NVRTC library
        if os.environ.get("CUPY_COSATTN_REQUIRE_NVRTC", "") not in ("", "0"):
            raise
        pytest.skip(f"NVRTC not available ({type(e).__name__}: {e})")
    probes = {}
    kernels = []
    for s in params.STRUCTS:
        for f in params.record_dtype(s).names:
            name = f"probe_{s}_{f}"
            probes[name] = (s, f)
            body = f"*o = {_offset_expr_of('p', f)};"
            kernels.append(f'extern "C" __global__ void {name}(ca::{s} p, long long* o) {{ {body} }}')
    code = load_source("params.cuh") + "\n" + "\n".join(kernels) + "\n"
    prog = nvrtc.createProgram(code, "layout.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, ["-arch=compute_80", "-std=c++17", f"-I{_paths.CUDA_SRC}"])
        except Exception as e:  # noqa: BLE001 - NVRTCError: show the log
            pytest.fail(f"{e}\n{nvrtc.getProgramLog(prog)}")
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    seen = 0
    for entry in ptx.split(".entry ")[1:]:
        name = entry.split("(", 1)[0].strip()
        s, f = probes[name]
        dt = params.record_dtype(s)
        size = re.search(rf"{name}_param_0\[(\d+)\]", entry)
        value = re.search(r"(?:mov\.u64\s+%rd\d+, |st\.global\.u64\s+\[%rd\d+\], )(\d+);", entry)
        assert size and value, entry[:800]
        assert int(size.group(1)) == dt.itemsize, (s, "sizeof")
        assert int(value.group(1)) == dt.fields[f][1], (s, f)
        seen += 1
    assert seen == len(probes)


def test_make_record_fills_by_name():
    rec = params.make_record(params.FWD_PARAMS, **{f: i for i, f in enumerate(params.FWD_PARAMS.names)})
    raw = np.frombuffer(rec.tobytes(), dtype=np.uint8)
    off = params.FWD_PARAMS.fields["groups"][1]
    assert int(raw[off:off + 4].view(np.int32)[0]) == params.FWD_PARAMS.names.index("groups")
