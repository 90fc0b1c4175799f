"""Train the evaluation classifier: a small timm network, from scratch, on the real training images.

Its penultimate features are the `classifier` feature space of the generation / tokenizer metrics, and its
accuracy on generated images is the class-fidelity score. A classifier trained on your own modality sees
the differences that matter there, which an ImageNet network may not; it is only useful when its held-out
accuracy is high, so that accuracy is reported (and stored in the checkpoint).

    python -m evaluation.train_classifier --meta data/demo/metadata.csv --out runs/classifier.pt

Real images are preprocessed as the codes were made when a tokenization manifest is found (`--codes`, or a
tokenizer.json beside --meta), so the classifier sees what the generator learnt from.
Images are read once into memory at --image_size (the datasets this is meant for are small); light
augmentation (small random scale / rotation / shift, brightness and contrast) runs on the batch.
Writes OUT (self-describing checkpoint; load with evaluation.features.load_classifier) and OUT.json.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from datasets.metadata import filter_split, read_metadata
from evaluation.features import (
    build_classifier,
    class_names_of,
    classifier_kwargs,
    load_images,
    manifest_read_options,
    save_classifier,
)
from models.checkpoint import atomic_write_text
from scripts.cli import ArgumentParser


def augment(images: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Random small affine warp and intensity jitter per image; images [B, C, H, W] in [-1, 1]."""
    B = images.shape[0]
    r = lambda lo, hi: torch.rand(B, generator=generator) * (hi - lo) + lo  # noqa: E731
    angle = r(-10, 10) * strength * math.pi / 180
    scale = 1 + r(-0.1, 0.1) * strength
    shift = torch.stack([r(-0.06, 0.06), r(-0.06, 0.06)], dim=1) * strength * 2  # in [-1, 1] grid units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    # Outside the image is background (-1), as in the zero-padded medical images.
    warped = F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    contrast = (1 + r(-0.1, 0.1) * strength).view(B, 1, 1, 1).to(images)
    brightness = (r(-0.1, 0.1) * strength).view(B, 1, 1, 1).to(images)
    return ((warped + 1) * contrast - 1 + brightness).clamp(-1, 1)


@torch.no_grad()
def accuracy(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device) -> float:
    model.eval()
    correct = sum((model(x.to(device)).argmax(1).cpu() == y).sum().item()
                  for x, y in zip(images.split(batch_size), labels.split(batch_size)))
    return correct / max(len(labels), 1)


