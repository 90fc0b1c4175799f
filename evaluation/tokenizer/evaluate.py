"""Reconstruction quality of a MedITok tokenizer: PSNR, SSIM and rFID, overall and per class / modality.

    python -m evaluation.tokenizer.evaluate --meta data/demo/metadata.csv --tokenizer_ckpt runs/tok.pt \
        --split val --out runs/eval_tokenizer

Each image goes through encode -> quantize -> decode (`img_to_reconstructed_img`) at the tokenizer's size,
read with the preprocessing the codes were made with when a tokenization manifest is found (`--codes`, or
a tokenizer.json beside --meta: CT window, intensity scaling, fit). PSNR and SSIM (`evaluation.metrics`:
PSNR = 10 log10(range^2 / MSE), SSIM on images mapped to [0, 1]) are computed per image, the reconstruction
clamped to the valid range, and averaged. rFID is the Frechet distance between the features of the originals and of
their reconstructions in the chosen feature space (default: the tokenizer's own encoder).
Writes OUT/tokenizer_metrics.{json,md}, OUT/tokenizer_per_class.png and OUT/tokenizer_worst.png (the images
with the lowest PSNR: original, reconstruction, absolute error).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from datasets.metadata import filter_split, read_metadata
from evaluation import metrics
from evaluation.features import (
    SPACES,
    FeatureExtractor,
    build_extractor,
    class_names_of,
    image_loader,
    manifest_read_options,
    plot_image_rows,
    plot_per_class,
    to_uint8,
    write_report,
)
from scripts.cli import ArgumentParser

MIN_CLASS_RFID = 10  # fewer images per class give a Frechet distance that is mostly small-sample noise


class OwnEncoder(FeatureExtractor):
    """The evaluated tokenizer's own encoder as the feature space (no second model to load)."""

    name = "meditok"

    def __init__(self, tokenizer):
        super().__init__()
        self.model, self.image_size, self.dim = tokenizer, int(tokenizer.img_size), int(tokenizer.config.width)

    def features(self, x):
        return self.model.forward_features(x)  # [B, width]


