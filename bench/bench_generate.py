"""Sampling speed of `models.generate`: prints a markdown table of positions/s and s/batch.

    python -m bench.bench_generate                      # the two standard configurations
    python -m bench.bench_generate --models small --modes cached naive --threads 1

"positions/s" counts image positions of all images in the batch (batch * positions / seconds), each
position being K codes. Random weights (speed does not depend on them). Modes:
  cached   generate() with fixed-shape KV caches (torch matrix products)
  compile  generate(compile=True): the per-position step under torch.compile (first call excluded)
  naive    generate_naive(): no caches, the whole prefix is recomputed for every position and codebook,
           as a straightforward implementation would; it gets slower as the prefix grows, so it runs on
           --naive-positions positions, and the other modes are also timed on that many for the ratio.
"""
import argparse
import time

import torch

from models.generate import generate, generate_naive
from models.gpt import GPT_models

# The two configurations of issue 3: a CPU-sized model and the released GPT-B, both with MedITok's
# vocabulary (8 codebooks of 4096) on a 16x16 grid and its 6 classes.
MODELS = {
    "small": dict(name="GPT-Small", kwargs=dict(dim=384, n_layer=6, n_head=6)),
    "gpt-b": dict(name="GPT-B", kwargs=dict()),
}


def build(model_key: str, args) -> torch.nn.Module:
    spec = MODELS[model_key]
    torch.manual_seed(args.seed)
    model = GPT_models[spec["name"]](
        vocab_size=args.vocab_size, num_codebooks=args.num_codebooks, block_size=args.grid * args.grid,
        num_classes=args.num_classes, **spec["kwargs"],
    )
    torch.nn.init.normal_(model.output.linear_head.weight, std=0.02)  # the default init zeroes it
    return model.to(args.device).eval()


def time_one(model, mode: str, positions: int, args) -> float:
    """Seconds for one batch of `positions` positions (after a short warm-up call)."""
    cond = torch.arange(args.batch, device=args.device) % args.num_classes
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    kw = dict(cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              sample_logits=not args.greedy, generator=g)
    if mode == "naive":
        run = lambda n: generate_naive(model, cond, n, **kw)  # noqa: E731
    else:
        extra = {"cached": {}, "compile": dict(compile=True)}[mode]
        run = lambda n: generate(model, cond, n, **kw, **extra)  # noqa: E731
    run(positions if mode == "compile" else min(positions, 4))  # warm-up (compile: the whole length)
    best = float("inf")
    for _ in range(args.repeats):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(positions)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device={args.device} threads={torch.get_num_threads()} batch={args.batch} cfg={args.cfg_scale} "
          f"sampling={'greedy' if args.greedy else f'T={args.temperature} top_k={args.top_k} top_p={args.top_p}'}\n")
    print("| model | mode | positions | s/batch | positions/s | vs naive, same positions |")
    print("|---|---|---:|---:|---:|---:|")
    for key in args.models:
        model = build(key, args)
        label = f"{MODELS[key]['name']} (dim {model.config.dim}, {model.config.n_layer} layers)"
        L = args.grid * args.grid
        full = L if key == "small" else min(L, args.gpt_b_positions)
        short = min(full, args.naive_positions)
        naive_rate = None
        for mode in args.modes:
            # The naive sampler slows down as the prefix grows: it runs on fewer positions, and the
            # ratio column compares each sampler with it on that same number of positions.
            lengths = [short] if mode == "naive" else ([short, full] if "naive" in args.modes and short < full else [full])
            for n in lengths:
                seconds = time_one(model, mode, n, args)
                rate = args.batch * n / seconds
                naive_rate = rate if mode == "naive" else naive_rate
                ratio = f"{rate / naive_rate:.1f}x" if naive_rate and mode != "naive" and n == short else ""
                print(f"| {label} | {mode} | {n} | {seconds:.2f} | {rate:.0f} | {ratio} |", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="configurations to time")
    p.add_argument("--modes", nargs="+", choices=["naive", "cached", "compile"], default=["naive", "cached"],
                   help="samplers to time (put naive first to get the ratio column)")
    p.add_argument("--batch", type=int, default=4, help="images per batch (doubled internally by guidance)")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="classifier-free guidance scale (>1 doubles the batch)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=0, help="top-k filter (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus filter (1.0: off)")
    p.add_argument("--grid", type=int, default=16, help="image grid side: block_size = grid * grid positions")
    p.add_argument("--vocab-size", type=int, default=32768, help="total vocabulary over codebooks")
    p.add_argument("--num-codebooks", type=int, default=8, help="codebooks per position")
    p.add_argument("--num-classes", type=int, default=6, help="class labels")
    p.add_argument("--gpt-b-positions", type=int, default=64, help="positions generated for GPT-B (it is slow on a CPU)")
    p.add_argument("--naive-positions", type=int, default=32, help="positions generated by the naive baseline")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per row; the fastest is reported")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and sampling")
    main(p.parse_args())
