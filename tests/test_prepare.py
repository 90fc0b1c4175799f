"""datasets.prepare: MedMNIST-format npz files, class-folder trees and volumes -> metadata rows."""
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from datasets.metadata import read_metadata, resolve_path, write_metadata
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


# ----------------------------------------------------------------------------------------------
# DICOM trees, grouped splits, the leak check
# ----------------------------------------------------------------------------------------------
def dicom_tree(root: Path) -> dict:
    """6 patients; each has a CT study (an axial series beside a one-slice localizer in the same folder)
    and some an MR study. Returns {series uid: (patient, stored volume)}."""
    from test_dicom import write_series  # by basename: a top-level `tests` package (torch-fidelity) shadows ours

    rng = np.random.default_rng(0)
    truth = {}
    for p in range(6):
        patient = f"PAT{p:02d}"
        vol = rng.integers(0, 2000, (3 + p % 3, 8, 8)).astype(np.int16)
        folder, study = root / patient / "study1" / "ct", f"1.2.826.0.1.{p}.1"
        uid, _ = write_series(folder, vol, patient=patient, study_uid=study, description="AX CT", seed=p)
        truth[uid] = (patient, vol)
        uid, _ = write_series(folder, vol[:1], patient=patient, study_uid=study, description="LOCALIZER", seed=100 + p)
        truth[uid] = (patient, vol[:1])
        if p % 2:
            mr = rng.integers(0, 2000, (4, 8, 8)).astype(np.int16)
            uid, _ = write_series(root / patient / "study2" / "mr_t1", mr, patient=patient, modality="MR",
                                  description="T1 AX", seed=200 + p)
            truth[uid] = (patient, mr)
    return truth


def splits_by(rows, column):
    seen = {}
    for r in rows:
        seen.setdefault(r[column], set()).add(r["split"])
    return seen


def test_dicom_tree_rows_grouped_by_patient(tmp_path, capsys):
    from datasets.image_dataset import ImageDataset

    truth = dicom_tree(tmp_path / "tree")
    meta = tmp_path / "meta.jsonl"
    assert main(parse_args(["dicom", str(tmp_path / "tree"), "--meta_path", str(meta), "--val_fraction", "0.2",
                            "--test_fraction", "0.2", "--label_map", "CT=0,MR=1:mri", "--seed", "3"])) == 0
    rows = read_metadata(meta)
    expected_rows = sum(len(v) for _, v in truth.values())
    assert len(rows) == expected_rows
    # no patient in two splits, and the fractions as close as whole patients allow
    assert all(len(s) == 1 for s in splits_by(rows, "PatientID").values())
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    largest = max(sum(1 for r in rows if r["PatientID"] == p) for p in {r["PatientID"] for r in rows})
    for split, fraction in (("val", 0.2), ("test", 0.2)):
        assert abs(sum(r["split"] == split for r in rows) - fraction * len(rows)) <= largest
    assert {(r["Modality"], r["label"], r["label_name"]) for r in rows} == {("CT", 0, "CT"), ("MR", 1, "mri")}
    # every row reads the slice it names: folder + slice_index + SeriesInstanceUID (two series share a folder)
    ds = ImageDataset(rows, meta_path=meta, image_size=None, channels=1, value_range=(0, 1), window=(0, 4000))
    for i, row in enumerate(rows):
        patient, vol = truth[row["SeriesInstanceUID"]]
        assert row["PatientID"] == patient
        k = row.get("slice_index") or 0
        hu = vol[k].astype(np.float64) - (1024 if row["Modality"] == "CT" else 0)
        expected = np.clip((hu + 2000) / 4000, 0, 1) if row["Modality"] == "CT" else None
        item = ds[i]
        assert item["ok"], item["error"]
        if expected is not None:
            np.testing.assert_allclose(item["image"][0].numpy(), expected, atol=1e-6)
    # seeded: the same command gives the same splits
    main(parse_args(["dicom", str(tmp_path / "tree"), "--meta_path", str(tmp_path / "again.jsonl"), "--val_fraction",
                     "0.2", "--test_fraction", "0.2", "--label_map", "CT=0,MR=1:mri", "--seed", "3"]))
    assert [r["split"] for r in read_metadata(tmp_path / "again.jsonl")] == [r["split"] for r in rows]
    # the leak check: clean, then a planted leak is reported with exit status 1
    capsys.readouterr()
    assert main(parse_args(["check", str(meta), "--group_by", "PatientID"])) == 0
    assert "no group spans two splits" in capsys.readouterr().out
    victim = next(r for r in rows if r["split"] == "train" and r.get("slice_index") == 1)
    leaked = [dict(r, split="val") if r is victim else r for r in rows]
    write_metadata(leaked, tmp_path / "leaky.csv")
    assert main(parse_args(["check", str(tmp_path / "leaky.csv"), "--group_by", "PatientID"])) == 1
    out = capsys.readouterr().out
    assert f"LEAK {victim['PatientID']}" in out and "1 groups appear in more than one split" in out
    # by study too; and a regular expression on the identifier (the patient folder)
    assert main(parse_args(["check", str(tmp_path / "leaky.csv"), "--group_by", "StudyInstanceUID"])) == 1
    assert main(parse_args(["check", str(tmp_path / "leaky.csv"), "--group_by", r"re:(PAT\d+)/"])) == 1
    assert main(parse_args(["check", str(tmp_path / "leaky.csv"), "--group_by", "patient_id"])) == 2
    assert "no row has a value for --group_by patient_id" in capsys.readouterr().out


