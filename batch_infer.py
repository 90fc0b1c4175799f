"""Tokenize every image listed in a metadata file: codes / latents / vectors / reconstructions.

    python batch_infer.py --output_dir out/ --pretrained_path weights/meditok_simple_v1.pth \
        --meta_path data/metadata.jsonl --infer_type latent
    torchrun --nproc_per_node 4 batch_infer.py ...          # rows strided over processes

Outputs (one file per row, mirroring the identifier's relative path under --output_dir; slice rows get
a suffix such as `_z0042`):
    code    [K, h, w] int64 indices (K codebooks, h = w = image_size / downsampling)
    latent  [vocab_width, h, w] float32 quantized latents (the normalised code vectors)
    vector  [embed_dim] float32 image embedding (encode_image, not normalised)
    image   PNG reconstruction
`<output_dir>/<file name of --meta_path>` receives every successful row with `code_identifier` (relative
to --output_dir) filled in; failed rows go to `<output_dir>/failures.jsonl` and the exit status is 1.
Every file is written atomically, and a rerun skips outputs that exist and load, so a run that was
killed and restarted ends exactly as a clean run.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets.image_dataset import ImageDataset
from datasets.metadata import parse_label, read_metadata, write_metadata
from datasets.readers import CT_WINDOWS, FIT_MODES, FORMATS, INTENSITY_MODES, ReadError, parse_axis, parse_index
from datasets.files import atomic_save, atomic_write_bytes, atomic_write_text, png_bytes
from models.checkpoint import load_checkpoint
from models.meditok import build_meditok
from scripts.cli import ArgumentParser

INFER_TYPES = ("code", "latent", "vector", "image")
PARTS_DIR = ".batch_infer_parts"
FAILURES = "failures.jsonl"


# ----------------------------------------------------------------------------------------------
# Output paths
# ----------------------------------------------------------------------------------------------
def strip_image_extension(name: str) -> str:
    """'a.nii.gz' -> 'a'; names without a known image extension (DICOM UIDs like 1.2.840.5) stay whole."""
    lower = name.lower()
    matches = [ext for ext in FORMATS if lower.endswith(ext)]
    return name[: -len(max(matches, key=len))] if matches and len(name) > len(max(matches, key=len)) else name


def output_relpath(identifier: str, slice_index=None, slice_axis=None, ext: str = ".pt") -> PurePosixPath:
    """Relative output path for a row; never escapes the output folder.

    Relative identifiers are mirrored; absolute ones go under `_abs/` (so '/data/a.png' and 'data/a.png'
    stay apart); any '..' component is refused.
    """
    text = str(identifier).replace("\\", "/")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"identifier {identifier!r} contains '..'; outputs must stay inside --output_dir")
    if not parts:
        raise ValueError(f"identifier {identifier!r} names no file")
    if text.startswith("/") or (len(parts[0]) == 2 and parts[0][1] == ":"):  # POSIX root or a drive 'C:'
        parts = ["_abs"] + [p.replace(":", "") for p in parts]
    stem = strip_image_extension(parts[-1])
    index = parse_index(slice_index)
    if index is not None:
        stem += f"_{'zyx'[parse_axis(slice_axis)]}{index:04d}"
    return PurePosixPath(*parts[:-1], stem + ext)


def expected_output(model, infer_type: str, image_size: int) -> tuple[tuple[int, ...], torch.dtype]:
    """(shape, dtype) of one output tensor, derived from the model config."""
    g = model.config.grid_size(image_size)
    if infer_type == "code":
        return (model.num_codebooks, g, g), torch.int64
    if infer_type == "latent":
        return (model.vocab_width, g, g), torch.float32
    if infer_type == "vector":
        return (model.config.embed_dim,), torch.float32
    return (image_size, image_size, model.in_chans), torch.uint8


def output_ok(path: Path, shape, dtype) -> bool:
    """True if `path` exists and holds a complete output of the expected shape (so a rerun may skip it)."""
    if not path.is_file():
        return False
    try:
        if path.suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                return im.size == (shape[1], shape[0])
        t = load_checkpoint(path)
        return isinstance(t, torch.Tensor) and tuple(t.shape) == tuple(shape) and t.dtype == dtype
    except Exception:
        return False


# ----------------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def infer_batch(model, x: torch.Tensor, infer_type: str, input_range: tuple[float, float]) -> torch.Tensor:
    """x [B, C, S, S] in input_range -> per-row outputs on the CPU (see the module docstring)."""
    g = model.config.grid_size(x.shape[-1])
    B = x.shape[0]
    if infer_type == "code":
        return model.img_to_idx(x).reshape(B, model.num_codebooks, g, g).cpu()  # [B, K, h, w]
    if infer_type == "latent":
        q = model.encode_image_vq(x)  # [B, L, vocab_width]
        return q.transpose(1, 2).reshape(B, model.vocab_width, g, g).float().cpu()
    if infer_type == "vector":
        return model.encode_image(x).float().cpu()  # [B, embed_dim]
    rec = model.img_to_reconstructed_img(x).float()  # [B, 3, S, S] in [-1, 1]
    lo, hi = input_range
    rec = ((rec - lo) / (hi - lo)).clamp(0, 1)
    return (rec * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()  # [B, S, S, 3]


def save_output(out: torch.Tensor, path: Path) -> None:
    if path.suffix == ".png":
        atomic_write_bytes(png_bytes(out.numpy()), path)
    else:
        atomic_save(out.clone(), path)  # clone: a view would save the whole batch's storage


def remove_stale_temporaries(output_dir: Path) -> int:
    """Delete temporary files left by a killed run (atomic writes name them .<name>.<random>.tmp)."""
    removed = 0
    for root, _, files in os.walk(output_dir):
        for name in files:
            if name.startswith(".") and name.endswith(".tmp"):
                os.unlink(os.path.join(root, name))
                removed += 1
    return removed


# ----------------------------------------------------------------------------------------------
# Distributed helpers (torchrun): rows strided by rank, rank 0 gathers through files
# ----------------------------------------------------------------------------------------------
def setup_distributed() -> tuple[int, int, int]:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world > 1:
        # gloo only synchronises (barriers); long runs can leave ranks waiting, hence the long timeout
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
    return rank, world, local_rank


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def failure_record(row: dict, reason: str) -> dict:
    rec = {"identifier": row.get("identifier"), "line": row.get("_line"), "reason": reason}
    if row.get("slice_index") is not None:
        rec["slice_index"] = row.get("slice_index")
    return rec


def plan_rows(rows: list[dict], infer_type: str, num_classes: int | None):
    """Per row: (relative output path, None) or (None, failure reason); collisions fail the later row."""
    ext = ".png" if infer_type == "image" else ".pt"
    seen: dict[PurePosixPath, int] = {}
    plans = []
    for i, row in enumerate(rows):
        try:
            rel = output_relpath(row["identifier"], row.get("slice_index"), row.get("slice_axis"), ext)
            if row.get("label") is not None:
                parse_label(row, num_classes)
            if rel in seen and rows[seen[rel]]["identifier"] != row["identifier"]:
                raise ValueError(f"output {rel} collides with line {rows[seen[rel]].get('_line')} "
                                 f"({rows[seen[rel]]['identifier']}); rename one of the files")
            seen.setdefault(rel, i)
            plans.append((rel, None))
        except (ValueError, ReadError) as e:
            plans.append((None, f"{type(e).__name__}: {e}"))
    return plans


def infer_rows(model, rows: list[dict], todo: list[int], plans, output_dir: Path, args, device: torch.device,
               image_size: int, channels: int, desc: str = "") -> tuple[dict, dict, float]:
    """Read, tokenize and save rows[todo]; returns ({row: code_identifier}, {row: failure}, seconds).

    DataLoader workers read and preprocess while the model runs; a small thread pool writes the
    outputs (atomic writes end in fsync, which would otherwise stall the model).
    """
    input_range = (args.model_input_min, args.model_input_max)
    dataset = ImageDataset(
        [rows[i] for i in todo], meta_path=args.meta_path, dataset_dir=args.dataset_dir, image_size=image_size,
        channels=channels, value_range=input_range, window=args.window, intensity=args.intensity,
        fit=args.fit, num_classes=args.num_classes, on_error="report",
    )
    loader = DataLoader(
        dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if args.num_workers > 0 else None,
    )
    use_bf16 = device.type == "cuda" and args.precision == "bf16"
    done: dict[int, str] = {}
    failures: dict[int, dict] = {}
    pending: deque[tuple[int, Future]] = deque()

    def finish_oldest():
        i, future = pending.popleft()
        try:
            future.result()
            done[i] = plans[i][0].as_posix()
        except OSError as e:  # disk full, permissions: that row failed, the run goes on
            failures[i] = failure_record(rows[i], f"could not write {output_dir / plans[i][0]}: {e}")

    bar = tqdm(total=len(todo), desc=desc, unit="img", dynamic_ncols=True, disable=args.no_progress)
    start = time.time()
    with ThreadPoolExecutor(max_workers=4) as writers:
        for batch in loader:
            ok = batch["ok"]
            for j in torch.nonzero(~ok).flatten().tolist():
                i = todo[int(batch["index"][j])]
                failures[i] = failure_record(rows[i], batch["error"][j])
            if ok.any():
                x = batch["image"][ok].to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    out = infer_batch(model, x, args.infer_type, input_range)
                for j, k in enumerate(torch.nonzero(ok).flatten().tolist()):
                    i = todo[int(batch["index"][k])]
                    pending.append((i, writers.submit(save_output, out[j], output_dir / plans[i][0])))
            while len(pending) > 4 * args.batch_size:  # bound the outputs held in memory
                finish_oldest()
            bar.update(len(ok))
        while pending:
            finish_oldest()
    bar.close()
    return done, failures, time.time() - start


def main(args) -> int:
    rank, world, local_rank = setup_distributed()
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    output_dir = Path(args.output_dir)
    out_meta = output_dir / Path(args.meta_path).name
    if out_meta.resolve() == Path(args.meta_path).resolve():
        raise SystemExit(f"--meta_path {args.meta_path} would be overwritten by the output metadata; "
                         "choose another --output_dir")
    output_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        removed = remove_stale_temporaries(output_dir)
        if removed:
            print(f"removed {removed} temporary files left by an interrupted run")
    barrier(world)  # no rank writes before the clean-up is over

    model = build_meditok(args.pretrained_path, img_size=args.image_size, device=device)
    image_size = args.image_size or model.img_size
    channels = args.model_input_channel or model.in_chans
    if channels != model.in_chans:
        raise SystemExit(f"--model_input_channel {channels} but the tokenizer takes {model.in_chans} channels")
    shape, dtype = expected_output(model, args.infer_type, image_size)

    rows = read_metadata(args.meta_path)
    plans = plan_rows(rows, args.infer_type, args.num_classes)
    done: dict[int, str] = {}  # row index -> code_identifier
    failures: dict[int, dict] = {}
    todo: list[int] = []
    mine = range(rank, len(rows), world)
    for i in tqdm(mine, desc="checking existing outputs", disable=rank != 0, leave=False):
        rel, error = plans[i]
        if error is not None:
            failures[i] = failure_record(rows[i], error)
        elif output_ok(output_dir / rel, shape, dtype):
            done[i] = rel.as_posix()
        else:
            todo.append(i)
    if rank == 0:
        print(f"{len(rows)} rows; this process: {len(todo)} to do, {len(done)} already done, "
              f"{len(failures)} refused; {args.infer_type} {tuple(shape)} at {image_size}px on {device}"
              + (f" ({world} processes)" if world > 1 else ""))

    new_done, new_failures, elapsed = infer_rows(
        model, rows, todo, plans, output_dir, args, device, image_size, channels,
        desc=f"{args.infer_type} (rank {rank})" if world > 1 else args.infer_type)
    done.update(new_done)
    failures.update(new_failures)
    if todo:
        print(f"rank {rank}: {len(todo)} images in {elapsed:.1f}s ({len(todo) / max(elapsed, 1e-9):.1f} images/s)")

    # Gather: every rank writes its part; rank 0 writes the metadata and the failures.
    if world > 1:
        atomic_write_text(json.dumps({"done": done, "failures": failures}), output_dir / PARTS_DIR / f"rank{rank}.json")
        barrier(world)
        for r in range(world):
            if r != rank:
                part = json.loads((output_dir / PARTS_DIR / f"rank{r}.json").read_text())
                done.update({int(k): v for k, v in part["done"].items()})
                failures.update({int(k): v for k, v in part["failures"].items()})
        barrier(world)  # everyone has read the parts before rank 0 removes them
    if rank == 0:
        out_rows = [{**rows[i], "code_identifier": done[i]} for i in range(len(rows)) if i in done]
        write_metadata(out_rows, out_meta)
        failures_path = output_dir / FAILURES
        if failures:
            atomic_write_text("".join(json.dumps(failures[i]) + "\n" for i in sorted(failures)), failures_path)
        elif failures_path.exists():
            failures_path.unlink()  # a rerun that fixed everything leaves no stale report
        if world > 1:
            for part in (output_dir / PARTS_DIR).glob("rank*.json"):
                part.unlink()
            (output_dir / PARTS_DIR).rmdir()
        print(f"wrote {len(out_rows)} rows to {out_meta}"
              + (f"; {len(failures)} failed rows listed in {failures_path}" if failures else ""))
    if world > 1:
        dist.destroy_process_group()
    return 1 if failures else 0


def parse_args(argv=None):
    parser = ArgumentParser(description="Tokenize the images of a metadata file with MedITok.")
    io_ = parser.add_argument_group("input / output")
    io_.add_argument("--output_dir", required=True, help="folder for the outputs, the filled metadata and failures.jsonl")
    io_.add_argument("--pretrained_path", required=True, help="tokenizer weights: the released state dict or our checkpoint")
    io_.add_argument("--meta_path", required=True, help="metadata file (.csv, .jsonl or .json) with an identifier column")
    io_.add_argument("--dataset_dir", default=None, help="folder that relative identifiers resolve against "
                     "(default: the row's root_dir, else the metadata file's folder)")
    io_.add_argument("--infer_type", default="code", choices=INFER_TYPES,
                     help="code [K,h,w] int64 | latent [vocab_width,h,w] | vector [embed_dim] | image (PNG reconstruction)")
    model = parser.add_argument_group("model input")
    model.add_argument("--image_size", type=int, default=None, help="side of the square model input (default: the checkpoint's)")
    model.add_argument("--model_input_min", type=float, default=-1.0, help="value that black maps to")
    model.add_argument("--model_input_max", type=float, default=1.0, help="value that white maps to")
    model.add_argument("--model_input_channel", type=int, default=None,
                       help="input channels (default: the tokenizer's; grey images are replicated)")
    model.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="autocast dtype on GPU (CPU runs fp32)")
    pre = parser.add_argument_group("preprocessing")
    pre.add_argument("--window", default=None, help=f"CT window for CT data: a preset ({', '.join(CT_WINDOWS)}) "
                     "or 'level,width' in HU; a row's own 'window' column wins")
    pre.add_argument("--intensity", default="auto", choices=INTENSITY_MODES, help="intensity scaling (see datasets/readers.py)")
    pre.add_argument("--fit", default="pad", choices=FIT_MODES, help="make images square by padding, centre-cropping or stretching")
    pre.add_argument("--num_classes", type=int, default=None, help="rows whose label is outside [0, num_classes) fail")
    run = parser.add_argument_group("run")
    run.add_argument("--batch_size", type=int, default=16, help="images per forward pass")
    run.add_argument("--num_workers", type=int, default=4, help="DataLoader worker processes reading images")
    run.add_argument("--no_progress", action="store_true", help="hide the progress bar (logs)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if not args.model_input_max > args.model_input_min:
        parser.error("--model_input_max must be greater than --model_input_min")
    return args


if __name__ == "__main__":
    sys.exit(main(parse_args()))
