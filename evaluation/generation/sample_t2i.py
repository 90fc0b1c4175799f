"""Sample images from a text-to-image GPT for written prompts, and decode them with the MedITok tokenizer.

    torchrun --standalone --nproc_per_node=4 -m evaluation.generation.sample_t2i \
        --gpt-ckpt results/my_t2i/checkpoints/latest.pt --vq-ckpt weights/meditok_simple_v1.pth \
        --prompts prompts.txt --num-per-prompt 8 --sample-dir samples --cfg-scale 2.0

Prompts come from a text file (one per line, blank lines and lines starting with '#' skipped) or from the
`text` column of a metadata file's --test-split rows (one sample per row, as sample_c2i). They are encoded
as in training: with the checkpoint's word vocabulary (built-in encoder), or with the Hugging Face encoder
recorded in the checkpoint (`--text-encoder` overrides where it lives, e.g. a local copy). Sharding,
seeding, skipping of finished images and the run-name convention are sample_c2i's. Output, in
SAMPLE_DIR/<run>/:
    <index>.png       one image per index
    samples.npz       samples [N, H, W, 3] uint8, prompts [N] (text), labels [N] (the rows' labels, -1 if none)
    samples.jsonl     one row per image: identifier (png path), text, label, source row
    grid.png          one row per distinct prompt: the prompt written on the left, its first images beside it
"""
from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from datasets.code_dataset import find_code_metadata
from datasets.files import write_png
from datasets.metadata import read_metadata, whole_number, write_metadata
from datasets.text_features import HFTextEncoder, WordCaptions, caption_of, pad_captions
from evaluation.generation.sample_c2i import decode, rank_share, read_samples, run_id, run_name, save_samples
from models.distributed import barrier, is_dist, setup_distributed
from models.generate import CFG_SCHEDULES, generate
from models.gpt import load_gpt
from models.meditok import build_meditok
from models.text_encoder import WordVocab, words
from scripts.cli import ArgumentParser


# ----------------------------------------------------------------------------------------------
# Prompts and their encoding
# ----------------------------------------------------------------------------------------------
def read_prompts(args) -> tuple[list[str], list[dict] | None]:
    """(one prompt per sample, the metadata rows they came from or None)."""
    if (args.prompts is None) == (args.test_data_path is None):
        raise ValueError("give exactly one of --prompts (a text file) or --test-data-path (metadata with a 'text' column)")
    if args.prompts is not None:
        lines = Path(args.prompts).read_text(encoding="utf-8").splitlines()
        prompts = [p.strip() for p in lines if p.strip() and not p.lstrip().startswith("#")]
        if not prompts:
            raise ValueError(f"{args.prompts}: no prompts (one per line)")
        return [p for p in prompts for _ in range(args.num_per_prompt)], None
    path = find_code_metadata(args.test_data_path)
    rows = read_metadata(path)
    if any(r.get("split") is not None for r in rows):
        wanted = set(args.test_split.split(","))
        rows = [r for r in rows if (r.get("split") or "train") in wanted]
        if not rows:
            raise ValueError(f"{path}: no rows with split in {sorted(wanted)} (see --test-split)")
    if args.num_fid_samples is not None:
        rows = rows[: args.num_fid_samples]
    rows = [r for r in rows for _ in range(args.num_per_prompt)]
    return [caption_of(r, path) for r in rows], rows


class PromptEncoder:
    """Prompts -> (caption [B, T, ...], mask [B, T]) the way the GPT was trained."""

    def __init__(self, gpt, ckpt, args, device):
        saved = ckpt.get("args", {}) if isinstance(ckpt, dict) else {}
        T = gpt.config.cls_token_num
        if gpt.text_encoder is not None:
            if not saved.get("text_vocab"):
                raise ValueError(f"{args.gpt_ckpt}: a built-in text encoder but no word vocabulary in the checkpoint's args")
            self.vocab = WordVocab(saved["text_vocab"])
            self.encode = WordCaptions(self.vocab, T)
            self.what = f"the checkpoint's word vocabulary ({len(self.vocab)} words)"
            return
        self.vocab = None
        manifest = saved.get("text_features_manifest") or {}
        ref = args.text_encoder or manifest.get("encoder")
        max_length = args.max_length or manifest.get("max_length") or T
        if ref is None:
            raise ValueError(f"{args.gpt_ckpt} does not record its text encoder: pass --text-encoder")
        encoder = HFTextEncoder(ref, max_length, device)
        if encoder.dim != gpt.config.caption_dim:
            raise ValueError(f"text encoder {ref} gives {encoder.dim}-d features, the GPT reads {gpt.config.caption_dim}-d")
        self.encode = lambda texts: pad_captions(encoder.encode(texts), T)  # noqa: E731
        self.what = f"{ref} ({encoder.describe()['encoder_class']}, max_length {max_length})"

    def unknown_words(self, prompts: list[str]) -> list[str]:
        if self.vocab is None:
            return []
        return sorted({w for p in prompts for w in words(p) if w not in self.vocab.index})


