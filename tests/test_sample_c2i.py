"""Class-to-image sampling: multi-process sharding, skipping, outputs, checkpoint layouts, class names.

A MedITok-Tiny tokenizer (64 px, 8x8 grid, 8 codebooks of 512) with random weights and a GPT-Tiny
trained for two steps by train_c2i on random codes of the tokenizer's shape.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.metadata import write_metadata
from evaluation.generation import sample_c2i, train_c2i
from models.checkpoint import load_checkpoint
from models.meditok import build_meditok, save_meditok

REPO = Path(__file__).resolve().parents[1]
CLASSES = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(vq checkpoint, trained GPT checkpoint, test metadata) shared by the tests of this file."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sample_c2i")
    vq = build_meditok(model_name="MedITok-Tiny", img_size=64)
    vq_path = root / "vq_tiny.pt"
    save_meditok(vq, vq_path)
    K, L, sub = vq.num_codebooks, vq.grid_size ** 2, vq.codebook_size
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(12):
        torch.save(torch.randint(0, sub, (K, vq.grid_size, vq.grid_size), generator=g), root / f"{i}.pt")
        rows.append({"identifier": f"img/{i}.png", "code_identifier": f"{i}.pt", "label": i % CLASSES,
                     "split": "train" if i < 8 else "test", "label_name": ["CT scan", "MRI", "x/ray"][i % CLASSES]})
    meta = root / "codes.jsonl"
    write_metadata(rows, meta)
    train_c2i.main(train_c2i.get_parser().parse_args([
        "--code-dir", str(meta), "--results-dir", str(root), "--exp-name", "gpt", "--gpt-model", "GPT-Tiny",
        "--vocab-size", str(K * sub), "--num-classes", str(CLASSES), "--global-batch-size", "4", "--max-steps", "2",
        "--ema", "--ema-decay", "0.5", "--no-compile", "--no-tensorboard", "--lr", "1e-3"]))
    torch.set_num_threads(n)
    return vq_path, root / "gpt" / "checkpoints" / "latest.pt", meta


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def sample(argv):
    return sample_c2i.main(sample_c2i.get_parser().parse_args([str(a) for a in argv]))


def pngs(run_dir: Path):
    return sorted(p.relative_to(run_dir).as_posix() for p in run_dir.glob("*/*.png"))


def test_class_names():
    assert sample_c2i.class_names(6) == list(sample_c2i.MODALITY_NAMES)
    assert sample_c2i.class_names(3) == ["class_0", "class_1", "class_2"]
    # A label_name column wins over the checkpoint's names; unsafe characters become '_'.
    assert sample_c2i.class_names(3, {0: "CT scan"}, {0: "ignored", 2: "x/ray"}) == ["CT_scan", "class_1", "x_ray"]
    # A name can never leave the run folder or hide: no '..', no '/', no leading dot.
    assert sample_c2i.class_names(4, {0: "..", 1: "../../etc", 2: ".hidden", 3: "/"}) == [
        "class_0", "etc", "hidden", "class_3"]
    # Two names that become one folder (also on case-insensitive file systems) get their label appended.
    assert sample_c2i.class_names(3, {0: "a/b", 1: "a_b", 2: "A_B"}) == ["a_b_0", "a_b_1", "A_B_2"]


def test_label_name_dotdot_stays_inside_the_run_folder(models, tmp_path):
    vq_path, gpt_path, meta = models
    rows = [{"identifier": f"x{i}.png", "label": i % CLASSES, "split": "test", "label_name": ".."} for i in range(3)]
    write_metadata(rows, tmp_path / "evil.jsonl")
    run_dir = sample(["--gpt-ckpt", gpt_path, "--vq-ckpt", vq_path, "--sample-dir", tmp_path / "s",
                      "--test-data-path", tmp_path / "evil.jsonl", "--cfg-scale", 1.0, "--no-prepack"])
    written = sorted(p.relative_to(tmp_path / "s") for p in (tmp_path / "s").rglob("*.png"))
    assert all(p.parts[0] == run_dir.name for p in written), written
    assert len(pngs(run_dir)) == 3


@pytest.mark.slow
def test_two_processes_write_each_index_once_then_skip(models, tmp_path):
    vq_path, gpt_path, _ = models
    args = ["--gpt-ckpt", gpt_path, "--vq-ckpt", vq_path, "--sample-dir", tmp_path, "--num-per-class", 3,
            "--per-proc-batch-size", 2, "--cfg-scale", 2.0, "--top-k", 50, "--grid-columns", 4]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "evaluation.generation.sample_c2i", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # Each rank generated its strided share (5 + 4); nothing was generated twice.
    assert "rank 0: generated 5 images" in out and "rank 1: generated 4 images" in out, out
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert "ema" in run_dir.name and "cfg2" in run_dir.name
    files = pngs(run_dir)
    # Class folders from the checkpoint's label names (recorded by train_c2i from the label_name column).
    expected = [f"{name}/{i:06d}.png" for i, name in enumerate(n for n in ["CT_scan", "MRI", "x_ray"] for _ in range(3))]
    assert files == sorted(expected)

    data = np.load(run_dir / "samples.npz")
    assert data["samples"].shape == (9, 64, 64, 3) and data["samples"].dtype == np.uint8
    assert data["labels"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert np.array_equal(data["samples"][4], np.asarray(Image.open(run_dir / "MRI" / "000004.png")))
    grid = np.asarray(Image.open(run_dir / "grid.png"))
    assert grid.shape == (3 * 64, 4 * 64, 3)
    assert np.array_equal(grid[64:128, 64:128], data["samples"][4])  # row = class 1, column = its 2nd sample

    # A second run finds everything on disk and rewrites nothing.
    mtimes = {f: (run_dir / f).stat().st_mtime_ns for f in files}
    sample(args)
    assert {f: (run_dir / f).stat().st_mtime_ns for f in files} == mtimes


def test_test_data_labels_and_released_layout(models, tmp_path):
    """Labels from --test_data_path (its test rows); a checkpoint with weights under 'model' and no
    config (the released GPT-B layout) loads, its grid taken from the tokenizer."""
    vq_path, gpt_path, meta = models
    released = tmp_path / "released.pt"
    torch.save({"model": load_checkpoint(gpt_path)["model"]}, released)
    run_dir = sample(["--gpt-ckpt", released, "--vq-ckpt", vq_path, "--sample-dir", tmp_path / "s",
                      "--test_data_path", meta, "--cfg-scale", 1.0, "--per-proc-batch-size", 4, "--copy-input",
                      "--no-prepack"])
    assert "-model-" in run_dir.name  # no EMA in this checkpoint
    files = pngs(run_dir)
    assert files == sorted(f"{['CT_scan', 'MRI', 'x_ray'][i % 3]}/{i - 8:06d}.png" for i in range(8, 12))
    assert len(list((run_dir / "input").glob("*/*.png"))) == 4
    assert np.load(run_dir / "samples.npz")["labels"].tolist() == [(i % 3) for i in range(8, 12)]

    with pytest.raises(ValueError, match="--num-classes 6 but the GPT has 3 classes"):
        sample(["--gpt-ckpt", released, "--vq-ckpt", vq_path, "--num-per-class", 1, "--num-classes", 6])


def test_run_folder_changes_with_test_rows_count_and_processes(models, tmp_path):
    """Other test rows (same count), another count, another process count: another folder, so a rerun
    never reuses PNGs made for other rows."""
    vq_path, gpt_path, _ = models
    base = ["--gpt-ckpt", gpt_path, "--vq-ckpt", vq_path, "--sample-dir", tmp_path / "s", "--cfg-scale", 1.0,
            "--no-prepack"]
    meta = tmp_path / "test.jsonl"
    write_metadata([{"identifier": f"a{i}.png", "label": i % CLASSES, "split": "test"} for i in range(3)], meta)
    first = sample(base + ["--test-data-path", meta])
    write_metadata([{"identifier": f"b{i}.png", "label": (i + 1) % CLASSES, "split": "test"} for i in range(3)], meta)
    second = sample(base + ["--test-data-path", meta])
    assert first != second and len(pngs(second)) == 3
    third = sample(base + ["--num-per-class", 1])
    assert len({first, second, third}) == 3
    assert "-n3-ws1-" in first.name
    args = sample_c2i.get_parser().parse_args(["--gpt-ckpt", "g", "--vq-ckpt", "v"])
    names = {sample_c2i.run_name(args, "g.pt", "v.pt", 64, "ema", 3, ws, "id") for ws in (1, 2)}
    assert len(names) == 2


def test_gathering_holds_one_copy_of_the_samples(tmp_path):
    """samples.npz is written from one preallocated array: peak Python/numpy memory while gathering is that
    array plus numpy's write buffer (at most 16 MiB, here the whole array), about 2x the samples; holding a
    list, stacking it and encoding the archive in memory peaked at 4x."""
    import tracemalloc

    N, H = 24, 256
    rng = np.random.default_rng(0)
    labels = [i % 3 for i in range(N)]
    paths = []
    for i in range(N):
        path = tmp_path / "run" / f"c{labels[i]}" / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (H, H, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    args = sample_c2i.get_parser().parse_args(["--gpt-ckpt", "g", "--vq-ckpt", "v", "--grid-columns", "2"])
    size = N * H * H * 3
    tracemalloc.start()
    try:
        sample_c2i.gather_outputs(args, tmp_path / "run", paths, labels, ["c0", "c1", "c2"], None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2.5 * size, f"peak {peak / size:.2f} x the samples"
    data = np.load(tmp_path / "run" / "samples.npz")
    assert data["samples"].shape == (N, H, H, 3)
    assert np.array_equal(data["samples"][5], np.asarray(Image.open(paths[5])))


def test_tokenizer_that_did_not_make_the_codes_is_refused(models, tmp_path):
    """A manifest beside the test metadata records other tokenizer weights: refused, naming both files,
    unless --allow-tokenizer-mismatch."""
    vq_path, gpt_path, _ = models
    meta = tmp_path / "codes" / "metadata.jsonl"
    meta.parent.mkdir()
    write_metadata([{"identifier": "a.png", "label": 0, "split": "test"}], meta)
    (meta.parent / "tokenizer.json").write_text(json.dumps(
        {"version": 1, "tokenizer": {"path": "/weights/other_tokenizer.pt", "sha256": "0" * 64}}))
    argv = ["--gpt-ckpt", gpt_path, "--vq-ckpt", vq_path, "--sample-dir", tmp_path / "s", "--test-data-path", meta,
            "--cfg-scale", 1.0, "--no-prepack"]
    with pytest.raises(ValueError, match=r"vq_tiny\.pt.*other_tokenizer\.pt"):
        sample(argv)
    with pytest.warns(UserWarning, match="other_tokenizer"):
        run_dir = sample(argv + ["--allow-tokenizer-mismatch"])
    assert len(pngs(run_dir)) == 1