def test_dicom_per_series_step_and_label_by_description(tmp_path):
    truth = dicom_tree(tmp_path / "tree")
    meta = tmp_path / "m.csv"
    main(parse_args(["dicom", str(tmp_path / "tree"), "--meta_path", str(meta), "--per", "series",
                     "--label_by", "description", "--label_map", "*ax ct*=0:ct,t1*=1:t1"]))
    rows = read_metadata(meta)
    assert len(rows) == sum(1 for _, v in truth.values() if len(v) > 1) + 0  # localizers match no pattern: dropped
    for row in rows:
        n = len(truth[row["SeriesInstanceUID"]][1])
        assert int(row["num_slices"]) == n and int(row["slice_index"]) == n // 2
        assert row["label_name"] == ("ct" if row["Modality"] == "CT" else "t1")
    main(parse_args(["dicom", str(tmp_path / "tree"), "--meta_path", str(meta), "--slice_step", "2",
                     "--group_by", "StudyInstanceUID"]))
    rows = read_metadata(meta)
    assert all("label" not in r or r["label"] is None for r in rows)
    assert len(rows) == sum((len(v) + 1) // 2 for _, v in truth.values())
    # labels from a csv keyed by patient
    labels = tmp_path / "labels.csv"
    labels.write_text("PatientID,label,label_name\nPAT00,0,healthy\nPAT01,1,sick\n")
    main(parse_args(["dicom", str(tmp_path / "tree"), "--meta_path", str(meta), "--label_csv", str(labels)]))
    rows = read_metadata(meta)
    assert {r["PatientID"] for r in rows} == {"PAT00", "PAT01"}
    assert all(int(r["label"]) == int(r["PatientID"][-1]) for r in rows)


def test_folder_tree_grouped_by_patient(tmp_path):
    root = tmp_path / "xray"
    patients = [f"p{i}" for i in range(10)]
    for i, patient in enumerate(patients):
        for cls in ("normal", "pneumonia") if i % 3 == 0 else ("normal",):  # some patients in both classes
            (root / cls / patient).mkdir(parents=True, exist_ok=True)
            for j in range(1 + i % 4):
                Image.fromarray(np.full((8, 8), j, np.uint8)).save(root / cls / patient / f"{patient}_img{j}.png")
    meta = tmp_path / "m.csv"
    for spec in ("subfolder", r"re:(p\d+)_img"):
        main(parse_args(["folder", "--root", str(root), "--meta_path", str(meta), "--val_fraction", "0.3",
                         "--group_by", spec, "--seed", "1"]))
        rows = read_metadata(meta)
        patient_of = [Path(r["identifier"]).parent.name for r in rows]
        seen = {}
        for p, r in zip(patient_of, rows):
            seen.setdefault(p, set()).add(r["split"])
        assert all(len(s) == 1 for s in seen.values())  # across classes too
        assert {r["split"] for r in rows} == {"train", "val"}
        assert abs(sum(r["split"] == "val" for r in rows) - 0.3 * len(rows)) <= 4  # the largest patient: 4 images
    with pytest.raises(ReadError, match="no value for --group_by"):
        (root / "normal" / "stray.png").write_bytes((root / "normal" / "p0" / "p0_img0.png").read_bytes())
        main(parse_args(["folder", "--root", str(root), "--meta_path", str(meta), "--group_by", r"re:(p\d+)_img"]))


def test_folder_split_folders_are_respected_with_grouping(tmp_path):
    root = tmp_path / "d"
    for split, patient in (("train", "a"), ("train", "b"), ("val", "c")):
        (root / split / "cls" / patient).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / split / "cls" / patient / "x.png")
    meta = tmp_path / "m.csv"
    main(parse_args(["folder", "--root", str(root), "--meta_path", str(meta), "--group_by", "subfolder",
                     "--val_fraction", "0.9"]))
    assert {Path(r["identifier"]).parent.name: r["split"] for r in read_metadata(meta)} == \
        {"a": "train", "b": "train", "c": "val"}
    (root / "val" / "cls" / "a").mkdir()  # patient a in both split folders: a leak in the input
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "val" / "cls" / "a" / "y.png")
    with pytest.raises(ReadError, match=r"group 'a' .* \['train', 'val'\]"):
        main(parse_args(["folder", "--root", str(root), "--meta_path", str(meta), "--group_by", "subfolder"]))


