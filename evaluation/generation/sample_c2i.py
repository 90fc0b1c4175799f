"""Sample class-conditional images from a trained GPT and decode them with the MedITok tokenizer.

    torchrun --standalone --nproc_per_node=4 -m evaluation.generation.sample_c2i \
        --gpt-ckpt results/run/checkpoints/latest.pt --vq-ckpt weights/meditok_simple_v1.pth \
        --test-data-path data/test.jsonl --sample-dir samples --cfg-scale 1.5

The released command line works as is (`--gpt_ckpt ... --vq_ckpt ... --test_data_path ...`: every flag
in both spellings, scripts/cli.py). Labels come from the rows of --test-data-path (one image per row, as
the released sampler) or from --num-per-class. Each rank seeds its own generator
(global_seed * world_size + rank) and takes a strided share of the indices; images already on disk
are skipped. Output, in SAMPLE_DIR/<run>/:
    <class>/<index>.png    one image per index
    input/<class>/<index>.png   with --copy-input: the test rows' own codes, decoded
    samples.npz            samples [N, H, W, 3] uint8 and labels [N], in index order; arr_0 = samples (the
                           key of the ADM evaluator / torch-fidelity; reference batch: evaluation.generation.reference_batch)
    samples.jsonl          one row per image: identifier (png path), label, label_name, source row
    grid.png               one row per class
<run> names the checkpoint, the weights used, the tokenizer and every sampling setting, plus the sample
count N, the number of processes and a short hash of the labels, the test metadata (path, size, mtime)
and the two weight files (path, size, mtime): a rerun with other test rows, another process count or a
retrained checkpoint writes a new folder instead of reusing stale PNGs.

Class folders are named after the `label_name` column, else the checkpoint's label names, else the
released six modality names (six classes) or class_<k>. Names are made safe for a folder: characters
other than letters, digits and `. + -` become `_`, leading and trailing dots and `_` go (so `..` cannot climb out), an empty
result becomes class_<k>, and two classes that end up with one name get their label appended.

The tokenizer must be the one that made the codes: when the test metadata or the codes the GPT was
trained on carry a tokenization manifest (tokenizer.json), a --vq-ckpt with other weights is refused
unless --allow-tokenizer-mismatch.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from datasets.code_dataset import find_code_metadata, load_codes
from datasets.files import atomic_savez, to_uint8, write_png
from datasets.manifest import check_tokenizer, read_manifest
from datasets.metadata import parse_label, read_metadata, write_metadata
from models.checkpoint import is_hub_reference, is_state_dict, load_checkpoint, resolve_weights
from models.distributed import barrier, is_dist, setup_distributed
from models.generate import CFG_SCHEDULES, generate
from models.gpt import GPT_SIZES, GPT_models, VQTokenEmbedder, load_gpt, load_vq_embedding
from models.meditok import build_meditok
from scripts.cli import ArgumentParser

# The released sampler's class names for its six-modality MedMNIST task.
MODALITY_NAMES = ("microscopy", "ultrasound", "x-ray", "dermoscopy", "histopathology", "fundus-photography")


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def folder_name(name, k: int) -> str:
    """A class name made safe as one folder name (see the module docstring)."""
    safe = re.sub(r"[^\w.+-]+", "_", str(name)).strip("._")
    return safe or f"class_{k}"


def class_names(num_classes: int, *sources: dict) -> list[str]:
    """Folder name of each class: the first source (e.g. label_name column, checkpoint) that names it,
    else the official modality names when there are six classes, else class_<k>. Unique and safe."""
    names = []
    for k in range(num_classes):
        name = next((s[k] for s in sources if s and k in s), None)
        if name is None:
            name = MODALITY_NAMES[k] if num_classes == len(MODALITY_NAMES) else f"class_{k}"
        names.append(folder_name(name, k))
    taken = [n.lower() for n in names]  # case-insensitive file systems count too
    return [f"{n}_{k}" if taken.count(n.lower()) > 1 else n for k, n in enumerate(names)]


def sample_labels(args, num_classes: int):
    """(labels [N], source rows or None, {label: label_name} from the rows)."""
    if args.num_per_class is not None:
        if args.test_data_path is not None:
            raise ValueError("give either --test-data-path (one sample per row) or --num-per-class, not both")
        labels = [c for c in range(num_classes) for _ in range(args.num_per_class)]
        return labels, None, {}
    if args.test_data_path is None:
        raise ValueError("give --test-data-path (one sample per row) or --num-per-class")
    args.test_data_path = str(find_code_metadata(args.test_data_path))  # a file, or a folder holding one
    rows = read_metadata(args.test_data_path, required=("label",))
    if any(r.get("split") is not None for r in rows):
        wanted = set(args.test_split.split(","))
        rows = [r for r in rows if (r.get("split") or "train") in wanted]
        if not rows:
            raise ValueError(f"{args.test_data_path}: no rows with split in {sorted(wanted)} (see --test-split)")
    if args.num_fid_samples is not None:
        rows = rows[: args.num_fid_samples]
    labels = [parse_label(r, num_classes, args.test_data_path) for r in rows]
    names = {}
    for r, label in zip(rows, labels):
        if r.get("label_name") is not None:
            names.setdefault(label, str(r["label_name"]))
    return labels, rows, names


def _file_id(path) -> list:
    p = (resolve_weights(path) if is_hub_reference(path) else Path(path)).resolve()  # hf://: the cached file
    st = p.stat()
    return [str(p), st.st_size, st.st_mtime_ns]


def rank_share(args, N: int, rank: int, world_size: int, device):
    """DiT-style sharding: rank r takes indices r, r + world, ... in batches, with its own seed.
    Returns (generator, this rank's indices, its batches)."""
    seed = args.global_seed * world_size + rank
    torch.manual_seed(seed)
    generator = torch.Generator(device).manual_seed(seed)
    mine = list(range(rank, N, world_size))
    batches = [mine[i:i + args.per_proc_batch_size] for i in range(0, len(mine), args.per_proc_batch_size)]
    return generator, mine, batches


def run_id(labels: list[int], *files) -> str:
    """Short hash of the labels and of the files' identities (path, size, mtime): what the PNGs depend on
    beyond the settings spelled out in the run name."""
    data = json.dumps([labels, [_file_id(f) for f in files if f is not None]])
    return hashlib.sha256(data.encode()).hexdigest()[:10]


def run_name(args, gpt_path: str, vq_path: str, image_size: int, weights: str, num_samples: int | None = None,
             world_size: int | None = None, data_id: str | None = None) -> str:
    stem = lambda p: Path(p).stem  # noqa: E731
    ckpt = f"{Path(gpt_path).parent.parent.name}-{stem(gpt_path)}" if Path(gpt_path).parent.name == "checkpoints" else stem(gpt_path)
    interval = f"-interval{args.cfg_interval:g}" if args.cfg_interval >= 0 else ""
    out_size = f"-out{args.output_size}" if getattr(args, "output_size", None) else ""
    name = (f"{ckpt}-{weights}-{stem(vq_path)}-size{image_size}{out_size}-cfg{args.cfg_scale:g}-{args.cfg_schedule}"
            f"{interval}-topk{args.top_k}-topp{args.top_p:g}-temp{args.temperature:g}-seed{args.global_seed}")
    if num_samples is not None:
        name += f"-n{num_samples}-ws{world_size}-{data_id}"
    return name


@torch.no_grad()
def decode(vq, codes: torch.Tensor, size: int | None = None) -> np.ndarray:
    """codes [B, K, L] -> uint8 images [B, H, W, 3], bicubically resized to size x size when given."""
    images = vq.idx_to_img(codes.to(next(vq.parameters()).device))
    if size and (images.shape[-1] != size or images.shape[-2] != size):
        images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False)
    return to_uint8(images)