def train_classifier(train_x, train_y, val_x, val_y, num_classes: int, arch: str = "resnet10t", width: float = 0.5,
                     epochs: int = 30, batch_size: int = 64, lr: float = 2e-3, weight_decay: float = 0.05,
                     augment_strength: float = 1.0, seed: int = 0, device="cpu"):
    """Train from scratch with AdamW and a cosine schedule; returns (model, history of per-epoch dicts)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_classifier(arch, num_classes, width, in_chans=train_x.shape[1]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                    pct_start=0.1)
    history = []
    for epoch in (bar := tqdm(range(epochs), desc="classifier")):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        total = 0.0
        for batch in order.split(batch_size):
            x = train_x[batch]
            if augment_strength > 0:
                x = augment(x, generator, augment_strength)
            loss = F.cross_entropy(model(x.to(device)), train_y[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(batch)
        record = {"epoch": epoch + 1, "train_loss": total / len(train_x)}
        if len(val_x):
            record["val_accuracy"] = accuracy(model, val_x, val_y, batch_size, device)
        history.append(record)
        bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k != "epoch"})
    return model.eval(), history


def main(args):
    meta = Path(args.meta)
    rows = read_metadata(meta)
    class_names = class_names_of(rows, meta)
    train_rows = [r for r in filter_split(rows, args.train_split) if r.get("label") is not None]
    val_rows = [r for r in filter_split(rows, args.val_split) if r.get("label") is not None]
    if not train_rows:
        raise SystemExit(f"{meta}: no labelled rows with split {args.train_split!r}")
    read_options, manifest = manifest_read_options(args.codes, meta)
    read = dict(meta_path=meta, dataset_dir=args.dataset_dir, image_size=args.image_size,
                batch_size=args.batch_size, num_workers=args.num_workers, **read_options)
    train_x, train_y = load_images(train_rows, desc="train images", **read)
    val_x, val_y = load_images(val_rows, desc="val images", **read) if val_rows else (train_x[:0], train_y[:0])
    print(f"[classifier] {len(train_x)} train / {len(val_x)} {args.val_split} images, {len(class_names)} classes, "
          f"{args.image_size} px")

    t0 = time.time()
    model, history = train_classifier(
        train_x, train_y, val_x, val_y, len(class_names), args.arch, args.width, args.epochs, args.batch_size,
        args.lr, args.weight_decay, args.augment, args.seed, args.device)
    result = {
        "train_accuracy": accuracy(model, train_x, train_y, args.batch_size, args.device),
        "val_accuracy": history[-1].get("val_accuracy"),
        "val_split": args.val_split, "num_train": len(train_x), "num_val": len(val_x),
        "seconds": round(time.time() - t0, 1),
    }
    info = {
        "arch": args.arch, "model_kwargs": classifier_kwargs(args.arch, args.width),
        "num_classes": len(class_names), "class_names": class_names, "image_size": args.image_size,
        "in_chans": int(train_x.shape[1]), "args": vars(args), "history": history, **result,
        "manifest": None if manifest is None else manifest.get("_path"), "real_preprocessing": read_options,
    }
    out = Path(args.out)
    save_classifier(model, out, info)
    summary = {k: v for k, v in info.items() if k != "history"} | {"checkpoint": str(out)}
    atomic_write_text(json.dumps(summary, indent=1) + "\n", out.with_suffix(".json"))
    val = "n/a (no held-out rows)" if result["val_accuracy"] is None else f"{result['val_accuracy']:.3f}"
    print(f"[classifier] train accuracy {result['train_accuracy']:.3f}, held-out ({args.val_split}) accuracy {val}; "
          f"wrote {out}")
    if result["val_accuracy"] is not None and result["val_accuracy"] < 0.8:
        print("[classifier] warning: held-out accuracy is low; its features and class-fidelity scores mean little")
    return summary


if __name__ == "__main__":
    parser = ArgumentParser(description="Train the evaluation classifier on real training images.")
    data = parser.add_argument_group("data")
    data.add_argument("--meta", required=True, help="metadata file (csv/jsonl/json) with label and split columns")
    data.add_argument("--dataset_dir", default=None, help="folder that relative identifiers resolve against")
    data.add_argument("--codes", "--manifest", default=None,
                      help="code folder, code metadata or tokenizer.json written by batch_infer.py: images are "
                           "preprocessed as those codes were made (default: a tokenizer.json beside --meta)")
    data.add_argument("--train_split", default="train", help="split used for training")
    data.add_argument("--val_split", default="val", help="held-out split whose accuracy is reported")
    data.add_argument("--image_size", type=int, default=64, help="images are resized (padded) to this square size")
    data.add_argument("--num_workers", type=int, default=0, help="data-loading workers while reading images")
    model = parser.add_argument_group("model")
    model.add_argument("--arch", default="resnet10t", help="timm model name, trained from scratch")
    model.add_argument("--width", type=float, default=0.5, help="width multiplier (timm ResNets only)")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=30, help="passes over the training images")
    opt.add_argument("--batch_size", type=int, default=64, help="images per step")
    opt.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (one-cycle schedule)")
    opt.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay")
    opt.add_argument("--augment", type=float, default=1.0, help="augmentation strength (0 turns it off)")
    opt.add_argument("--seed", type=int, default=0, help="random seed")
    opt.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--classifier_ckpt", dest="out", required=True,
                        help="checkpoint file to write (a .json summary goes next to it); evaluate.py reads it back "
                             "under the same name")
    main(parser.parse_args())
