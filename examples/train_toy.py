#!/usr/bin/env python3
"""Train a small byte-level cosine-sim attention language model on the Python standard library's source.

    python examples/train_toy.py                        # CPU: 600 steps, a few minutes (see the README)
    python examples/train_toy.py --attn softmax         # the regular-attention baseline
    torchrun --nproc_per_node=2 examples/train_toy.py   # DDP (gloo on the CPU, nccl on GPUs)
    torchrun --nproc_per_node=2 examples/train_toy.py --context-parallel 2   # each sequence over 2 ranks
    python examples/train_toy.py --pack                 # variable-length documents packed, no padding
    python examples/train_toy.py --resume runs/toy-... --steps 1200   # continue that run, in its directory

The text is read at run time from the .py files of this interpreter's standard library (a few MB,
sorted by path, so every run sees the same data), split 90 % / 10 % into train and validation. The
model is byte-level: its tokens, the "characters" it predicts, are the 256 byte values, so losses are
reported in bits per byte. The script shows a progress bar, prints the validation loss in bits/byte
every --val-every steps, prints a generated sample at the end and writes loss.png (the curves) and
checkpoint.pt into --out. On a GPU the model runs the fused CUDA kernels under bfloat16 (or float16)
autocast; on the CPU it runs the torch implementation of the same op in float32.

--pack trains on documents of different lengths instead of fixed windows: each document is a piece
of one source file (a random length up to --seq-len, shorter where the file is), and every step packs
documents into one row of --batch-size x --seq-len tokens with their cu_seqlens: no padding, positions
restart per document, and attention never crosses a document (varlen attention). The run reports the
tokens per second it trained either way.

A run trains for --steps steps, however long that takes on a busy machine, so its learning-rate
schedule always completes. --time-limit SECONDS caps the training time instead; the schedule then
follows whichever of the step count and the time budget is further along, so a capped run still
decays its learning rate before it stops.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import sysconfig
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

try:  # running from a checkout without `pip install -e .`
    import cupy_cosattn  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cupy_cosattn.transformer import CosineSimCausalTransformer

LN2 = math.log(2.0)
MODEL_KEYS = ("dim", "depth", "heads", "seq_len", "attn")
SMOOTH_WINDOW = 20  # steps averaged by the smoothed training curve of loss.png


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each flag's default to its help once; flags whose default is None explain it in words."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
    p.add_argument("--steps", type=int, default=600,
                   help="total optimizer steps; a resumed run continues up to this many")
    p.add_argument("--seq-len", type=int, default=128, help="context length in bytes")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step and process")
    p.add_argument("--attn", choices=("cosine", "softmax"), default="cosine",
                   help="cosine: this package's op; softmax: regular scaled-dot-product attention, the baseline")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default=None,
                   help="output directory (default: the --resume directory, else a new runs/toy-<timestamp>)")
    p.add_argument("--resume", default=None, metavar="PATH",
                   help="continue a run: its directory or its checkpoint.pt (default: start a new run)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialization, the batches and the sample")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (warmup, then cosine decay)")
    p.add_argument("--dim", type=int, default=128, help="model width")
    p.add_argument("--depth", type=int, default=3, help="transformer blocks")
    p.add_argument("--heads", type=int, default=4, help="attention heads (head dim = dim / heads)")
    p.add_argument("--val-every", type=int, default=50, help="validate every this many steps")
    p.add_argument("--time-limit", type=float, default=0.0,
                   help="stop training after this many seconds, decaying the learning rate over that time "
                        "(0: no limit, train all --steps)")
    p.add_argument("--data-mb", type=float, default=4.0, help="megabytes of standard-library source to read")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast dtype; auto = bf16 (fp16 without bf16 support) on a GPU, fp32 on the CPU")
    p.add_argument("--sample-len", type=int, default=256, help="bytes to generate at the end")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads per process (0: the cores divided among this node's processes, "
                        "or 1 when other work already keeps every core busy)")
    p.add_argument("--pack", action="store_true",
                   help="train on variable-length documents (pieces of single source files) packed into one "
                        "row per step with cu_seqlens, without padding")
    p.add_argument("--context-parallel", type=int, default=1, metavar="N",
                   help="shard each sequence over N ranks (ring attention; under torchrun, N divides the world)")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


# ------------------------------------------------------------------------------------------------ data

def stdlib_text(max_bytes: int) -> bytes:
    """Up to max_bytes of this interpreter's standard-library .py sources, in a fixed (sorted) order."""
    return b"".join(stdlib_files(max_bytes))[:max_bytes]


