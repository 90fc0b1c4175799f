"""batch_infer's helpers against values written out by hand, files read back and torch's / argparse's own
behaviour (tests added for mutation testing, docs/MUTATION.md): output names, the skip-finished check, the
row sharding over ranks, the command line, the folder's bookkeeping and the run's plan. No model; files of
a few bytes."""
import datetime
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import batch_infer as bi
from datasets.readers import DEFAULT_MAX_PIXELS


def test_strip_image_extension():
    assert bi.strip_image_extension("scan.nii.gz") == "scan"  # the longest known extension
    assert bi.strip_image_extension("SCAN.NII.GZ") == "SCAN"  # case-insensitive, case kept
    assert bi.strip_image_extension("a.b.png") == "a.b"
    assert bi.strip_image_extension("1.2.840.5") == "1.2.840.5"  # a DICOM UID: no image extension
    assert bi.strip_image_extension(".png") == ".png"  # nothing would be left
    assert bi.strip_image_extension("x.nii") == "x"


def test_mirrored_parts():
    assert bi.mirrored_parts("a/./b//c.png") == ["a", "b", "c.png"]
    assert bi.mirrored_parts("a\\b\\c.png") == ["a", "b", "c.png"]
    assert bi.mirrored_parts("/data/x.png") == ["_abs", "data", "x.png"]
    assert bi.mirrored_parts("C:\\d\\x.png") == ["_abs", "C", "d", "x.png"]
    assert bi.mirrored_parts("ab/x.png") == ["ab", "x.png"]  # two letters without a colon: not a drive
    with pytest.raises(ValueError, match=r"^root_dir 'a/\.\./b' contains '\.\.'; outputs must stay inside --output_dir$"):
        bi.mirrored_parts("a/../b", "root_dir")
    with pytest.raises(ValueError, match=r"^identifier '\./' names no file$"):
        bi.mirrored_parts("./")


def test_slice_suffix_and_output_relpath():
    assert bi.slice_suffix() == "" and bi.slice_suffix(None, 2) == ""
    assert bi.slice_suffix(7) == "_z0007"  # axis 0 by default
    assert bi.slice_suffix(12, 1) == "_y0012" and bi.slice_suffix("3", "x") == "_x0003"
    assert bi.output_relpath("dir/a.nii.gz", 7, 1).as_posix() == "dir/a_y0007.pt"
    assert bi.output_relpath("a.png", ext=".png").as_posix() == "a.png"
    assert bi.output_relpath("/abs/b.dcm").as_posix() == "_abs/abs/b.pt"


def test_name_candidates_in_order():
    key = json.dumps(["/data/A/img.png", 4, 0, "bone", "1.2.3"])
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    row = {"identifier": "sub/img.png", "slice_index": 4, "window": "bone", "series_uid": "1.2/3", "root_dir": "A"}
    assert bi.name_candidates(row, key, ".pt", None) == [
        "sub/img_z0004.pt",
        "sub/img.png_z0004.pt",
        "sub/img.png_z0004_wbone_s1.2_3.pt",
        "A/sub/img.png_z0004_wbone_s1.2_3.pt",
        f"A/sub/img.png_z0004_wbone_s1.2_3_{digest}.pt",
    ]
    # with --dataset_dir the root_dir does not resolve the file; duplicates are dropped; SeriesInstanceUID read
    row = {"identifier": "img", "SeriesInstanceUID": "9", "root_dir": "A"}
    assert bi.name_candidates(row, key, ".png", "/ds") == ["img.png", "img_s9.png", f"img_s9_{digest}.png"]
    # an absolute identifier is not under its root_dir; a root_dir with '..' is refused by name
    row = {"identifier": "/data/img.png", "root_dir": "A"}
    assert bi.name_candidates(row, key, ".pt", None) == ["_abs/data/img.pt", "_abs/data/img.png.pt",
                                                          f"_abs/data/img.png_{digest}.pt"]
    with pytest.raises(ValueError, match=r"^root_dir '\.\./A' contains '\.\.'; outputs must stay inside --output_dir$"):
        bi.name_candidates({"identifier": "img.png", "root_dir": "../A"}, key, ".pt", None)
    row = {"identifier": "v.nii.gz", "slice_index": "12", "slice_axis": "coronal"}  # the axis names the slice
    assert bi.name_candidates(row, key, ".pt", None) == ["v_y0012.pt", "v.nii.gz_y0012.pt", f"v.nii.gz_y0012_{digest}.pt"]


def test_assign_names_by_level():
    free = lambda name, claimed: False  # noqa: E731
    # k1 and k2 want "a" at level 0: neither gets it; both go to their level-1 names. k3 shares k1's input.
    keys = ["k1", "k2", "k1", "k4"]
    cands = [["a", "a1"], ["a", "a2"], ["a", "a1"], ["d"]]
    claims = {}
    assert bi.assign_names(keys, cands, claims, free) == ["a1", "a2", "a1", "d"]
    assert claims == {"a1": "k1", "a2": "k2", "d": "k4"}
    # an earlier claim wins even when another input also wants the name; a taken name is skipped
    claims = {"a": "k2"}
    taken = lambda name, claimed: name == "b"  # noqa: E731
    assert bi.assign_names(["k1", "k2"], [["a", "b", "c"], ["a"]], claims, taken) == ["c", "a"]
    # a name claimed by another input is not taken even if the only candidate left; the last one repeats
    assert bi.assign_names(["k9"], [["a"]], {"a": "k1"}, free) == [None]
    assert bi.assign_names([], [], {}, free) == []
    assert bi.assign_names(["k1"], [["a", "b"]], {}, free) == ["a"]  # the first candidate is preferred
    # a shorter list keeps offering its last name at later levels
    assert bi.assign_names(["k1", "k2"], [["x"], ["y", "z"]], {"x": "k3", "y": "k4"}, free) == [None, "z"]
    # `taken` is told whether the name is claimed
    seen = []
    bi.assign_names(["k1", "k2"], [["x"], ["y"]], {"x": "k1"}, lambda n, c: seen.append((n, c)) or False)
    assert sorted(seen) == [("x", True), ("y", False)]