def make_grid(images: np.ndarray, labels: list[int], columns: int) -> np.ndarray:
    """One row per class present (ascending label), its first `columns` images, black where fewer.
    images [N, H, W, 3] uint8."""
    H, W = images.shape[1:3]
    classes = sorted(set(labels))
    grid = np.zeros((len(classes) * H, columns * W, 3), dtype=np.uint8)
    for r, c in enumerate(classes):
        mine = [i for i, lab in enumerate(labels) if lab == c][:columns]
        for j, i in enumerate(mine):
            grid[r * H:(r + 1) * H, j * W:(j + 1) * W] = images[i]
    return grid


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
def check_codes_tokenizer(args, ckpt) -> None:
    """Refuse a --vq-ckpt whose weights differ from the ones that made the codes: those of the test rows
    and those the GPT was trained on (its checkpoint records --code-dir), when a manifest says so."""
    sources = [args.test_data_path]
    saved = ckpt.get("args") if isinstance(ckpt, dict) else None
    if isinstance(saved, dict) and saved.get("code_dir"):
        sources.append(saved["code_dir"])
    for source in sources:
        if source is None or not Path(source).exists():
            continue
        manifest = read_manifest(source)
        if manifest is not None:
            check_tokenizer(manifest, args.vq_ckpt, allow_mismatch=args.allow_tokenizer_mismatch)


