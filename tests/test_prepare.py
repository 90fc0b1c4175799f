"""datasets.prepare: MedMNIST-format npz files, class-folder trees and volumes -> metadata rows."""
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from datasets.metadata import read_metadata, resolve_path
from datasets.prepare import contiguous_splits, main, parse_args
from datasets.readers import ReadError, read_image

NIBABEL_DATA = Path(__import__("nibabel").__file__).parent / "tests" / "data"


def make_medmnist(path: Path, shape: tuple, n=(5, 2, 3), num_classes=4, seed=0, labels_2d=True) -> dict:
    """A file laid out like MedMNIST(+): <split>_images uint8, <split>_labels [N, 1]."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, *shape), dtype=np.uint8)
        labels = rng.integers(0, num_classes, count)
        arrays[f"{split}_labels"] = labels[:, None] if labels_2d else labels
    np.savez(path, **arrays)
    return arrays


@pytest.mark.parametrize("shape", [(28, 28), (28, 28, 3), (64, 64)])
def test_medmnist_2d(tmp_path, shape):
    arrays = make_medmnist(tmp_path / "pathmnist.npz", shape)
    main(parse_args(["medmnist", "--npz", str(tmp_path / "pathmnist.npz"), "--output_dir", str(tmp_path / "out"),
                     "--meta_name", "meta.csv", "--label_names", "a,b,c,d"]))
    meta = tmp_path / "out" / "meta.csv"
    rows = read_metadata(meta)
    assert len(rows) == 10
    by_split = {s: [r for r in rows if r["split"] == s] for s in ("train", "val", "test")}
    for split, split_rows in by_split.items():
        assert len(split_rows) == len(arrays[f"{split}_images"])
        for i, row in enumerate(split_rows):
            img = read_image(resolve_path(row["identifier"], row, meta))
            expected = arrays[f"{split}_images"][i] / 255.0
            np.testing.assert_allclose(img[..., 0] if len(shape) == 2 else img, expected, atol=1e-6)
            assert int(row["label"]) == int(arrays[f"{split}_labels"][i, 0])
            assert row["label_name"] == "abcd"[int(row["label"])]
            assert not Path(row["identifier"]).is_absolute()  # portable: relative to the metadata


def test_medmnist_class_per_file_builds_the_multi_modality_task(tmp_path):
    # The released c2i task: one MedMNIST subset per class, named after the file.
    make_medmnist(tmp_path / "pathmnist.npz", (8, 8, 3), n=(3, 1, 1))
    make_medmnist(tmp_path / "chestmnist.npz", (8, 8), n=(2, 1, 0))
    main(parse_args(["medmnist", "--npz", str(tmp_path / "pathmnist.npz"), str(tmp_path / "chestmnist.npz"),
                     "--output_dir", str(tmp_path / "out"), "--class_per_file"]))
    rows = read_metadata(tmp_path / "out" / "metadata.jsonl")
    got = sorted({(int(r["label"]), r["label_name"]) for r in rows})
    assert got == [(0, "pathmnist"), (1, "chestmnist")]
    assert sum(int(r["label"]) == 1 for r in rows) == 3
    with pytest.raises(ValueError, match="exclude"):
        main(parse_args(["medmnist", "--npz", str(tmp_path / "pathmnist.npz"), "--output_dir", str(tmp_path / "o"),
                         "--class_per_file", "--label", "2"]))


def test_medmnist_3d_volumes_become_slice_rows(tmp_path):
    arrays = make_medmnist(tmp_path / "organmnist3d.npz", (28, 28, 28), n=(2, 1, 1), labels_2d=False)
    main(parse_args(["medmnist", "--npz", str(tmp_path / "organmnist3d.npz"), "--output_dir", str(tmp_path / "o"),
                     "--slice_stride", "7", "--splits", "train", "val"]))
    meta = tmp_path / "o" / "metadata.jsonl"
    rows = read_metadata(meta)
    assert len(rows) == 3 * 4  # 3 volumes in train+val, slices 0, 7, 14, 21
    row = [r for r in rows if r["split"] == "train"][5]  # volume 1, slice 7
    assert row["slice_index"] == 7
    img = read_image(resolve_path(row["identifier"], row, meta), row["slice_index"], row["slice_axis"])
    np.testing.assert_allclose(img[..., 0], arrays["train_images"][1][7] / 255.0, atol=1e-6)


def test_medmnist_bad_files(tmp_path):
    np.savez(tmp_path / "f.npz", train_images=np.zeros((2, 8, 8), np.float32), train_labels=np.zeros((2, 1), int))
    with pytest.raises(ReadError, match="dtype float32"):
        main(parse_args(["medmnist", "--npz", str(tmp_path / "f.npz"), "--output_dir", str(tmp_path / "o")]))
    np.savez(tmp_path / "m.npz", train_images=np.zeros((2, 8, 8), np.uint8), train_labels=np.zeros((2, 14), int))
    with pytest.raises(ReadError, match="multi-label"):
        main(parse_args(["medmnist", "--npz", str(tmp_path / "m.npz"), "--output_dir", str(tmp_path / "o")]))
    # a multi-label set can still be used with one class for the whole subset
    main(parse_args(["medmnist", "--npz", str(tmp_path / "m.npz"), "--output_dir", str(tmp_path / "o"),
                     "--label", "2", "--label_name", "x-ray"]))
    rows = read_metadata(tmp_path / "o" / "metadata.jsonl")
    assert [r["label"] for r in rows] == [2, 2] and rows[0]["label_name"] == "x-ray"


def test_folder_tree(tmp_path):
    root = tmp_path / "data"
    for cls, n in (("normal", 6), ("pneumonia", 4)):
        (root / cls / "nested").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8), i, np.uint8)).save(root / cls / "nested" / f"{i}.png")
    (root / "normal" / "notes.txt").write_text("not an image")
    shutil.copy(get_testdata_file("CT_small.dcm"), root / "pneumonia" / "ct.dcm")
    meta = root / "meta.jsonl"
    main(parse_args(["folder", "--root", str(root), "--meta_path", str(meta), "--val_fraction", "0.5", "--seed", "1"]))
    rows = read_metadata(meta)
    assert len(rows) == 11
    assert {r["label_name"]: r["label"] for r in rows} == {"normal": 0, "pneumonia": 1}
    assert sum(r["split"] == "val" for r in rows if r["label"] == 0) == 3
    assert all(resolve_path(r["identifier"], r, meta).is_file() for r in rows)


def test_folder_tree_with_split_folders_and_volumes(tmp_path):
    root = tmp_path / "d"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / split / cls / "x.png")
    shutil.copy(get_testdata_file("emri_small.dcm"), root / "train" / "b" / "mr.dcm")  # 10 frames
    meta = tmp_path / "m.csv"
    main(parse_args(["folder", "--root", str(root), "--meta_path", str(meta), "--expand_volumes"]))
    rows = read_metadata(meta)
    assert len(rows) == 4 + 10
    frames = [r for r in rows if r["identifier"].endswith("mr.dcm")]
    assert [int(r["slice_index"]) for r in frames] == list(range(10))
    assert {r["split"] for r in frames} == {"train"} and {r["label"] for r in frames} == {"1"}


def test_volumes_contiguous_holdout_and_foreground(tmp_path):
    nii = NIBABEL_DATA / "anatomical.nii"
    meta = tmp_path / "v.jsonl"
    main(parse_args(["volumes", "--inputs", str(nii), "--meta_path", str(meta), "--slice_axis", "coronal",
                     "--val_fraction", "0.2", "--label", "0", "--label_name", "brain", "--window", "brain"]))
    rows = read_metadata(meta)
    n = len(rows)
    assert n == 41 and {r["slice_axis"] for r in rows} == {1}
    splits = [r["split"] for r in rows]
    assert splits == ["train"] * (n - 9) + ["val"] * 9  # one contiguous block at the end
    assert rows[0]["window"] == "brain"
    nilearn = pytest.importorskip("nilearn")
    mni = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    main(parse_args(["volumes", "--inputs", str(mni), "--meta_path", str(meta), "--min_foreground", "0.1"]))
    kept = [int(r["slice_index"]) for r in read_metadata(meta)]
    assert 100 < len(kept) < 160  # the skull-stripped template: ~123 axial slices hold >10 % brain
    assert kept == list(range(kept[0], kept[0] + len(kept)))  # the brain is one contiguous block
    assert read_image(mni, kept[0] - 1, 0).mean() < read_image(mni, kept[0], 0).mean()
    with pytest.raises(ReadError, match="not a volume"):
        main(parse_args(["volumes", "--inputs", get_testdata_file("CT_small.dcm"), "--meta_path", str(meta)]))


def test_contiguous_splits():
    for n in (0, 1, 7, 100):
        s = contiguous_splits(n, 0.1, 0.2)
        assert len(s) == n and s == sorted(s, key=["train", "val", "test"].index)