def stdlib_files(max_bytes: int) -> list[bytes]:
    """The standard-library .py sources that stdlib_text joins, one bytes object per file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    top = sorted(root.glob("*.py"))
    rest = sorted(f for f in root.rglob("*.py")
                  if f.parent != root and not ({"site-packages", "dist-packages", "test", "tests"} & set(f.parts)))
    chunks, total = [], 0
    for f in top + rest:
        if total >= max_bytes:
            break
        try:
            b = f.read_bytes()
        except OSError:
            continue
        chunks.append(b)
        total += len(b)
    if total < 10_000:
        raise SystemExit(f"found only {total} bytes of Python source under {root}; is the standard library installed?")
    return chunks


def random_batch(data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, seq_len + 1) byte windows starting at random offsets."""
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=gen)
    idx = starts.unsqueeze(1) + torch.arange(seq_len + 1).unsqueeze(0)
    return data[idx].long()


def file_bounds(files: list[bytes], limit: int) -> list[tuple[int, int]]:
    """(start, end) byte offsets of each file in the joined text, cut at `limit` (the train split)."""
    bounds, at = [], 0
    for f in files:
        start, at = at, at + len(f)
        if min(at, limit) - start >= 2:
            bounds.append((start, min(at, limit)))
        if at >= limit:
            break
    return bounds


def packed_batch(data: torch.Tensor, bounds: list[tuple[int, int]], tokens: int, seq_len: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (1, `tokens`) long, cu_seqlens int32): documents packed into one row without padding.
    Each document is a piece of one file, of a random length in [2, seq_len] (the file's length where
    it is shorter; the last one is cut to fill the row exactly), at a random offset in the file."""
    pieces, lengths, total = [], [], 0
    while total < tokens:
        start, end = bounds[int(torch.randint(len(bounds), (1,), generator=gen))]
        n = min(int(torch.randint(2, seq_len + 1, (1,), generator=gen)), end - start, tokens - total)
        off = start + int(torch.randint(end - start - n + 1, (1,), generator=gen))
        pieces.append(data[off:off + n])
        lengths.append(n)
        total += n
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return torch.cat(pieces).long().unsqueeze(0), cu


def decode(tokens) -> str:
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------- training

def cpu_threads(requested: int, local_world: int) -> int:
    """Torch's intra-op threads for each process: `requested`, or (0) the cores shared among the node's
    processes -- but only 1 when the 1-minute load average already reaches the core count: threads that
    wait for each other at every op's barrier while other work holds the cores make each step several
    times slower than one thread does."""
    if requested > 0:
        return requested
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] >= cores
    except OSError:  # pragma: no cover - no load average on this platform
        busy = False
    return 1 if busy else max(1, cores // max(1, local_world))


def setup_distributed(device_arg: str, threads: int = 0):
    """(rank, world, device); initializes the process group under torchrun and sets the CPU threads."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_arg)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu":  # share the cores between the processes of this node
        torch.set_num_threads(cpu_threads(threads, int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))))
    return rank, world, device


def autocast_dtype(precision: str, device: torch.device):
    if device.type != "cuda" or precision == "fp32":
        return None if precision in ("auto", "fp32") else {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def lr_at(step: int, total: int, peak: float, time_frac: float = 0.0) -> float:
    """Linear warmup over 20 steps (or 10 % of a short run), then cosine decay to 10 % of the peak.

    The decay follows the run's progress: the fraction of the post-warmup steps done, or `time_frac`
    (the fraction of --time-limit used) when that is further along, so that a run stopped by the time
    limit ends at the low learning rate too."""
    warm = max(1, min(20, total // 10))
    if step < warm:
        return peak * (step + 1) / warm
    t = max((step - warm) / max(1, total - warm), time_frac)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, t))))


def trailing_mean(values, window: int):
    """Means of the last `window` values ending at each index from window - 1 on (a trailing moving
    average: every point averages exactly `window` values, so the curve's start is not an expanding mean)."""
    out, acc = [], 0.0
    for i, x in enumerate(values):
        acc += x
        if i >= window:
            acc -= values[i - window]
        if i >= window - 1:
            out.append(acc / window)
    return out


@torch.no_grad()
def validate(model, val: torch.Tensor, args, device, amp) -> float:
    """Mean validation loss in bits per byte over 8 fixed batches."""
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(8):
        x = random_batch(val, args.batch_size, args.seq_len, gen).to(device)
        with amp():
            losses.append(model(x, return_loss=True).item())
    model.train()
    return sum(losses) / len(losses) / LN2


