"""Write metadata (one row per 2-D image) from common dataset layouts.

    python -m datasets.prepare medmnist --npz pathmnist.npz --output_dir data/pathmnist
    python -m datasets.prepare folder   --root data/xray --meta_path data/xray/metadata.csv --val_fraction 0.1
    python -m datasets.prepare volumes  --inputs ct/*.nii.gz --meta_path data/ct.jsonl --window abdomen \
                                        --val_fraction 0.1 --group_by volume
    python -m datasets.prepare dicom    data/pacs_export --meta_path data/dicom.jsonl --val_fraction 0.1 \
                                        --label_map CT=0,MR=1
    python -m datasets.prepare check    data/dicom.jsonl --group_by PatientID

medmnist: a MedMNIST / MedMNIST+ `.npz` (`train_images`, `train_labels`, `val_...`, `test_...`), any
    image size; 2-D images become PNG files, 3-D volumes ([N, D, H, W]) become `.npy` volumes with one
    row per slice. folder: one sub-folder per class (optionally under train/ val/ test/). volumes:
    NIfTI / MetaImage / multi-frame DICOM / `.npy` volumes expanded into slice rows. dicom: a DICOM tree
    (series folders, headers only) -> one row per slice or per series, with patient / study / series
    columns. check: report groups (patients) that appear in more than one split.
Splits of `folder`, `volumes` and `dicom` may be grouped (`--group_by`): every row of a group (a patient, a
study, a sub-folder, a volume) lands in one split, and the fractions are met as closely as the group sizes
allow. Ungrouped `volumes` splits hold out the last slices of every volume (one volume, e.g. a template).
Identifiers are written relative to the metadata file's folder when they lie under it.
"""
from __future__ import annotations

import fnmatch
import io
import math
import os
import random
import re
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from datasets.metadata import metadata_format, read_metadata, write_metadata
from datasets.readers import FORMATS, ReadError, is_dicom_file, load_raw, parse_axis, parse_window, volume_shape
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
# grouped splits and the leak check
# ----------------------------------------------------------------------------------------------
def group_function(spec: str, base: Callable[[dict], str] | None = None) -> Callable[[dict], str | None]:
    """row -> group key. `spec` is a column name, or `re:PATTERN` searched in the row's path (`base(row)`,
    default the identifier): the first capture group, else the whole match, is the key."""
    if spec.startswith("re:"):
        pattern = re.compile(spec[3:])
        where = base or (lambda row: str(row.get("identifier", "")))

        def by_pattern(row: dict) -> str | None:
            m = pattern.search(where(row))
            return None if m is None else (m.group(1) if pattern.groups else m.group(0))
        return by_pattern

    def by_column(row: dict) -> str | None:
        value = row.get(spec)
        return None if value is None or str(value).strip() == "" else str(value)
    return by_column


GROUP_SPLIT_TRIALS = 32


def assign_group_splits(sizes: dict[str, int], preset: dict[str, str], val_fraction: float,
                        test_fraction: float, seed: int) -> dict[str, str]:
    """One split per group. Groups in `preset` keep theirs. The others are dealt in a seeded random order,
    each to the split where it leaves the row counts closest to their targets (squared error); of
    GROUP_SPLIT_TRIALS such orders the closest result is kept. No group spans two splits, and the
    fractions are met as closely as the group sizes allow (not exactly: a patient is not cut in two)."""
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction <= 1):
        raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be >= 0 with sum <= 1")
    total = sum(sizes.values())
    target = {"train": total * (1 - val_fraction - test_fraction), "val": total * val_fraction,
              "test": total * test_fraction}
    start = dict.fromkeys(SPLITS, 0)
    for group, split in preset.items():
        start[split] += sizes[group]
    free = sorted(g for g in sizes if g not in preset)
    rng = random.Random(seed)

    def error(count):
        return sum((count[s] - target[s]) ** 2 for s in SPLITS)

    best, best_error = None, math.inf
    for _ in range(GROUP_SPLIT_TRIALS if free else 1):
        order = free[:]
        rng.shuffle(order)
        count, chosen = dict(start), {}
        for group in order:
            n = sizes[group]
            split = min(SPLITS, key=lambda s: error({**count, s: count[s] + n}))
            chosen[group] = split
            count[split] += n
        if error(count) < best_error:
            best, best_error = chosen, error(count)
    return {**preset, **best}


