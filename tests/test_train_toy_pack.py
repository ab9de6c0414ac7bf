"""examples/train_toy.py --pack: documents of different lengths packed into one row per step with
cu_seqlens (no padding), trained through the model's packed forward, with tokens/s reported."""
import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "train_toy.py"
TINY = ["--dim", 32, "--depth", 1, "--heads", 2, "--seq-len", 32, "--batch-size", 4, "--sample-len", 8,
        "--data-mb", 1, "--val-every", 1000]


@pytest.fixture(scope="module")
def toy():
    spec = importlib.util.spec_from_file_location("train_toy_pack", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_packed_batch_is_whole_documents_of_single_files(toy):
    files = [b"a" * 5, b"bb" * 40, b"c" * 3, b"d" * 100]
    data = torch.frombuffer(bytearray(b"".join(files)), dtype=torch.uint8)
    bounds = toy.file_bounds(files, limit=150)  # the train split cuts the last file
    assert bounds == [(0, 5), (5, 85), (85, 88), (88, 150)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        x, cu = toy.packed_batch(data, bounds, 64, 16, gen)
        assert x.shape == (1, 64) and cu.dtype == torch.int32 and int(cu[0]) == 0 and int(cu[-1]) == 64
        lengths = torch.diff(cu)
        assert (lengths >= 1).all() and (lengths <= 16).all()
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            doc = bytes(x[0, a:b].tolist())
            assert len(set(doc)) == 1, doc  # one file's bytes only (each file is one repeated letter)


def test_pack_run_trains_and_reports_tokens_per_second(toy, tmp_path, capsys):
    n = torch.get_num_threads()
    try:
        toy.main(["--pack", "--steps", "12", "--out", str(tmp_path / "run")] + [str(a) for a in TINY])
    finally:
        torch.set_num_threads(n)
    log = capsys.readouterr().out
    assert "tokens/s, packed documents)" in log
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=False)
    train = [v for _, v in ck["history"]["train"]]
    assert len(train) == 12 and train[-1] < train[0]
