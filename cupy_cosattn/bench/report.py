"""Benchmark outputs: the CSV rows, the markdown table, the PNG chart, and the versions line."""
from __future__ import annotations

import csv
import math
import platform
import re
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from .cases import CSV_COLUMNS, IMPLS, MASKS, PASSES, REPO, SDPA_IMPLS, SHORT
from .runner import Row

# --------------------------------------------------------------------------------------------------
# Output


def _fmt(x: Any, nd: int = 5) -> str:
    """A CSV number: `nd` significant digits, empty for None."""
    if x is None:
        return ""
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{nd}g}"
    return str(x)


def _tf(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def row_dict(r: Row, meta: dict) -> dict:
    c = r.case
    return {
        "mode": meta["mode"], "device": meta["device"], "dtype": c.dtype, "D": c.D, "N": c.N, "B": c.B,
        "H": c.H, "mask": c.mask, "impl": r.impl, "pass": r.pass_, "status": r.status,
        "ms": _fmt(r.ms), "ms_min": _fmt(r.ms_min), "ms_max": _fmt(r.ms_max), "repeats": r.repeats,
        "tflops": _fmt(r.tflops), "time_vs_best_sdpa": _fmt(r.time_vs_best_sdpa), "best_sdpa": r.best_sdpa,
        "time_vs_normalize_sdpa": _fmt(r.time_vs_normalize_sdpa),
        "peak_mib": _fmt(r.peak_mib), "cupy_pool_mib": _fmt(r.cupy_pool_mib),
        "first_call_ms": _fmt(r.first_call_ms),
        "rel_err": "" if r.rel_err is None else f"{r.rel_err:.2e}", "check": r.check, "note": r.note,
    }


class CsvSink:
    def __init__(self, path: Path, meta: dict) -> None:
        self.path, self.meta = path, meta
        self.f = open(path, "w", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=CSV_COLUMNS)
        self.w.writeheader()
        self.f.flush()

    def add(self, rows: Iterable[Row]) -> None:
        for r in rows:
            self.w.writerow(row_dict(r, self.meta))
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def write_markdown(path: Path, rows: Sequence[Row], meta: dict, impls: Sequence[str]) -> None:
    smoke = meta["mode"] != "gpu"
    lines = []
    if smoke:
        lines += ["# cupy-cosattn benchmark: CPU SMOKE TEST (not performance)", "",
                  "> **CPU smoke mode**: tiny sizes, CPU torch implementations, wall-clock timers. These numbers "
                  "only show that the benchmark runs end to end; they say nothing about GPU performance.", ""]
    else:
        lines += ["# cupy-cosattn benchmark", ""]
    lines += [f"- date: {meta['date']}", f"- device: {meta['device']}", f"- versions: {meta['versions']}",
              f"- settings: {meta['settings']}",
              "- cells: median ms (TFLOP/s); TFLOP/s counts 4·B·H·N²·D per forward, 2.5× that per backward, "
              "3.5× per forward+backward, half of it for causal; key-padding masks count in full",
              "- `cosattn / best SDPA`: our median time over the fastest SDPA backend's (< 1 = faster), all on "
              "the same pre-normalized q, k; `cosattn / normalize+SDPA`: over the user's alternative with its "
              "normalization cost (F.normalize on q and k, then SDPA with torch's own backend choice); "
              "peak MiB: memory allocated above the inputs during the pass (torch allocator"
              + ("; plus CuPy's pool where it was used" if not smoke else "") + ")", ""]
    notes: dict = {}

    def note_ref(text: str) -> int:
        if text not in notes:
            notes[text] = len(notes) + 1
        return notes[text]

    by_key = {}
    for r in rows:
        by_key.setdefault((r.case, r.pass_), {})[r.impl] = r
    header = ["dtype", "D", "mask", "N", "B×H", "pass"] + list(impls) + \
             ["cosattn / best SDPA", "cosattn / normalize+SDPA", "peak MiB cosattn / best SDPA / unfused"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for (case, p), d in by_key.items():
        cells = [SHORT[case.dtype], str(case.D), case.mask, str(case.N), str(case.B * case.H), p]
        for impl in impls:
            r = d.get(impl)
            if r is None:
                cells.append("")
            elif r.status == "ok":
                cell = f"{r.ms:.3f} ({_tf(r.tflops)})" if r.tflops is not None else f"{r.ms:.3f}"
                if r.check == "FAIL":
                    cell += f" ⚠{note_ref(r.note)}"
                cells.append(cell)
            else:
                label = "n/a" if r.status == "skip" else "**ERROR**"
                cells.append(f"{label}<sup>{note_ref(r.note or r.status)}</sup>")
        ours = d.get("cosattn")
        if ours is not None and ours.time_vs_best_sdpa is not None:
            cells.append(f"{ours.time_vs_best_sdpa:.2f}× ({ours.best_sdpa.replace('sdpa_', '')})")
        else:
            cells.append("")
        cells.append(f"{ours.time_vs_normalize_sdpa:.2f}×"
                     if ours is not None and ours.time_vs_normalize_sdpa is not None else "")
        best = d.get(ours.best_sdpa) if ours is not None and ours.best_sdpa else None
        if best is None:
            sd = [r for r in d.values() if r.impl in SDPA_IMPLS and r.status == "ok" and r.ms]
            best = min(sd, key=lambda r: r.ms) if sd else None
        mem = [d.get("cosattn"), best, d.get("unfused")]
        cells.append(" / ".join("–" if r is None or r.peak_mib is None else f"{r.peak_mib:.0f}" for r in mem))
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"{n}. {text}" for text, n in notes.items()]
    n_err = sum(r.status == "error" for r in rows)
    n_bad = sum(r.check == "FAIL" for r in rows)
    lines += ["", f"{len(rows)} rows: {sum(r.status == 'ok' for r in rows)} ok, "
                  f"{sum(r.status == 'skip' for r in rows)} skipped, {n_err} errors, {n_bad} failed checks.", ""]
    path.write_text("\n".join(lines))


def write_png(path: Path, rows: Sequence[Row], meta: dict, impls: Sequence[str], plot_dtype: str,
              plot_d: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masks = [m for m in MASKS if any(r.case.mask == m for r in rows)] or list(MASKS)
    passes = [p for p in PASSES if any(r.pass_ == p for r in rows)] or list(PASSES)
    fig, axes = plt.subplots(len(passes), len(masks), figsize=(4.2 * len(masks), 3.2 * len(passes)),
                             squeeze=False)
    sel = [r for r in rows if r.case.dtype == plot_dtype and r.case.D == plot_d]
    colors = {impl: f"C{i}" for i, impl in enumerate(IMPLS)}  # the same colour in every panel
    ns = sorted({r.case.N for r in sel})
    for i, p in enumerate(passes):
        for j, m in enumerate(masks):
            ax = axes[i][j]
            for impl in impls:
                pts = sorted((r.case.N, r.tflops) for r in sel
                             if r.pass_ == p and r.case.mask == m and r.impl == impl and r.status == "ok"
                             and r.tflops is not None)
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color=colors[impl],
                            lw=2.2 if impl == "cosattn" else 1.2, label=impl)
            ax.set_xscale("log", base=2)
            if ns:
                ax.set_xticks(ns, [str(n) for n in ns])
                ax.minorticks_off()
            ax.set_title(f"{p}, mask={m}", fontsize=9)
            ax.set_xlabel("N (B·H·N² constant)", fontsize=8)
            ax.set_ylabel("TFLOP/s", fontsize=8)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    title = f"cupy-cosattn vs SDPA: {plot_dtype}, D={plot_d}, {meta['device']}"
    if meta["mode"] != "gpu":
        title = "CPU SMOKE TEST, NOT PERFORMANCE: " + title
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)



