"""Planted faults: run the package's kernels from a scratch copy of a source with one edit.

    plant(monkeypatch, "backward.cu", "atomicAdd(x, y);", "*x += y;")

The launch layer then compiles the edited text (the file on disk is untouched) in fresh module caches,
so the next launch of any kernel of that source runs the planted fault; monkeypatch undoes it all.
"""
from __future__ import annotations

from cupy_cosattn.launch import devices


def plant(monkeypatch, source: str, old: str, new: str) -> None:
    """Kernels of cuda_src/`source` are compiled with `old` (which must occur exactly once) replaced by `new`."""
    real = devices.load_source

    def load(name: str) -> str:
        text = real(name)
        if name == source:
            assert text.count(old) == 1, f"{source}: the planted fault's original text must occur exactly once: {old!r}"
            text = text.replace(old, new)
        return text

    monkeypatch.setattr(devices, "load_source", load)
    monkeypatch.setattr(devices, "_MODULE_CACHE", {})
    monkeypatch.setattr(devices, "_FUNC_CACHE", {})
