"""Generated images against the real data: FID / KID / precision-recall, class fidelity, memorisation.

    python -m evaluation.generation.evaluate --real_meta data/demo/metadata.csv \
        --samples samples/run1/samples.npz --classifier_ckpt runs/classifier.pt --out runs/eval_generation

--samples is an .npz with `samples` (or `arr_0`) [N, H, W, 3] uint8 and `labels` [N] (what sample_c2i.py writes), or a
folder of class sub-folders (SAMPLE_DIR/<run>/<class_name>/<index>.png) whose names are the metadata's
label_name values or integer labels.

- Real images are read exactly as the codes the generator learnt from were made: the preprocessing (CT
  window, intensity scaling, fit) comes from the tokenization manifest (tokenizer.json, written by
  batch_infer.py) of `--codes` (the code folder or code metadata), or from one beside `--real_meta`.
- Distribution metrics compare the samples with the real `--train_split` images (what the generator learnt
  from) in the chosen feature space; the same metrics for the real `--heldout_split` images against the
  training images are reported next to them as the floor (FID, KID) and ceiling (precision, recall) a
  perfect generator would reach at this sample size.
- Precision = share of samples inside the real images' k-NN manifold (union of balls reaching each real
  image's k-th nearest real neighbour): fidelity. Recall = share of real images inside the samples' k-NN
  manifold: diversity. k is sqrt(set size) unless --k is given (the published k = 3 is for 50k images; on a
  few hundred near-duplicate slices its balls are so small that held-out real images score near 0 too).
- Class fidelity: the evaluation classifier's accuracy on the samples, with their conditioning labels as
  targets (and its accuracy on held-out real images for reference).
- Memorisation: each sample's distance to its nearest training image against the same for held-out real
  images; samples closer than the held-out 5 % quantile are candidate copies (shown in a plot).
Writes OUT/generation_metrics.{json,md}, OUT/generation_per_class.png and OUT/nearest_neighbours.png.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datasets.image_dataset import ImageDataset
from datasets.metadata import filter_split, parse_label, read_metadata
from evaluation import metrics
from evaluation.features import (
    SPACES,
    ClassifierFeatures,
    build_extractor,
    class_names_of,
    extract_features,
    from_uint8,
    image_loader,
    manifest_read_options,
    plot_image_rows,
    plot_per_class,
    to_uint8,
    write_report,
)
from scripts.cli import ArgumentParser

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# ----------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------
def folder_label(name: str, class_names: list[str]) -> int | None:
    """Label of a class folder: a label_name (also with runs of other characters than [\\w.+-] made '_',
    as sample_c2i.py names folders), or an integer label written '3' or 'class_3'."""
    for i, class_name in enumerate(class_names):
        if name in (class_name, re.sub(r"[^\w.+-]+", "_", class_name).strip("_")):
            return i
    match = re.fullmatch(r"(?:class_)?(\d+)", name)
    return int(match.group(1)) if match else None


def load_samples(path, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W, 3], labels int64 [N]) from an .npz or a folder of class sub-folders."""
    path = Path(path)
    if path.is_dir() and (path / "samples.npz").is_file():  # a sample_c2i.py run folder: its npz has the labels
        path = path / "samples.npz"
    if path.suffix == ".npz":
        with np.load(path) as data:
            key = "samples" if "samples" in data else "arr_0"  # arr_0: the ADM evaluator's name
            missing = [k for k in (key, "labels") if k not in data]
            if missing:
                raise ValueError(f"{path}: missing arrays {missing}; expected 'samples' (or 'arr_0') [N, H, W, 3] "
                                 f"and 'labels' [N]")
            images, labels = data[key], data["labels"].astype(np.int64)
        if len(images) != len(labels):
            raise ValueError(f"{path}: {len(images)} samples but {len(labels)} labels")
        if images.dtype != np.uint8:
            raise ValueError(f"{path}: 'samples' must be uint8 in [0, 255], got {images.dtype}")
    elif path.is_dir():
        images, labels = [], []
        folders = sorted(p for p in path.iterdir() if p.is_dir())
        for folder in folders:
            label = folder_label(folder.name, class_names)
            if label is None:
                raise ValueError(f"{folder}: folder name is neither a class name {class_names} nor an integer "
                                 f"label (as '3' or 'class_3')")
            for file in sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES):
                images.append(np.asarray(Image.open(file).convert("RGB")))
                labels.append(label)
        if not images:
            raise ValueError(f"{path}: no images in class sub-folders ({[f.name for f in folders]})")
        sizes = {im.shape for im in images}
        if len(sizes) > 1:
            raise ValueError(f"{path}: samples differ in size {sorted(sizes)}")
        images, labels = np.stack(images), np.array(labels, dtype=np.int64)
    else:
        raise FileNotFoundError(f"samples not found (an .npz file or a folder of class folders): {path}")
    if images.ndim == 3:
        images = images[..., None]
    bad = labels[(labels < 0) | (labels >= len(class_names))]
    if len(bad):
        raise ValueError(f"{path}: labels {sorted(set(bad.tolist()))} outside the {len(class_names)} real classes")
    return images, labels


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------
def distribution_metrics(real: np.ndarray, fake: np.ndarray, k: int | None, kid_subsets: int,
                         kid_subset_size: int) -> dict:
    """FID, KID and k-NN precision/recall of fake against real features (k None: sqrt of each set's size)."""
    kid_mean, kid_std = metrics.kid(real, fake, subsets=kid_subsets, subset_size=kid_subset_size)
    pr = metrics.precision_recall(real, fake, k=None if k is None else min(k, len(real) - 1, len(fake) - 1))
    return {"fid": metrics.fid(real, fake), "kid_mean": kid_mean, "kid_std": kid_std, **pr}