def check_vq_embedding(args, gpt) -> None:
    """--vq-embed-path: the GPT must embed its tokens through the tokenizer; the weights in the GPT
    checkpoint are used (as the released sampler, which loads the checkpoint over them)."""
    emb = gpt.tok_embeddings
    if not isinstance(emb, VQTokenEmbedder):
        raise ValueError(f"--vq-embed-path {args.vq_embed_path}: {args.gpt_ckpt} embeds its tokens with one table "
                         f"per codebook, not through a tokenizer; drop the flag")
    part, _ = load_vq_embedding(args.vq_embed_path)
    mine = {f"quantizer.{k}": v for k, v in emb.quantizer.state_dict().items()}
    mine.update({f"post_quant_proj.{k}": v for k, v in emb.post_quant_proj.state_dict().items()})
    differ = [k for k in mine if k not in part or part[k].shape != mine[k].shape
              or not torch.equal(part[k].to(mine[k]), mine[k])]
    if differ:
        print(f"note: the tokenizer part inside {args.gpt_ckpt} differs from {args.vq_embed_path} in {len(differ)} "
              f"tensors (e.g. {differ[0]}); the checkpoint's own weights are used", flush=True)


def load_models(args, device):
    """(gpt, vq, which weights, raw checkpoint). The GPT is rebuilt from its checkpoint's config when it
    has one, else from the shapes of its weights (the released layout)."""
    vq = build_meditok(args.vq_ckpt, img_size=args.image_size, device=device)
    ckpt = load_checkpoint(args.gpt_ckpt)
    if args.from_fsdp and not is_state_dict(ckpt):
        raise ValueError(f"--from-fsdp: {args.gpt_ckpt} is not a plain state dict (top-level keys "
                         f"{sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__})")
    has_config = isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict)
    overrides = {}
    if not has_config:
        # The released layout: shapes give most of the config; the grid comes from the tokenizer and
        # the condition positions (not visible in shapes) from --cls-token-num.
        overrides["block_size"] = vq.grid_size ** 2
        if args.cls_token_num is not None:
            overrides["cls_token_num"] = args.cls_token_num
        if args.gpt_model is not None:
            overrides["n_head"] = GPT_SIZES[args.gpt_model]["n_head"]
    elif args.gpt_model is not None and ckpt.get("gpt_model") not in (None, args.gpt_model):
        raise ValueError(f"{args.gpt_ckpt} holds a {ckpt['gpt_model']}, not the --gpt-model {args.gpt_model}")
    weights = "ema" if (not args.no_ema and isinstance(ckpt, dict) and "ema" in ckpt) else "model"
    check_codes_tokenizer(args, ckpt)
    del ckpt
    gpt, ckpt = load_gpt(args.gpt_ckpt, prefer_ema=not args.no_ema, **overrides)
    c = gpt.config
    sub_width = vq.vocab_width // vq.num_codebooks
    checks = [
        (c.model_type == "c2i", f"a {c.model_type} GPT: use evaluation/generation/sample_t2i.py"),
        (args.num_classes is None or args.num_classes == c.num_classes, f"--num-classes {args.num_classes} but the GPT has {c.num_classes} classes"),
        (args.codebook_size is None or args.codebook_size == c.vocab_size,
         f"--codebook-size {args.codebook_size} (the total vocabulary, as released) but the GPT's is {c.vocab_size}"),
        (args.num_codebooks is None or args.num_codebooks == c.num_codebooks, f"--num-codebooks {args.num_codebooks} but the GPT has {c.num_codebooks}"),
        (args.num_output_layer is None or args.num_output_layer == c.n_output_layer,
         f"--num-output-layer {args.num_output_layer} but the GPT's head has {c.n_output_layer} blocks"),
        (args.cls_token_num is None or args.cls_token_num == c.cls_token_num,
         f"--cls-token-num {args.cls_token_num} but the GPT was trained with {c.cls_token_num}"),
        (args.codebook_embed_dim is None or args.codebook_embed_dim == sub_width,
         f"--codebook-embed-dim {args.codebook_embed_dim} but the tokenizer's codebooks hold {sub_width}-d codes"),
        (args.downsample_size is None or args.downsample_size == vq.config.downsample,
         f"--downsample-size {args.downsample_size} but the tokenizer downsamples by {vq.config.downsample}"),
        (vq.num_codebooks == c.num_codebooks, f"tokenizer has {vq.num_codebooks} codebooks, the GPT {c.num_codebooks}"),
        (vq.codebook_size == c.sub_vocab_size, f"tokenizer codebooks hold {vq.codebook_size} codes, the GPT's {c.sub_vocab_size}"),
        (vq.grid_size ** 2 == c.block_size,
         f"tokenizer grid {vq.grid_size}x{vq.grid_size} (image size {vq.img_size}) but the GPT generates {c.block_size} positions"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(f"{args.gpt_ckpt} / {args.vq_ckpt}: {msg}")
    if args.vq_embed_path is not None:
        check_vq_embedding(args, gpt)
    if args.compile and isinstance(gpt.tok_embeddings, VQTokenEmbedder):
        raise ValueError("--compile: a GPT that embeds its tokens through the tokenizer re-reads the growing prefix "
                         "at every position (its projection is causal), which torch.compile cannot keep in one graph; "
                         "sample it without --compile")
    if device.type == "cuda" and args.precision != "none":
        gpt = gpt.to(dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[args.precision])
    elif args.precision != "none":
        print(f"note: --precision {args.precision} applies on a GPU; this CPU run samples in float32", flush=True)
    return gpt.to(device), vq, weights, ckpt


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
@torch.no_grad()  # scoped, not torch.set_grad_enabled(False): main() is also called in-process by tests
def main(args):
    if args.gpt_type != "c2i":
        raise ValueError(f"--gpt-type {args.gpt_type}: this sampler is class-to-image; text-to-image sampling is "
                         f"evaluation/generation/sample_t2i.py")
    if args.image_size_eval is not None:
        raise ValueError("--image-size-eval: the released sampler parses it but never uses it; the samples "
                         "come out at --image-size (the tokenizer's input size) or --output-size")
    rank, world_size, device = setup_distributed()
    gpt, vq, weights, ckpt = load_models(args, device)
    num_classes = gpt.config.num_classes
    labels, rows, row_names = sample_labels(args, num_classes)
    ckpt_names = ckpt.get("label_names", {}) if isinstance(ckpt, dict) else {}
    names = class_names(num_classes, row_names, ckpt_names)
    del ckpt
    N = len(labels)
    data_id = run_id(labels, args.test_data_path, args.gpt_ckpt, args.vq_ckpt)
    name = run_name(args, args.gpt_ckpt, args.vq_ckpt, vq.img_size, weights, N, world_size, data_id)
    run_dir = Path(args.sample_dir) / name
    width = max(6, len(str(N - 1)))
    paths = [run_dir / names[lab] / f"{i:0{width}d}.png" for i, lab in enumerate(labels)]
    if rank == 0:
        print(f"sampling {N} images of {num_classes} classes into {run_dir} ({world_size} processes, {weights} weights)", flush=True)

    generator, mine, batches = rank_share(args, N, rank, world_size, device)
    generated = 0
    for batch in tqdm(batches, desc="sampling", disable=rank != 0, dynamic_ncols=True):
        todo = [i for i in batch if not paths[i].exists()]
        if not todo:
            continue
        cond = torch.tensor([labels[i] for i in batch], device=device)
        codes = generate(gpt, cond, gpt.config.block_size, cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval,
                         cfg_schedule=args.cfg_schedule, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, generator=generator, compile=args.compile,
                         prepack=False if args.no_prepack else None)  # [B, K, L]
        for i, image in zip(batch, decode(vq, codes, args.output_size)):
            if i in todo:
                write_png(image, paths[i])
                generated += 1
    if args.copy_input and rows is not None:
        copy_inputs(args, run_dir, rows, labels, names, vq, rank, world_size, device)
    print(f"rank {rank}: generated {generated} images, {len(mine) - generated} already there", flush=True)
    barrier()

    if rank == 0:
        gather_outputs(args, run_dir, paths, labels, names, rows)
    barrier()
    if is_dist():
        dist.destroy_process_group()
    return run_dir


def copy_inputs(args, run_dir: Path, rows, labels, names, vq, rank, world_size, device):
    """Decode the test rows' own codes to RUN_DIR/input/<class>/<index>.png (reference images)."""
    width = max(6, len(str(len(rows) - 1)))
    for i in range(rank, len(rows), world_size):
        path = run_dir / "input" / names[labels[i]] / f"{i:0{width}d}.png"
        if path.exists():
            continue
        codes = load_codes([rows[i]], args.test_data_path, device=device, progress=False, tokenizer=vq)
        write_png(decode(vq, codes, args.output_size)[0], path)


def read_samples(paths) -> np.ndarray:
    """Every rank's PNGs -> one preallocated uint8 array [N, H, W, 3] (never a list of copies)."""
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} samples are missing after sampling, e.g. {missing[:3]}")
    samples = None
    for i, p in enumerate(tqdm(paths, desc="gathering", leave=False)):
        with Image.open(p) as im:
            image = np.asarray(im.convert("RGB"))
        if samples is None:
            samples = np.empty((len(paths), *image.shape), dtype=np.uint8)
        if image.shape != samples.shape[1:]:
            raise RuntimeError(f"{p}: {image.shape} but the first sample is {samples.shape[1:]}; delete the stray file")
        samples[i] = image
    return samples


def save_samples(run_dir: Path, samples: np.ndarray, **arrays: np.ndarray) -> None:
    """samples.npz streamed to disk; arr_0 holds the same images under the key the ADM evaluator and
    torch-fidelity read (stored twice on disk)."""
    atomic_savez(run_dir / "samples.npz", samples=samples, arr_0=samples, **arrays)


def gather_outputs(args, run_dir: Path, paths, labels, names, rows) -> None:
    """Rank 0: samples.npz, samples.jsonl and grid.png from the PNGs of all ranks."""
    samples = read_samples(paths)
    save_samples(run_dir, samples, labels=np.asarray(labels, dtype=np.int64))
    out_rows = []
    for i, (p, lab) in enumerate(zip(paths, labels)):
        row = {"identifier": str(p.relative_to(run_dir)), "label": lab, "label_name": names[lab], "split": "generated"}
        if rows is not None:
            row["source_identifier"] = rows[i].get("identifier")
        out_rows.append(row)
    write_metadata(out_rows, run_dir / "samples.jsonl")
    write_png(make_grid(samples, labels, args.grid_columns), run_dir / "grid.png")
    print(f"wrote {len(paths)} samples to {run_dir} (samples.npz, samples.jsonl, grid.png)", flush=True)


def get_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("models")
    g.add_argument("--gpt-ckpt", type=str, required=True, help="GPT checkpoint: ours (config inside) or the released GPT-B")
    g.add_argument("--gpt-model", type=str, choices=list(GPT_models), default=None,
                   help="GPT size; checked against our checkpoints, gives n_head for checkpoints without a config")
    g.add_argument("--gpt-type", type=str, choices=["c2i", "t2i"], default="c2i",
                   help="conditioning type: class-to-image here (t2i is refused: use sample_t2i.py)")
    g.add_argument("--from-fsdp", action="store_true",
                   help="the checkpoint is a plain state dict (checked; plain state dicts are also found without it)")
    g.add_argument("--no-ema", action="store_true", help="use the trained weights even when the checkpoint has EMA weights")
    g.add_argument("--cls-token-num", type=int, default=None,
                   help="condition positions: sets it for checkpoints without a config (default 1), checked otherwise")
    g.add_argument("--num-output-layer", type=int, default=None, help="if given, checked against the GPT's head depth")
    g.add_argument("--num-classes", type=int, default=None, help="if given, checked against the GPT")
    g.add_argument("--codebook-size", type=int, default=None,
                   help="the total vocabulary over all codebooks (the released meaning); if given, checked against the GPT")
    g.add_argument("--codebook-embed-dim", type=int, default=None,
                   help="width of one codebook's code vectors; if given, checked against the tokenizer")
    g.add_argument("--num-codebooks", type=int, default=None, help="if given, checked against the GPT and the tokenizer")
    g.add_argument("--vq-ckpt", type=str, required=True, help="MedITok tokenizer checkpoint used to decode the codes")
    g.add_argument("--vq-embed-path", type=str, default=None,
                   help="the tokenizer whose quantizer + post_quant_proj embed the GPT's tokens (the released variant); "
                        "the GPT checkpoint holds those weights, so this only checks that it is such a GPT")
    g.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="sample even when --vq-ckpt differs from the tokenizer recorded in the codes' manifest")
    g.add_argument("--image-size", type=int, default=None,
                   help="the tokenizer's input size (grid = image size / downsampling; default: the size stored "
                        "in the tokenizer checkpoint, 256 for the released one); samples come out at this size")
    g.add_argument("--image-size-eval", type=int, default=None, help=argparse.SUPPRESS)  # released, unused: refused
    g.add_argument("--downsample-size", type=int, default=None, help="if given, checked against the tokenizer")
    g.add_argument("--precision", type=str, default="bf16", choices=["none", "fp16", "bf16"], help="GPT dtype on GPU (CPU runs float32)")
    g.add_argument("--compile", action="store_true", help="torch.compile the per-position decoding step")
    g.add_argument("--no-prepack", action="store_true",
                   help="CPU: do not prepack the GPT's linear weights for oneDNN (saves a copy of them; slower)")

    g = parser.add_argument_group("what to sample")
    g.add_argument("--test-data-path", type=str, default=None,
                   help="metadata file (or folder holding one): one sample per row, with that row's label (the released behaviour)")
    g.add_argument("--test-split", type=str, default="test",
                   help="comma-separated splits of --test-data-path to use when it has a split column")
    g.add_argument("--num-per-class", type=int, default=None, help="instead of test rows: this many samples of every class")
    g.add_argument("--num-fid-samples", type=int, default=None, help="use at most this many test rows")
    g.add_argument("--copy-input", action="store_true", help="also decode the test rows' own codes to RUN_DIR/input/")

    g = parser.add_argument_group("sampling")
    g.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale (1 disables guidance)")
    g.add_argument("--cfg-interval", type=float, default=-1, help="guide only the first cfg_interval + 1 positions (-1: all)")
    g.add_argument("--cfg-schedule", type=str, default="constant", choices=CFG_SCHEDULES, help="guidance scale over positions")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely codes (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    g.add_argument("--global-seed", type=int, default=0, help="rank r seeds with global_seed * world_size + r")

    g = parser.add_argument_group("output")
    g.add_argument("--sample-dir", type=str, default=os.path.join("outputs", "generation", "inference", "c2i"),
                   help="samples go to SAMPLE_DIR/<run name from the settings>/")
    g.add_argument("--output-size", type=int, default=None,
                   help="resize the decoded samples to this side (bicubic); default: as decoded (--image-size)")
    g.add_argument("--per-proc-batch-size", type=int, default=32, help="images generated at once per process")
    g.add_argument("--grid-columns", type=int, default=8, help="images per class row in grid.png")
    return parser


if __name__ == "__main__":
    main(get_parser().parse_args())
