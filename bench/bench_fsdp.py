"""Memory per process of DDP vs FSDP for the GPT sizes, and FSDP's training speed relative to DDP.

    python -m bench.bench_fsdp                      # the tables below with their defaults
    python -m bench.bench_fsdp --measure GPT-Tiny:ddp:2 GPT-Tiny:fsdp:2 --speed-model GPT-Tiny --speed-steps 2

1. Training state per process: parameters + gradients + AdamW moments (+ AdamW's step counters), fp32,
   the largest rank's share. "computed" comes from the parameter shapes alone: DDP keeps every tensor
   whole; FSDP2 splits dim 0 of every tensor over the processes (rank 0 holds ceil(rows / N) rows).
   "measured" runs the configuration on N CPU processes (gloo): a real forward/backward/AdamW step
   through models.parallel.wrap_model, then sums the bytes of every parameter, gradient and optimizer
   tensor the process holds (local shards for FSDP). Both must agree where both exist.
   FSDP also holds, while a block runs, that block's gathered weights and gradients, and the root's
   (embeddings and output layers) from forward to backward: "fsdp peak" adds them (computed).
2. Speed: evaluation/generation/train_c2i.py itself (data, schedule, clipping, AdamW) on 2 CPU processes,
   --data-parallel ddp vs fsdp, interleaved runs, best of each, positions/s after the warm-up steps.
"""
from __future__ import annotations

import argparse
import ast
import math
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.bench_train_c2i import make_code_files
from models.gpt import GPT_models, TransformerBlock
from models.parallel import device_mesh, find_blocks, wrap_model
from scripts.cli import ArgumentParser

REPO = Path(__file__).resolve().parents[1]
ADAM_BYTES = 8  # exp_avg + exp_avg_sq, fp32
GIB = 2 ** 30


def build(name: str, args, device="meta"):
    with torch.device(device):
        return GPT_models[name](vocab_size=args.vocab_size, num_codebooks=args.num_codebooks, block_size=args.grid ** 2,
                                num_classes=args.num_classes)


# ----------------------------------------------------------------------------------------------
# Accounting from shapes
# ----------------------------------------------------------------------------------------------
def shard_numel(shape, world_size: int) -> int:
    """Elements of rank 0's dim-0 shard (the largest): ceil(rows / N) rows."""
    if not shape:
        return 1
    return math.ceil(shape[0] / world_size) * math.prod(shape[1:])


def computed_state_bytes(model, mode: str, world_size: int) -> int:
    """Parameters (4 B) + gradients (4 B) + AdamW moments (8 B) per element, + one fp32 step counter per tensor."""
    n = world_size if mode == "fsdp" else 1
    return sum(shard_numel(tuple(p.shape), n) * (4 + 4 + ADAM_BYTES) + 4 for p in model.parameters())


def computed_fsdp_transient(model) -> int:
    """Gathered while running: the root's weights + gradients (embeddings, output layers; forward to
    backward), and two blocks' weights (the running one, the next one prefetched) + one block's gradients."""
    block_params = {id(p) for b in find_blocks(model, (TransformerBlock,)) for p in b.parameters()}
    root = sum(p.numel() for p in model.parameters() if id(p) not in block_params)
    block = max(sum(p.numel() for p in b.parameters()) for b in find_blocks(model, (TransformerBlock,)))
    return 4 * (2 * root + 3 * block)