def class_accuracy(classifier: ClassifierFeatures, images: torch.Tensor, labels: np.ndarray, batch_size: int,
                   device) -> tuple[float, np.ndarray]:
    """(accuracy, predictions [N]) of the classifier on images [N, 3, H, W] in [-1, 1]."""
    preds = torch.cat([classifier.logits(x.to(device)).argmax(1).cpu() for x in images.split(batch_size)]).numpy()
    return float((preds == labels).mean()), preds


def evaluate_generation(real_meta, samples, classifier_ckpt=None, feature_space: str = "classifier",
                        inception_weights=None, meditok_ckpt=None, dataset_dir=None, train_split: str = "train",
                        heldout_split: str | None = "val", k: int | None = None, kid_subsets: int = 50,
                        kid_subset_size: int = 1000, min_class_fid: int = 10, num_pairs: int = 8,
                        batch_size: int = 64, num_workers: int = 0, device="cpu", out=None, codes=None) -> dict:
    """Metrics of generated `samples` (.npz path, folder, or (images uint8 [N,H,W,C], labels [N])) against the
    real rows of `real_meta`, read with the preprocessing of the manifest of `codes` (or the one beside
    `real_meta`). Returns a dict (fid, kid_mean, precision, recall, sample_class_accuracy, memorisation,
    per_class, ...); with `out`, also writes the JSON / Markdown report and the plots there."""
    real_meta = Path(real_meta)
    read_options, manifest = manifest_read_options(codes, real_meta)
    rows = read_metadata(real_meta)
    class_names = class_names_of(rows, real_meta)
    images_u8, labels = samples if isinstance(samples, tuple) else load_samples(samples, class_names)
    images_u8 = np.asarray(images_u8)
    images_u8 = images_u8[..., None] if images_u8.ndim == 3 else images_u8  # [N, H, W, C]
    fake_images = from_uint8(images_u8)  # [N, 3, H, W] in [-1, 1]
    labels = np.asarray(labels, dtype=np.int64)
    size = fake_images.shape[-1]
    train_rows = filter_split(rows, train_split)
    held_rows = filter_split(rows, heldout_split) if heldout_split else []
    if len(train_rows) < 2:
        raise ValueError(f"{real_meta}: need at least 2 rows with split {train_split!r}, found {len(train_rows)}")
    train_labels = np.array([parse_label(r, len(class_names), real_meta) for r in train_rows])
    held_labels = np.array([parse_label(r, len(class_names), real_meta) for r in held_rows], dtype=np.int64)

    extractor = build_extractor(feature_space, classifier_ckpt, inception_weights, meditok_ckpt, device)
    read = dict(meta_path=real_meta, dataset_dir=dataset_dir, image_size=size, batch_size=batch_size,
                num_workers=num_workers, **read_options)  # real images at the samples' size, as the codes were made
    f_fake = extract_features(extractor, fake_images, batch_size, device, "sample features")
    f_train = extract_features(extractor, image_loader(train_rows, **read), batch_size, device, "train features")
    result = {
        "real_meta": str(real_meta), "samples": None if isinstance(samples, tuple) else str(samples),
        "feature_space": extractor.name, "num_samples": len(f_fake), "num_train": len(f_train),
        "num_heldout": len(held_rows), "sample_size": size, "class_names": class_names,
        "manifest": None if manifest is None else manifest.get("_path"), "real_preprocessing": read_options,
        **distribution_metrics(f_train, f_fake, k, kid_subsets, kid_subset_size),
    }
    f_held = None
    if len(held_rows) >= 2:
        f_held = extract_features(extractor, image_loader(held_rows, **read), batch_size, device, "held-out features")
        result["heldout_reference"] = distribution_metrics(f_train, f_held, k, kid_subsets, kid_subset_size)

    # Class fidelity: the classifier of classifier_ckpt, whatever the feature space.
    classifier = extractor if isinstance(extractor, ClassifierFeatures) else (
        ClassifierFeatures(classifier_ckpt, device) if classifier_ckpt else None)
    preds = None
    if classifier is not None:
        if classifier.class_names != class_names:
            raise ValueError(f"classifier classes {classifier.class_names} differ from {real_meta}'s {class_names}")
        result["sample_class_accuracy"], preds = class_accuracy(classifier, fake_images, labels, batch_size, device)
        if len(held_rows):
            held_images = torch.cat([b["image"] for b in image_loader(held_rows, **read)])
            result["heldout_class_accuracy"], _ = class_accuracy(classifier, held_images, held_labels, batch_size, device)

    per_class = {}
    for c, name in enumerate(class_names):
        mask, train_mask = labels == c, train_labels == c
        if not mask.any():
            continue
        entry = {"samples": int(mask.sum()), "fid": None,
                 "class_accuracy": None if preds is None else float((preds[mask] == c).mean())}
        if mask.sum() >= min_class_fid and train_mask.sum() >= min_class_fid:
            entry["fid"] = metrics.fid(f_train[train_mask], f_fake[mask])
        per_class[name] = entry
    result["per_class"] = per_class

    pairs = None
    if f_held is not None:
        mem = metrics.memorisation(f_fake, f_train, f_held)
        order = np.argsort(mem["sample_nn_distance"])[:num_pairs]  # the samples closest to a training image
        pairs = [(int(i), int(mem["sample_nn_index"][i]), float(mem["sample_nn_distance"][i])) for i in order]
        result["memorisation"] = {k_: v for k_, v in mem.items() if not isinstance(v, np.ndarray)}
        result["memorisation"]["closest"] = [
            {"sample": i, "label_name": class_names[labels[i]], "train_identifier": train_rows[j]["identifier"],
             "distance": d} for i, j, d in pairs]
    if out is not None:
        write_outputs(result, out, images_u8, pairs, train_rows, read)
    return result


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------
def markdown_of(r: dict) -> str:
    fmt = lambda v, f=".3f": "n/a" if v is None else format(v, f)  # noqa: E731
    ref = r.get("heldout_reference") or {}
    lines = [
        "# Generation metrics", "",
        f"{r['num_samples']} samples ({r['sample_size']} px) against {r['num_train']} real training images of "
        f"`{r['real_meta']}`, in the **{r['feature_space']}** feature space.", "",
        "| metric | samples vs train | held-out real vs train (floor / ceiling) |", "|---|---:|---:|",
    ]
    for key in ("fid", "kid_mean", "precision", "recall"):
        lines.append(f"| {key} | {fmt(r.get(key), '.4f')} | {fmt(ref.get(key), '.4f')} |")
    lines += ["", f"Precision: share of samples inside the union of k-NN balls of the real training images "
                  f"(k = {r.get('k_real')}), i.e. that look like some real image; recall: share of real training "
                  f"images inside the samples' k-NN balls (k = {r.get('k_fake')}), i.e. how much of the real "
                  f"variety the samples cover. Held-out real images in place of the samples give the ceiling."]
    if r.get("manifest"):
        lines += ["", f"Real images read with the preprocessing of `{r['manifest']}`: {r['real_preprocessing']}"]
    lines += ["", f"- class fidelity (classifier accuracy on samples): **{fmt(r.get('sample_class_accuracy'))}** "
                  f"(held-out real images: {fmt(r.get('heldout_class_accuracy'))})"]
    mem = r.get("memorisation")
    if mem:
        lines.append(f"- memorisation: median nearest-training distance of samples {mem['sample_nn_median']:.4g} vs "
                     f"held-out real {mem['heldout_nn_median']:.4g} (ratio {mem['nn_ratio']:.3f}; below 1 means closer "
                     f"to the training set than unseen real images are); {100 * mem['fraction_below_threshold']:.1f}% "
                     f"of samples are closer than the held-out {100 * mem['threshold_quantile']:.0f}% quantile")
    lines += ["", "| class | samples | FID | class accuracy |", "|---|---:|---:|---:|"]
    for name, c in r["per_class"].items():
        lines.append(f"| {name} | {c['samples']} | {fmt(c['fid'])} | {fmt(c['class_accuracy'])} |")
    lines += ["", "FID and KID depend on the feature space and the number of images: compare runs only with the "
                  "same space, reference set and sample count.", ""]
    return "\n".join(lines)