def grouped_splits(rows: list[dict], key: Callable[[dict], str | None], val_fraction: float, test_fraction: float,
                   seed: int, what: str) -> None:
    """Set `split` on rows that have none, one split per group; rows with a split keep it (and pull the
    rest of their group along). Raises when a group has no key or its preset splits disagree."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        value = key(row)
        if value is None:
            raise ReadError(f"{row.get('identifier')}: no value for --group_by {what}; choose another grouping "
                            "(e.g. StudyInstanceUID, or re:PATTERN on the path)")
        groups.setdefault(value, []).append(row)
    preset = {}
    for group, members in groups.items():
        given = sorted({r["split"] for r in members if r.get("split")})
        if len(given) > 1:
            raise ReadError(f"group {group!r} ({what}) already has rows in {given}: the existing split column "
                            "leaks this group across splits; fix it or group differently")
        if given:
            preset[group] = given[0]
    sizes = {g: len(m) for g, m in groups.items()}
    chosen = assign_group_splits(sizes, preset, val_fraction, test_fraction, seed)
    for group, members in groups.items():
        for row in members:
            row["split"] = chosen[group]


def find_leaks(rows: list[dict], key: Callable[[dict], str | None]) -> tuple[dict[str, dict[str, int]], int]:
    """({group: {split: rows}} for every group in more than one split, rows without a group key)."""
    seen: dict[str, dict[str, int]] = {}
    missing = 0
    for row in rows:
        group = key(row)
        if group is None:
            missing += 1
            continue
        split = str(row.get("split") or "train")
        seen.setdefault(group, {}).setdefault(split, 0)
        seen[group][split] += 1
    return {g: c for g, c in seen.items() if len(c) > 1}, missing


def leak_report(rows: list[dict], key, what: str, limit: int = 20) -> list[str]:
    leaks, missing = find_leaks(rows, key)
    groups = len({key(r) for r in rows} - {None})
    lines = [f"{len(rows)} rows, {groups} groups by {what}: "
             + (f"{len(leaks)} groups appear in more than one split" if leaks else "no group spans two splits")]
    for group, counts in sorted(leaks.items())[:limit]:
        lines.append(f"  LEAK {group}: " + ", ".join(f"{s} {n}" for s, n in sorted(counts.items())))
    if len(leaks) > limit:
        lines.append(f"  ... and {len(leaks) - limit} more")
    if missing:
        lines.append(f"  {missing} rows have no {what} (not checked)")
    return lines


def prepare_check(args) -> int:
    """Exit status 0: no leak; 1: groups in several splits; 2: no row has a group value."""
    rows = read_metadata(args.meta)
    key = group_function(args.group_by)
    leaks, missing = find_leaks(rows, key)
    if rows and missing == len(rows):
        columns = sorted({c for r in rows for c in r if not c.startswith("_")})
        print(f"{args.meta}: no row has a value for --group_by {args.group_by}; columns: {', '.join(columns)}")
        return 2
    print(f"{args.meta}: " + "\n".join(leak_report(rows, key, args.group_by)))
    return 1 if leaks else 0


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
    if not path.is_file() or name.startswith("."):
        return False
    return any(name.endswith(ext) for ext in FORMATS) or is_dicom_file(path)  # DICOM often has no extension


def folder_group(spec: str, root: Path) -> Callable[[dict], str | None]:
    """Group of a `prepare folder` row: `subfolder` (the folder under the class folder, e.g. one per
    patient; a file directly in the class folder is its own group) or `re:PATTERN` on the path below
    the class folder."""
    def below_class(row: dict) -> str:
        return row["_relpath"]

    if spec == "subfolder":
        return lambda row: row["_relpath"].split("/")[0]
    if spec.startswith("re:"):
        return group_function(spec, below_class)
    raise ValueError(f"--group_by {spec!r}: use 'subfolder' or 're:PATTERN' (a regular expression on the path "
                     "below the class folder; its first group names the patient)")


def prepare_folder(args) -> list[dict]:
    root, meta_path = Path(args.root), Path(args.meta_path)
    if not root.is_dir():
        raise ReadError(f"--root {root} is not a folder")
    presplit = [s for s in SPLITS if (root / s).is_dir()]
    tops = [(root / s, s) for s in presplit] if presplit else [(root, None)]
    classes = sorted({d.name for top, _ in tops for d in top.iterdir() if d.is_dir()})
    if not classes:
        raise ReadError(f"{root}: no class sub-folders found")
    group = folder_group(args.group_by, root) if args.group_by else None
    rng = random.Random(args.seed)
    rows = []
    for top, split in tops:
        for label, cls in enumerate(classes):
            files = sorted(p for p in (top / cls).rglob("*") if is_image_file(p)) if (top / cls).is_dir() else []
            assigned = {}
            if split is None and group is None:  # per file, stratified by class
                shuffled = files[:]
                rng.shuffle(shuffled)
                n_val = round(len(files) * args.val_fraction)
                n_test = round(len(files) * args.test_fraction)
                assigned = {p: "val" for p in shuffled[:n_val]}
                assigned.update({p: "test" for p in shuffled[n_val:n_val + n_test]})
            for path in files:
                sp = split or assigned.get(path) or (None if group is not None else "train")
                extra = {"_relpath": path.relative_to(top / cls).as_posix()}
                if args.expand_volumes and volume_shape(path) is not None:
                    new = volume_rows([path], meta_path, parse_axis(args.slice_axis), args.slice_stride,
                                      args.min_foreground, label, cls, 0.0, 0.0, sp or "train")
                    for row in new:
                        row.update(extra, split=sp)
                    rows += new
                else:
                    rows.append({"identifier": relative_identifier(path, meta_path), "label": label,
                                 "split": sp, "label_name": cls, **extra})
    if not rows:
        raise ReadError(f"{root}: no readable image files under the class folders {classes}")
    if group is not None:
        # groups are global: the same patient under two classes is still one patient
        grouped_splits(rows, group, args.val_fraction, args.test_fraction, args.seed, args.group_by)
        for line in leak_report(rows, group, args.group_by):
            print(line)
    for row in rows:
        row.pop("_relpath", None)
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
    # With --group_by, val/test take whole volumes (or whole patients); without it, the last slices of every volume.
    holdout = args.val_fraction > 0 or args.test_fraction > 0
    grouped = args.group_by is not None and holdout
    fractions = (0.0, 0.0) if grouped else (args.val_fraction, args.test_fraction)
    rows = volume_rows(paths, meta_path, parse_axis(args.slice_axis), args.slice_stride, args.min_foreground,
                       args.label, args.label_name, *fractions, None if grouped else args.split)
    if grouped:
        key = group_function("identifier" if args.group_by == "volume" else args.group_by)
        grouped_splits(rows, key, args.val_fraction, args.test_fraction, args.seed, args.group_by)
        for line in leak_report(rows, key, args.group_by):
            print(line)
    elif len(paths) > 1 and holdout:
        print(f"note: val/test are the last slices of each of the {len(paths)} volumes, so every volume (patient) is "
              "in train too; --group_by volume puts whole volumes in val/test")
    if args.window is not None:
        parse_window(args.window)  # validate early; the window is a reading option, stored per row
        for row in rows:
            row["window"] = args.window
    write_metadata(rows, meta_path)
    return rows


# ----------------------------------------------------------------------------------------------
# dicom
# ----------------------------------------------------------------------------------------------
DICOM_COLUMNS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesDescription")


def scan_dicom_tree(root: Path) -> list[tuple[Path, "dicom.Series"]]:
    """(folder, series) for every series of every folder under `root`; headers only, with a progress bar."""
    from datasets import dicom

    files = [p for folder, _, _ in sorted(os.walk(root)) for p in dicom.folder_files(Path(folder))]
    by_folder: dict[Path, list] = {}
    others = 0
    for path in tqdm(files, desc="DICOM headers", unit="file"):
        header = dicom.read_header(path)
        if header is None:
            others += 1
        else:
            by_folder.setdefault(path.parent, []).append(header)
    if others:
        print(f"{others} of {len(files)} files are not DICOM images (reports, DICOMDIR, other files): skipped")
    return [(folder, series) for folder, headers in sorted(by_folder.items())
            for series in sorted(dicom.group_series(headers).values(), key=lambda s: s.uid)]


def parse_label_map(text: str) -> list[tuple[str, int, str]]:
    """'CT=0,MR=1' or '*T1*=0:t1,*T2*=1:t2' -> [(key, label, label_name)]."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.rpartition("=")
        label, _, name = value.partition(":")
        try:
            out.append((key.strip(), int(label), name.strip() or key.strip().strip("*")))
        except ValueError:
            raise ValueError(f"--label_map item {item!r} is not KEY=LABEL or KEY=LABEL:NAME") from None
        if not sep or not key.strip():
            raise ValueError(f"--label_map item {item!r} is not KEY=LABEL or KEY=LABEL:NAME")
    return out