def save_plot(path: Path, history: dict, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    if history["train"]:
        s, loss = zip(*history["train"])
        ax.plot(s, loss, lw=0.8, alpha=0.6, label="train")
        w = min(SMOOTH_WINDOW, len(loss))
        if w > 1:
            ax.plot(s[w - 1:], trailing_mean(loss, w), lw=1.6, label=f"train (trailing {w}-step mean)")
    if history["val"]:
        s, loss = zip(*history["val"])
        ax.plot(s, loss, "o-", lw=1.6, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (bits per byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------- context parallelism (--context-parallel N)

class ContextParallelLoss(torch.nn.Module):
    """The training loss of `model` with each sequence sharded over the ranks of a context-parallel group.

    All ranks of the group train on the group leader's batch: each embeds its zigzag shard of the
    positions (and labels), the layers' attention runs as ring attention over the group, and each rank's
    loss is the mean over its own tokens. The returned value is the group's mean loss (what a single
    process computes for the whole sequence), its gradient that of the rank's own mean: DDP's average
    over the ranks then gives the gradient of the mean loss over every token of every group."""

    def __init__(self, model, group, leader: int, size: int, rank_in_group: int):
        super().__init__()
        from functools import partial

        from cupy_cosattn.torch.ring import ring_cosine_sim_attention

        self.model, self.group, self.leader, self.size, self.rank = model, group, leader, size, rank_in_group
        self.attend = partial(ring_cosine_sim_attention, group=group, layout="zigzag")

    def forward(self, x: torch.Tensor, return_loss: bool = True) -> torch.Tensor:
        from cupy_cosattn.torch.ring import shard_indices

        x = x.contiguous()
        dist.broadcast(x, src=self.leader, group=self.group)
        inputs, labels = x[:, :-1], x[:, 1:]
        pos = shard_indices(inputs.shape[1], self.size, self.rank, "zigzag", device=x.device)
        logits = self.model(inputs.index_select(1, pos), positions=pos, attention_fn=self.attend)
        local = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.index_select(1, pos).reshape(-1))
        mean = local.detach().clone()
        dist.all_reduce(mean, group=self.group)
        return local + (mean / self.size - local).detach()


def context_parallel(model, args, rank: int, world: int, device) -> ContextParallelLoss:
    """--context-parallel N: consecutive groups of N ranks each share one sequence (DDP spans them all)."""
    n = args.context_parallel
    if world % n:
        raise SystemExit(f"--context-parallel {n} must divide the number of processes ({world})")
    if args.seq_len % (2 * n):
        raise SystemExit(f"--seq-len {args.seq_len} must be a multiple of 2 x --context-parallel = {2 * n} "
                         f"(the zigzag layout cuts each sequence into {2 * n} equal chunks)")
    if args.attn != "cosine":
        raise SystemExit("--context-parallel runs cosine attention (ring_cosine_sim_attention)")
    groups = [dist.new_group(list(range(g, g + n))) for g in range(0, world, n)]  # every rank creates every group
    first = rank - rank % n
    return ContextParallelLoss(model, groups[rank // n], first, n, rank - first)


# ----------------------------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device, args.threads)
    main_proc = rank == 0

    def log(msg):
        if main_proc:
            from tqdm import tqdm

            tqdm.write(msg)

    ckpt, out = None, None
    if args.resume:
        path = Path(args.resume)
        if path.is_dir():
            path = path / "checkpoint.pt"
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        for key in MODEL_KEYS:  # the model is the checkpoint's, whatever the flags say
            setattr(args, key, ckpt["args"][key])
        out = path.parent  # a resumed run continues in its own directory unless --out says otherwise
        log(f"resuming from {path} at step {ckpt['step']}")
    if args.out:
        out = Path(args.out)
    elif out is None:
        out = Path("runs") / time.strftime("toy-%Y%m%d-%H%M%S")
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    files = stdlib_files(int(args.data_mb * 1e6))
    text = b"".join(files)[:int(args.data_mb * 1e6)]
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    split = int(0.9 * data.numel())
    train_data, val_data = data[:split], data[split:]
    if args.pack and args.context_parallel > 1:
        raise SystemExit("--pack and --context-parallel do not combine (a packed row is not split across ranks)")
    train_files = file_bounds(files, split) if args.pack else []

    if args.dim % args.heads:
        raise SystemExit(f"--dim {args.dim} must be divisible by --heads {args.heads}")
    model = CosineSimCausalTransformer(
        num_tokens=256, dim=args.dim, depth=args.depth, heads=args.heads, dim_head=args.dim // args.heads,
        max_seq_len=args.seq_len, attn=args.attn, learned_scale=True, attn_scale=10.0, pre_norm=True).to(device)
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    history = {"train": [], "val": []}
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optim.load_state_dict(ckpt["optimizer"])
        history, start = ckpt["history"], ckpt["step"]
    raw_model = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if args.context_parallel > 1:
        model = context_parallel(model, args, rank, world, device)

    amp_dtype = autocast_dtype(args.precision, device)
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else nullcontext
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16 and device.type == "cuda")

    n_params = sum(p.numel() for p in raw_model.parameters())
    log(f"{args.attn} attention, {n_params / 1e6:.2f}M parameters, {len(text) / 1e6:.1f} MB of stdlib source "
        f"({train_data.numel()} train / {val_data.numel()} val bytes), device {device}"
        f"{f' x{world} processes' if world > 1 else ''}, autocast {amp_dtype or 'off'}"
        f"{f', {torch.get_num_threads()} CPU threads' if device.type == 'cpu' else ''}")
    if start == 0 and main_proc:
        v = validate(raw_model, val_data, args, device, amp)
        history["val"].append((0, v))
        log(f"step 0: validation {v:.3f} bits/byte (uniform guess: 8.000)")

    gen = torch.Generator().manual_seed(args.seed * 1000 + rank + 7919 * start)
    from tqdm import tqdm

    bar = tqdm(total=args.steps, initial=start, desc="training", disable=not main_proc, dynamic_ncols=True,
               mininterval=1.0)
    t0 = time.time()
    trained_tokens = 0
    step = start
    model.train()
    time_frac = 0.0  # the fraction of --time-limit used (the same on every process)
    while step < args.steps:
        for group in optim.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, time_frac)
        if args.pack:
            x, cu = packed_batch(data, train_files, args.batch_size * args.seq_len, args.seq_len, gen)
            x, cu = x.to(device, non_blocking=True), cu.to(device, non_blocking=True)
            with amp():
                loss = model(x, cu_seqlens=cu, return_loss=True)
            trained_tokens += x.shape[1]
        else:
            x = random_batch(train_data, args.batch_size, args.seq_len, gen).to(device, non_blocking=True)
            with amp():
                loss = model(x, return_loss=True)
            trained_tokens += args.batch_size * args.seq_len
        optim.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optim)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optim)
        scaler.update()
        step += 1
        bpb = loss.item() / LN2
        history["train"].append((step, bpb))
        bar.update(1)
        bar.set_postfix(loss=f"{bpb:.3f} bits/byte", refresh=False)
        if args.time_limit:
            time_frac = (time.time() - t0) / args.time_limit
            if world > 1:  # every process follows the same schedule and stops at the same step
                frac = torch.tensor([time_frac], dtype=torch.float64, device=device)
                dist.all_reduce(frac, op=dist.ReduceOp.MAX)
                time_frac = float(frac.item())
        out_of_time = time_frac >= 1.0
        last = step == args.steps or out_of_time
        if main_proc and (step % args.val_every == 0 or last):
            v = validate(raw_model, val_data, args, device, amp)
            history["val"].append((step, v))
            log(f"step {step}: train {bpb:.3f}, validation {v:.3f} bits/byte")
        if out_of_time and step < args.steps:
            log(f"time limit of {args.time_limit:g} s reached after {step - start} steps "
                f"(learning rate decayed to {lr_at(step, args.steps, args.lr, time_frac):.2g})")
            break
    bar.close()
    elapsed = time.time() - t0
    done = step

    if main_proc:
        torch.save({"model": raw_model.state_dict(), "optimizer": optim.state_dict(), "step": done,
                    "history": history, "args": vars(args)}, out / "checkpoint.pt")
        save_plot(out / "loss.png", history, f"{args.attn} attention, byte-level Python stdlib")
        first = history["val"][0][1] if history["val"] else float("nan")
        last_v = history["val"][-1][1] if history["val"] else float("nan")
        tok_s = trained_tokens * world / args.context_parallel / max(elapsed, 1e-9)  # sequences, not shards
        log(f"trained {done - start} steps in {elapsed:.0f} s ({tok_s:.0f} "
            f"tokens/s{', packed documents' if args.pack else ''}); validation {first:.3f} -> {last_v:.3f} bits/byte")
        head = bytes(val_data[:100_000].tolist())
        at = head.find(b"\ndef ") + 1  # start the prompt at a function definition (0 if there is none)
        prompt_tokens = val_data[at:at + 48].long().unsqueeze(0).to(device)
        torch.manual_seed(args.seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_gen = time.time()
        with amp():
            sample = raw_model.generate(prompt_tokens, args.sample_len, temperature=0.8, filter_thres=0.9)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_gen = time.time() - t_gen
        log("sample (prompt | generated):\n" + decode(prompt_tokens[0].tolist()) + " | " + decode(sample[0].tolist()))
        log(f"generation: {sample.numel()} tokens in {t_gen:.2f} s ({sample.numel() / max(t_gen, 1e-9):.1f} tokens/s, "
            f"KV cache of {raw_model.max_seq_len} positions)")
        log(f"wrote {out / 'checkpoint.pt'} and {out / 'loss.png'}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
