"""batch_infer's output naming and skip-finished checks, against names written out by hand (tests added
for mutation testing, docs/MUTATION.md). Pure functions only: no model, no files beyond a few bytes."""
import hashlib
import json

import pytest
import torch
from PIL import Image

import batch_infer as bi


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