def test_output_ok(tmp_path):
    p = tmp_path / "a.pt"
    assert not bi.output_ok(p, (2, 3), torch.int64)  # missing
    torch.save(torch.zeros(2, 3, dtype=torch.int64), p)
    assert bi.output_ok(p, (2, 3), torch.int64) and bi.output_ok(p, [2, 3], torch.int64)
    assert not bi.output_ok(p, (3, 2), torch.int64) and not bi.output_ok(p, (2, 3), torch.float32)
    torch.save({"t": torch.zeros(2, 3, dtype=torch.int64)}, p)
    assert not bi.output_ok(p, (2, 3), torch.int64)  # not a tensor
    p.write_bytes(b"torn")
    assert not bi.output_ok(p, (2, 3), torch.int64)
    png = tmp_path / "b.png"
    Image.new("RGB", (5, 4)).save(png)  # PIL size is (width, height)
    assert bi.output_ok(png, (4, 5, 3), None) and not bi.output_ok(png, (5, 4, 3), None)
    png.write_bytes(png.read_bytes()[:40])  # truncated
    assert not bi.output_ok(png, (4, 5, 3), None)
    (tmp_path / "dir.pt").mkdir()
    assert not bi.output_ok(tmp_path / "dir.pt", (2, 3), torch.int64)


def test_read_jsonl_skips_torn_and_non_records(tmp_path):
    p = tmp_path / "j.jsonl"
    assert bi.read_jsonl(p) == []
    p.write_text('{"name": "a"}\n[1, 2]\n{"name": "b"}\n{"name": "c', encoding="utf-8")
    assert bi.read_jsonl(p) == [{"name": "a"}, {"name": "b"}]
    bi.append_jsonl(p, [])
    assert p.read_text(encoding="utf-8").endswith('"c')


# ---- the row sharding over ranks and the skip-finished decision (issue 19) ----------------------------
SHARD_CASES = [  # (names of the rows, None = refused; world)
    (["a", "b", "c", "d", "e", "f", "g"], 2),
    (["a", "b", "c", "d", "e", "f", "g"], 3),
    (["a", None, "b", "a", "c", None, "b", "d"], 3),  # shared inputs and refused rows
    (["a", "b"], 5),  # more ranks than outputs
    (["a", "a", "a"], 2),
    ([None, None], 2),
    ([], 4),
    (["x", "y", "z"], 1),
]


