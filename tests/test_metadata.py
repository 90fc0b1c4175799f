"""The metadata reader/writer: three formats, round trips, errors that name the line."""
import json

import pytest

from datasets.metadata import (
    MetadataError,
    filter_split,
    parse_label,
    read_metadata,
    resolve_path,
    write_metadata,
)

ROWS = [
    {"identifier": "a/x.png", "code_identifier": None, "label": 0, "split": "train", "extra": "kept"},
    {"identifier": "b/x.png", "code_identifier": "codes/b/x.pt", "label": 2, "split": "val", "extra": "y"},
]


@pytest.mark.parametrize("ext", [".csv", ".jsonl", ".json"])
def test_roundtrip_every_format(tmp_path, ext):
    path = tmp_path / f"meta{ext}"
    write_metadata(ROWS, path)
    rows = read_metadata(path)
    assert [r["identifier"] for r in rows] == ["a/x.png", "b/x.png"]
    assert rows[0]["code_identifier"] is None  # empty csv cell reads back as absent
    assert rows[1]["code_identifier"] == "codes/b/x.pt"
    assert [parse_label(r) for r in rows] == [0, 2]
    assert rows[1]["extra"] == "y"
    assert [r["identifier"] for r in filter_split(rows, "val")] == ["b/x.png"]


def test_tutorial_json_array(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"identifier": "i.png", "code_identifier": "", "label": 1, "split": "train"}]))
    (row,) = read_metadata(path)
    assert row["code_identifier"] is None and row["_line"] == 1


def test_errors_name_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"identifier": "a.png", "label": 0}\n{"identifier": "b.png", "label": 0\n')
    with pytest.raises(MetadataError, match=r"bad.jsonl:2"):
        read_metadata(p)
    p = tmp_path / "missing.csv"
    p.write_text("identifier,label\na.png,0\n,1\n")
    with pytest.raises(MetadataError, match=r"missing.csv:3.*identifier"):
        read_metadata(p)
    with pytest.raises(MetadataError, match="unsupported"):
        read_metadata(tmp_path / "m.txt")


def test_labels_checked():
    row = {"identifier": "a.png", "label": "3", "_line": 7}
    assert parse_label(row, num_classes=4) == 3
    with pytest.raises(MetadataError, match=r"row 7 .*outside"):
        parse_label(row, num_classes=3)
    with pytest.raises(MetadataError, match="not an integer"):
        parse_label({"identifier": "a", "label": "cat"})
    with pytest.raises(MetadataError, match="not an integer"):
        parse_label({"identifier": "a", "label": 1.5})


def test_resolve_path_precedence(tmp_path):
    meta = tmp_path / "m" / "meta.csv"
    assert resolve_path("x.png", {}, meta) == tmp_path / "m" / "x.png"
    assert resolve_path("x.png", {"root_dir": "imgs"}, meta) == tmp_path / "m" / "imgs" / "x.png"
    assert resolve_path("x.png", {"root_dir": "imgs"}, meta, dataset_dir=tmp_path / "d") == tmp_path / "d" / "x.png"
    assert resolve_path("/abs/x.png", {}, meta, dataset_dir=tmp_path) == type(meta)("/abs/x.png")