def test_assign_group_splits_meets_fractions_and_keeps_presets():
    from datasets.prepare import assign_group_splits

    sizes = {f"g{i}": 1 for i in range(100)}
    got = assign_group_splits(sizes, {}, 0.1, 0.2, seed=0)
    counts = {s: sum(v == s for v in got.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 70, "val": 10, "test": 20}
    assert got != assign_group_splits(sizes, {}, 0.1, 0.2, seed=1)  # seeded
    assert got == assign_group_splits(sizes, {}, 0.1, 0.2, seed=0)
    got = assign_group_splits({"big": 50, **sizes}, {"big": "test", "g0": "val"}, 0.1, 0.2, seed=0)
    assert got["big"] == "test" and got["g0"] == "val" and "test" not in {got[f"g{i}"] for i in range(1, 100)}


def test_volumes_grouped_split_keeps_each_volume_or_patient_in_one_split(tmp_path, capsys):
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(0)
    folder = tmp_path / "vols"
    folder.mkdir()
    for subject in range(4):
        for scan in ("t1", "t2"):
            volume = rng.integers(0, 1000, (6, 8, 8)).astype(np.int16)
            nib.save(nib.Nifti1Image(volume, np.eye(4)), folder / f"sub-{subject}_{scan}.nii.gz")
    meta = tmp_path / "v.csv"

    def split_of(rows, key):
        seen = {}
        for r in rows:
            seen.setdefault(key(r), set()).add(r["split"])
        return seen

    # ungrouped: every volume is cut, its last slices in val (and a note says so)
    main(parse_args(["volumes", "--inputs", str(folder), "--meta_path", str(meta), "--val_fraction", "0.25"]))
    rows = read_metadata(meta)
    assert len(rows) == 8 * 8 and all(s == {"train", "val"} for s in split_of(rows, lambda r: r["identifier"]).values())
    assert "--group_by volume" in capsys.readouterr().out
    # by volume: 2 of 8 volumes in val, none cut
    main(parse_args(["volumes", "--inputs", str(folder), "--meta_path", str(meta), "--val_fraction", "0.25",
                     "--group_by", "volume", "--seed", "3"]))
    rows = read_metadata(meta)
    per_volume = split_of(rows, lambda r: r["identifier"])
    assert len(per_volume) == 8 and all(len(s) == 1 for s in per_volume.values())
    assert sorted(next(iter(s)) for s in per_volume.values()) == ["train"] * 6 + ["val"] * 2
    assert "no group spans two splits" in capsys.readouterr().out
    # by patient: both scans of a subject land together; 1 of 4 subjects in val
    main(parse_args(["volumes", "--inputs", str(folder), "--meta_path", str(meta), "--val_fraction", "0.25",
                     "--test_fraction", "0.25", "--group_by", r"re:(sub-\d+)_"]))
    rows = read_metadata(meta)
    per_subject = split_of(rows, lambda r: Path(r["identifier"]).name.split("_")[0])
    assert len(per_subject) == 4 and all(len(s) == 1 for s in per_subject.values())
    assert sorted(next(iter(s)) for s in per_subject.values()) == ["test", "train", "train", "val"]
    # a grouping that does not match every file is refused, naming the file
    with pytest.raises(ReadError, match=r"sub-\d_t\d\.nii\.gz.*no value for --group_by"):
        main(parse_args(["volumes", "--inputs", str(folder), "--meta_path", str(meta), "--val_fraction", "0.25",
                         "--group_by", r"re:patient(\d+)"]))