def load_tokenizer(tokenizer, device):
    """A MedITok from a checkpoint path, or the given model moved to `device`."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from models.meditok import build_meditok

        return build_meditok(tokenizer, device=device)
    return tokenizer.to(device)


def _mean(values) -> float | None:
    return float(np.mean(values)) if len(values) else None


@torch.no_grad()
def evaluate_tokenizer(meta, tokenizer, split: str | None = "val", dataset_dir=None, feature_space: str | None = "meditok",
                       classifier_ckpt=None, inception_weights=None, meditok_ckpt=None, batch_size: int = 16,
                       num_workers: int = 0, max_images: int | None = None, worst_k: int = 8, device="cpu",
                       out=None, codes=None) -> dict:
    """Reconstruction metrics of `tokenizer` (a checkpoint path or a MedITok) on the `split` rows of `meta`.

    feature_space: one of SPACES or None (no rFID). For "meditok" without `meditok_ckpt` the evaluated
    tokenizer's own encoder is used. Real images are preprocessed by the manifest of `codes` (or the one
    beside `meta`) when there is one. Returns a dict (recon_psnr_db, recon_ssim, rfid, per_class, worst, ...);
    with `out`, also writes the JSON / Markdown report and the plots there.
    """
    meta = Path(meta)
    read_options, manifest = manifest_read_options(codes, meta)
    if manifest is not None:
        pre = manifest["preprocessing"]
        if (pre["model_input_min"], pre["model_input_max"]) != (-1.0, 1.0):
            raise ValueError(f"{manifest['_path']}: the codes were made with model inputs in "
                             f"[{pre['model_input_min']}, {pre['model_input_max']}]; this evaluation feeds the "
                             f"tokenizer [-1, 1] images")
    all_rows = read_metadata(meta)
    rows = filter_split(all_rows, split)[:max_images]
    if not rows:
        raise ValueError(f"{meta}: no rows with split {split!r}")
    has_labels = all(r.get("label") is not None for r in rows)
    class_names = class_names_of(all_rows, meta) if has_labels else ["all"]
    model = load_tokenizer(tokenizer, device).eval()
    extractor = None
    if feature_space == "meditok" and meditok_ckpt is None:
        extractor = OwnEncoder(model)
    elif feature_space is not None:
        extractor = build_extractor(feature_space, classifier_ckpt, inception_weights, meditok_ckpt, device)

    psnr, ssim, labels, feats_real, feats_rec = [], [], [], [], []
    worst: list[tuple[float, int, np.ndarray, np.ndarray]] = []  # (psnr, row position, original, reconstruction)
    loader = image_loader(rows, meta, dataset_dir, model.img_size, batch_size, num_workers, **read_options)
    for batch in tqdm(loader, desc="reconstructing"):
        x = batch["image"].to(device)  # [B, 3, S, S] in [-1, 1]
        rec = model.img_to_reconstructed_img(x).float()
        p = metrics.psnr(rec, x, (-1, 1))  # [B]
        s = metrics.ssim(rec, x, (-1, 1))  # [B]
        psnr += p.cpu().tolist()
        ssim += s.cpu().tolist()
        labels += batch["label"].tolist() if has_labels else [0] * len(x)
        if extractor is not None:
            feats_real.append(extractor(x).cpu())
            feats_rec.append(extractor(rec).cpu())
        # keep only the worst_k so far, as uint8, so memory does not grow with the dataset
        originals, recs = to_uint8(x), to_uint8(rec)
        worst += [(p[i].item(), int(batch["index"][i]), originals[i], recs[i]) for i in range(len(x))]
        worst = sorted(worst, key=lambda w: w[0])[:worst_k]

    psnr_a, ssim_a, labels_a = np.array(psnr), np.array(ssim), np.array(labels)
    real = torch.cat(feats_real).numpy() if feats_real else None
    recon = torch.cat(feats_rec).numpy() if feats_rec else None
    per_class = {}
    for c, name in enumerate(class_names):
        mask = labels_a == c
        if not mask.any():
            continue
        entry = {"count": int(mask.sum()), "psnr_db": _mean(psnr_a[mask]), "ssim": _mean(ssim_a[mask]), "rfid": None}
        if real is not None and mask.sum() >= MIN_CLASS_RFID:
            entry["rfid"] = metrics.fid(real[mask], recon[mask])
        per_class[name] = entry
    result = {
        "meta": str(meta), "split": split,
        "tokenizer": str(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else None,
        "img_size": int(model.img_size), "num_images": len(psnr),
        "manifest": None if manifest is None else manifest.get("_path"), "real_preprocessing": read_options,
        "recon_psnr_db": _mean(psnr_a), "recon_ssim": _mean(ssim_a),
        "feature_space": None if extractor is None else extractor.name,
        "rfid": metrics.fid(real, recon) if real is not None and len(real) >= 2 else None,
        "per_class": per_class,
        "worst": [{"identifier": rows[i]["identifier"], "label_name": class_names[labels_a[i]] if has_labels else None,
                   "psnr_db": p} for p, i, _, _ in worst],
    }
    if out is not None:
        write_outputs(result, worst, out)
    return result


def markdown_of(result: dict) -> str:
    fmt = lambda v, f=".3f": "n/a" if v is None else format(v, f)  # noqa: E731
    lines = [
        "# Tokenizer reconstruction", "",
        f"{result['num_images']} images (split `{result['split']}` of `{result['meta']}`) at {result['img_size']} px.", "",
        f"- PSNR: **{fmt(result['recon_psnr_db'], '.2f')} dB**",
        f"- SSIM: **{fmt(result['recon_ssim'], '.4f')}**",
        f"- rFID ({result['feature_space'] or 'no feature space'}): **{fmt(result['rfid'])}**",
        f"- images read with the preprocessing of `{result['manifest']}`: {result['real_preprocessing']}"
        if result.get("manifest") else "- images read with the reader's defaults (no tokenization manifest)", "",
        "| class | images | PSNR (dB) | SSIM | rFID |", "|---|---:|---:|---:|---:|",
    ]
    for name, c in result["per_class"].items():
        lines.append(f"| {name} | {c['count']} | {fmt(c['psnr_db'], '.2f')} | {fmt(c['ssim'], '.4f')} | {fmt(c['rfid'])} |")
    lines += ["", "Worst reconstructions (lowest PSNR):", ""]
    lines += [f"- {w['psnr_db']:.2f} dB  `{w['identifier']}` ({w['label_name']})" for w in result["worst"]]
    lines += ["", f"rFID per class needs at least {MIN_CLASS_RFID} images; compare rFID only within one feature space.", ""]
    return "\n".join(lines)


def write_outputs(result: dict, worst, out) -> list[Path]:
    """tokenizer_metrics.{json,md}, the per-class bars and the worst-case grid under `out`."""
    out = Path(out)
    paths = write_report(out, "tokenizer_metrics", result, markdown_of(result))
    plot = plot_per_class(result["per_class"], ["psnr_db", "ssim", "rfid"], out / "tokenizer_per_class.png",
                          "reconstruction per class")
    if plot is not None:
        paths.append(plot)
    if worst:
        originals = np.stack([w[2] for w in worst])
        recs = np.stack([w[3] for w in worst])
        error = np.abs(originals.astype(np.int16) - recs.astype(np.int16)).astype(np.uint8)
        paths.append(plot_image_rows([("original", originals), ("reconstruction", recs), ("|error|", error)],
                                     [f"{w[0]:.1f} dB" for w in worst], out / "tokenizer_worst.png",
                                     "lowest-PSNR reconstructions"))
    return paths


def main(args):
    result = evaluate_tokenizer(
        args.meta, args.tokenizer_ckpt, split=None if args.split == "all" else args.split, dataset_dir=args.dataset_dir,
        feature_space=None if args.feature_space == "none" else args.feature_space,
        classifier_ckpt=args.classifier_ckpt, inception_weights=args.inception_weights, meditok_ckpt=args.meditok_ckpt,
        batch_size=args.batch_size, num_workers=args.num_workers, max_images=args.max_images, worst_k=args.worst_k,
        device=args.device, out=args.out, codes=args.codes,
    )
    print(markdown_of(result))
    print(f"[tokenizer] wrote {args.out}/tokenizer_metrics.json, .md and plots")
    return result


if __name__ == "__main__":
    parser = ArgumentParser(description="PSNR / SSIM / rFID of a MedITok tokenizer over a metadata file.")
    parser.add_argument("--meta", required=True, help="metadata file (csv/jsonl/json)")
    parser.add_argument("--tokenizer_ckpt", required=True, help="MedITok checkpoint (ours or the released state dict)")
    parser.add_argument("--dataset_dir", default=None, help="folder that relative identifiers resolve against")
    parser.add_argument("--codes", "--manifest", default=None,
                        help="code folder, code metadata or tokenizer.json written by batch_infer.py: images are "
                             "preprocessed as those codes were made (default: a tokenizer.json beside --meta)")
    parser.add_argument("--split", default="val", help="split to evaluate ('all' for every row)")
    parser.add_argument("--max_images", type=int, default=None, help="evaluate at most this many rows")
    parser.add_argument("--feature_space", default="meditok", choices=[*SPACES, "none"],
                        help="features for rFID; 'meditok' without --meditok_ckpt uses the evaluated tokenizer's encoder")
    parser.add_argument("--classifier_ckpt", default=None, help="classifier from evaluation.train_classifier")
    parser.add_argument("--inception_weights", default=None, help="FID Inception weights file (path or hf://)")
    parser.add_argument("--meditok_ckpt", default=None, help="another MedITok whose encoder gives the features")
    parser.add_argument("--worst_k", type=int, default=8, help="number of worst reconstructions shown in the grid")
    parser.add_argument("--batch_size", type=int, default=16, help="images per forward pass")
    parser.add_argument("--num_workers", type=int, default=0, help="data-loading workers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--out", required=True, help="output folder for the JSON, Markdown and plots")
    main(parser.parse_args())
