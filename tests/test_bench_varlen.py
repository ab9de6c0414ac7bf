"""The benchmark's varlen training section (cupy_cosattn/bench/varlen.py) in the CPU smoke mode: its
document lengths, and one run through the command line (packed and padded agree on the real rows)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from cupy_cosattn.bench import cli, varlen  # noqa: E402


@pytest.mark.parametrize("dist", varlen.DISTRIBUTIONS)
def test_doc_lengths_fill_the_batch_within_the_limit(dist):
    lens = varlen.doc_lengths(dist, 10_000, 512, torch.Generator().manual_seed(1))
    assert sum(lens) == 10_000 and min(lens) >= 1 and max(lens) <= 512 and len(lens) > 10


def test_smoke_run_writes_the_section(tmp_path):
    assert cli.main(["--smoke", "--varlen", "only", "--out", str(tmp_path), "--dtypes", "bf16", "--head-dims", "16",
                     "--repeats", "1", "--warmup", "0", "--strict"]) == 0
    text = (tmp_path / "varlen.md").read_text()
    assert "CPU SMOKE" in text
    rows = [line for line in text.splitlines() if line.startswith("| bf16 | 16 |")]
    assert len(rows) == len(varlen.DISTRIBUTIONS)