# ----------------------------------------------------------------------------------------------
# Measured on CPU processes
# ----------------------------------------------------------------------------------------------
def local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _measure_worker(rank, world_size, port, name, mode, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    cpu = torch.device("cpu")
    try:
        # Built on the meta device: with fsdp only this rank's shards are ever allocated.
        model = build(name, args)
        if mode == "fsdp":
            wrap_model(model, mode, cpu, (TransformerBlock,), mesh=device_mesh(mode, cpu))
        model.to_empty(device=cpu)
        with torch.no_grad():
            for p in model.parameters():
                (p.to_local() if hasattr(p, "to_local") else p).normal_(0.0, 0.02)
        # As wrap_model does for ddp (gradients live in DDP's communication buckets, not in a second copy).
        train_model = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True) if mode == "ddp" else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        L = args.grid ** 2
        x = torch.randint(0, args.vocab_size // args.num_codebooks, (1, args.num_codebooks, L))
        y = torch.zeros(1, dtype=torch.long)
        train_model(x[:, :, :-1], y, targets=x)[1].backward()
        opt.step()
        held = sum(local_bytes(p) + local_bytes(p.grad) for p in model.parameters())
        held += sum(local_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
        gathered = [None] * world_size
        dist.all_gather_object(gathered, held)
        if rank == 0:
            torch.save(max(gathered), out)
    finally:
        dist.destroy_process_group()


def measure(name: str, mode: str, world_size: int, args) -> int:
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        out = Path(tmp) / "bytes.pt"
        mp.spawn(_measure_worker, args=(world_size, port, name, mode, args, out), nprocs=world_size)
        return torch.load(out)


# ----------------------------------------------------------------------------------------------
# Speed of train_c2i, ddp vs fsdp
# ----------------------------------------------------------------------------------------------
def train_c2i_positions_per_sec(mode: str, codes: Path, workdir: Path, args) -> float:
    argv = ["--code-dir", str(codes), "--results-dir", str(workdir), "--exp-name", f"speed-{mode}",
            "--gpt-model", args.speed_model, "--vocab-size", str(args.vocab_size), "--num-classes", str(args.num_classes),
            "--global-batch-size", str(args.speed_batch), "--max-steps", str(args.speed_warmup + args.speed_steps),
            "--epochs", "1000", "--timing-warmup-steps", str(args.speed_warmup), "--log-every", "1000000",
            "--no-local-save", "--no-tensorboard", "--no-compile", "--data-parallel", mode]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "evaluation.generation.train_c2i", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"train_c2i --data-parallel {mode} failed:\n{proc.stderr[-3000:]}")
    done = [line for line in (workdir / f"speed-{mode}" / "log.txt").read_text().splitlines() if "] done: " in line][-1]
    return ast.literal_eval(done.split("] done: ", 1)[1])["positions_per_sec"]


# ----------------------------------------------------------------------------------------------
def main(args):
    measured = {}
    for spec in args.measure:
        name, mode, n = spec.split(":")
        measured[(name, mode, int(n))] = measure(name, mode, int(n), args)

    names = list(dict.fromkeys(args.models + [k[0] for k in measured]))
    print(f"\nTraining state per process (fp32 parameters + gradients + AdamW), GiB; vocab {args.vocab_size}, "
          f"{args.num_codebooks} codebooks, {args.grid}x{args.grid} grid. m = measured on CPU processes / c = computed")
    cols = [f"fsdp N={n}" for n in args.world_sizes]
    print(f"| model | parameters | ddp (any N) | {' | '.join(cols)} | fsdp peak N={args.world_sizes[-1]} |")
    print("|---|---|---|" + "---|" * len(cols) + "---|")
    agree = []
    for name in names:
        model = build(name, args)
        n_params = sum(p.numel() for p in model.parameters())

        def cell(mode, n):
            c = computed_state_bytes(model, mode, n)
            m = measured.get((name, mode, n))
            if m is not None:
                agree.append((name, mode, n, m, c))
                return f"{m / GIB:.2f} m / {c / GIB:.2f} c"
            return f"{c / GIB:.2f} c"

        ddp_n = next((n for (nm, md, n) in measured if nm == name and md == "ddp"), 1)
        peak = computed_state_bytes(model, "fsdp", args.world_sizes[-1]) + computed_fsdp_transient(model)
        print(f"| {name} | {n_params / 1e6:.0f}M | {cell('ddp', ddp_n)} | "
              f"{' | '.join(cell('fsdp', n) for n in args.world_sizes)} | {peak / GIB:.2f} c |")
    for name, mode, n, m, c in agree:
        print(f"measured vs computed, {name} {mode} N={n}: {m:,} vs {c:,} bytes ({m / c - 1:+.4%})")

    if args.speed_steps > 0:
        with tempfile.TemporaryDirectory() as tmp:
            codes = make_code_files(Path(tmp), 2 * args.speed_batch, args.num_codebooks, args.grid,
                                    args.vocab_size // args.num_codebooks, args.num_classes)
            best = {"ddp": 0.0, "fsdp": 0.0}
            for _ in range(args.speed_repeats):  # interleaved: a shared machine's speed drifts
                for mode in best:
                    best[mode] = max(best[mode], train_c2i_positions_per_sec(mode, codes, Path(tmp), args))
        print(f"\ntrain_c2i speed, {args.speed_model}, 2 CPU processes x {args.threads} thread(s), global batch "
              f"{args.speed_batch}, {args.speed_steps} timed steps after {args.speed_warmup}, best of {args.speed_repeats}")
        print("| mode | positions/s | relative to ddp |\n|---|---|---|")
        for mode, v in best.items():
            print(f"| {mode} | {v:.0f} | {v / best['ddp']:.1%} |")


if __name__ == "__main__":
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("memory")
    g.add_argument("--models", nargs="+", default=["GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-XXXL"],
                   choices=list(GPT_models), help="sizes of the memory table (computed)")
    g.add_argument("--world-sizes", nargs="+", type=int, default=[2, 4, 8], help="FSDP process counts")
    g.add_argument("--measure", nargs="*", default=["GPT-Small:ddp:2", "GPT-Small:fsdp:2", "GPT-B:ddp:2",
                                                   "GPT-B:fsdp:2", "GPT-B:fsdp:4"],
                   help="MODEL:MODE:N configurations also measured on N CPU processes (mind the machine's memory)")
    g.add_argument("--grid", type=int, default=16, help="code grid side (16 for 256 px MedITok)")
    g.add_argument("--num-codebooks", type=int, default=8, help="codebooks K")
    g.add_argument("--vocab-size", type=int, default=32768, help="total vocabulary over the codebooks")
    g.add_argument("--num-classes", type=int, default=6, help="classes")
    g = parser.add_argument_group("speed")
    g.add_argument("--speed-model", default="GPT-Small", choices=list(GPT_models), help="GPT size timed")
    g.add_argument("--speed-batch", type=int, default=8, help="global batch (2 processes)")
    g.add_argument("--speed-steps", type=int, default=6, help="timed steps per run (0: skip the speed table)")
    g.add_argument("--speed-warmup", type=int, default=2, help="untimed steps first")
    g.add_argument("--speed-repeats", type=int, default=3, help="interleaved ddp/fsdp runs; the best of each is kept")
    g.add_argument("--threads", type=int, default=1, help="threads per process")
    main(parser.parse_args())