@pytest.mark.parametrize("names,world", SHARD_CASES)
def test_rank_share_deals_each_distinct_output_to_one_rank(names, world):
    distinct = sorted({n for n in names if n is not None}, key=names.index)  # order of first appearance
    shares = [bi.rank_share(names, rank, world) for rank in range(world)]
    for rank, share in enumerate(shares):
        # rank r gets distinct outputs r, r + world, r + 2 world, ...: ceil((D - r) / world) of them
        assert len(share) == max(0, -(-(len(distinct) - rank) // world))
        assert list(share) == [n for k, n in enumerate(distinct) if k % world == rank]
        assert all(share[n] == names.index(n) for n in share)  # the first row that wants the name
    union = [n for share in shares for n in share]
    assert len(union) == len(set(union)) and set(union) == set(distinct)  # disjoint, and together all of them


def test_rank_share_by_hand():
    names = ["a", None, "b", "a", "c", None, "b", "d", "e"]
    assert bi.rank_share(names, 0, 2) == {"a": 0, "c": 4, "e": 8}
    assert bi.rank_share(names, 1, 2) == {"b": 2, "d": 7}
    assert bi.rank_share(names, 0, 1) == {"a": 0, "b": 2, "c": 4, "d": 7, "e": 8}
    assert bi.rank_share(["a", "b"], 3, 4) == {}


def plan_with(tmp_path, n_inputs, finished, crashed=()):
    """Input files in0..in{n-1} and a plan whose rows want out{k}.pt for input k (row n repeats input 0);
    the outputs in `finished` are written with the journal records an earlier run leaves."""
    rows, keys, names, done = [], [], [], {}
    for k in list(range(n_inputs)) + [0]:
        src = tmp_path / f"in{k}.png"
        src.write_bytes(b"x" * (k + 1))
        rows.append({"identifier": src.name, "row": len(rows)})
        keys.append(json.dumps([str(src), None, None, None, None]))
        names.append(f"out{k}.pt")
    for k in finished:
        torch.save(torch.zeros(2, 3, dtype=torch.int64), tmp_path / f"out{k}.pt")
        st = os.stat(tmp_path / f"in{k}.png")
        done[f"out{k}.pt"] = {"name": f"out{k}.pt", "key": keys[k], "stat": [st.st_size, st.st_mtime_ns]}
    crashed = {f"out{k}.pt": {"name": f"out{k}.pt", "reason": f"boom {k}"} for k in crashed}
    return rows, {"names": names, "keys": keys, "done": done, "crashed": crashed}


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_ranks_redo_exactly_the_unfinished_outputs(tmp_path, world):
    finished, crashed = {0, 3, 4}, {5}
    rows, plan = plan_with(tmp_path, 7, finished, crashed)
    todo, reused, failed = [], set(), {}
    for rank in range(world):
        t, r, f = bi.check_share(bi.rank_share(plan["names"], rank, world), plan, rows, tmp_path, (2, 3), torch.int64)
        assert len(t) + len(r) + len(f) == len(bi.rank_share(plan["names"], rank, world))
        todo += t
        reused |= r
        failed.update(f)
    assert sorted(it["name"] for it in todo) == ["out1.pt", "out2.pt", "out6.pt"]  # each once, on one rank
    assert reused == {"out0.pt", "out3.pt", "out4.pt"}
    assert failed == {"out5.pt": "skipped: boom 5 in an earlier run (--retry_crashed reads it again)"}
    for it in todo:
        k = int(it["name"][3:-3])
        st = os.stat(tmp_path / f"in{k}.png")
        assert it == {"name": f"out{k}.pt", "key": plan["keys"][k], "stat": [st.st_size, st.st_mtime_ns], "row": rows[k]}


def test_check_share_redoes_whatever_does_not_match_the_journal(tmp_path):
    rows, plan = plan_with(tmp_path, 6, finished=range(6), crashed=[5])
    share = {f"out{k}.pt": k for k in range(6)}
    plan["done"]["out1.pt"]["key"] = plan["keys"][2]  # made from another input
    plan["done"]["out2.pt"]["stat"][1] += 1  # the input was modified since
    torch.save(torch.zeros(3, 2, dtype=torch.int64), tmp_path / "out3.pt")  # wrong shape
    (tmp_path / "out4.pt").write_bytes(b"torn")
    todo, reused, failed = bi.check_share(share, plan, rows, tmp_path, (2, 3), torch.int64, progress=False)
    assert [it["name"] for it in todo] == ["out1.pt", "out2.pt", "out3.pt", "out4.pt"]
    assert reused == {"out0.pt"}
    assert list(failed) == ["out5.pt"]  # a crash wins over a finished record
    del plan["done"]["out0.pt"]  # no record: redone even though the file is fine
    (tmp_path / "in1.png").unlink()  # a vanished input has no stat
    todo, reused, _ = bi.check_share({"out0.pt": 0, "out1.pt": 1}, plan, rows, tmp_path, (2, 3), torch.int64)
    assert [(it["name"], it["stat"]) for it in todo] == [("out0.pt", [1, os.stat(tmp_path / "in0.png").st_mtime_ns]),
                                                         ("out1.pt", None)] and reused == set()


def test_check_share_progress_bar_only_when_asked(tmp_path, capsys):
    rows, plan = plan_with(tmp_path, 2, finished=[])
    share = {"out0.pt": 0, "out1.pt": 1}
    bi.check_share(share, plan, rows, tmp_path, (2, 3), torch.int64)  # default: no bar (ranks other than 0)
    assert capsys.readouterr().err == ""
    bi.check_share(share, plan, rows, tmp_path, (2, 3), torch.int64, progress=True)
    err = capsys.readouterr().err
    # tqdm draws on stderr even when it is not a terminal; leave=False clears the bar when done (ends in '\r')
    assert err.startswith("\rchecking existing outputs: ") and "0/2" in err and err.endswith("\r")


# ---- what a run writes: outputs, failure records, the preprocessing it passes on -----------------------
def test_save_output_writes_what_readers_read_back(tmp_path):
    batch = torch.arange(4 * 2 * 3, dtype=torch.int64).reshape(4, 2, 3)
    bi.save_output(batch[1], tmp_path / "a" / "x.pt")
    got = torch.load(tmp_path / "a" / "x.pt", weights_only=True)
    assert torch.equal(got, batch[1])
    assert got.untyped_storage().nbytes() == 2 * 3 * 8  # the row alone, not the whole batch's storage
    img = torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    bi.save_output(img, tmp_path / "b" / "y.png")
    with Image.open(tmp_path / "b" / "y.png") as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert np.array_equal(np.asarray(im), img.numpy())
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["x.pt", "y.png"]  # no temporaries


def test_failure_record():
    assert bi.failure_record({"identifier": "a.png", "_line": 3, "label": 1}, "why") == {
        "identifier": "a.png", "line": 3, "reason": "why"}
    assert bi.failure_record({"identifier": "v.nii", "_line": 9, "slice_index": 0}, "r") == {
        "identifier": "v.nii", "line": 9, "reason": "r", "slice_index": 0}  # slice 0 is a slice
    assert bi.failure_record({}, "r") == {"identifier": None, "line": None, "reason": "r"}


def test_dataset_options_from_the_command_line():
    base = ["--output_dir", "o", "--pretrained_path", "w.pt", "--meta_path", "m.csv"]
    args = bi.parse_args(base + ["--window", "40,400", "--intensity", "window", "--percentiles", "5", "95",
                                 "--fit", "crop", "--model_input_min", "0", "--model_input_max", "2",
                                 "--max_pixels", "1000"])
    assert bi.dataset_options(args, 48, 1) == dict(
        image_size=48, channels=1, value_range=(0.0, 2.0), window="40,400", intensity="window",
        percentiles=(5.0, 95.0), fit="crop", max_pixels=1000)
    defaults = bi.dataset_options(bi.parse_args(base), 32, 3)
    assert defaults == dict(image_size=32, channels=3, value_range=(-1.0, 1.0), window=None, intensity="auto",
                            percentiles=(0.5, 99.5), fit="pad", max_pixels=DEFAULT_MAX_PIXELS)
    assert type(defaults["percentiles"]) is tuple
    assert bi.dataset_options(bi.parse_args(base + ["--max_pixels", "0"]), 32, 3)["max_pixels"] is None  # no cap


def test_close_inherited_closes_the_lock_copy(tmp_path):
    fd = os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR)
    bi.close_inherited(None, 0)  # no lock held (ranks other than 0)
    bi.close_inherited(fd, 3)
    with pytest.raises(OSError):
        os.fstat(fd)


# ---- the command line -----------------------------------------------------------------------------------
REQUIRED = ["--output_dir", "o", "--pretrained_path", "w.pt", "--meta_path", "m.csv"]


def test_parse_args_defaults_written_out():
    assert vars(bi.parse_args(REQUIRED)) == dict(
        output_dir="o", pretrained_path="w.pt", meta_path="m.csv", dataset_dir=None, infer_type="code",
        image_size=None, model_input_min=-1.0, model_input_max=1.0, model_input_channel=None, precision="bf16",
        window=None, intensity="auto", percentiles=(0.5, 99.5), fit="pad", max_pixels=DEFAULT_MAX_PIXELS,
        num_classes=None, batch_size=16, num_workers=4, overwrite_changed=False, wait_for_lock=None,
        retry_crashed=False, no_progress=False)


def test_parse_args_every_flag_reaches_its_field():
    args = bi.parse_args(REQUIRED + [
        "--dataset_dir", "d", "--infer_type", "latent", "--image_size", "48", "--model_input_min", "0",
        "--model_input_max", "2.5", "--model_input_channel", "1", "--precision", "fp32", "--window", "bone",
        "--intensity", "percentile", "--percentiles", "1", "99", "--fit", "stretch", "--max_pixels", "0",
        "--num_classes", "3", "--batch_size", "1", "--num_workers", "0", "--overwrite_changed",
        "--wait_for_lock", "2.5", "--retry_crashed", "--no_progress"])
    assert vars(args) == dict(
        output_dir="o", pretrained_path="w.pt", meta_path="m.csv", dataset_dir="d", infer_type="latent",
        image_size=48, model_input_min=0.0, model_input_max=2.5, model_input_channel=1, precision="fp32",
        window="bone", intensity="percentile", percentiles=[1.0, 99.0], fit="stretch", max_pixels=0,
        num_classes=3, batch_size=1, num_workers=0, overwrite_changed=True, wait_for_lock=2.5,
        retry_crashed=True, no_progress=True)
    for field in ("image_size", "model_input_channel", "max_pixels", "num_classes", "batch_size", "num_workers"):
        assert type(getattr(args, field)) is int, field
    for field in ("model_input_min", "model_input_max", "wait_for_lock"):
        assert type(getattr(args, field)) is float, field


@pytest.mark.parametrize("argv,message", [
    (REQUIRED[2:], "the following arguments are required: --output_dir"),
    (REQUIRED[:2] + REQUIRED[4:], "the following arguments are required: --pretrained_path"),
    (REQUIRED[:4], "the following arguments are required: --meta_path"),
    (REQUIRED + ["--infer_type", "codes"], "argument --infer_type: invalid choice: 'codes'"),
    (REQUIRED + ["--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
    (REQUIRED + ["--intensity", "loud"], "argument --intensity: invalid choice: 'loud'"),
    (REQUIRED + ["--fit", "fill"], "argument --fit: invalid choice: 'fill'"),
    (REQUIRED + ["--percentiles", "5"], "argument --percentiles: expected 2 arguments"),
    (REQUIRED + ["--batch_size", "0"], "--batch_size must be at least 1"),
    (REQUIRED + ["--model_input_min", "1", "--model_input_max", "1"],
     "--model_input_max must be greater than --model_input_min"),
    (REQUIRED + ["--model_input_min", "2"], "--model_input_max must be greater than --model_input_min"),
    (REQUIRED + ["--max_pixels", "-1"], "--max_pixels must be 0 (no limit) or positive"),
])
def test_parse_args_refusals_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bi.parse_args(argv)
    assert e.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err


def test_parse_args_bounds_that_are_allowed():
    args = bi.parse_args(REQUIRED + ["--batch_size", "1", "--max_pixels", "0", "--model_input_min", "0.5",
                                     "--model_input_max", "0.75"])
    assert (args.batch_size, args.max_pixels, args.model_input_min, args.model_input_max) == (1, 0, 0.5, 0.75)
    assert bi.parse_args(REQUIRED + ["--infer_type", "image"]).infer_type == "image"
    assert bi.parse_args(REQUIRED + ["--precision", "bf16"]).precision == "bf16"  # the default, also when given


# ---- taking over a folder, the run's plan -----------------------------------------------------------------
def test_check_paths_refuses_our_own_names_and_the_input(tmp_path):
    args = bi.parse_args(REQUIRED)
    for name in ("failures.jsonl", "tokenizer.json", ".batch_infer"):
        args.meta_path = str(tmp_path / "in" / name)
        with pytest.raises(SystemExit) as e:
            bi.check_paths(args, tmp_path / "out")
        assert e.value.code == (f"--meta_path {args.meta_path}: the name {name} is one of batch_infer's own files "
                                "in --output_dir (failures.jsonl, tokenizer.json, .batch_infer); rename the metadata file")
    (tmp_path / "in").mkdir()
    args.meta_path = str(tmp_path / "in" / "meta.csv")
    os.symlink(tmp_path / "in", tmp_path / "link")
    for out in (tmp_path / "in", tmp_path / "link", tmp_path / "in" / ".." / "in"):  # the same folder, spelt three ways
        with pytest.raises(SystemExit) as e:
            bi.check_paths(args, out)
        assert e.value.code == (f"--meta_path {args.meta_path} would be overwritten by the output metadata; "
                                "choose another --output_dir")
    assert bi.check_paths(args, tmp_path / "out") == tmp_path / "out" / "meta.csv"


def manifest_file(out):
    path = out / "tokenizer.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def test_take_over_folder_writes_compares_and_clears(tmp_path, capsys):
    out, state = tmp_path / "out", tmp_path / "out" / ".batch_infer"
    state.mkdir(parents=True)
    args = bi.parse_args(REQUIRED)
    def manifest(fit, weights):
        return {"version": 1, "tokenizer": {"path": weights, "sha256": "ab"}, "preprocessing": {"fit": fit}}

    new = manifest("crop", "a.pt")
    bi.take_over_folder(args, out, state, new)  # a fresh folder: the manifest is written
    assert manifest_file(out) == new
    bi.take_over_folder(args, out, state, manifest("crop", "b.pt"))
    assert manifest_file(out)["tokenizer"]["path"] == "b.pt"  # a change that no output depends on: rewritten

    # outputs, claims and journals of an earlier run made with fit "pad"
    (out / "tokenizer.json").write_text(json.dumps({**manifest("pad", "c.pt"), "image_size": 32}))
    (out / "sub").mkdir()
    for name in ("a.pt", "sub/b.pt", "failures.jsonl", "mine.pt"):
        (out / name).write_bytes(b"x")
    os.symlink(out / "mine.pt", out / "link.pt")
    claims = [{"name": n, "key": "k"} for n in ("a.pt", "sub/b.pt", "gone.pt", "link.pt", "sub")]
    (state / "claims.jsonl").write_text("".join(json.dumps(c) + "\n" for c in claims))
    (state / "done.rank0.jsonl").write_text("{}\n")
    (state / "lock").write_text("")
    with pytest.raises(SystemExit) as e:
        bi.take_over_folder(args, out, state, new)
    assert e.value.code == (f"{out} holds outputs made with other settings (tokenizer.json):\n"
                            '  image_size: 32 -> (absent)\n  fit: "pad" -> "crop"\n'
                            "use another --output_dir, or pass --overwrite_changed to delete those outputs and redo them")
    assert (out / "a.pt").exists() and manifest_file(out)["image_size"] == 32  # nothing touched

    args.overwrite_changed = True
    capsys.readouterr()
    bi.take_over_folder(args, out, state, new)
    # claimed plain files go; the link (not its target), the folder, unclaimed files and the lock stay
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        ".batch_infer", ".batch_infer/lock", "link.pt", "mine.pt", "sub", "tokenizer.json"]
    assert manifest_file(out) == new
    assert capsys.readouterr().out == ('--overwrite_changed: settings changed (image_size: 32 -> (absent); '
                                       'fit: "pad" -> "crop"); removed 2 earlier outputs\n')


def test_take_over_folder_without_a_manifest_but_with_claims(tmp_path):
    out, state = tmp_path / "out", tmp_path / "out" / ".batch_infer"
    state.mkdir(parents=True)
    (state / "claims.jsonl").write_text(json.dumps({"name": "a.pt", "key": "k"}) + "\n")
    (out / "a.pt").write_bytes(b"x")
    with pytest.raises(SystemExit, match="^.* holds outputs made with other settings \\(tokenizer.json\\):\n"
                                         "  no tokenizer.json, but outputs of an earlier run are recorded\n"):
        bi.take_over_folder(bi.parse_args(REQUIRED), out, state, {"version": 1, "tokenizer": {}})
    bi.take_over_folder(bi.parse_args(REQUIRED + ["--overwrite_changed"]), out, state, {"version": 1, "tokenizer": {}})
    assert not (out / "a.pt").exists() and manifest_file(out) == {"version": 1, "tokenizer": {}}


def test_on_rank0_in_one_process():
    assert bi.on_rank0(1, 0, lambda: {"plan": 1}) == {"plan": 1}
    for error, message in ((SystemExit("stop here"), "stop here"), (ValueError("bad value"), "bad value"),
                           (OSError("disk"), "disk"), (bi.FolderLockedError("in use"), "in use")):
        def fail(error=error):
            raise error
        with pytest.raises(SystemExit) as e:
            bi.on_rank0(1, 0, fail)
        assert e.value.code == message
    with pytest.raises(KeyError):  # anything else is a bug: its traceback is kept
        bi.on_rank0(1, 0, lambda: {}["x"])


def test_plan_run_names_refusals_and_claims(tmp_path):
    data, meta_dir = tmp_path / "data", tmp_path / "meta"
    for rel in ("a.png", "b/a.png", "c.png", "d.png", "link/e.png", ".batch_infer/f.png"):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(b"img")
    meta_dir.mkdir()
    meta = meta_dir / "meta.csv"
    meta.write_text("identifier\n")
    out = data  # outputs beside the inputs: names must step around them
    state = out / ".batch_infer"
    (out / "d.png.png").write_bytes(b"not ours")  # a file batch_infer did not write
    os.symlink(tmp_path, out / "sub")
    args = bi.parse_args(["--output_dir", str(out), "--pretrained_path", "w.pt", "--meta_path", str(meta),
                          "--dataset_dir", str(data), "--num_classes", "3", "--infer_type", "image"])
    rows = [{"identifier": "a.png", "label": 0}, {"identifier": "b/a.png"}, {"identifier": "a.png", "label": 2},
            {"identifier": "c.png", "label": 3, "_line": 5}, {"identifier": "../x.png"}, {"identifier": "d.png"},
            {"identifier": ".batch_infer/f.png"}, {"identifier": "sub/g.png"}, {"identifier": "meta.csv"}]
    key = lambda rel: json.dumps([str(data / rel), None, None, None, None])  # noqa: E731
    digest = lambda rel: hashlib.sha1(key(rel).encode()).hexdigest()[:10]  # noqa: E731
    plan = bi.plan_run(args, rows, out, state, ".png")
    assert plan["names"] == ["a.png.png", "b/a.png.png", "a.png.png", None, None, f"d.png_{digest('d.png')}.png",
                             None, None, "meta.csv.png"]
    errors = plan["errors"]
    assert errors[3] == f"MetadataError: {meta}:5 (c.png): label 3 is outside [0, 3)"  # file and line named
    assert errors[4] == "ValueError: identifier '../x.png' contains '..'; outputs must stay inside --output_dir"
    assert errors[6] == ("no free output name among ['.batch_infer/f.png', '.batch_infer/f.png.png', "
                         f"'.batch_infer/f.png_{digest('.batch_infer/f.png')}.png']")
    assert errors[7] == (f"output folder {out / 'sub'} is a symbolic link (or not a folder); "
                         "refusing to write outside --output_dir")
    assert [e is None for e in errors] == [n is not None for n in plan["names"]]
    assert plan["keys"][:3] == [key("a.png"), key("b/a.png"), key("a.png")] and plan["keys"][3] is None  # label first
    claimed = [{"name": "a.png.png", "key": key("a.png")}, {"name": "b/a.png.png", "key": key("b/a.png")},
               {"name": f"d.png_{digest('d.png')}.png", "key": key("d.png")},
               {"name": "meta.csv.png", "key": key("meta.csv")}]
    assert [json.loads(line) for line in (state / "claims.jsonl").read_text().splitlines()] == claimed
    ours = {c["name"] for c in claimed} | {".batch_infer", "failures.jsonl", "tokenizer.json"}
    assert plan["ours"] == sorted(plan["ours"]) and ours <= set(plan["ours"]) <= ours | {"sub/g.png.png"}
    assert plan["done"] == {} and plan["crashed"] == {}

    # a second plan keeps the claims (even for a name that is now unwanted) and appends nothing
    plan2 = bi.plan_run(args, rows[:2], out, state, ".png")
    assert plan2["names"] == ["a.png.png", "b/a.png.png"] and plan2["ours"] == sorted(ours)
    assert len((state / "claims.jsonl").read_text().splitlines()) == len(claimed)
    # inputs and the metadata file are never outputs, even where a claim (an earlier run's) names them
    args.meta_path = str(data / "meta.csv")
    (data / "meta.csv").write_text("identifier\n")
    bi.append_jsonl(state / "claims.jsonl", [{"name": "meta.csv", "key": key("meta.png")},
                                             {"name": "c.png", "key": key("c.png")}])
    rows = [{"identifier": "meta.png"}, {"identifier": "c.png"}]
    assert bi.plan_run(args, rows, out, state, ".csv")["names"] == ["meta.png.csv", "c.csv"]
    assert bi.plan_run(args, rows[1:], out, state, ".png")["names"] == ["c.png.png"]
    (data / ".batch_infer" / "s").mkdir()
    (data / ".batch_infer" / "s" / "f.png").write_bytes(b"img")
    assert bi.plan_run(args, [{"identifier": ".batch_infer/s/f.png"}], out, state, ".png")["names"] == [None]
    # with --dataset_dir a row's root_dir resolves nothing, so it is no name either: windows 'a b' and 'a_b'
    # have one safe spelling, and the two inputs end at their hashes, not under R1/ and R2/
    rows = [{"identifier": "q.png", "window": w, "root_dir": r} for w, r in (("a b", "R1"), ("a_b", "R2"))]
    digests = [hashlib.sha1(json.dumps([str(data / "q.png"), None, None, w, None]).encode()).hexdigest()[:10]
               for w in ("a b", "a_b")]
    assert bi.plan_run(args, rows, out, state, ".pt")["names"] == [f"q.png_wa_b_{d}.pt" for d in digests]


def test_plan_run_reads_journals_crashes_and_suspects(tmp_path):
    out, state = tmp_path / "out", tmp_path / "out" / ".batch_infer"
    state.mkdir(parents=True)
    (tmp_path / "a.png").write_bytes(b"img")
    meta = tmp_path / "meta.csv"
    meta.write_text("identifier\n")
    args = bi.parse_args(["--output_dir", str(out), "--pretrained_path", "w.pt", "--meta_path", str(meta)])
    rows = [{"identifier": "a.png"}]
    (state / "done.rank0.jsonl").write_text('{"name": "x.pt", "v": 1}\n{"name": "y.pt", "v": 1}\n{"name": "x.pt", "v": 2}\n')
    (state / "done.rank1.jsonl").write_text('{"name": "y.pt", "v": 3}\n')
    (state / "crashed.jsonl").write_text('{"name": "z.pt", "reason": "r"}\n')
    (state / "reading.123").write_text("s.pt")  # a row being read when the whole run died
    (state / "reading.124").write_text("")  # a reader that finished its row
    (state / "reading.x").write_text("t.pt")  # not a reader's file
    plan = bi.plan_run(args, rows, out, state, ".pt")
    assert plan["keys"] == [json.dumps([str(tmp_path / "a.png"), None, None, None, None])]  # beside the metadata
    assert plan["done"] == {"x.pt": {"name": "x.pt", "v": 2}, "y.pt": {"name": "y.pt", "v": 3}}  # the latest wins
    assert plan["crashed"] == {"z.pt": {"name": "z.pt", "reason": "r"}}
    assert json.loads((state / "suspects.json").read_text()) == {"s.pt": 1}  # retried once
    assert sorted(p.name for p in state.glob("reading.*")) == ["reading.x"]
    (state / "reading.125").write_text("s.pt")  # ... and the run died on it again
    plan = bi.plan_run(args, rows, out, state, ".pt")
    dead = {"name": "s.pt", "reason": "the run died twice while reading this row"}
    assert plan["crashed"] == {"z.pt": {"name": "z.pt", "reason": "r"}, "s.pt": dead}
    assert json.loads((state / "suspects.json").read_text()) == {"s.pt": 2}
    assert [json.loads(line) for line in (state / "crashed.jsonl").read_text().splitlines()] == [
        {"name": "z.pt", "reason": "r"}, dead]
    args.retry_crashed = True
    plan = bi.plan_run(args, rows, out, state, ".pt")
    assert plan["crashed"] == {} and len(plan["done"]) == 2


# ---- the folder's bookkeeping: journals, temporaries, readers that died ----------------------------------
def test_worker_death_reads_the_pids_of_both_torch_messages():
    # the two wordings of torch's DataLoader (the SIGCHLD handler's, and the check on a failed queue read)
    assert bi.worker_death(RuntimeError("DataLoader worker (pid 4321) is killed by signal: Killed. ")) == {4321}
    assert bi.worker_death(RuntimeError("DataLoader worker (pid 77) exited unexpectedly with exit code 3. "
                                        "Details are lost due to multiprocessing.")) == {77}
    assert bi.worker_death(RuntimeError("DataLoader worker (pid(s) 12, 345) exited unexpectedly")) == {12, 345}
    assert bi.worker_death(RuntimeError("DataLoader worker exited unexpectedly")) == set()  # no pid: all readers
    assert bi.worker_death(RuntimeError("CUDA error 700 (pid 5)")) is None  # not a worker's death
    assert bi.worker_death(ValueError("DataLoader worker (pid 5) is killed by signal")) is None


def leftover(folder, name):
    """A temporary as datasets.files' atomic writers name it (tempfile.mkstemp in the destination folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    return Path(path)


def test_remove_stale_temporaries_only_ours(tmp_path):
    out = tmp_path / "out"
    ours = [leftover(out / "a", "img.pt"), leftover(out, "tokenizer.json"), leftover(out / ".batch_infer", "claims.jsonl"),
            leftover(out / ".batch_infer" / "parts", "rank1.json"), leftover(out, "x.y.png")]
    theirs = [leftover(out / "a", "other.pt"), leftover(out, "img.pt"), leftover(out / "b", "img.pt")]
    (out / "a" / "img.pt.tmp").write_bytes(b"")  # not a hidden temporary
    (out / ".img.pt.tmp.keep").write_bytes(b"")
    (out / "a" / "ximg.pt.r1.tmp").write_bytes(b"")  # not hidden: not a temporary of a/img.pt
    (out / "a" / ".img.pt.abcd").write_bytes(b"")  # hidden, but no .tmp
    kept = sorted(p for p in out.rglob("*") if p.is_file() and p not in ours)
    assert bi.remove_stale_temporaries(out, {"a/img.pt", "tokenizer.json", "x.y.png", "c.pt"}) == len(ours)
    assert sorted(p for p in out.rglob("*") if p.is_file()) == kept and all(p.exists() for p in theirs)
    assert bi.remove_stale_temporaries(out, {"a/img.pt"}) == 0


def test_rows_being_read_and_the_tracker(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "reading.11").write_text("a.pt")
    (state / "reading.12").write_text("")  # finished its row
    (state / "reading.13").write_text("c/d.pt")
    (state / "reading.x1").write_text("e.pt")  # not a pid
    (state / "other.11").write_text("f.pt")
    (state / "reading.7.old").write_text("g.pt")  # not a reader's file either
    (state / "reading.old.8").write_text("h.pt")
    assert bi.rows_being_read(state, {13, 99}) == {13: "c/d.pt"}  # only those pids, and their files go
    assert sorted(p.name for p in state.iterdir()) == ["other.11", "reading.11", "reading.12", "reading.7.old",
                                                       "reading.old.8", "reading.x1"]
    assert bi.rows_being_read(state) == {11: "a.pt"}
    assert sorted(p.name for p in state.iterdir()) == ["other.11", "reading.7.old", "reading.old.8", "reading.x1"]

    seen = []

    class Rows:
        def __len__(self):
            return 3

        def __getitem__(self, i):
            seen.append((state / f"reading.{os.getpid()}").read_text())  # what a killed reader leaves behind
            return i * 10

    tracker = bi.ReadTracker(Rows(), ["long/name0.pt", "n1.pt", "x.pt"], state)
    fds = len(os.listdir("/proc/self/fd"))
    assert len(tracker) == 3 and [tracker[i] for i in (0, 1, 2)] == [0, 10, 20]
    assert len(os.listdir("/proc/self/fd")) == fds + 1  # one mark file per reader process, not one per row
    assert seen == ["long/name0.pt", "n1.pt", "x.pt"]  # the name alone, no tail of a longer earlier one
    assert (state / f"reading.{os.getpid()}").read_text() == ""  # cleared once the row is read
    assert oct((state / f"reading.{os.getpid()}").stat().st_mode & 0o777) == oct(0o644 & ~current_umask())


def current_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_append_jsonl_and_input_stat(tmp_path):
    p = tmp_path / "j.jsonl"
    bi.append_jsonl(p, [{"a": 1}, {"b": [2, "x"]}])
    bi.append_jsonl(p, [{"c": None}], sync=True)
    assert p.read_text(encoding="utf-8") == '{"a": 1}\n{"b": [2, "x"]}\n{"c": null}\n'
    bi.append_jsonl(tmp_path / "none.jsonl", [])
    assert not (tmp_path / "none.jsonl").exists()  # nothing to write: no file
    src = tmp_path / "in.png"
    src.write_bytes(b"12345")
    st = os.stat(src)
    assert bi.input_stat(json.dumps([str(src), None, None, None, None])) == [5, st.st_mtime_ns]
    assert bi.input_stat(json.dumps([str(tmp_path / "gone.png"), 3, 0, None, None])) is None


def test_input_key_series_and_safe_names(tmp_path):
    meta = tmp_path / "m" / "meta.csv"
    row = {"identifier": "x/v.nii", "slice_index": "7", "slice_axis": "coronal", "window": "bone",
           "SeriesInstanceUID": "1.2"}
    assert bi.input_key(row, meta, None) == json.dumps([str(tmp_path / "m" / "x" / "v.nii"), 7, 1, "bone", "1.2"])
    assert bi.input_key({"identifier": "v.nii", "slice_axis": 2}, meta, str(tmp_path / "d")) == json.dumps(
        [str(tmp_path / "d" / "v.nii"), None, None, None, None])  # no slice: the axis does not matter
    assert bi.input_key({"identifier": "a/../v.nii", "root_dir": str(tmp_path / "r")}, meta, None) == json.dumps(
        [str(tmp_path / "r" / "v.nii"), None, None, None, None])  # normalised, root_dir used
    assert bi.row_series({"series_uid": "9", "SeriesInstanceUID": "8"}) == "9"
    assert bi.row_series({"series_uid": "", "SeriesInstanceUID": "8"}) == "8" and bi.row_series({}) is None
    assert bi._safe("Bone W1 a/b:c,d+e=f-g.h_ü") == "Bone_W1_a_b_c,d+e=f-g.h__"


def test_symlinked_parent(tmp_path):
    out = tmp_path / "out"
    (out / "a" / "b").mkdir(parents=True)
    (out / "f").write_bytes(b"")
    os.symlink(tmp_path, out / "a" / "l")
    cache = {}
    assert bi.symlinked_parent(out, "a/b/x.pt", cache) is None
    assert bi.symlinked_parent(out, "x.pt", cache) is None
    assert bi.symlinked_parent(out, "a/l/c/x.pt", cache) == out / "a" / "l"  # the first one on the way
    assert bi.symlinked_parent(out, "f/x.pt", cache) == out / "f"  # a file where a folder should be
    assert bi.symlinked_parent(out, "new/deeper/x.pt", cache) is None  # not there yet: created later
    (out / "a" / "b").rmdir()
    os.symlink(tmp_path, out / "a" / "b")
    assert bi.symlinked_parent(out, "a/b/y.pt", cache) is None  # answered from the cache, per folder
    assert bi.symlinked_parent(out, "a/b/y.pt", {}) == out / "a" / "b"


def _on_rank0_rank(rank: int, init: str, out: str, fail: bool):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        def prepare():
            assert rank == 0, "prepare() ran on rank 1"
            if fail:
                raise ValueError("rank 0 says no")
            return {"names": ["a.pt", None]}
        try:
            got = ["ok", bi.on_rank0(2, rank, prepare)]
        except SystemExit as e:
            got = ["exit", e.code]
        Path(f"{out}.{rank}").write_text(json.dumps(got))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fail", [False, True])
def test_on_rank0_gives_rank0s_result_or_error_to_every_rank(tmp_path, fail):
    # Rank 0 runs in this process (so mutmut's coverage sees the call), rank 1 in a forked child.
    args = (f"file://{tmp_path / 'init'}", str(tmp_path / "got"), fail)
    child = mp.get_context("fork").Process(target=_on_rank0_rank, args=(1, *args))
    child.start()
    try:
        _on_rank0_rank(0, *args)
    finally:
        child.join(90)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    expected = ["exit", "rank 0 says no"] if fail else ["ok", {"names": ["a.pt", None]}]
    assert [json.loads((tmp_path / f"got.{r}").read_text()) for r in (0, 1)] == [expected, expected]


# ---- a whole run in this process: what reaches the manifest and the outputs ----------------------------------
@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from models.meditok import build_meditok, save_meditok

    torch.manual_seed(0)
    model = build_meditok(model_name="MedITok-Tiny", img_size=32)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_meditok(model, path)
    return path, model


def test_run_records_every_setting_in_the_manifest(tmp_path, tiny_tokenizer, one_thread):
    ckpt, model = tiny_tokenizer
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 36), dtype=np.uint8)).save(data / "a.png")
    meta = data / "meta.csv"
    meta.write_text("identifier\na.png\n")
    out = tmp_path / "out"
    argv = ["--output_dir", str(out), "--pretrained_path", str(ckpt), "--meta_path", str(meta), "--infer_type", "latent",
            "--image_size", "48", "--window", "40,400", "--intensity", "percentile", "--percentiles", "5", "95",
            "--fit", "crop", "--model_input_min", "0", "--model_input_max", "2", "--model_input_channel", "3",
            "--max_pixels", "100000", "--num_workers", "0", "--batch_size", "1", "--no_progress"]
    assert bi.main(bi.parse_args(argv)) == 0
    manifest = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    assert manifest["preprocessing"] == {"window": "40,400", "intensity": "percentile", "percentiles": [5.0, 95.0],
                                         "fit": "crop", "model_input_min": 0.0, "model_input_max": 2.0,
                                         "model_input_channel": 3, "max_pixels": 100000}
    assert (manifest["image_size"], manifest["infer_type"]) == (48, "latent")
    assert manifest["tokenizer"]["path"] == str(ckpt)
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    latent = torch.load(out / "a.pt", weights_only=True)
    side = 48 // model.config.downsample  # the tokenizer's grid at 48 px, not at the checkpoint's 32
    assert latent.dtype == torch.float32 and tuple(latent.shape) == (model.vocab_width, side, side)
    assert manifest["output"] == {"shape": [model.vocab_width, side, side], "dtype": "float32"}

    # without --image_size / --model_input_channel: the checkpoint's 32 px and its 3 channels, codes
    base = ["--pretrained_path", str(ckpt), "--meta_path", str(meta), "--num_workers", "0", "--no_progress"]
    assert bi.main(bi.parse_args(base + ["--output_dir", str(tmp_path / "out2")])) == 0
    manifest = json.loads((tmp_path / "out2" / "tokenizer.json").read_text(encoding="utf-8"))
    side = 32 // model.config.downsample
    assert manifest["image_size"] == 32 and manifest["preprocessing"]["model_input_channel"] == 3
    assert manifest["output"] == {"shape": [model.num_codebooks, side, side], "dtype": "int64"}
    assert tuple(torch.load(tmp_path / "out2" / "a.pt", weights_only=True).shape) == (model.num_codebooks, side, side)
    with pytest.raises(SystemExit) as e:
        bi.main(bi.parse_args(base + ["--output_dir", str(tmp_path / "out3"), "--model_input_channel", "1"]))
    assert e.value.code == "--model_input_channel 1 but the tokenizer takes 3 channels"


def test_journals_survive_torn_and_undecodable_lines(tmp_path):
    p = tmp_path / "done.rank0.jsonl"
    p.write_bytes(b'{"name": "a"}\n\xff\xfe{"name": \n{"name": "b"}\n{"name": "c')  # garbage, then a killed writer
    assert bi.read_jsonl(p) == [{"name": "a"}, {"name": "b"}]  # every readable record, past the bad line
    bi.append_jsonl(p, [{"name": "d"}])  # the next run appends after the torn line
    assert bi.read_jsonl(p) == [{"name": "a"}, {"name": "b"}, {"name": "d"}]
    one = tmp_path / "one.jsonl"
    one.write_bytes(b"{")  # torn after one byte
    bi.append_jsonl(one, [{"name": "e"}])
    assert bi.read_jsonl(one) == [{"name": "e"}]
    state = tmp_path / "state"
    state.mkdir()
    (state / "reading.5").write_bytes("café".encode()[:-1])  # killed between writing a name and trimming it
    assert bi.rows_being_read(state) == {5: "caf\ufffd"}
