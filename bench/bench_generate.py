"""Sampling speed of `models.generate`: prints a markdown table of positions/s and s/batch.

    python -m bench.bench_generate                      # the two standard configurations
    python -m bench.bench_generate --models small --modes cached naive --threads 1

"positions/s" counts image positions of all images in the batch (batch * positions / seconds), each
position being K codes. Random weights (speed does not depend on them). Modes:
  cached   generate(): KV caches allocated once, and on a CPU the linear weights prepacked for oneDNN
  unpacked generate(prepack=False): the same without prepacking (plain torch matrix products)
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
from scripts.cli import ArgumentParser

# The two configurations of issue 3: a CPU-sized model and the released GPT-B, both with MedITok's
# vocabulary (8 codebooks of 4096) on a 16x16 grid and its 6 classes.
OFFICIAL_RATE = 46  # positions/s of the released sampler, GPT-Small configuration, 2-core AVX2 CPU (issue 3)
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


def make_runner(model, mode: str, args):
    """A function n -> seconds to generate one batch of n positions with `mode`."""
    cond = torch.arange(args.batch, device=args.device) % args.num_classes
    kw = dict(cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              sample_logits=not args.greedy)
    extra = {"naive": {}, "unpacked": dict(prepack=False), "cached": {}, "compile": dict(compile=True)}[mode]
    sampler = generate_naive if mode == "naive" else generate

    def run(n: int) -> float:
        g = torch.Generator(device=args.device).manual_seed(args.seed)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sampler(model, cond, n, generator=g, **kw, **extra)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return run


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device={args.device} threads={torch.get_num_threads()} batch={args.batch} cfg={args.cfg_scale} "
          f"sampling={'greedy' if args.greedy else f'T={args.temperature} top_k={args.top_k} top_p={args.top_p}'} "
          f"repeats={args.repeats} (interleaved, fastest kept)\n")
    print("| model | mode | positions | s/batch | positions/s | vs naive, same positions | vs unpacked, same positions |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for key in args.models:
        model = build(key, args)
        label = f"{MODELS[key]['name']} (dim {model.config.dim}, {model.config.n_layer} layers)"
        L = args.grid * args.grid
        full = L if key == "small" else min(L, args.gpt_b_positions)
        short = min(full, args.naive_positions)
        # The naive sampler slows down as the prefix grows: it runs on fewer positions, and the
        # ratio columns compare the samplers on that same number of positions.
        rows = []
        for mode in args.modes:
            lengths = [short] if mode == "naive" else ([short, full] if "naive" in args.modes and short < full else [full])
            rows += [(mode, n) for n in lengths]
        runners = {mode: make_runner(model, mode, args) for mode in args.modes}
        for mode, run in runners.items():
            run(full if mode == "compile" else min(full, 4))  # warm-up (compile: the whole length)
        best = {row: float("inf") for row in rows}
        for _ in range(args.repeats):  # interleaved: a slow minute of the machine hits every mode alike
            for mode, n in rows:
                best[mode, n] = min(best[mode, n], runners[mode](n))
        rate = {row: args.batch * row[1] / seconds for row, seconds in best.items()}
        for mode, n in rows:
            vs = [f"{rate[mode, n] / rate[base, n]:.1f}x" if (base, n) in rate and mode not in (base, "naive") else ""
                  for base in ("naive", "unpacked")]
            print(f"| {label} | {mode} | {n} | {best[mode, n]:.2f} | {rate[mode, n]:.0f} | {vs[0]} | {vs[1]} |", flush=True)
    if "small" in args.models and args.grid == 16 and args.batch == 4:
        print(f"\nThe released sampler needs 19-27 s per batch for the GPT-Small configuration on a 2-core AVX2 CPU "
              f"(about {OFFICIAL_RATE} positions/s, issue 3): compare its positions/s column with that.")


if __name__ == "__main__":
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="configurations to time")
    p.add_argument("--modes", nargs="+", choices=["naive", "unpacked", "cached", "compile"],
                   default=["naive", "unpacked", "cached"], help="samplers to time")
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