def write_outputs(result: dict, out, images_u8, pairs, train_rows, read: dict) -> list[Path]:
    out = Path(out)
    paths = write_report(out, "generation_metrics", result, markdown_of(result))
    plot = plot_per_class(result["per_class"], ["fid", "class_accuracy"], out / "generation_per_class.png",
                          f"per class ({result['feature_space']} features)")
    if plot is not None:
        paths.append(plot)
    if pairs:
        dataset = ImageDataset([train_rows[j] for _, j, _ in pairs], meta_path=read["meta_path"],
                               dataset_dir=read["dataset_dir"], image_size=read["image_size"], channels=3,
                               **result["real_preprocessing"])
        neighbours = to_uint8(torch.stack([dataset[n]["image"] for n in range(len(dataset))]))
        samples = np.stack([images_u8[i] for i, _, _ in pairs])
        paths.append(plot_image_rows([("sample", samples), ("nearest train", neighbours)],
                                     [f"d={d:.3g}" for _, _, d in pairs], out / "nearest_neighbours.png",
                                     "samples closest to a training image"))
    return paths


def main(args):
    result = evaluate_generation(
        args.real_meta, args.samples, classifier_ckpt=args.classifier_ckpt, feature_space=args.feature_space,
        inception_weights=args.inception_weights, meditok_ckpt=args.meditok_ckpt, dataset_dir=args.dataset_dir,
        train_split=args.train_split, heldout_split=None if args.heldout_split == "none" else args.heldout_split,
        k=args.k, kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
        min_class_fid=args.min_class_fid, num_pairs=args.num_pairs, batch_size=args.batch_size,
        num_workers=args.num_workers, device=args.device, out=args.out, codes=args.codes,
    )
    print(markdown_of(result))
    print(f"[generation] wrote {args.out}/generation_metrics.json, .md and plots")
    return result


