"""Write metadata (one row per 2-D image) from common dataset layouts.

    python -m datasets.prepare medmnist --npz pathmnist.npz --output_dir data/pathmnist
    python -m datasets.prepare folder   --root data/xray --meta_path data/xray/metadata.csv --val_fraction 0.1
    python -m datasets.prepare volumes  --inputs ct/*.nii.gz --meta_path data/ct.jsonl --window abdomen

medmnist: a MedMNIST / MedMNIST+ `.npz` (`train_images`, `train_labels`, `val_...`, `test_...`), any
    image size; 2-D images become PNG files, 3-D volumes ([N, D, H, W]) become `.npy` volumes with one
    row per slice. folder: one sub-folder per class (optionally under train/ val/ test/). volumes:
    NIfTI / MetaImage / multi-frame DICOM / `.npy` volumes expanded into slice rows.
Identifiers are written relative to the metadata file's folder when they lie under it.
"""
from __future__ import annotations

import io
import math
import os
import random
from pathlib import Path

import numpy as np
from tqdm import tqdm

from datasets.metadata import metadata_format, write_metadata
from datasets.readers import FORMATS, ReadError, load_raw, parse_axis, parse_window, volume_shape
from datasets.files import atomic_write_bytes, png_bytes
from scripts.cli import ArgumentParser

SPLITS = ("train", "val", "test")


def relative_identifier(path: Path, meta_path: Path) -> str:
    """`path` relative to the metadata file's folder when it lies under it, else absolute."""
    path, base = Path(os.path.abspath(path)), Path(os.path.abspath(meta_path)).parent
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


