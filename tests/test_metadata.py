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


# ---- hostile metadata (issue 14.11): each error names the file and line, or the value is kept ----
def test_non_utf8_metadata_names_file_and_line(tmp_path):
    p = tmp_path / "latin1.csv"
    p.write_bytes("identifier,label_name\na.png,ok\nb.png,Gew\xe4be\n".encode("latin-1"))
    with pytest.raises(MetadataError, match=r"latin1.csv:3: .*UTF-8"):
        read_metadata(p)
    p = tmp_path / "utf16.csv"  # Excel's "Unicode text": UTF-16 with a byte-order mark reads as is
    p.write_bytes("identifier,label_name\na.png,Gewäbe\n".encode("utf-16"))
    assert read_metadata(p)[0]["label_name"] == "Gewäbe"


def test_huge_csv_field_names_the_line(tmp_path):
    p = tmp_path / "big.csv"
    p.write_text("identifier,report\na.png,short\nb.png," + "x" * 200_000 + "\n")
    with pytest.raises(MetadataError, match=r"big.csv:3: .*field"):
        read_metadata(p)


def test_duplicate_column_is_refused(tmp_path):
    p = tmp_path / "dup.csv"
    p.write_text("identifier,label,label\na.png,0,1\n")
    with pytest.raises(MetadataError, match=r"dup.csv:1: .*'label'"):
        read_metadata(p)


def test_unbalanced_quote_names_the_record(tmp_path):
    p = tmp_path / "quote.csv"
    p.write_text('identifier,note\na.png,fine\nb.png,"oops\nc.png,x\nd.png,y\n')
    with pytest.raises(MetadataError, match=r"quote.csv:3: .*quote"):
        read_metadata(p)


@pytest.mark.parametrize("ext", [".csv", ".jsonl", ".json"])
def test_none_and_null_strings_in_free_text_are_kept(tmp_path, ext):
    rows = [{"identifier": "a.png", "label": 0, "label_name": "None", "note": "null", "code_identifier": ""}]
    path = tmp_path / f"m{ext}"
    write_metadata(rows, path)
    (row,) = read_metadata(path)
    assert row["label_name"] == "None" and row["note"] == "null"  # kept as written
    assert row["code_identifier"] is None  # an empty known column is absent
    out = tmp_path / f"o{ext}"
    write_metadata([row], out)
    assert read_metadata(out)[0]["note"] == "null"


@pytest.mark.parametrize("label", [1e30, True, "true", -(2 ** 70)])
def test_labels_beyond_int64_or_booleans_are_refused(label):
    with pytest.raises(MetadataError, match="label"):
        parse_label({"identifier": "a.png", "label": label, "_line": 4})


def test_duplicate_json_key_is_refused(tmp_path):
    p = tmp_path / "dup.jsonl"
    p.write_text('{"identifier": "a.png", "label": 0}\n{"identifier": "b.png", "label": 0, "label": 1}\n')
    with pytest.raises(MetadataError, match=r"dup.jsonl:2: .*'label'"):
        read_metadata(p)
