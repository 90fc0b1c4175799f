"""A small class-conditional dataset of real medical images that ships inside PyPI packages.

Four classes, 505 images with the default settings, built offline in seconds:
    0 brain_mri_axial      MNI152 2009a T1 template (nilearn), axial slices
    1 brain_mri_sagittal   same template, sagittal slices
    2 brain_mri_coronal    same template, coronal slices
    3 echocardiography     frames of `color3d_jpeg_baseline.dcm` (pydicom-data), grayscale, centre square

Brain slices are kept when more than `--min_foreground` of the slice is brain, are shown in radiological
view (patient's right on the viewer's left, anterior / superior at the top) and are zero-padded to a square.
The template is an average brain and the echo frames come from one clip, so neighbouring slices/frames
are near-duplicates: the `val` split is one contiguous block per class, separated from the training
slices by `--gap` dropped slices on each side, so that no validation image has a training neighbour.

Output (identifiers relative to --out, the tutorial's metadata format):
    OUT/images/<label_name>/<label_name>_<index>.png   8-bit grayscale, --output_size square
    OUT/metadata.csv   identifier, code_identifier (empty), label, label_name, split, source
    OUT/demo_info.json the settings, counts and the data licences

    python -m datasets.demo --out data/demo
Rerunning with the same settings skips the build when every file is in place.
"""
from __future__ import annotations

import functools
import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from datasets.metadata import read_metadata, write_metadata
from datasets.files import atomic_write_bytes, atomic_write_text
from scripts.cli import ArgumentParser

CLASSES = ("brain_mri_axial", "brain_mri_sagittal", "brain_mri_coronal", "echocardiography")
# Volume axis sliced for each brain class (the template's voxel axes are x=R, y=A, z=S).
MNI_AXES = {"brain_mri_axial": 2, "brain_mri_sagittal": 0, "brain_mri_coronal": 1}
MNI_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"  # shipped in nilearn/datasets/data
ECHO_FILE = "color3d_jpeg_baseline.dcm"
LICENCES = {
    "MNI152 2009a template (via nilearn, BSD-3)": (
        "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological "
        "Institute, McGill University. Permission to use, copy, modify, and distribute this software and "
        "its documentation for any purpose and without fee is hereby granted, provided that the above "
        "copyright notice appear in all copies. The authors and McGill University make no representations "
        "about the suitability of this software for any purpose. It is provided 'as is' without express "
        "or implied warranty."
    ),
    f"{ECHO_FILE} (pydicom-data, MIT)": "Test data distributed with pydicom-data under the MIT licence.",
}


# ----------------------------------------------------------------------------------------------
# Sources: each returns a list of (2-D float image in [0, 1], source description), in slice order
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def mni_volume() -> np.ndarray:
    """The 1 mm MNI152 T1 template as float32 [X, Y, Z] in [0, 1].

    Read straight from nilearn's package data with nibabel: `nilearn.datasets` would import scikit-learn
    (seconds) to give the same uint8 volume divided by 255.
    """
    from importlib.resources import files

    import nibabel

    path = files("nilearn") / "datasets" / "data" / MNI_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; install the `nilearn` package")
    raw = np.asarray(nibabel.load(str(path)).dataobj)
    if raw.dtype != np.uint8:
        raise ValueError(f"{path}: expected the uint8 template, got {raw.dtype}")
    return raw.astype(np.float32) / 255.0


def mni_slices(axis: int, min_foreground: float) -> list[tuple[np.ndarray, str]]:
    """Slices of the 1 mm MNI152 T1 template along `axis` with enough brain in them."""
    stack = np.ascontiguousarray(np.moveaxis(mni_volume(), axis, 0))  # [slices, the other two axes in x, y, z order]
    out = []
    for i, s in enumerate(stack):
        if (s > 0).mean() <= min_foreground:
            continue
        # Rows run from anterior/superior down, columns from the patient's right (x) or anterior (y)
        # to the other side: the radiological view for all three orientations.
        out.append((np.ascontiguousarray(s.T[::-1, ::-1]), f"mni152_t1_1mm:axis{axis}:{i}"))
    return out