def contiguous_splits(n: int, val_fraction: float, test_fraction: float) -> list[str]:
    """Split labels for n neighbouring slices: the last blocks go to val and test, so that
    neighbouring (near-identical) slices never straddle train and val."""
    n_test = min(n, math.ceil(n * test_fraction))
    n_val = min(n - n_test, math.ceil(n * val_fraction))
    return ["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test


def foreground_slices(path: Path, axis: int, min_foreground: float) -> list[int]:
    """Indices of slices along `axis` whose fraction of voxels above the volume's low end is >= the bound."""
    shape = volume_shape(path)
    if shape is None:
        raise ReadError(f"{path}: not a volume (one 2-D image); list it as an ordinary row instead")
    if min_foreground <= 0:
        return list(range(shape[axis]))
    vol = load_raw(path).array.astype(np.float32)
    if vol.ndim == 4:  # colour frames: brightness
        vol = vol.mean(-1)
    lo, hi = np.percentile(vol[::2, ::2, ::2], (1, 99))
    fg = vol > lo + 0.05 * (hi - lo)
    fractions = fg.mean(axis=tuple(a for a in range(3) if a != axis))
    return [int(i) for i in np.flatnonzero(fractions >= min_foreground)]


def volume_rows(paths, meta_path: Path, axis: int, stride: int, min_foreground: float, label, label_name,
                val_fraction: float, test_fraction: float, split: str) -> list[dict]:
    rows = []
    for path in tqdm(paths, desc="volumes", unit="vol"):
        indices = foreground_slices(Path(path), axis, min_foreground)[::stride]
        if val_fraction > 0 or test_fraction > 0:
            splits = contiguous_splits(len(indices), val_fraction, test_fraction)
        else:
            splits = [split] * len(indices)
        for idx, sp in zip(indices, splits):
            row = {"identifier": relative_identifier(Path(path), meta_path), "label": label,
                   "split": sp, "slice_index": idx, "slice_axis": axis}
            if label_name is not None:
                row["label_name"] = label_name
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# medmnist
# ----------------------------------------------------------------------------------------------
def medmnist_labels(labels: np.ndarray, path: Path, key: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ReadError(f"{path}: {key} has shape {labels.shape}: a multi-label task (e.g. ChestMNIST); "
                        "pass --label to give every image one class instead")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ReadError(f"{path}: {key} has dtype {labels.dtype}, expected integers")
    return labels


def prepare_medmnist(args) -> list[dict]:
    out_dir = Path(args.output_dir)
    meta_path = out_dir / args.meta_name
    label_names = args.label_names.split(",") if args.label_names else None
    rows = []
    if args.class_per_file and args.label is not None:
        raise ValueError("--class_per_file and --label exclude each other")
    for file_index, npz_path in enumerate(map(Path, args.npz)):
        name = npz_path.name.split(".")[0]
        # --class_per_file: the i-th file is class i (the released six-modality task: one subset per class)
        file_label = file_index if args.class_per_file else args.label
        file_label_name = args.label_name
        if args.class_per_file and label_names is None:
            file_label_name = name
        with np.load(npz_path, allow_pickle=False) as z:
            splits = [s for s in args.splits if f"{s}_images" in z]
            if not splits:
                raise ReadError(f"{npz_path}: no '<split>_images' arrays for splits {args.splits}; "
                                f"keys are {list(z.keys())}")
            for split in splits:
                images = z[f"{split}_images"]
                if images.dtype != np.uint8:
                    raise ReadError(f"{npz_path}: {split}_images has dtype {images.dtype}; MedMNIST stores uint8")
                if file_label is not None:
                    labels = np.full(len(images), file_label)
                else:
                    if f"{split}_labels" not in z:
                        raise ReadError(f"{npz_path}: {split}_images has no {split}_labels; pass --label")
                    labels = medmnist_labels(z[f"{split}_labels"], npz_path, f"{split}_labels")
                    if len(labels) != len(images):
                        raise ReadError(f"{npz_path}: {len(images)} {split}_images but {len(labels)} labels")
                # [N, H, W] grey or [N, H, W, 3] RGB are 2-D; [N, D, H, W] are volumes (MedMNIST 3-D)
                is_3d = images.ndim == 4 and images.shape[-1] not in (3,)
                if images.ndim not in (3, 4):
                    raise ReadError(f"{npz_path}: {split}_images has shape {images.shape}")
                limit = len(images) if args.max_per_split is None else min(len(images), args.max_per_split)
                for i in tqdm(range(limit), desc=f"{name}/{split}", unit="img"):
                    label = int(labels[i])
                    base = out_dir / "images" / name / split
                    if is_3d:
                        path = base / f"{i:06d}.npy"
                        atomic_write_bytes(_npy_bytes(images[i]), path)
                        depth = images.shape[1]
                        for s in range(0, depth, args.slice_stride):
                            rows.append(_row(path, meta_path, label, split, label_names, file_label_name,
                                             slice_index=s, slice_axis=0))
                    else:
                        path = base / f"{i:06d}.png"
                        atomic_write_bytes(png_bytes(images[i]), path)
                        rows.append(_row(path, meta_path, label, split, label_names, file_label_name))
    write_metadata(rows, meta_path)
    return rows


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _row(path, meta_path, label, split, label_names, label_name, **extra) -> dict:
    row = {"identifier": relative_identifier(path, meta_path), "label": label, "split": split}
    if label_name is not None:
        row["label_name"] = label_name
    elif label_names is not None:
        if not 0 <= label < len(label_names):
            raise ReadError(f"label {label} has no name in --label_names ({len(label_names)} names)")
        row["label_name"] = label_names[label]
    row.update(extra)
    return row


# ----------------------------------------------------------------------------------------------
# folder
# ----------------------------------------------------------------------------------------------
def is_image_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and not name.startswith(".") and any(name.endswith(ext) for ext in FORMATS)


def prepare_folder(args) -> list[dict]:
    root, meta_path = Path(args.root), Path(args.meta_path)
    if not root.is_dir():
        raise ReadError(f"--root {root} is not a folder")
    presplit = [s for s in SPLITS if (root / s).is_dir()]
    tops = [(root / s, s) for s in presplit] if presplit else [(root, None)]
    classes = sorted({d.name for top, _ in tops for d in top.iterdir() if d.is_dir()})
    if not classes:
        raise ReadError(f"{root}: no class sub-folders found")
    rng = random.Random(args.seed)
    rows = []
    for top, split in tops:
        for label, cls in enumerate(classes):
            files = sorted(p for p in (top / cls).rglob("*") if is_image_file(p)) if (top / cls).is_dir() else []
            if split is None:
                shuffled = files[:]
                rng.shuffle(shuffled)
                n_val = round(len(files) * args.val_fraction)
                n_test = round(len(files) * args.test_fraction)
                assigned = {p: "val" for p in shuffled[:n_val]}
                assigned.update({p: "test" for p in shuffled[n_val:n_val + n_test]})
            for path in files:
                sp = split or assigned.get(path, "train")
                if args.expand_volumes and volume_shape(path) is not None:
                    rows += volume_rows([path], meta_path, parse_axis(args.slice_axis), args.slice_stride,
                                        args.min_foreground, label, cls, 0.0, 0.0, sp)
                else:
                    rows.append({"identifier": relative_identifier(path, meta_path), "label": label,
                                 "split": sp, "label_name": cls})
    if not rows:
        raise ReadError(f"{root}: no readable image files under the class folders {classes}")
    write_metadata(rows, meta_path)
    return rows


# ----------------------------------------------------------------------------------------------
# volumes
# ----------------------------------------------------------------------------------------------
def prepare_volumes(args) -> list[dict]:
    meta_path = Path(args.meta_path)
    paths = []
    for item in map(Path, args.inputs):
        paths += sorted(p for p in item.rglob("*") if is_image_file(p)) if item.is_dir() else [item]
    if not paths:
        raise ReadError(f"no volume files found in {args.inputs}")
    rows = volume_rows(paths, meta_path, parse_axis(args.slice_axis), args.slice_stride, args.min_foreground,
                       args.label, args.label_name, args.val_fraction, args.test_fraction, args.split)
    if args.window is not None:
        parse_window(args.window)  # validate early; the window is a reading option, stored per row
        for row in rows:
            row["window"] = args.window
    write_metadata(rows, meta_path)
    return rows


def main(args) -> None:
    if args.command == "medmnist":
        metadata_format(args.meta_name)
        rows = prepare_medmnist(args)
        where = Path(args.output_dir) / args.meta_name
    elif args.command == "folder":
        metadata_format(args.meta_path)
        rows, where = prepare_folder(args), args.meta_path
    else:
        metadata_format(args.meta_path)
        rows, where = prepare_volumes(args), args.meta_path
    counts = {s: sum(r["split"] == s for r in rows) for s in sorted({r["split"] for r in rows})}
    print(f"wrote {len(rows)} rows to {where} ({', '.join(f'{k}: {v}' for k, v in counts.items())})")


def parse_args(argv=None):
    parser = ArgumentParser(description="Write metadata (one row per 2-D image) for batch_infer.py.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("medmnist", help="MedMNIST / MedMNIST+ .npz files -> PNG (or .npy volumes) + metadata")
    p.add_argument("--npz", nargs="+", required=True, help="one or more MedMNIST .npz files (2-D or 3-D, any size)")
    p.add_argument("--output_dir", required=True, help="folder for images/<name>/<split>/ and the metadata file")
    p.add_argument("--meta_name", default="metadata.jsonl", help="metadata file name inside --output_dir (.csv/.jsonl/.json)")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS, help="which splits to export")
    p.add_argument("--label", type=int, default=None, help="give every image this class (e.g. one class per MedMNIST subset)")
    p.add_argument("--label_name", default=None, help="label_name written on every row (with --label)")
    p.add_argument("--class_per_file", action="store_true",
                   help="the i-th --npz file is class i (label_name: --label_names, else the file name)")
    p.add_argument("--label_names", default=None, help="comma-separated class names indexed by the npz labels")
    p.add_argument("--slice_stride", type=int, default=1, help="3-D volumes: keep every n-th slice")
    p.add_argument("--max_per_split", type=int, default=None, help="export at most this many images per split")

    p = sub.add_parser("folder", help="a tree root/<class>/... (or root/<split>/<class>/...) -> metadata")
    p.add_argument("--root", required=True, help="folder with one sub-folder per class")
    p.add_argument("--meta_path", required=True, help="metadata file to write (.csv/.jsonl/.json)")
    p.add_argument("--val_fraction", type=float, default=0.0, help="fraction of each class put in 'val' (no split folders)")
    p.add_argument("--test_fraction", type=float, default=0.0, help="fraction of each class put in 'test' (no split folders)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split assignment")
    p.add_argument("--expand_volumes", action="store_true", help="turn volumes found in the tree into slice rows")
    p.add_argument("--slice_axis", default="0", help="with --expand_volumes: 0/z/axial, 1/coronal, 2/sagittal")
    p.add_argument("--slice_stride", type=int, default=1, help="with --expand_volumes: keep every n-th slice")
    p.add_argument("--min_foreground", type=float, default=0.0, help="with --expand_volumes: drop slices with less foreground")

    p = sub.add_parser("volumes", help="volumes / multi-frame files -> one row per slice")
    p.add_argument("--inputs", nargs="+", required=True, help="volume files or folders holding them")
    p.add_argument("--meta_path", required=True, help="metadata file to write (.csv/.jsonl/.json)")
    p.add_argument("--slice_axis", default="0", help="0/z/axial (frames for DICOM), 1/y/coronal, 2/x/sagittal")
    p.add_argument("--slice_stride", type=int, default=1, help="keep every n-th slice")
    p.add_argument("--min_foreground", type=float, default=0.0, help="drop slices whose foreground fraction is below this")
    p.add_argument("--label", type=int, default=None, help="class of every row")
    p.add_argument("--label_name", default=None, help="label_name of every row")
    p.add_argument("--split", default="train", choices=SPLITS, help="split of every row (without the fractions)")
    p.add_argument("--val_fraction", type=float, default=0.0, help="last contiguous slices of each volume go to 'val'")
    p.add_argument("--test_fraction", type=float, default=0.0, help="the very last contiguous slices go to 'test'")
    p.add_argument("--window", default=None, help="CT window stored on every row (preset name or 'level,width')")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
