"""Kernel sources: the text of a cuda_src/ file with its project headers inlined, and the compile options.

Project headers (common.cuh, params.cuh) are inlined so that the module cache keys (CuPy hashes the
source text, not the files it includes) change whenever a header does; the emulator shim (emu/...)
stays an include, found through -I.
"""
from __future__ import annotations

import re

from .. import _paths

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)


def load_source(name: str) -> str:
    """Text of cuda_src/<name> with its project-header includes inlined once each (pragma once)."""
    seen = set()

    def expand(fname: str) -> str:
        text = _paths.read_source(fname)

        def repl(m: re.Match) -> str:
            inc = m.group(1)
            if inc.startswith("emu/") or not (_paths.CUDA_SRC / inc).exists():
                return m.group(0)
            if inc in seen:
                return f"// (already included: {inc})"
            seen.add(inc)
            return f"// ---- begin {inc}\n{expand(inc)}\n// ---- end {inc}"

        return _INCLUDE.sub(repl, text.replace("#pragma once", "// #pragma once"))

    seen.add(name)
    return expand(name)


def compile_options() -> tuple[str, ...]:
    """NVRTC / emulator compile options shared by every module."""
    return ("-std=c++17", f"-I{_paths.CUDA_SRC}")
