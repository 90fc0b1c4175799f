"""Throughput of batch_infer's whole pipeline against the bare model forward on the same images.

    python -m bench.bench_batch_infer                              # MedITok-B, 256 px, on GPU if present
    python -m bench.bench_batch_infer --model MedITok-L --num_images 512 --batch_size 32 --num_workers 8

The images are real medical files written once into a temporary folder, in the mix a user would have:
16-bit PNG (1024^2 MR), compressed DICOM (512^2 JPEG 2000 CT), multi-frame colour DICOM (one 480x640
echo frame), NIfTI slices (MNI template), JPEG. "pipeline" = DataLoader reading + windowing/scaling +
resizing + model + atomic .pt writes (batch_infer.infer_items); "model" = infer_batch on the same images
already preprocessed and on the device. Goal: the pipeline costs at most 15 % more time than the model.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from torch.utils.data import DataLoader

import batch_infer
from datasets.image_dataset import ImageDataset
from datasets.metadata import write_metadata
from models.meditok import MEDITOK_CONFIGS, build_meditok
from scripts.cli import ArgumentParser


def make_images(root: Path, n: int) -> list[dict]:
    """n metadata rows cycling over five kinds of real files (each file written once)."""
    import nilearn

    mr = pydicom.dcmread(get_testdata_file("MR2_UNCI.dcm")).pixel_array
    Image.fromarray(mr).save(root / "mr16.png")
    echo = pydicom.dcmread(get_testdata_file("examples_ybr_color.dcm")).pixel_array[0]
    Image.fromarray(echo).save(root / "echo.jpg", quality=90)
    shutil.copy(get_testdata_file("J2K_pixelrep_mismatch.dcm"), root / "ct_j2k.dcm")
    shutil.copy(get_testdata_file("color3d_jpeg_baseline.dcm"), root / "echo_frames.dcm")
    mni = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    shutil.copy(mni, root / "mni.nii.gz")
    kinds = [
        lambda k: {"identifier": "mr16.png"},
        lambda k: {"identifier": "ct_j2k.dcm", "window": "brain"},
        lambda k: {"identifier": "echo_frames.dcm", "slice_index": k % 120},
        lambda k: {"identifier": "mni.nii.gz", "slice_index": 40 + k % 100},
        lambda k: {"identifier": "echo.jpg"},
    ]
    # distinct outputs per row: copies get their own names so no two rows share an output file
    rows = []
    for k in range(n):
        row = kinds[k % len(kinds)](k)
        if "slice_index" not in row:
            src = root / row["identifier"]
            dst = root / f"{k:05d}_{src.name}"
            shutil.copy(src, dst)
            row["identifier"] = dst.name
        rows.append({**row, "label": 0, "_line": k + 2})
    return rows


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_model(model, images: torch.Tensor, args, device) -> float:
    """images/s of infer_batch alone on preprocessed images already on the device."""
    use_bf16 = device.type == "cuda" and args.precision == "bf16"
    sync(device)
    start = time.time()
    for s in range(0, len(images), args.batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            batch_infer.infer_batch(model, images[s:s + args.batch_size], args.infer_type, (-1.0, 1.0))
    sync(device)
    return len(images) / (time.time() - start)


def main(args) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = build_meditok(model_name=args.model, img_size=args.image_size, device=device)  # random weights
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = make_images(root, args.num_images)
        meta = root / "meta.jsonl"
        write_metadata(rows, meta)
        run_args = batch_infer.parse_args([
            "--output_dir", str(root / "out"), "--pretrained_path", "(in memory)", "--meta_path", str(meta),
            "--infer_type", args.infer_type, "--image_size", str(args.image_size), "--batch_size",
            str(args.batch_size), "--num_workers", str(args.num_workers), "--precision", args.precision,
            "--no_progress",
        ])
        ext = ".png" if args.infer_type == "image" else ".pt"
        items = [{"name": batch_infer.output_relpath(r["identifier"], ext=ext).as_posix(), "key": r["identifier"],
                  "stat": None, "row": r} for r in rows]
        options = batch_infer.dataset_options(run_args, args.image_size, model.in_chans)

        # the preprocessed images, read once (also the reading-only throughput)
        ds = ImageDataset(rows, meta_path=meta, image_size=args.image_size, channels=model.in_chans)
        start = time.time()
        loader = DataLoader(ds, batch_size=args.batch_size, num_workers=args.num_workers)
        images = torch.cat([b["image"] for b in loader])
        read_ips = len(images) / (time.time() - start)
        images = images.to(device)

        bare_model(model, images[: args.batch_size], run_args, device)  # warm-up (kernels, allocator)
        results = {"model": [], "pipeline": []}
        for rep in range(args.repeats):
            results["model"].append(bare_model(model, images, run_args, device))
            shutil.rmtree(root / "out", ignore_errors=True)
            state = root / "out" / batch_infer.STATE_DIR
            state.mkdir(parents=True)
            done, failures, elapsed = batch_infer.infer_items(
                model, items, root / "out", state, run_args, device, options, rank=0)
            if failures:
                raise RuntimeError(f"benchmark rows failed: {list(failures.values())[:3]}")
            results["pipeline"].append(len(done) / elapsed)

    best_model, best_pipe = max(results["model"]), max(results["pipeline"])
    print(f"{args.model} ({n_params:.0f}M parameters), {args.image_size}px, infer_type {args.infer_type}, "
          f"batch {args.batch_size}, {args.num_workers} workers, {args.num_images} images, device {device}, "
          f"{torch.get_num_threads()} torch threads; best of {args.repeats}")
    print(f"{'stage':<34}{'images/s':>10}")
    print(f"{'reading + preprocessing only':<34}{read_ips:>10.2f}")
    print(f"{'bare model forward':<34}{best_model:>10.2f}")
    print(f"{'whole pipeline (batch_infer)':<34}{best_pipe:>10.2f}")
    overhead = (best_model / best_pipe - 1) * 100
    print(f"pipeline overhead: {overhead:+.1f} % of the model's time (goal: <= 15 %)")


def parse_args(argv=None):
    parser = ArgumentParser(description="batch_infer.py throughput against the bare model forward.")
    parser.add_argument("--model", default="MedITok-B", choices=list(MEDITOK_CONFIGS), help="tokenizer size (random weights)")
    parser.add_argument("--image_size", type=int, default=256, help="model input side")
    parser.add_argument("--num_images", type=int, default=40, help="images per measurement")
    parser.add_argument("--batch_size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--num_workers", type=int, default=2, help="DataLoader workers of the pipeline")
    parser.add_argument("--infer_type", default="code", choices=batch_infer.INFER_TYPES, help="what to compute")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="autocast on GPU")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=2, help="measurements of each; the best is reported")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