def _cupy_distributions(name_versions: Iterable[tuple[Optional[str], str]]) -> list[str]:
    """"name version" of the installed CuPy distributions (cupy, cupy-cuda12x, cupy-cuda13x, ...) among
    (name, version) pairs: not this package (cupy-cosattn / cupy_cosattn), each listed once (a
    distribution visible on two sys.path entries is reported twice by importlib.metadata)."""
    found = set()
    for name, version in name_versions:
        norm = re.sub(r"[-_.]+", "-", (name or "").lower())
        if norm.startswith("cupy") and not norm.startswith("cupy-cosattn"):
            found.add(f"{name} {version}")
    return sorted(found)


def _versions(cuda: bool) -> str:
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    if cuda:
        parts.append(f"CUDA (torch) {torch.version.cuda}")
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        parts.append(f"cuDNN {cudnn}")
    try:
        from importlib import metadata

        parts += _cupy_distributions((d.metadata["Name"], d.version) for d in metadata.distributions())
    except Exception:  # noqa: BLE001
        pass
    try:
        import cupy_cosattn

        parts.append(f"cupy_cosattn {cupy_cosattn.__version__}")
    except Exception:  # noqa: BLE001
        parts.append("cupy_cosattn not importable")
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        if rev:
            parts.append(f"commit {rev}")
    except Exception:  # noqa: BLE001
        pass
    return ", ".join(parts)