if __name__ == "__main__":
    parser = ArgumentParser(description="FID / KID / precision-recall, class fidelity and memorisation "
                                                 "of generated samples against real metadata.")
    data = parser.add_argument_group("data")
    data.add_argument("--real_meta", required=True, help="metadata of the real images (label, split columns)")
    data.add_argument("--samples", required=True, help="samples .npz (samples, labels) or a folder of class folders")
    data.add_argument("--dataset_dir", default=None, help="folder that relative identifiers resolve against")
    data.add_argument("--codes", "--manifest", default=None,
                      help="code folder, code metadata or tokenizer.json of the codes the GPT learnt from: real images "
                           "are preprocessed as those codes were made (default: a tokenizer.json beside --real_meta)")
    data.add_argument("--train_split", default="train", help="real reference split (what the generator learnt from)")
    data.add_argument("--heldout_split", default="val", help="held-out real split for the floor and memorisation ('none' to skip)")
    feats = parser.add_argument_group("feature space")
    feats.add_argument("--feature_space", default="classifier", choices=SPACES, help="features for FID/KID/PR and memorisation")
    feats.add_argument("--classifier_ckpt", default=None,
                       help="classifier from evaluation.train_classifier (also gives the class-fidelity score)")
    feats.add_argument("--inception_weights", default=None,
                       help="FID Inception weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth; a path "
                            "or hf:// reference, never downloaded otherwise): paper-comparable FID/KID")
    feats.add_argument("--meditok_ckpt", default=None, help="MedITok checkpoint whose encoder gives the features")
    m = parser.add_argument_group("metrics")
    m.add_argument("--k", type=int, default=None,
                   help="k of the k-NN manifolds for precision/recall (default: sqrt of each set's size, at least 3)")
    m.add_argument("--kid_subsets", type=int, default=50, help="random subsets averaged by KID")
    m.add_argument("--kid_subset_size", type=int, default=1000, help="rows per KID subset (capped at the set sizes)")
    m.add_argument("--min_class_fid", type=int, default=10, help="per-class FID only with at least this many images")
    m.add_argument("--num_pairs", type=int, default=8, help="sample / nearest-training-image pairs shown")
    run = parser.add_argument_group("run")
    run.add_argument("--batch_size", type=int, default=64, help="images per forward pass")
    run.add_argument("--num_workers", type=int, default=0, help="data-loading workers")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    run.add_argument("--out", required=True, help="output folder for the JSON, Markdown and plots")
    main(parser.parse_args())
