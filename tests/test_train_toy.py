"""examples/train_toy.py end to end (train, write, resume, time limit, torchrun), its schedule, help and
loss curve, and a 2-process gloo DDP step of the transformer on the CPU."""
import importlib.util
import math
import os
import re
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "train_toy.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A small model and 1 MB of text keep each run to seconds even on a busy 2-core machine.
SMALL = ["--dim", 64, "--depth", 2, "--heads", 4, "--seq-len", 64, "--batch-size", 8, "--data-mb", 1]


def run_script(args, cwd, timeout=150, launcher=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = (launcher or [sys.executable]) + [str(SCRIPT)] + [str(a) for a in args]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    return out


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def toy():
    """examples/train_toy.py as a module."""
    spec = importlib.util.spec_from_file_location("train_toy", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def keep_torch_threads():
    """main() sets torch's thread count; give the rest of the test session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


TINY = ["--dim", 32, "--depth", 1, "--heads", 2, "--seq-len", 32, "--batch-size", 4, "--sample-len", 8,
        "--data-mb", 1, "--val-every", 1000]


def test_default_run_trains_every_step_however_slow_the_machine(toy, tmp_path, monkeypatch, keep_torch_threads):
    """No time cap by default: with a clock that advances 1000 s per reading (a very busy machine) a run
    still trains all --steps, so its learning-rate schedule completes."""
    assert toy.parse_args([]).time_limit == 0 and toy.parse_args([]).steps == 600
    clock = iter(range(0, 10**9, 1000))
    monkeypatch.setattr(toy.time, "time", lambda: float(next(clock)))
    out = tmp_path / "run"
    toy.main(["--steps", "12", "--out", str(out)] + [str(a) for a in TINY])
    ck = load(out / "checkpoint.pt")
    assert ck["step"] == 12 and len(ck["history"]["train"]) == 12
    # the last step ran near the end of the cosine schedule
    assert ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(toy.lr_at(11, 12, ck["args"]["lr"]))
    assert toy.lr_at(11, 12, 1.0) < 0.2  # decayed from the peak of 1 towards 0.1


def test_lr_schedule(toy):
    peak, total = 2e-3, 600
    assert toy.lr_at(0, total, peak) == pytest.approx(peak / 20)  # warmup
    assert toy.lr_at(19, total, peak) == pytest.approx(peak)
    assert toy.lr_at(total, total, peak) == pytest.approx(0.1 * peak)  # the floor at the last step
    lrs = [toy.lr_at(s, total, peak) for s in range(20, total + 1)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # decays monotonically
    # with a time limit the schedule follows whichever budget is further along
    assert toy.lr_at(100, total, peak, time_frac=1.0) == pytest.approx(0.1 * peak)
    assert toy.lr_at(100, total, peak, time_frac=0.5) == pytest.approx(0.1 * peak + 0.45 * peak)
    assert toy.lr_at(500, total, peak, time_frac=0.01) == toy.lr_at(500, total, peak)


def test_trailing_mean(toy):
    assert toy.trailing_mean([1.0, 2.0, 3.0, 4.0, 5.0], 2) == [1.5, 2.5, 3.5, 4.5]
    assert toy.trailing_mean([4.0, 0.0, 2.0], 3) == [2.0]
    assert toy.trailing_mean([1.0, 2.0], 3) == []
    vals = [math.sin(i) for i in range(50)]
    got = toy.trailing_mean(vals, 7)
    assert len(got) == 44
    for i, m in enumerate(got):  # point i averages exactly values i .. i + 6
        assert m == pytest.approx(sum(vals[i:i + 7]) / 7)


def test_loss_plot_smooths_with_a_trailing_mean(toy, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    lines = []
    real_plot = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **kw: lines.append((a, kw)) or real_plot(self, *a, **kw))
    train = [(s, 8.0 - 0.05 * s + (s % 3)) for s in range(1, 41)]
    toy.save_plot(tmp_path / "loss.png", {"train": train, "val": [(0, 8.0), (40, 6.0)]}, "t")
    assert (tmp_path / "loss.png").read_bytes()[:8] == PNG_MAGIC
    (xs, ys), kw = next((a[:2], kw) for a, kw in lines if "mean" in kw.get("label", ""))
    w = toy.SMOOTH_WINDOW
    assert list(xs) == [s for s, _ in train][w - 1:]  # starts once a full window exists
    assert list(ys) == pytest.approx([sum(x for _, x in train[i - w + 1:i + 1]) / w for i in range(w - 1, 40)])
    assert f"trailing {w}-step mean" in kw["label"]


def test_help_names_every_flag_with_its_meaning_and_default_once(toy):
    parser = toy.build_parser()
    text = parser.format_help()
    options = text[text.index("options:"):]
    blocks = re.split(r"\n  (?=-)", options)[1:]  # one block per flag: "--name META  help ..."
    by_flag = {}
    for b in blocks:
        flag = b.split()[0].rstrip(",")
        by_flag[flag] = " ".join(b.split())
    for action in parser._actions:
        if action.dest == "help":
            continue
        flag = action.option_strings[-1]
        assert options.count(f"\n  {flag}") == 1, flag
        body = by_flag[flag]
        assert action.help and len(action.help) > 8, flag
        assert body.count("default") == 1, body  # shown once, in words or as "(default: X)"
        if action.default is not None:
            assert f"(default: {action.default})" in body, body


def test_resume_continues_in_the_run_directory(tmp_path, toy, monkeypatch, capsys, keep_torch_threads):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    toy.main(["--steps", "6", "--out", str(run)] + [str(a) for a in TINY])
    toy.main(["--resume", str(run), "--steps", "9", "--sample-len", "8", "--data-mb", "1"])
    log = capsys.readouterr().out
    assert f"resuming from {run / 'checkpoint.pt'} at step 6" in log
    ck = load(run / "checkpoint.pt")
    assert ck["step"] == 9 and len(ck["history"]["train"]) == 9
    assert not (tmp_path / "runs").exists()  # no new run directory


def test_train_toy_trains_writes_and_resumes(tmp_path):
    out = tmp_path / "run"
    log = run_script(["--steps", 40, "--out", out, "--sample-len", 64] + SMALL, cwd=tmp_path)
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC
    ck = load(out / "checkpoint.pt")
    assert ck["step"] == 40 and len(ck["history"]["train"]) == 40
    val = [v for _, v in ck["history"]["val"]]
    assert val[0] > 7.5 and val[-1] < val[0] - 2.0, val  # from ~8 bits/byte (uniform) clearly down
    assert "bits/byte" in log and "sample" in log
    assert re.search(r"generation: 64 tokens in [0-9.]+ s \([0-9.]+ tokens/s", log), log[-500:]

    # resume: continues from step 40 with the checkpoint's model and optimizer state
    out2 = tmp_path / "resumed"
    log = run_script(["--resume", out / "checkpoint.pt", "--steps", 50, "--out", out2, "--dim", 999,
                      "--sample-len", 16, "--data-mb", 1], cwd=tmp_path)
    assert "resuming from" in log
    ck2 = load(out2 / "checkpoint.pt")
    assert ck2["step"] == 50 and len(ck2["history"]["train"]) == 50
    assert ck2["args"]["dim"] == ck["args"]["dim"]  # the model is the checkpoint's, not the flag's
    assert ck2["history"]["train"][:40] == ck["history"]["train"]
    assert (out2 / "loss.png").read_bytes()[:8] == PNG_MAGIC


def test_train_toy_time_limit_stops_early_with_the_schedule_decayed(tmp_path, toy):
    out = tmp_path / "run"
    t0 = time.time()
    log = run_script(["--steps", 100000, "--time-limit", 2, "--out", out] + TINY, cwd=tmp_path)
    m = re.search(r"time limit of 2 s reached after (\d+) steps \(learning rate decayed to ([0-9.e-]+)\)", log)
    assert m, log[-2000:]
    ck = load(out / "checkpoint.pt")
    assert 1 <= ck["step"] == int(m.group(1)) < 100000
    # the time budget is spent: the schedule stands at its end, whatever step that happened at
    peak = ck["args"]["lr"]
    assert float(m.group(2)) == pytest.approx(toy.lr_at(ck["step"], 100000, peak, time_frac=1.0), rel=0.01)
    if ck["step"] >= 20:  # past the warmup: the floor of the cosine decay
        assert float(m.group(2)) == pytest.approx(0.1 * peak, rel=0.01)
    assert time.time() - t0 < 60


def test_train_toy_under_torchrun_two_processes(tmp_path):
    out = tmp_path / "ddp"
    log = run_script(["--steps", 6, "--val-every", 3, "--out", out, "--dim", 32, "--depth", 1, "--heads", 2,
                      "--seq-len", 32, "--batch-size", 4, "--sample-len", 8, "--data-mb", 1], cwd=tmp_path,
                     launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])
    assert "x2 processes" in log
    assert log.count("trained 6 steps") == 1  # only rank 0 prints
    assert load(out / "checkpoint.pt")["step"] == 6 and (out / "loss.png").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("precision,dtype", [("bf16", "torch.bfloat16"), ("fp16", "torch.float16")])
def test_train_toy_on_gpu(tmp_path, precision, dtype):
    """The fused kernels in training: bfloat16 autocast, and float16 autocast with the GradScaler (whose
    first steps may be skipped while the scale settles, hence the smaller required drop)."""
    out = tmp_path / precision
    log = run_script(["--device", "cuda", "--precision", precision, "--steps", 20, "--out", out, "--sample-len", 32]
                     + SMALL, cwd=tmp_path, timeout=300)
    assert "device cuda" in log and f"autocast {dtype}" in log, log[-2000:]
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC
    ck = load(out / "checkpoint.pt")
    assert ck["step"] == 20
    val = [v for _, v in ck["history"]["val"]]
    assert len(val) >= 2 and all(v == v for v in val), val  # no NaN
    assert val[0] > 7.5 and val[-1] < val[0] - 1.0, val  # ~8 bits/byte (uniform) clearly down


# ------------------------------------------------------------------------------------- DDP with spawn

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, result_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from cupy_cosattn.transformer import CosineSimCausalTransformer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)  # the same initial weights on every rank
        model = CosineSimCausalTransformer(num_tokens=17, dim=32, max_seq_len=12, depth=2, heads=4, dim_head=8,
                                           learned_scale=True, kv_heads=2)
        batches = [torch.randint(0, 17, (3, 12), generator=torch.Generator().manual_seed(r)) for r in range(world)]
        # what DDP must produce: the mean over ranks of each rank's own gradient
        expected = []
        for b in batches:
            model.zero_grad()
            model(b, return_loss=True).backward()
            expected.append([p.grad.clone() for p in model.parameters()])
        expected = [sum(gs) / world for gs in zip(*expected)]
        model.zero_grad()
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        ddp(batches[rank], return_loss=True).backward()  # each rank its own data
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        torch.save({"grads": grads, "expected": expected, "params": [p.detach().clone() for p in model.parameters()]},
                   os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_process_gloo_step(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    ctx = mp.start_processes(_ddp_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.time() + 120
    try:
        while not ctx.join(timeout=1):
            if time.time() > deadline:
                pytest.fail("DDP workers did not finish within 120 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    r0, r1 = (load(tmp_path / f"rank{r}.pt") for r in range(world))
    for g0, g1, e in zip(r0["grads"], r1["grads"], r0["expected"]):
        torch.testing.assert_close(g0, g1)  # all-reduced
        torch.testing.assert_close(g0, e, rtol=1e-4, atol=1e-6)  # = the average of the ranks' gradients
    for p0, p1 in zip(r0["params"], r1["params"]):
        torch.testing.assert_close(p0, p1, rtol=0, atol=0)  # replicas stay identical after the step