def dicom_labeller(args) -> Callable[[dict], tuple[int, str | None] | None] | None:
    """row (with the DICOM columns) -> (label, label_name), None when unmatched; None without a mapping."""
    if args.label_csv:
        table = {}
        for rec in read_metadata(args.label_csv, required=(args.label_key, "label")):
            table[str(rec[args.label_key])] = (int(rec["label"]), rec.get("label_name"))
        return lambda row: table.get(str(row.get(args.label_key)))
    if not args.label_map:
        return None
    mapping = parse_label_map(args.label_map)
    if args.label_by == "description":  # shell-style patterns, case-insensitive, first match wins
        def by_description(row):
            text = str(row.get("SeriesDescription") or "").lower()
            return next(((lab, name) for key, lab, name in mapping if fnmatch.fnmatchcase(text, key.lower())), None)
        return by_description
    exact = {key.upper(): (lab, name) for key, lab, name in mapping}
    return lambda row: exact.get(str(row.get("Modality") or "").upper())


def default_dicom_group(rows: list[dict]) -> str:
    for column in ("PatientID", "StudyInstanceUID"):
        if rows and all(str(r.get(column) or "").strip() for r in rows):
            return column
    return "SeriesInstanceUID"


def prepare_dicom(args) -> list[dict]:
    root, meta_path = Path(args.root), Path(args.meta_path)
    if not root.is_dir():
        raise ReadError(f"{root}: not a folder")
    if args.slice_step < 1:
        raise ValueError(f"--slice_step must be >= 1, got {args.slice_step}")
    if args.window is not None:
        parse_window(args.window)
    labeller = dicom_labeller(args)
    rows, skipped, unlabelled = [], [], 0
    for folder, series in scan_dicom_tree(root):
        first = series.slices[0]
        info = {"PatientID": first.patient_id, "StudyInstanceUID": first.study_uid, "SeriesInstanceUID": series.uid,
                "Modality": first.modality, "SeriesDescription": first.description}
        if series.problem:
            skipped.append(f"{folder}: {series.summary()}: {series.problem}")
            continue
        n = series.num_slices
        if series.multiframe or n == 1:  # one file: a radiograph, or the frames of a clip / enhanced volume
            identifier, extra = relative_identifier(first.path, meta_path), {}
        else:  # a series folder; the uid picks the series where the folder holds several
            identifier, extra = relative_identifier(folder, meta_path), {}
        if n == 1:
            indices = [None]
        elif args.per == "series":
            indices = [n // 2]  # one representative (middle) slice per series
        else:
            indices = list(range(0, n, args.slice_step))
        base = {"identifier": identifier, **extra}
        label = None
        if labeller is not None:
            label = labeller(info)
            if label is None:
                unlabelled += 1
                if args.unlabelled == "drop":
                    continue
        for k in indices:
            row = dict(base)
            if label is not None:
                row["label"], row["label_name"] = label[0], label[1]
            if k is not None:
                row["slice_index"] = k
            row.update(info)
            if args.per == "series":
                row["num_slices"] = n
            if args.window is not None:
                row["window"] = args.window
            rows.append(row)
    for line in skipped[:20]:
        print(f"skipped (not a volume): {line}")
    if len(skipped) > 20:
        print(f"... {len(skipped) - 20} more series skipped")
    if unlabelled:
        what = "dropped" if args.unlabelled == "drop" else "kept without a label"
        print(f"{unlabelled} series matched no label ({what})")
    if not rows:
        raise ReadError(f"{root}: no DICOM image series found" + (f" ({len(skipped)} skipped)" if skipped else ""))
    group_by = args.group_by or default_dicom_group(rows)
    key = group_function(group_by)
    if group_by == "SeriesInstanceUID":  # fallback: at least the slices of one series stay together
        print("no PatientID / StudyInstanceUID on every series: splits are grouped by series only")
    grouped_splits(rows, key, args.val_fraction, args.test_fraction, args.seed, group_by)
    for line in leak_report(rows, key, group_by):
        print(line)
    write_metadata(rows, meta_path)
    return rows


def main(args) -> int:
    if args.command == "check":
        return prepare_check(args)
    if args.command == "medmnist":
        metadata_format(args.meta_name)
        rows = prepare_medmnist(args)
        where = Path(args.output_dir) / args.meta_name
    elif args.command == "folder":
        metadata_format(args.meta_path)
        rows, where = prepare_folder(args), args.meta_path
    elif args.command == "dicom":
        metadata_format(args.meta_path)
        rows, where = prepare_dicom(args), args.meta_path
    else:
        metadata_format(args.meta_path)
        rows, where = prepare_volumes(args), args.meta_path
    counts = {s: sum(r["split"] == s for r in rows) for s in sorted({r["split"] for r in rows})}
    print(f"wrote {len(rows)} rows to {where} ({', '.join(f'{k}: {v}' for k, v in counts.items())})")
    return 0


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
    p.add_argument("--group_by", default=None,
                   help="keep each group in one split: 'subfolder' (the folder under the class folder, e.g. one per "
                        "patient) or 're:PATTERN' (regular expression on the path below the class folder; its first "
                        "group names the patient); groups span classes; split folders are respected")

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
    p.add_argument("--group_by", default=None,
                   help="split whole groups instead of slices: 'volume' (each file), a column, or re:PATTERN on the "
                        "identifier (e.g. the patient in the file name); the fractions then count rows")
    p.add_argument("--seed", type=int, default=0, help="seed of the group assignment")
    p.add_argument("--window", default=None, help="CT window stored on every row (preset name or 'level,width')")

    p = sub.add_parser("dicom", help="a DICOM tree (series folders) -> one row per slice or per series, grouped splits")
    p.add_argument("root", help="folder to walk; every folder's files are grouped into series (headers only)")
    p.add_argument("--meta_path", required=True, help="metadata file to write (.csv/.jsonl/.json)")
    p.add_argument("--per", default="slice", choices=("slice", "series"),
                   help="one row per slice, or per series (its middle slice)")
    p.add_argument("--slice_step", type=int, default=1, help="with --per slice: keep every n-th slice")
    p.add_argument("--label_by", default="modality", choices=("modality", "description"),
                   help="what --label_map keys match: the Modality, or SeriesDescription patterns "
                        "(*T1*, case-insensitive)")
    p.add_argument("--label_map", default=None, help="KEY=LABEL[:NAME],... e.g. CT=0,MR=1 or '*T1*=0:t1,*T2*=1:t2'")
    p.add_argument("--label_csv", default=None, help="csv/jsonl with columns <--label_key>, label[, label_name]")
    p.add_argument("--label_key", default="PatientID", choices=DICOM_COLUMNS, help="the --label_csv column to match")
    p.add_argument("--unlabelled", default="drop", choices=("drop", "keep"),
                   help="series that match no label (with a mapping): leave them out, or keep them without a label")
    p.add_argument("--group_by", default=None,
                   help="no group spans two splits: PatientID (default when every series has one), StudyInstanceUID, "
                        "another column, or re:PATTERN on the identifier")
    p.add_argument("--val_fraction", type=float, default=0.0,
                   help="fraction of rows in 'val' (met as closely as groups allow)")
    p.add_argument("--test_fraction", type=float, default=0.0, help="fraction of rows in 'test'")
    p.add_argument("--seed", type=int, default=0, help="seed of the group assignment")
    p.add_argument("--window", default=None,
                   help="window stored on every row (preset, 'level,width', 'file', 'file:NAME')")

    p = sub.add_parser("check", help="report groups (e.g. patients) found in more than one split; exit status 1 if any")
    p.add_argument("meta", help="metadata file (.csv/.jsonl/.json)")
    p.add_argument("--group_by", default="PatientID", help="a column, or re:PATTERN on the identifier")
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))