@functools.lru_cache(maxsize=1)
def echo_frames() -> list[tuple[np.ndarray, str]]:
    """Every frame of the pydicom-data echocardiography clip, grayscale, centre square crop.

    Cached: decoding the 120 JPEG frames takes seconds, and tests build the dataset twice in one process."""
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file(ECHO_FILE)
    if path is None:
        raise FileNotFoundError(
            f"{ECHO_FILE} not found by pydicom.data.get_testdata_file; install the `pydicom-data` package"
        )
    frames = pydicom.dcmread(path).pixel_array.astype(np.float32)  # [T, H, W, 3] RGB (pydicom converts YBR)
    gray = frames @ np.array([0.299, 0.587, 0.114], dtype=np.float32) / 255.0  # [T, H, W]
    h, w = gray.shape[1:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    gray = gray[:, top:top + side, left:left + side]
    return [(np.clip(g, 0.0, 1.0), f"{ECHO_FILE}:frame{t}") for t, g in enumerate(gray)]


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def to_png(image: np.ndarray, size: int) -> bytes:
    """Zero-pad a [0, 1] image to a centred square, resize to size x size, encode as 8-bit PNG."""
    h, w = image.shape
    side = max(h, w)
    square = np.zeros((side, side), dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    square[top:top + h, left:left + w] = image
    resized = np.asarray(Image.fromarray(square).resize((size, size), Image.BICUBIC))
    pixels = np.clip(np.rint(resized * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def split_indices(n: int, val_fraction: float, gap: int, val_center: float) -> list[str | None]:
    """'train' / 'val' / None (dropped) for n ordered items: one contiguous val block, `gap` dropped around it."""
    n_val = max(1, round(n * val_fraction))
    start = min(max(0, round(n * val_center - n_val / 2)), n - n_val)
    splits: list[str | None] = []
    for i in range(n):
        if start <= i < start + n_val:
            splits.append("val")
        elif start - gap <= i < start + n_val + gap:
            splits.append(None)
        else:
            splits.append("train")
    return splits


def settings_of(args) -> dict:
    """The build settings (what demo_info.json records and `build_demo_dataset` takes)."""
    return {
        "image_size": args.image_size, "val_fraction": args.val_fraction, "gap": args.gap,
        "val_center": args.val_center, "min_foreground": args.min_foreground,
    }


def is_complete(out: Path, settings: dict) -> bool:
    """True when demo_info.json holds the same settings and every image of metadata.csv exists."""
    info, meta = out / "demo_info.json", out / "metadata.csv"
    if not (info.is_file() and meta.is_file()):
        return False
    try:
        info = json.loads(info.read_text())
        if info.get("settings") != settings or info.get("classes") != list(CLASSES):
            return False
        rows = read_metadata(meta)
    except (ValueError, OSError):
        return False
    return len(rows) > 0 and all((out / r["identifier"]).is_file() for r in rows)


def build_demo_dataset(
    out: str | Path, image_size: int = 128, val_fraction: float = 0.15, gap: int = 3,
    val_center: float = 0.5, min_foreground: float = 0.10,
) -> list[dict]:
    """Write the images, metadata.csv and demo_info.json under `out`; return the metadata rows."""
    out = Path(out)
    settings = dict(image_size=image_size, val_fraction=val_fraction, gap=gap,
                    val_center=val_center, min_foreground=min_foreground)
    # Remove the marker first so that an interrupted rebuild is never taken for a finished one.
    (out / "demo_info.json").unlink(missing_ok=True)
    rows = []
    for label, name in enumerate(CLASSES):
        items = echo_frames() if name == "echocardiography" else mni_slices(MNI_AXES[name], min_foreground)
        splits = split_indices(len(items), val_fraction, gap, val_center)
        for index, ((image, source), split) in enumerate(zip(items, splits)):
            if split is None:
                continue
            identifier = f"images/{name}/{name}_{index:03d}.png"
            atomic_write_bytes(to_png(image, image_size), out / identifier)
            rows.append({
                "identifier": identifier, "code_identifier": None, "label": label,
                "label_name": name, "split": split, "source": source,
            })
    # The metadata is written last: its presence (with the info file) marks a finished build.
    write_metadata(rows, out / "metadata.csv")
    counts = {name: {s: sum(r["label_name"] == name and r["split"] == s for r in rows) for s in ("train", "val")}
              for name in CLASSES}
    info = {"settings": settings, "classes": list(CLASSES), "counts": counts, "licences": LICENCES}
    atomic_write_text(json.dumps(info, indent=1) + "\n", out / "demo_info.json")
    return rows


def main(args):
    out = Path(args.out)
    settings = settings_of(args)
    if not args.force and is_complete(out, settings):
        print(f"[demo] {out}/metadata.csv is complete; nothing to do (--force rebuilds)")
        return
    t0 = time.time()
    rows = build_demo_dataset(out, **settings)
    info = json.loads((out / "demo_info.json").read_text())
    for name, c in info["counts"].items():
        print(f"[demo] {name:20s} train {c['train']:4d}  val {c['val']:4d}")
    print(f"[demo] wrote {len(rows)} images and {out}/metadata.csv in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    parser = ArgumentParser(description="Build the 4-class demo dataset of real medical images.")
    parser.add_argument("--out", required=True, help="output folder (images/, metadata.csv, demo_info.json)")
    parser.add_argument("--output_size", dest="image_size", type=int, default=128,
                        help="side of the saved square PNGs in pixels (--image-size always means a model's input)")
    parser.add_argument("--val_fraction", type=float, default=0.15, help="fraction of each class held out as val")
    parser.add_argument("--gap", type=int, default=3,
                        help="slices/frames dropped on each side of the val block (no neighbour leakage)")
    parser.add_argument("--val_center", type=float, default=0.5,
                        help="position of the val block's centre within each class's ordered slices, in [0, 1]")
    parser.add_argument("--min_foreground", type=float, default=0.10,
                        help="keep brain slices whose non-zero fraction exceeds this")
    parser.add_argument("--force", action="store_true", help="rebuild even when the output is complete")
    main(parser.parse_args())
