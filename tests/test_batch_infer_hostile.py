"""batch_infer.py against hostile data and hostile use (issue 14): collisions, inputs in the output folder,
stale outputs, poison rows, dying readers, concurrent runs, symlinks, preprocessing options.

Expected codes come from `datasets.readers.read_image_tensor` and the tokenizer called directly, one
image at a time (not through batch_infer's dataset code).
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import batch_infer
from datasets.files import FolderLock
from datasets.manifest import read_manifest
from datasets.metadata import read_metadata, write_metadata
from datasets.readers import read_image_tensor, register_format
from models.checkpoint import load_checkpoint
from models.meditok import build_meditok, save_meditok

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32  # MedITok-Tiny downsamples 8x: a 4 x 4 grid


# A test-only format whose reader kills its own process, like a decoder segfault or an OOM kill.
# The file says how: "kill" (SIGKILL) or "exit" (os._exit); each call is counted in <file>.calls.
@register_format(".crash")
def read_crash(path, frame=None):
    with open(str(path) + ".calls", "a") as f:
        f.write("1")
    if Path(path).read_text().strip() == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(3)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_meditok(build_meditok(model_name="MedITok-Tiny", img_size=IMAGE_SIZE), folder / f"tiny{seed}.pt")
        paths.append(folder / f"tiny{seed}.pt")
    return paths, build_meditok(paths[0])


def run(meta, out, ckpt, *extra, workers=0) -> int:
    args = batch_infer.parse_args([
        "--output_dir", str(out), "--pretrained_path", str(ckpt), "--meta_path", str(meta),
        "--image_size", str(IMAGE_SIZE), "--num_workers", str(workers), "--no_progress", "--batch_size", "2", *extra,
    ])
    return batch_infer.main(args)


def reference(model, path, lo=-1.0, hi=1.0, **options) -> torch.Tensor:
    """Codes [K, h, w] of one image read by datasets.readers and tokenized on its own."""
    x = read_image_tensor(path, channels=model.in_chans, image_size=IMAGE_SIZE, **options) * (hi - lo) + lo
    g = model.config.grid_size(IMAGE_SIZE)
    with torch.no_grad():
        return model.img_to_idx(x[None])[0].reshape(model.num_codebooks, g, g)


def save_png(path, seed, shape=(40, 36)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def written(out, meta_name):
    return {(r["identifier"], r.get("root_dir"), r.get("window")): r["code_identifier"]
            for r in read_metadata(out / meta_name)}


def failures(out):
    path = out / batch_infer.FAILURES
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---- 14.1: different inputs never share an output; names stay readable -------------------------
def test_inputs_that_share_a_name_get_distinct_readable_outputs(tmp_path, tokenizers, one_thread):
    (ckpt, _), model = tokenizers
    data = tmp_path / "data"
    save_png(data / "A" / "img.png", 1)
    save_png(data / "B" / "img.png", 2)  # same identifier, another root_dir
    save_png(data / "ct_slice.npy.png", 3)  # (decoy for the extension-keeping name)
    np.save(data / "ct_slice.npy", np.random.default_rng(4).integers(-1000, 1500, (36, 36)).astype(np.int16))
    import pydicom
    from pydicom.data import get_testdata_file
    import shutil

    shutil.copy(get_testdata_file("CT_small.dcm"), data / "ct_slice.dcm")  # a scan beside its conversion
    np.save(data / "vol.npy", np.random.default_rng(5).integers(-1000, 1500, (36, 36)).astype(np.int16))
    save_png(data / "solo.png", 6)
    rows = [
        {"identifier": "img.png", "root_dir": "A", "label": 0},
        {"identifier": "img.png", "root_dir": "B", "label": 0},
        {"identifier": "ct_slice.dcm", "label": 1},
        {"identifier": "ct_slice.npy", "label": 1},
        {"identifier": "vol.npy", "window": "bone", "label": 1},
        {"identifier": "vol.npy", "window": "40,400", "label": 1},
        {"identifier": "solo.png", "label": 0},
        {"identifier": "solo.png", "label": 2},  # the same input twice: one output
    ]
    meta = data / "meta.jsonl"
    write_metadata(rows, meta)
    out = tmp_path / "out"
    assert run(meta, out, ckpt) == 0
    names = written(out, "meta.jsonl")
    assert names == {
        ("img.png", "A", None): "A/img.png.pt", ("img.png", "B", None): "B/img.png.pt",
        ("ct_slice.dcm", None, None): "ct_slice.dcm.pt", ("ct_slice.npy", None, None): "ct_slice.npy.pt",
        ("vol.npy", None, "bone"): "vol.npy_wbone.pt", ("vol.npy", None, "40,400"): "vol.npy_w40,400.pt",
        ("solo.png", None, None): "solo.pt",  # unambiguous: the released name
    }
    expected = {
        "A/img.png.pt": reference(model, data / "A" / "img.png"),
        "B/img.png.pt": reference(model, data / "B" / "img.png"),
        "ct_slice.dcm.pt": reference(model, data / "ct_slice.dcm"),
        "ct_slice.npy.pt": reference(model, data / "ct_slice.npy"),
        "vol.npy_wbone.pt": reference(model, data / "vol.npy", window="bone"),
        "vol.npy_w40,400.pt": reference(model, data / "vol.npy", window="40,400"),
        "solo.pt": reference(model, data / "solo.png"),
    }
    for name, codes in expected.items():
        assert torch.equal(load_checkpoint(out / name), codes), name
    assert not torch.equal(expected["A/img.png.pt"], expected["B/img.png.pt"])  # the inputs really differ
    assert not torch.equal(expected["vol.npy_wbone.pt"], expected["vol.npy_w40,400.pt"])

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")}
    assert run(meta, out, ckpt) == 0  # a rerun: the same names, nothing redone
    assert written(out, "meta.jsonl") == names
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")} == before


def test_later_run_never_takes_an_earlier_runs_name(tmp_path, tokenizers, one_thread):
    """Names claimed by earlier runs into the folder stay with their inputs: a later run whose input
    mirrors to the same name gets another one, never the earlier output."""
    (ckpt, _), model = tokenizers
    data = tmp_path / "data"
    save_png(data / "x" / "ct.png", 1)
    first = data / "first.csv"
    write_metadata([{"identifier": "x/ct.png"}], first)
    out = tmp_path / "out"
    assert run(first, out, ckpt) == 0
    assert read_metadata(out / "first.csv")[0]["code_identifier"] == "x/ct.pt"
    # the same identifier resolved elsewhere (dataset_dir): x/ct.pt is taken by the earlier input
    other = tmp_path / "other"
    save_png(other / "x" / "ct.png", 9)
    assert run(first, out, ckpt, "--dataset_dir", str(other)) == 0
    name = read_metadata(out / "first.csv")[0]["code_identifier"]
    assert name != "x/ct.pt" and name.startswith("x/ct.png")
    assert torch.equal(load_checkpoint(out / name), reference(model, other / "x" / "ct.png"))
    assert torch.equal(load_checkpoint(out / "x" / "ct.pt"), reference(model, data / "x" / "ct.png"))  # untouched


# ---- 14.2: no output resolves to an input -------------------------------------------------------
def test_outputs_never_overwrite_inputs(tmp_path, tokenizers, one_thread):
    (ckpt, _), model = tokenizers
    d1 = tmp_path / "d1"
    save_png(d1 / "ok.png", 1)
    meta = tmp_path / "m1.csv"
    write_metadata([{"identifier": "ok.png"}], meta)
    original = (d1 / "ok.png").read_bytes()
    assert run(meta, d1, ckpt, "--dataset_dir", str(d1), "--infer_type", "image") == 0
    assert (d1 / "ok.png").read_bytes() == original  # the input is intact
    assert read_metadata(d1 / "m1.csv")[0]["code_identifier"] == "ok.png.png"
    assert np.array(Image.open(d1 / "ok.png.png")).shape == (IMAGE_SIZE, IMAGE_SIZE, 3)

    d2 = tmp_path / "d2"
    save_png(d2 / "scan.png", 2)
    torch.save(torch.rand(30, 30), d2 / "scan.pt")  # an input that is itself a .pt file
    save_png(d2 / "keep.png", 3)
    torch.save({"mine": 1}, d2 / "keep.pt")  # a file of the user's, not an input
    save_png(d2 / "plain.png", 4)
    snapshot = {p.name: p.read_bytes() for p in d2.iterdir()}
    meta = tmp_path / "m2.csv"
    write_metadata([{"identifier": n} for n in ("scan.png", "scan.pt", "keep.png", "plain.png")], meta)
    assert run(meta, d2, ckpt, "--dataset_dir", str(d2)) == 0
    assert all((d2 / n).read_bytes() == b for n, b in snapshot.items())
    names = {r["identifier"]: r["code_identifier"] for r in read_metadata(d2 / "m2.csv")}
    assert names == {"scan.png": "scan.png.pt", "scan.pt": "scan.pt.pt", "keep.png": "keep.png.pt",
                     "plain.png": "plain.pt"}  # scan.pt next to scan.png would be fine: here it is an input
    for ident, name in names.items():
        assert torch.equal(load_checkpoint(d2 / name), reference(model, d2 / ident)), ident


# ---- 14.3: stale outputs --------------------------------------------------------------------------
def test_rerun_with_other_settings_stops_or_redoes(tmp_path, tokenizers, one_thread):
    (ckpt, other_ckpt), model = tokenizers
    data = tmp_path / "data"
    save_png(data / "a.png", 1, (40, 20))
    save_png(data / "b.png", 2, (20, 40))
    meta = data / "meta.csv"
    write_metadata([{"identifier": "a.png"}, {"identifier": "b.png"}], meta)
    out = tmp_path / "out"
    assert run(meta, out, ckpt) == 0
    before = {p: p.read_bytes() for p in out.glob("*.pt")}

    with pytest.raises(SystemExit, match='fit: "pad" -> "crop"'):
        run(meta, out, ckpt, "--fit", "crop")
    with pytest.raises(SystemExit, match=r"tokenizer sha256: [0-9a-f]{12}… -> [0-9a-f]{12}…"):
        run(meta, out, other_ckpt)
    with pytest.raises(SystemExit, match="image_size"):
        run(meta, out, ckpt, "--image_size", "64")
    assert {p: p.read_bytes() for p in out.glob("*.pt")} == before  # nothing touched
    assert read_manifest(out)["preprocessing"]["fit"] == "pad"

    other_meta = data / "other.csv"  # a second metadata file tokenized into the same folder
    write_metadata([{"identifier": "b.png", "split": "test"}], other_meta)
    assert run(other_meta, out, ckpt) == 0 and (out / "other.csv").exists()
    assert run(meta, out, ckpt, "--fit", "crop", "--overwrite_changed") == 0
    assert not (out / "other.csv").exists()  # its codes were made with "pad": deleted, never mixed
    assert read_manifest(out)["preprocessing"]["fit"] == "crop"
    for name in ("a", "b"):
        assert torch.equal(load_checkpoint(out / f"{name}.pt"), reference(model, data / f"{name}.png", fit="crop"))
    assert not torch.equal(load_checkpoint(out / "a.pt"), reference(model, data / "a.png", fit="pad"))

    # an input replaced by another image under the same name is redone, the other row is not
    a_before = (out / "b.pt").stat().st_mtime_ns
    time.sleep(0.01)
    save_png(data / "a.png", 7, (40, 20))
    assert run(meta, out, ckpt, "--fit", "crop") == 0
    assert torch.equal(load_checkpoint(out / "a.pt"), reference(model, data / "a.png", fit="crop"))
    assert (out / "b.pt").stat().st_mtime_ns == a_before


# ---- 14.4 and 14.5: our own files, failures first, labels per row --------------------------------
def test_failures_are_written_first_and_names_are_ours(tmp_path, tokenizers, monkeypatch, one_thread):
    (ckpt, _), model = tokenizers
    save_png(tmp_path / "a.png", 1)
    meta = tmp_path / "failures.jsonl"
    write_metadata([{"identifier": "a.png"}], meta)
    with pytest.raises(SystemExit, match="failures.jsonl is one of batch_infer's own files"):
        run(meta, tmp_path / "out", ckpt)
    assert meta.read_text().count("a.png") == 1

    meta = tmp_path / "meta.jsonl"
    meta.write_text('{"identifier": "a.png", "label": 1e30}\n{"identifier": "a.png", "label": true}\n'
                    '{"identifier": "missing.png"}\n{"identifier": "a.png", "label": 2}\n')

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(batch_infer, "write_metadata", disk_full)
    with pytest.raises(OSError, match="No space"):
        run(meta, tmp_path / "full", ckpt)
    assert [f["line"] for f in failures(tmp_path / "full")] == [1, 2, 3]  # saved before the metadata
    monkeypatch.undo()

    out = tmp_path / "out"
    assert run(meta, out, ckpt) == 1  # no --num_classes: the huge label must still fail only its row
    reasons = {f["line"]: f["reason"] for f in failures(out)}
    assert "64-bit" in reasons[1] and "not an integer" in reasons[2] and "not found" in reasons[3]
    (row,) = read_metadata(out / "meta.jsonl")
    assert row["label"] == 2 and torch.equal(load_checkpoint(out / row["code_identifier"]),
                                             reference(model, tmp_path / "a.png"))


# ---- 14.6: a reader that kills its process --------------------------------------------------------
@pytest.mark.parametrize("how", ["kill", "exit"])
def test_dead_reader_fails_its_row_and_reruns_go_past_it(tmp_path, tokenizers, how, one_thread):
    (ckpt, _), model = tokenizers
    for i in range(4):
        save_png(tmp_path / f"g{i}.png", i)
    (tmp_path / "bomb.crash").write_text(how)
    rows = [{"identifier": "g0.png"}, {"identifier": "bomb.crash"}, {"identifier": "g1.png"},
            {"identifier": "g2.png"}, {"identifier": "g3.png"}]
    meta = tmp_path / "meta.csv"
    write_metadata(rows, meta)
    out = tmp_path / "out"
    assert run(meta, out, ckpt, workers=1) == 1
    (fail,) = failures(out)
    assert fail["identifier"] == "bomb.crash" and fail["line"] == 3 and "reader process died" in fail["reason"]
    done = read_metadata(out / "meta.csv")
    assert [r["identifier"] for r in done] == ["g0.png", "g1.png", "g2.png", "g3.png"]
    for r in done:
        assert torch.equal(load_checkpoint(out / r["code_identifier"]), reference(model, tmp_path / r["identifier"]))
    calls = tmp_path / "bomb.crash.calls"
    assert calls.read_text() == "1"

    assert run(meta, out, ckpt, workers=1) == 1  # the rerun goes past it without reading it again
    assert calls.read_text() == "1" and "earlier run" in failures(out)[0]["reason"]
    assert len(read_metadata(out / "meta.csv")) == 4
    assert run(meta, out, ckpt, "--retry_crashed", workers=1) == 1
    assert calls.read_text() == "11"


@pytest.mark.slow
def test_run_dying_twice_on_a_row_skips_it(tmp_path, tokenizers):
    """Without worker processes the reader kills the run itself: the rerun retries once, then skips it."""
    (ckpt, _), model = tokenizers
    save_png(tmp_path / "g0.png", 0)
    (tmp_path / "bomb.crash").write_text("kill")
    meta = tmp_path / "meta.csv"
    write_metadata([{"identifier": "bomb.crash"}, {"identifier": "g0.png"}], meta)
    # This module by its basename (tests/ on PYTHONPATH): a top-level `tests` package (torch-fidelity) shadows ours.
    script = ("import sys, test_batch_infer_hostile, batch_infer; "
              "sys.exit(batch_infer.main(batch_infer.parse_args(sys.argv[1:])))")
    cmd = [sys.executable, "-c", script, "--output_dir", str(tmp_path / "out"), "--pretrained_path", str(ckpt),
           "--meta_path", str(meta), "--image_size", str(IMAGE_SIZE), "--num_workers", "0", "--no_progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    codes = [subprocess.run(cmd, cwd=REPO, env=env, capture_output=True).returncode for _ in range(3)]
    assert codes == [-signal.SIGKILL, -signal.SIGKILL, 1]
    assert (tmp_path / "bomb.crash.calls").read_text() == "11"
    assert "died twice" in failures(tmp_path / "out")[0]["reason"]
    assert [r["identifier"] for r in read_metadata(tmp_path / "out" / "meta.csv")] == ["g0.png"]


# ---- 14.9 and 14.10: concurrent runs, symlinks ---------------------------------------------------
def test_second_run_on_a_folder_in_use(tmp_path, tokenizers, one_thread):
    (ckpt, _), model = tokenizers
    save_png(tmp_path / "a.png", 1)
    meta = tmp_path / "meta.csv"
    write_metadata([{"identifier": "a.png"}], meta)
    out = tmp_path / "out"
    assert run(meta, out, ckpt) == 0
    live_tmp = out / ".a.pt.x1y2z3ab.tmp"  # a temporary of the run that holds the folder
    live_tmp.write_bytes(b"partial")
    lock = FolderLock(out / batch_infer.STATE_DIR, "lock").acquire()
    try:
        with pytest.raises(SystemExit, match="in use by pid"):
            run(meta, out, ckpt)
        start = time.monotonic()
        with pytest.raises(SystemExit, match="in use"):
            run(meta, out, ckpt, "--wait_for_lock", "0.5")
        assert time.monotonic() - start >= 0.5
        assert live_tmp.exists()  # never removed while its run is alive
        threading.Timer(0.5, lock.release).start()
        assert run(meta, out, ckpt, "--wait_for_lock", "30") == 0  # waits, then runs
    finally:
        lock.release()
    assert not live_tmp.exists()  # the holder is gone: now it is a leftover


def test_symlinked_subfolder_is_refused(tmp_path, tokenizers, one_thread):
    (ckpt, _), model = tokenizers
    save_png(tmp_path / "data" / "a" / "x.png", 1)
    save_png(tmp_path / "data" / "b" / "y.png", 2)
    meta = tmp_path / "data" / "meta.csv"
    write_metadata([{"identifier": "a/x.png"}, {"identifier": "b/y.png"}], meta)
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    os.symlink(elsewhere, out / "a")
    assert run(meta, out, ckpt) == 1
    (fail,) = failures(out)
    assert fail["identifier"] == "a/x.png" and "symbolic link" in fail["reason"]
    assert list(elsewhere.iterdir()) == [] and (out / "b" / "y.pt").is_file()
    os.symlink(elsewhere, tmp_path / "out2")  # the output folder itself may be a link
    assert run(meta, tmp_path / "out2", ckpt) == 0


def test_bad_metadata_is_reported_with_file_and_line(tmp_path, tokenizers):
    (ckpt, _), model = tokenizers
    meta = tmp_path / "meta.csv"
    meta.write_bytes("identifier,label_name\na.png,ok\nb.png,Gew\xe4be\n".encode("latin-1"))
    with pytest.raises(SystemExit, match=r"meta.csv:3"):
        run(meta, tmp_path / "out", ckpt)


# ---- issue 19: the preprocessing options, against datasets.readers called directly -----------------
def test_preprocessing_options_reach_the_reader(tmp_path, tokenizers, one_thread):
    (ckpt, _), model = tokenizers
    data, meta_dir = tmp_path / "images", tmp_path / "meta"
    ct = np.random.default_rng(0).integers(-1000, 1500, (48, 30)).astype(np.int16)  # CT-like, not square
    data.mkdir()
    np.save(data / "ct.npy", ct)
    save_png(data / "photo.png", 1, (30, 48))
    meta = meta_dir / "meta.csv"
    meta_dir.mkdir()
    write_metadata([{"identifier": "ct.npy"}, {"identifier": "photo.png"}], meta)  # resolved via --dataset_dir
    flags = ["--dataset_dir", str(data), "--window", "40,400", "--intensity", "window", "--fit", "crop",
             "--model_input_min", "0", "--model_input_max", "1"]
    out = tmp_path / "out"
    assert run(meta, out, ckpt, *flags) == 0
    opts = dict(window=(40.0, 400.0), intensity="window", fit="crop", lo=0.0, hi=1.0)
    for ident, name in (("ct.npy", "ct.pt"), ("photo.png", "photo.pt")):
        got = load_checkpoint(out / name)
        assert torch.equal(got, reference(model, data / ident, **opts)), ident
        assert not torch.equal(got, reference(model, data / ident)), ident  # the defaults give other codes
    pre = read_manifest(out)["preprocessing"]
    assert (pre["window"], pre["intensity"], pre["fit"], pre["model_input_min"]) == ("40,400", "window", "crop", 0.0)
    # percentile scaling with other limits
    assert run(meta, tmp_path / "pct", ckpt, "--dataset_dir", str(data), "--intensity", "percentile",
               "--percentiles", "5", "95") == 0
    assert torch.equal(load_checkpoint(tmp_path / "pct" / "ct.pt"),
                       reference(model, data / "ct.npy", intensity="percentile", percentiles=(5.0, 95.0)))


# ---- 14.7: memory --------------------------------------------------------------------------------
@pytest.mark.slow
def test_peak_memory_on_a_one_pixel_high_strip(tmp_path, tokenizers):
    """A 1 x 60000 PNG (a few hundred bytes) must not cost the square of its long side in memory."""
    (ckpt, _), model = tokenizers
    Image.fromarray(np.full((1, 60000), 128, np.uint8)).save(tmp_path / "strip.png")
    save_png(tmp_path / "small.png", 1)
    assert (tmp_path / "strip.png").stat().st_size < 1000

    # One process: a small image first (the baseline peak: model, torch, one batch), then the strip.
    # ru_maxrss only grows, so the second reading is the strip's peak.
    for name in ("small", "strip"):
        write_metadata([{"identifier": f"{name}.png"}], tmp_path / f"{name}.csv")
    script = ("import resource, sys, batch_infer\n"
              "for name in ('small', 'strip'):\n"
              "    argv = [a.replace('NAME', name) for a in sys.argv[1:]]\n"
              "    assert batch_infer.main(batch_infer.parse_args(argv)) == 0\n"
              "    print('PEAK', name, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    cmd = [sys.executable, "-c", script, "--output_dir", str(tmp_path / "out_NAME"), "--pretrained_path", str(ckpt),
           "--meta_path", str(tmp_path / "NAME.csv"), "--image_size", str(IMAGE_SIZE), "--num_workers", "0",
           "--no_progress"]
    res = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    peaks = {line.split()[1]: int(line.split()[2]) / 1024 for line in res.stdout.splitlines() if line.startswith("PEAK")}
    base, strip = peaks["small"], peaks["strip"]  # MiB (ru_maxrss is in KiB on Linux)
    assert strip - base < 300, (base, strip)


def test_pixel_cap_fails_only_the_large_row(tmp_path, tokenizers, one_thread):
    (ckpt, _), model = tokenizers
    save_png(tmp_path / "big.png", 1, (40, 36))
    save_png(tmp_path / "small.png", 2, (10, 12))
    os.makedirs(tmp_path / ".batch_infer")
    save_png(tmp_path / ".batch_infer" / "x.png", 3, (10, 12))  # would land in the run's own folder
    meta = tmp_path / "meta.csv"
    write_metadata([{"identifier": "big.png"}, {"identifier": "small.png"}, {"identifier": ".batch_infer/x.png"}], meta)
    assert run(meta, tmp_path / "capped", ckpt, "--max_pixels", "1000") == 1
    fails = failures(tmp_path / "capped")
    assert [f["identifier"] for f in fails] == ["big.png", ".batch_infer/x.png"]
    assert "max_pixels" in fails[0]["reason"] and "no free output name" in fails[1]["reason"]
    assert [r["identifier"] for r in read_metadata(tmp_path / "capped" / "meta.csv")] == ["small.png"]
    assert read_manifest(tmp_path / "capped")["preprocessing"]["max_pixels"] == 1000
    assert run(meta, tmp_path / "free", ckpt, "--max_pixels", "0") == 1  # 0: no limit
    assert [f["identifier"] for f in failures(tmp_path / "free")] == [".batch_infer/x.png"]


@pytest.mark.slow
def test_torchrun_ranks_stop_together_on_a_refused_folder(tmp_path, tokenizers):
    """Rank 0 takes the lock (and checks the manifest); every rank must stop with its message instead of
    waiting at the next collective forever."""
    (ckpt, _), model = tokenizers
    save_png(tmp_path / "a.png", 1)
    meta = tmp_path / "meta.csv"
    write_metadata([{"identifier": "a.png"}], meta)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "batch_infer.py",
           "--output_dir", str(out), "--pretrained_path", str(ckpt), "--meta_path", str(meta),
           "--image_size", str(IMAGE_SIZE), "--num_workers", "0", "--no_progress"]
    with FolderLock(out / batch_infer.STATE_DIR, "lock"):
        res = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                             text=True, timeout=300)
    assert res.returncode != 0 and res.stderr.count("is in use by pid") >= 2  # both ranks say why


def test_outputs_get_the_umask_modes_with_parallel_writers(tmp_path, tokenizers, one_thread):
    """Writer threads must not flip the process umask: every folder and file gets the plain umask's mode."""
    (ckpt, _), model = tokenizers
    rows = []
    for i in range(8):
        save_png(tmp_path / "data" / f"d{i}" / "x.png", i, (12, 12))
        rows.append({"identifier": f"d{i}/x.png"})
    meta = tmp_path / "data" / "meta.csv"
    write_metadata(rows, meta)
    umask = os.umask(0o022)
    os.umask(umask)
    out = tmp_path / "out"
    assert run(meta, out, ckpt, "--batch_size", "8") == 0
    for p in out.rglob("*"):
        if p.is_dir():
            assert p.stat().st_mode & 0o777 == 0o777 & ~umask, p
        elif p.name.endswith(".pt"):
            assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p
