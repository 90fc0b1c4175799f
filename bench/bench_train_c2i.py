"""Training throughput of train_c2i against the bare forward/backward of the same model.

    python -m bench.bench_train_c2i                          # GPT-Small and GPT-B, 16x16 grid, 8 codebooks
    python -m bench.bench_train_c2i --models GPT-Tiny --steps 5

"bare" times only `loss = model(...); loss.backward()` on a fixed batch; "train" is the real script
(train_c2i.main: data loader, learning-rate schedule, clipping, AdamW, logging) on random code files,
timed by the script itself after its warm-up steps. Positions = images x grid positions per second.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from datasets.metadata import write_metadata
from evaluation.generation import train_c2i
from models.gpt import GPT_models
from models.training import autocast_context
from scripts.cli import ArgumentParser


def make_code_files(folder: Path, n: int, num_codebooks: int, grid: int, sub_vocab: int, num_classes: int) -> Path:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        torch.save(torch.randint(0, sub_vocab, (num_codebooks, grid, grid), generator=g), folder / f"{i}.pt")
        rows.append({"identifier": f"{i}.png", "code_identifier": f"{i}.pt", "label": i % num_classes, "split": "train"})
    write_metadata(rows, folder / "codes.jsonl")
    return folder / "codes.jsonl"


def bare_positions_per_sec(args, name: str, device: torch.device) -> float:
    """Forward + backward only, same model settings and micro-batch as the training run."""
    targs = train_c2i.get_parser().parse_args(train_argv(args, name, "unused"))
    torch.manual_seed(0)
    model = train_c2i.build_model(targs, args.num_codebooks, args.grid).to(device).train()
    B, L = args.batch_size, args.grid ** 2
    x = torch.randint(0, args.vocab_size // args.num_codebooks, (B, args.num_codebooks, L), device=device)
    y = torch.randint(0, args.num_classes, (B,), device=device)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with autocast_context(device, targs.mixed_precision):
            _, loss = model(x[:, :, :-1], y, targets=x)
        loss.backward()
        model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.steps * B * L / (time.perf_counter() - t0)


def train_argv(args, name: str, code_dir) -> list[str]:
    argv = ["--code-dir", str(code_dir), "--results-dir", str(args.workdir), "--exp-name", f"bench-{name}",
            "--gpt-model", name, "--vocab-size", str(args.vocab_size), "--num-classes", str(args.num_classes),
            "--global-batch-size", str(args.batch_size), "--max-steps", str(args.warmup + args.steps),
            "--epochs", "1000", "--timing-warmup-steps", str(args.warmup), "--log-every", "1000000",
            "--no-local-save", "--no-tensorboard", "--no-compile"]  # eager, like the bare loop
    if args.ema:
        argv.append("--ema")
    return argv


def main(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        args.workdir = Path(tmp)
        codes = make_code_files(Path(tmp), 2 * args.batch_size, args.num_codebooks, args.grid,
                                args.vocab_size // args.num_codebooks, args.num_classes)
        results = []
        for name in args.models:
            # Interleaved and best-of: this machine's speed drifts by tens of % from minute to minute.
            bare, train = 0.0, 0.0
            for _ in range(args.repeats):
                bare = max(bare, bare_positions_per_sec(args, name, device))
                stats = train_c2i.main(train_c2i.get_parser().parse_args(train_argv(args, name, codes)))
                train = max(train, stats["positions_per_sec"])
            results.append((name, bare, train))

    print(f"\ndevice {device} ({torch.get_num_threads()} threads), batch {args.batch_size}, grid {args.grid}x{args.grid}, "
          f"{args.num_codebooks} codebooks, vocab {args.vocab_size}, {args.steps} timed steps after {args.warmup}"
          f"{', EMA on' if args.ema else ''}, best of {args.repeats} interleaved runs")
    print(f"{'model':<10} {'bare fwd/bwd pos/s':>19} {'train_c2i pos/s':>16} {'ratio':>7}")
    for name, bare, train in results:
        print(f"{name:<10} {bare:>19.0f} {train:>16.0f} {train / bare:>7.1%}")


if __name__ == "__main__":
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("models and data")
    g.add_argument("--models", nargs="+", default=["GPT-Small", "GPT-B"], choices=list(GPT_models), help="GPT sizes to time")
    g.add_argument("--grid", type=int, default=16, help="code grid side (16 for 256 px MedITok)")
    g.add_argument("--num-codebooks", type=int, default=8, help="codebooks K")
    g.add_argument("--vocab-size", type=int, default=32768, help="total vocabulary over the codebooks")
    g.add_argument("--num-classes", type=int, default=6, help="classes")
    g = parser.add_argument_group("timing")
    g.add_argument("--batch-size", type=int, default=4, help="images per step (one process)")
    g.add_argument("--steps", type=int, default=4, help="timed steps")
    g.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    g.add_argument("--repeats", type=int, default=2, help="interleaved bare/train measurements; the best of each is kept")
    g.add_argument("--ema", action="store_true", help="train with EMA (costs one pass over the weights per step)")
    main(parser.parse_args())
