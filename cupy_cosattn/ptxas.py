"""ptxas' verbose report (-Xptxas=-v): registers, shared memory, spills and stack per kernel entry.

Shared by the NVRTC resource gate (``cupy_cosattn.resources``) and the SASS profiler (``cupy_cosattn.sass``).
"""
from __future__ import annotations

import re

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(log: str) -> dict:
    """{mangled entry name: {regs, smem, stack, spill_st, spill_ld}} from an -Xptxas=-v log."""
    out, cur = {}, None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = out.setdefault(m.group(1), {"regs": 0, "smem": 0, "stack": 0, "spill_st": 0, "spill_ld": 0})
            continue
        if cur is None:
            continue
        m = _PROPS.search(line)
        if m:
            cur["stack"], cur["spill_st"], cur["spill_ld"] = (int(x) for x in m.groups())
            continue
        m = _USED.search(line)
        if m:
            cur["regs"] = int(m.group(1))
            cur["smem"] = int(m.group(2) or 0)
    return out