# ----------------------------------------------------------------------------------------------
# The grid with the prompts written beside the images
# ----------------------------------------------------------------------------------------------
def prompt_grid(images: list[np.ndarray], prompts: list[str], columns: int, max_rows: int = 32) -> np.ndarray:
    """One row per distinct prompt (first appearance order, at most max_rows): the prompt on a
    black panel on the left, then its first `columns` images (black where fewer)."""
    H, W, _ = images[0].shape
    distinct = list(dict.fromkeys(prompts))[:max_rows]
    font = ImageFont.load_default()
    panel = max(3 * W, 240)
    chars = max(12, panel // 7)
    canvas = Image.new("RGB", (panel + columns * W, len(distinct) * H))
    draw = ImageDraw.Draw(canvas)
    for r, prompt in enumerate(distinct):
        lines = textwrap.wrap(prompt, chars)[: max(1, H // 12)]
        draw.multiline_text((4, r * H + 4), "\n".join(lines), fill=(255, 255, 255), font=font, spacing=2)
        mine = [img for img, p in zip(images, prompts) if p == prompt][:columns]
        for j, img in enumerate(mine):
            canvas.paste(Image.fromarray(img), (panel + j * W, r * H))
    return np.asarray(canvas)


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def load_models(args, device):
    vq = build_meditok(args.vq_ckpt, device=device)
    gpt, ckpt = load_gpt(args.gpt_ckpt, prefer_ema=not args.no_ema)
    weights = "ema" if (not args.no_ema and isinstance(ckpt, dict) and "ema" in ckpt) else "model"
    c = gpt.config
    if c.model_type != "t2i":
        raise ValueError(f"{args.gpt_ckpt} is a {c.model_type} model; use sample_c2i.py")
    for ok, msg in (
        (vq.num_codebooks == c.num_codebooks, f"tokenizer has {vq.num_codebooks} codebooks, the GPT {c.num_codebooks}"),
        (vq.codebook_size == c.sub_vocab_size, f"tokenizer codebooks hold {vq.codebook_size} codes, the GPT's {c.sub_vocab_size}"),
        (vq.grid_size ** 2 == c.block_size, f"tokenizer grid {vq.grid_size}x{vq.grid_size} but the GPT generates {c.block_size} positions"),
    ):
        if not ok:
            raise ValueError(f"{args.gpt_ckpt} / {args.vq_ckpt}: {msg}")
    if device.type == "cuda" and args.precision != "none":
        gpt = gpt.to(dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[args.precision])
    return gpt.to(device), vq, weights, ckpt


@torch.no_grad()  # scoped: main() is also called in-process by tests
def main(args):
    rank, world_size, device = setup_distributed()
    gpt, vq, weights, ckpt = load_models(args, device)
    encoder = PromptEncoder(gpt, ckpt, args, device)
    del ckpt
    prompts, rows = read_prompts(args)
    image_size = args.image_size or vq.img_size
    N = len(prompts)
    # Like sample_c2i: the name also holds the count, world size and a hash of the prompts and weights,
    # so a rerun with other prompts never reuses stale PNGs.
    data_id = run_id(prompts, args.prompts, args.test_data_path, args.gpt_ckpt, args.vq_ckpt)
    run_dir = Path(args.sample_dir) / run_name(args, args.gpt_ckpt, args.vq_ckpt, image_size, weights, N, world_size, data_id)
    width = max(6, len(str(N - 1)))
    paths = [run_dir / f"{i:0{width}d}.png" for i in range(N)]
    if rank == 0:
        unknown = encoder.unknown_words(prompts)
        print(f"sampling {N} images for {len(set(prompts))} prompts into {run_dir} ({world_size} processes, "
              f"{weights} weights; prompts encoded with {encoder.what})"
              + (f"; words not seen in training (ignored as <unk>): {unknown}" if unknown else ""), flush=True)

    generator, mine, batches = rank_share(args, N, rank, world_size, device)
    generated = 0
    for batch in tqdm(batches, desc="sampling", disable=rank != 0, dynamic_ncols=True):
        todo = [i for i in batch if not paths[i].exists()]
        if not todo:
            continue
        cond, mask = encoder.encode([prompts[i] for i in batch])
        codes = generate(gpt, cond.to(device), gpt.config.block_size, cfg_scale=args.cfg_scale,
                         cfg_interval=args.cfg_interval, cfg_schedule=args.cfg_schedule, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, generator=generator, compile=args.compile,
                         prepack=False if args.no_prepack else None, cond_mask=mask.to(device))  # [B, K, L]
        for i, image in zip(batch, decode(vq, codes, image_size)):
            if i in todo:
                write_png(image, paths[i])
                generated += 1
    print(f"rank {rank}: generated {generated} images, {len(mine) - generated} already there", flush=True)
    barrier()
    if rank == 0:
        gather_outputs(args, run_dir, paths, prompts, rows)
    barrier()
    if is_dist():
        dist.destroy_process_group()
    return run_dir


def row_label(row: dict | None) -> int:
    try:
        return whole_number(row.get("label")) if row is not None else -1
    except ValueError:
        return -1


def gather_outputs(args, run_dir: Path, paths, prompts, rows) -> None:
    """Rank 0: samples.npz, samples.jsonl and grid.png from the PNGs of all ranks."""
    images = read_samples(paths)
    labels = [row_label(rows[i] if rows else None) for i in range(len(paths))]
    save_samples(run_dir, images, prompts=np.asarray(prompts, dtype=str), labels=np.asarray(labels, dtype=np.int64))
    out_rows = []
    for i, (p, text) in enumerate(zip(paths, prompts)):
        row = {"identifier": p.name, "text": text, "label": labels[i] if labels[i] >= 0 else None, "split": "generated"}
        if rows is not None:
            row["source_identifier"] = rows[i].get("identifier")
        out_rows.append(row)
    write_metadata(out_rows, run_dir / "samples.jsonl")
    write_png(prompt_grid(images, prompts, args.grid_columns), run_dir / "grid.png")
    print(f"wrote {len(images)} samples to {run_dir} (samples.npz, samples.jsonl, grid.png)", flush=True)


def get_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("models")
    g.add_argument("--gpt-ckpt", type=str, required=True, help="text-to-image GPT checkpoint (train_t2i.py)")
    g.add_argument("--no-ema", action="store_true", help="use the trained weights even when the checkpoint has EMA weights")
    g.add_argument("--vq-ckpt", type=str, required=True, help="MedITok tokenizer checkpoint used to decode the codes")
    g.add_argument("--text-encoder", type=str, default=None,
                   help="Hugging Face text encoder (folder or hf://org/repo) for GPTs trained on its features "
                        "(default: the one recorded in the checkpoint)")
    g.add_argument("--max-length", type=int, default=None, help="tokens per prompt for that encoder (default: as in training)")
    g.add_argument("--precision", type=str, default="bf16", choices=["none", "fp16", "bf16"], help="GPT dtype on GPU (CPU runs float32)")
    g.add_argument("--compile", action="store_true", help="torch.compile the per-position decoding step")
    g.add_argument("--no-prepack", action="store_true", help="CPU: do not prepack the GPT's linear weights for oneDNN")

    g = parser.add_argument_group("what to sample")
    g.add_argument("--prompts", type=str, default=None, help="text file with one prompt per line")
    g.add_argument("--test-data-path", "--test_data_path", dest="test_data_path", type=str, default=None,
                   help="metadata file whose rows' 'text' column gives the prompts (one sample per row)")
    g.add_argument("--test-split", type=str, default="test",
                   help="comma-separated splits of --test-data-path to use when it has a split column")
    g.add_argument("--num-fid-samples", type=int, default=None, help="use at most this many test rows")
    g.add_argument("--num-per-prompt", type=int, default=1, help="images per prompt line / per test row")

    g = parser.add_argument_group("sampling")
    g.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale (1 disables guidance)")
    g.add_argument("--cfg-interval", type=float, default=-1, help="guide only the first cfg_interval + 1 positions (-1: all)")
    g.add_argument("--cfg-schedule", type=str, default="constant", choices=CFG_SCHEDULES, help="guidance scale over positions")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely codes (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    g.add_argument("--global-seed", type=int, default=0, help="rank r seeds with global_seed * world_size + r")

    g = parser.add_argument_group("output")
    g.add_argument("--sample-dir", type=str, default="samples", help="samples go to SAMPLE_DIR/<run name from the settings>/")
    g.add_argument("--image-size", type=int, default=None, help="resize samples to this side (default: the tokenizer's)")
    g.add_argument("--per-proc-batch-size", type=int, default=32, help="images generated at once per process")
    g.add_argument("--grid-columns", type=int, default=8, help="images per prompt row in grid.png")
    return parser


if __name__ == "__main__":
    main(get_parser().parse_args())
