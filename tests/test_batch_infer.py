"""batch_infer.py on real files (pydicom, pydicom-data, nibabel) and bad inputs, with a tiny random MedITok.

The expected outputs are the tokenizer's results on each row's image, where the image is made here
independently of datasets/ (read by PIL / numpy / pydicom / SimpleITK / nibabel, scaled, oriented and
resized by the documented formulas written out below); the pipeline must write exactly those, under the
mirrored path, whatever the batch size.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pydicom.data import get_testdata_file

import batch_infer
from datasets.metadata import read_metadata, write_metadata
from models.checkpoint import load_checkpoint
from models.meditok import build_meditok, save_meditok

REPO = Path(__file__).resolve().parents[1]
NIBABEL_DATA = Path(__import__("nibabel").__file__).parent / "tests" / "data"
IMAGE_SIZE = 32  # MedITok-Tiny downsamples 8x: a 4 x 4 grid keeps the CPU work small


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    torch.manual_seed(0)
    model = build_meditok(model_name="MedITok-Tiny", img_size=IMAGE_SIZE)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_meditok(model, path)
    return path, build_meditok(path)


def good_rows(root: Path) -> list[dict]:
    """Real files of every supported kind, laid out under `root`, as metadata rows (relative paths)."""
    (root / "png16").mkdir(parents=True)
    (root / "a").mkdir()
    (root / "b").mkdir()
    mr = pydicom.dcmread(get_testdata_file("MR2_UNCI.dcm")).pixel_array
    Image.fromarray(mr[::4, ::4].copy()).save(root / "png16" / "mr.png")  # 16-bit PNG
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(root / "a" / "img.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(root / "b" / "img.jpg")  # same name
    np.save(root / "a" / "arr.npy", rng.integers(0, 3000, (20, 24)).astype(np.uint16))
    import SimpleITK as sitk

    sitk.WriteImage(sitk.ReadImage(get_testdata_file("CT_small.dcm")), str(root / "ct_meta.mha"))
    shutil.copy(get_testdata_file("CT_small.dcm"), root / "ct.dcm")
    shutil.copy(get_testdata_file("emri_small.dcm"), root / "emri.dcm")
    shutil.copy(NIBABEL_DATA / "anatomical.nii", root / "anat.nii")
    rows = [
        {"identifier": "png16/mr.png", "label": 0, "split": "train", "label_name": "mr"},
        {"identifier": "a/img.jpg", "label": 1, "split": "train", "label_name": "photo"},
        {"identifier": "b/img.jpg", "label": 1, "split": "val", "label_name": "photo"},
        {"identifier": "a/arr.npy", "label": 0, "split": "train", "note": "kept"},
        {"identifier": "ct_meta.mha", "label": 2, "split": "test"},
        {"identifier": "ct.dcm", "label": 2, "split": "train"},
        {"identifier": str(root / "ct.dcm"), "label": 2, "split": "train"},  # absolute identifier
    ]
    rows += [{"identifier": "emri.dcm", "label": 0, "split": "train", "slice_index": k} for k in (0, 4, 9)]
    rows += [{"identifier": "anat.nii", "label": 0, "split": "train", "slice_index": k, "slice_axis": ax}
             for k, ax in ((12, 0), (20, 1))]
    return rows


def bad_rows(root: Path) -> list[dict]:
    (root / "bad").mkdir()
    good = (root / "png16" / "mr.png").read_bytes()
    (root / "bad" / "trunc.png").write_bytes(good[: len(good) // 3])
    np.save(root / "bad" / "complex.npy", np.zeros((8, 8), np.complex64))
    shutil.copy(root / "a" / "img.jpg", root / "a" / "img.png")
    return [
        {"identifier": "bad/missing.png", "label": 0, "split": "train"},
        {"identifier": "bad/trunc.png", "label": 0, "split": "train"},
        {"identifier": "bad/complex.npy", "label": 0, "split": "train"},
        {"identifier": "a/img.jpg", "label": 7, "split": "train"},  # label out of range
        {"identifier": "../outside.png", "label": 0, "split": "train"},
        {"identifier": "anat.nii", "label": 0, "split": "train"},  # a volume without slice_index
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    good = good_rows(root)
    bad = bad_rows(root)
    good.append({"identifier": "a/img.png", "label": 0, "split": "train"})  # same stem as a/img.jpg
    rows = good[:4] + bad[:3] + good[4:] + bad[3:]  # failures interleaved with successes
    meta = root / "meta.csv"
    write_metadata(rows, meta)
    return root, meta, good, bad


def run(meta, out, ckpt, *extra) -> int:
    args = batch_infer.parse_args([
        "--output_dir", str(out), "--pretrained_path", str(ckpt), "--meta_path", str(meta),
        "--image_size", str(IMAGE_SIZE), "--num_workers", "0", "--num_classes", "3", "--no_progress", *extra,
    ])
    return batch_infer.main(args)


def percentile_unit(a) -> np.ndarray:
    """The readers' 'auto' scaling of data that is neither 8-bit nor windowed: the 0.5 and 99.5
    percentiles map to 0 and 1, clipped (float32, as the readers compute it)."""
    a = np.asarray(a).astype(np.float32)
    lo, hi = np.percentile(a, (0.5, 99.5))
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0)


def reference_image(root: Path, row: dict, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Row -> [3, size, size] in [-1, 1], read with the format's own library, not datasets.readers."""
    import nibabel as nib
    import SimpleITK as sitk

    path = Path(row["identifier"])
    path = path if path.is_absolute() else root / path
    k = row.get("slice_index")
    if path.suffix in (".png", ".jpg"):
        a = np.array(Image.open(path))
        a = a / np.float32(255) if a.dtype == np.uint8 else percentile_unit(a)
    elif path.suffix == ".npy":
        a = percentile_unit(np.load(path))
    elif path.suffix == ".mha":  # a 2-D CT written as a one-slice MetaImage
        a = percentile_unit(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[0])
    elif path.suffix == ".dcm":  # stored values -> modality units, then the frame
        ds = pydicom.dcmread(path)
        a = pydicom.pixels.apply_rescale(ds.pixel_array, ds) if "RescaleSlope" in ds else ds.pixel_array
        a = percentile_unit(a if k is None else a[k])
    elif path.suffix == ".nii":  # RAS+ [x, y, z]; radiological display: patient right on the left
        d = np.asanyarray(nib.as_closest_canonical(nib.load(str(path))).dataobj)
        if row.get("slice_axis", 0) == 0:  # axial: anterior at the top
            a = d[:, :, k].T[::-1, ::-1]
        else:  # coronal, counted from anterior: superior at the top
            a = d[:, d.shape[1] - 1 - k, :].T[::-1, ::-1]
        a = percentile_unit(a)
    else:
        raise AssertionError(f"no reference for {path}")
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)  # [C, H, W]
    # 'pad': the long side resized to `size` (bilinear, antialiased), then centred zero padding
    h, w = t.shape[1:]
    nh, nw = round(h * size / max(h, w)), round(w * size / max(h, w))
    if (nh, nw) != (h, w):
        t = F.interpolate(t[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (size - nh) // 2, (size - nw) // 2
    t = F.pad(t, (left, size - nw - left, top, size - nh - top)).clamp(0, 1)
    return t.expand(3, -1, -1) * 2 - 1  # grey replicated to the tokenizer's 3 channels; [0, 1] -> [-1, 1]


def expected_codes(model, root, rows) -> list[torch.Tensor]:
    g = model.config.grid_size(IMAGE_SIZE)
    with torch.no_grad():
        return [model.img_to_idx(reference_image(root, r)[None])[0].reshape(model.num_codebooks, g, g) for r in rows]


def test_codes_metadata_and_failures(tmp_path, tokenizer, data):
    ckpt, model = tokenizer
    root, meta, good, bad = data
    out = tmp_path / "out"
    assert run(meta, out, ckpt, "--infer_type", "code", "--batch_size", "3") == 1  # failures -> non-zero

    written = read_metadata(out / "meta.csv")
    assert [r["identifier"] for r in written] == [r["identifier"] for r in good]  # only successes, in order
    for w, g in zip(written, good):  # every other field kept
        assert all(str(w[k]) == str(v) for k, v in g.items())
    for w, codes in zip(written, expected_codes(model, root, good)):
        path = out / w["code_identifier"]
        assert path.resolve().is_relative_to(out.resolve())
        saved = load_checkpoint(path)
        assert saved.dtype == torch.int64 and saved.shape == (model.num_codebooks, 4, 4)
        assert torch.equal(saved, codes), w["identifier"]
    ids = [w["code_identifier"] for w in written]
    assert "b/img.pt" in ids  # same file name in two folders: no collision, the released name
    assert "a/img.jpg.pt" in ids and "a/img.png.pt" in ids  # same stem in one folder: the extension is kept
    assert "emri_z0004.pt" in ids and "anat_y0020.pt" in ids
    assert any(i.startswith("_abs/") for i in ids)
    assert not (tmp_path / "outside.pt").exists() and not (out.parent / "outside.pt").exists()

    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["identifier"] for f in failures] == [b["identifier"] for b in bad]
    reasons = " | ".join(f["reason"] for f in failures)
    for needle in ("file not found", "trunc.png: could not read", "unsupported pixel dtype complex64",
                   "outside [0, 3)", "contains '..'", "needs a slice_index"):
        assert needle in reasons
    assert all(isinstance(f["line"], int) and f["line"] > 1 for f in failures)
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_batch_size_one_and_latent_inverse(tmp_path, tokenizer, data):
    ckpt, model = tokenizer
    root, meta, good, bad = data
    good_meta = root / "good.jsonl"
    write_metadata(good, good_meta)
    assert run(good_meta, tmp_path / "c1", ckpt, "--infer_type", "code", "--batch_size", "1") == 0
    assert run(good_meta, tmp_path / "l5", ckpt, "--infer_type", "latent", "--batch_size", "5") == 0
    assert not (tmp_path / "c1" / "failures.jsonl").exists()
    rows = read_metadata(tmp_path / "l5" / "good.jsonl")
    assert len(rows) == len(good)
    for row, codes in zip(rows, expected_codes(model, root, good)):
        latent = load_checkpoint(tmp_path / "l5" / row["code_identifier"])
        assert latent.dtype == torch.float32 and latent.shape == (model.vocab_width, 4, 4)
        assert torch.equal(model.latent_to_idx(latent[None])[0].reshape(codes.shape), codes)
        assert torch.equal(load_checkpoint(tmp_path / "c1" / row["code_identifier"]), codes)


def test_vector_and_image_outputs(tmp_path, tokenizer, data):
    ckpt, model = tokenizer
    root, meta, good, bad = data
    small = root / "small.json"
    write_metadata(good[:3], small)
    assert run(small, tmp_path / "v", ckpt, "--infer_type", "vector", "--batch_size", "2") == 0
    images = [reference_image(root, r) for r in good[:3]]
    for i, row in enumerate(read_metadata(tmp_path / "v" / "small.json")):
        vec = load_checkpoint(tmp_path / "v" / row["code_identifier"])
        with torch.no_grad():
            torch.testing.assert_close(vec, model.encode_image(images[i][None])[0], rtol=1e-4, atol=1e-5)
    assert run(small, tmp_path / "i", ckpt, "--infer_type", "image", "--batch_size", "2") == 0
    rows = read_metadata(tmp_path / "i" / "small.json")
    for i, row in enumerate(rows):
        assert row["code_identifier"].endswith(".png")
        png = np.array(Image.open(tmp_path / "i" / row["code_identifier"]))
        with torch.no_grad():
            rec = model.img_to_reconstructed_img(images[i][None])[0]
        expected = ((rec + 1) / 2 * 255).round().permute(1, 2, 0).numpy()
        assert png.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and np.abs(png - expected).max() <= 1


def test_rerun_skips_good_outputs_and_redoes_broken_ones(tmp_path, tokenizer, data):
    ckpt, model = tokenizer
    root, meta, good, bad = data
    small = root / "rerun.csv"
    write_metadata(good[:5], small)
    out = tmp_path / "o"
    assert run(small, out, ckpt, "--infer_type", "code") == 0
    files = sorted(out.rglob("*.pt"))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    files[0].write_bytes(before[files[0]][1][:50])  # truncated
    files[1].unlink()
    (out / "a" / ".img.pt.abc123.tmp").write_bytes(b"partial")  # left by a killed run
    time.sleep(0.01)
    assert run(small, out, ckpt, "--infer_type", "code") == 0
    for p in files:
        assert p.read_bytes() == before[p][1]
    assert all(p.stat().st_mtime_ns == before[p][0] for p in files[2:])  # skipped, not rewritten
    assert not list(out.rglob("*.tmp"))


def test_output_paths_never_escape():
    rel = batch_infer.output_relpath
    assert str(rel("x/y/scan.nii.gz", 7, "sagittal")) == "x/y/scan_x0007.pt"
    assert str(rel("/abs/dir/1.2.840.10008.dcm")) == "_abs/abs/dir/1.2.840.10008.pt"
    assert str(rel("1.2.840.113619.2.55")) == "1.2.840.113619.2.55.pt"  # a DICOM UID name keeps its dots
    assert str(rel("C:\\data\\img.png", ext=".png")) == "_abs/C/data/img.png"
    for bad in ("../a.png", "a/../../b.png", "a\\..\\..\\b.png", "", "/"):
        with pytest.raises(ValueError):
            rel(bad)


@pytest.mark.slow
def test_sigkill_then_rerun_equals_clean_run(tmp_path, tokenizer, data):
    ckpt, model = tokenizer
    root, meta, good, bad = data
    # enough rows that the run is still going when the first outputs appear
    rows = good + [{"identifier": "anat.nii", "label": 1, "split": "train", "slice_index": k} for k in range(0, 25, 2)]
    rows += [{"identifier": "emri.dcm", "label": 2, "split": "val", "slice_index": k} for k in range(1, 10, 2)]
    kmeta = root / "kill.jsonl"
    write_metadata(rows, kmeta)
    killed = tmp_path / "killed"
    cmd = [sys.executable, "batch_infer.py", "--output_dir", str(killed), "--pretrained_path", str(ckpt),
           "--meta_path", str(kmeta), "--image_size", str(IMAGE_SIZE), "--infer_type", "latent",
           "--batch_size", "2", "--num_workers", "1", "--no_progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while len(list(killed.rglob("*.pt"))) < 4 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    n_before = len(list(killed.rglob("*.pt")))
    assert 0 < n_before < len(rows) and not (killed / "kill.jsonl").exists()

    assert run(kmeta, killed, ckpt, "--infer_type", "latent", "--batch_size", "3") == 0
    assert run(kmeta, tmp_path / "clean", ckpt, "--infer_type", "latent", "--batch_size", "4") == 0
    assert (killed / "kill.jsonl").read_text() == (tmp_path / "clean" / "kill.jsonl").read_text()
    def outputs(folder):  # every file but the run's own bookkeeping (journals, lock)
        return sorted(p.relative_to(folder) for p in folder.rglob("*")
                      if p.is_file() and batch_infer.STATE_DIR not in p.relative_to(folder).parts)

    names = outputs(killed)
    assert names == outputs(tmp_path / "clean")
    for name in names:
        if name.suffix == ".pt":
            assert torch.equal(load_checkpoint(killed / name), load_checkpoint(tmp_path / "clean" / name)), name


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path, tokenizer, data):
    ckpt, model = tokenizer
    root, meta, good, bad = data
    out2 = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "batch_infer.py",
           "--output_dir", str(out2), "--pretrained_path", str(ckpt), "--meta_path", str(meta),
           "--image_size", str(IMAGE_SIZE), "--num_workers", "0", "--num_classes", "3", "--no_progress",
           "--infer_type", "code", "--batch_size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode != 0, result.stderr[-2000:]  # the bad rows fail on both ranks' shares
    assert run(meta, tmp_path / "one", ckpt, "--infer_type", "code") == 1
    for name in ("meta.csv", "failures.jsonl"):
        assert (out2 / name).read_text() == (tmp_path / "one" / name).read_text()
    for row in read_metadata(out2 / "meta.csv"):
        assert torch.equal(load_checkpoint(out2 / row["code_identifier"]),
                           load_checkpoint(tmp_path / "one" / row["code_identifier"]))
    assert not (out2 / batch_infer.STATE_DIR / "parts").exists()
    # each rank tokenized its own share: disjoint, together every distinct input once
    shares = [{r["name"] for r in batch_infer.read_jsonl(out2 / batch_infer.STATE_DIR / f"done.rank{k}.jsonl")}
              for k in range(2)]
    assert shares[0] and shares[1] and not shares[0] & shares[1]
    assert shares[0] | shares[1] == {r["code_identifier"] for r in read_metadata(out2 / "meta.csv")}
