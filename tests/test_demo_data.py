"""The demo dataset (datasets/demo.py): real images, four classes, leak-free contiguous val blocks, deterministic."""
import argparse
import json

import numpy as np
import pytest
from PIL import Image

from datasets import demo
from datasets.metadata import read_metadata

SIZE = 32  # small PNGs keep the test fast; the sources and splits do not depend on the size
GAP = 3


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    demo.build_demo_dataset(out, image_size=SIZE, gap=GAP)
    return out


def _index(row):
    # `source` ends with the slice/frame number within the class's volume or clip.
    return int(row["source"].rsplit(":", 1)[1].removeprefix("frame"))


def test_classes_and_counts(built):
    rows = read_metadata(built / "metadata.csv")
    assert 450 <= len(rows) <= 600
    for label, name in enumerate(demo.CLASSES):
        mine = [r for r in rows if r["label_name"] == name]
        assert {int(r["label"]) for r in mine} == {label}
        train = sum(r["split"] == "train" for r in mine)
        val = sum(r["split"] == "val" for r in mine)
        assert train >= 80 and val >= 12, (name, train, val)
        assert 0.10 <= val / (train + val) <= 0.20
    assert all(r["code_identifier"] is None for r in rows)
    assert all(not r["identifier"].startswith("/") and (built / r["identifier"]).is_file() for r in rows)
    info = json.loads((built / "demo_info.json").read_text())
    assert info["classes"] == list(demo.CLASSES) and info["licences"]


def test_val_is_one_contiguous_block_away_from_train(built):
    rows = read_metadata(built / "metadata.csv")
    for name in demo.CLASSES:
        mine = [r for r in rows if r["label_name"] == name]
        val = sorted(_index(r) for r in mine if r["split"] == "val")
        train = sorted(_index(r) for r in mine if r["split"] == "train")
        assert not set(val) & set(train)
        assert val == list(range(val[0], val[-1] + 1)), f"{name}: val slices are not contiguous"
        # No training slice within GAP of the val block, and training data on both sides of it.
        assert min(abs(t - v) for t in train for v in (val[0], val[-1])) > GAP
        assert train[0] < val[0] and train[-1] > val[-1]


def test_images_are_real_and_distinct(built):
    rows = read_metadata(built / "metadata.csv")
    for name in demo.CLASSES:
        mine = [r for r in rows if r["label_name"] == name]
        middle = mine[len(mine) // 2]
        img = Image.open(built / middle["identifier"])
        assert img.mode == "L" and img.size == (SIZE, SIZE)
        x = np.asarray(img, dtype=np.float32) / 255.0
        assert x.std() > 0.05 and (x > 0.05).mean() > 0.10, name
    # Brain classes differ in shape: the mean images of two orientations are far apart.
    means = {}
    for name in demo.CLASSES:
        files = [built / r["identifier"] for r in rows if r["label_name"] == name]
        means[name] = np.mean([np.asarray(Image.open(f), dtype=np.float32) for f in files], axis=0) / 255.0
    names = list(means)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert np.abs(means[names[i]] - means[names[j]]).mean() > 0.02, (names[i], names[j])


def test_brain_slices_in_radiological_view():
    # Template axes are RAS+ (x to the patient's right, y anterior): radiological view puts the most
    # anterior row at the top and the patient's right (largest x) in the left column.
    vol = demo.mni_volume()
    axial = dict((src, img) for img, src in demo.mni_slices(2, 0.10))
    z = vol.shape[2] // 2
    img = axial[f"mni152_t1_1mm:axis2:{z}"]
    assert img.shape == (vol.shape[1], vol.shape[0])  # rows = y (A->P), columns = x (R->L)
    np.testing.assert_array_equal(img[0, 0], vol[-1, -1, z])
    np.testing.assert_array_equal(img[-1, -1], vol[0, 0, z])


def test_deterministic_and_idempotent(built, tmp_path, capsys):
    again = tmp_path / "again"
    demo.build_demo_dataset(again, image_size=SIZE, gap=GAP)
    for f in sorted(built.rglob("*")):
        if f.is_file():
            assert (again / f.relative_to(built)).read_bytes() == f.read_bytes(), f
    args = argparse.Namespace(out=str(again), image_size=SIZE, val_fraction=0.15, gap=GAP,
                              val_center=0.5, min_foreground=0.10, force=False)
    stamp = (again / "metadata.csv").stat().st_mtime_ns
    demo.main(args)
    assert "nothing to do" in capsys.readouterr().out
    assert (again / "metadata.csv").stat().st_mtime_ns == stamp


def test_quickstart_report_assembles_grid_and_metrics(built, tmp_path):
    # scripts/quickstart_report.py on stand-ins for the evaluation outputs: exact keys, null when absent.
    from scripts import quickstart_report

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(demo.CLASSES)), 3)
    samples = rng.integers(0, 256, (len(labels), 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", samples=samples, labels=labels)
    (tmp_path / "tok.json").write_text(json.dumps({"recon_psnr_db": 27.5, "recon_ssim": 0.9}))
    (tmp_path / "gen.json").write_text(json.dumps(
        {"fid": 1.5, "sample_class_accuracy": 0.75, "heldout_reference": {"fid": 0.1}, "feature_space": "classifier"}))
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "1_data.seconds").write_text("10.0\n")
    (tmp_path / "stages" / "10_tokenizer.seconds").write_text("300.5\n")
    (tmp_path / "stages" / "10_tokenizer.cmd").write_text("bash scripts/train_tokenizer.sh ")
    args = argparse.Namespace(
        out=str(tmp_path / "out"), meta_path=str(built / "metadata.csv"), samples=str(tmp_path / "samples.npz"),
        tokenizer_eval=str(tmp_path / "tok.json"), generation_eval=str(tmp_path / "gen.json"),
        classifier_eval=str(tmp_path / "missing.json"), stage_dir=str(tmp_path / "stages"),
        real_split="train", per_class=2, tile=0, pad=2, tokenizer=None, codes=None)
    quickstart_report.main(args)

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["recon_psnr_db"] == 27.5 and report["fid_classifier"] == 1.5
    assert report["fid_classifier_heldout_floor"] == 0.1 and report["classifier_val_accuracy"] is None
    assert list(report["stage_seconds"].items()) == [("data", 10.0), ("tokenizer", 300.5)]  # numeric stage order
    assert report["total_seconds"] == 310.5
    assert report["stage_commands"] == {"data": None, "tokenizer": "bash scripts/train_tokenizer.sh"}
    assert report["targets"]["recon_psnr_db"]["met"] and not report["targets"]["sample_class_accuracy"]["met"]
    assert report["fid_over_heldout_floor"] == 15.0 and not report["targets"]["fid_over_heldout_floor"]["met"]
    assert report["targets"]["precision"]["met"] is None  # not produced: neither met nor failed
    grid = np.asarray(Image.open(tmp_path / "out" / "grid.png"))
    # One row per class; blocks of two real and two generated 16-px tiles, 2-px gaps, 2 more around each block.
    assert grid.shape == (len(demo.CLASSES) * 18 + 2, 2 * (2 * 18 + 4) + 2, 3)
    first_generated = samples[labels == 0][0]
    assert np.array_equal(grid[2:18, 42:58], first_generated)  # the generated block starts after the real one
    assert "PSNR" in (tmp_path / "out" / "report.md").read_text()
