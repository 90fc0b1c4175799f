"""The reference batch of real images in the form the field's FID tools read: an .npz with `arr_0`.

    python -m evaluation.generation.reference_batch --meta data/c2i/metadata.jsonl --split train \
        --codes outputs/codes --out ref_train.npz
    # then, e.g. with the ADM evaluator (openai/guided-diffusion evaluations/evaluator.py):
    #   python evaluator.py ref_train.npz outputs/generation/inference/c2i/<run>/samples.npz
    # or torch-fidelity: fidelity --fid --input1 ... (both read arr_0)

Writes OUT with `arr_0` uint8 [N, H, W, 3] (the ADM evaluator's layout, the same as samples.npz's arr_0)
and `labels` int64 [N], rows in metadata order. Images are preprocessed exactly as the codes were made
when a tokenization manifest is found (`--codes`: the code folder, code metadata or tokenizer.json; or a
tokenizer.json beside --meta): CT window, intensity scaling, fit, and the size (the tokenizer's input size,
which is also the size sample_c2i decodes to). Without a manifest, --image-size is required.
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from datasets.files import atomic_savez, to_uint8
from datasets.metadata import filter_split, parse_label, read_metadata
from evaluation.features import image_loader, manifest_read_options
from scripts.cli import ArgumentParser


def reference_batch(meta, split: str | None = "train", codes=None, image_size: int | None = None,
                    dataset_dir=None, batch_size: int = 64, num_workers: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """(images uint8 [N, H, W, 3], labels int64 [N] (-1 where unlabelled), the preprocessing used)."""
    read_options, manifest = manifest_read_options(codes, meta)
    if image_size is None:
        if manifest is None:
            raise ValueError(f"{meta}: no tokenization manifest found (--codes, or tokenizer.json beside the metadata); "
                             f"pass --image-size")
        image_size = int(manifest["image_size"])
    rows = filter_split(read_metadata(meta), split)
    if not rows:
        raise ValueError(f"{meta}: no rows with split {split!r}")
    images = np.empty((len(rows), image_size, image_size, 3), dtype=np.uint8)  # filled batch by batch
    labels = np.array([parse_label(r, path=meta) if r.get("label") is not None else -1 for r in rows], dtype=np.int64)
    loader = image_loader(rows, meta, dataset_dir, image_size, batch_size, num_workers, **read_options)
    for batch in tqdm(loader, desc="reference images", leave=False):
        images[batch["index"].numpy()] = to_uint8(batch["image"])
    return images, labels, {"image_size": image_size, **read_options,
                            "manifest": None if manifest is None else manifest.get("_path")}


def main(args):
    images, labels, used = reference_batch(args.meta, None if args.split == "all" else args.split, args.codes,
                                           args.image_size, args.dataset_dir, args.batch_size, args.num_workers)
    atomic_savez(args.out, arr_0=images, labels=labels)
    print(f"[reference] wrote {args.out}: arr_0 {images.shape} uint8, labels; preprocessing {used}")


if __name__ == "__main__":
    parser = ArgumentParser(description="Write real images as an .npz reference batch (arr_0 uint8 [N, H, W, 3]).")
    parser.add_argument("--meta", required=True, help="metadata of the real images (csv/jsonl/json)")
    parser.add_argument("--split", default="train", help="rows of this split ('all' for every row)")
    parser.add_argument("--codes", "--manifest", default=None,
                        help="code folder, code metadata or tokenizer.json written by batch_infer.py "
                             "(default: a tokenizer.json beside --meta)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="side of the written images (default: the manifest's image size)")
    parser.add_argument("--dataset_dir", default=None, help="folder that relative identifiers resolve against")
    parser.add_argument("--batch-size", type=int, default=64, help="images read per batch")
    parser.add_argument("--num-workers", type=int, default=0, help="data-loading workers")
    parser.add_argument("--out", required=True, help="output .npz file")
    main(parser.parse_args())
