"""The one reader/writer of metadata files: csv, jsonl, or a JSON array of objects.

A row is a plain dict. Known columns:
    identifier       path of the image (relative paths resolve against --dataset_dir, else the row's
                     root_dir, else the metadata file's folder)
    code_identifier  path of the tokenized codes (.pt) written by batch_infer.py
    label            integer class index
    split            train / val / test
    root_dir, label_name, slice_index, slice_axis   optional
Unknown columns are kept and written back unchanged.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from datasets.files import atomic_write_text

FORMATS = (".csv", ".jsonl", ".json")
REQUIRED = ("identifier",)
INT64_LIMIT = 2 ** 63


class MetadataError(ValueError):
    """A metadata file or row is malformed; the message names the file and line."""


def metadata_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise MetadataError(f"{path}: unsupported metadata format {suffix!r}; use one of {FORMATS}")
    return suffix


# Columns whose values are paths, numbers or names: here pandas' 'nan' / 'None' / 'null' mean "absent".
# Every other column is free text and keeps such words as written; an empty cell is absent everywhere.
STRUCTURED = ("identifier", "code_identifier", "label", "split", "root_dir", "slice_index", "slice_axis", "window")


def _clean(key: str, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "" or (key in STRUCTURED and text in ("nan", "none", "null")):
            return None
    return value


def _decode(path: Path, data: bytes) -> str:
    """UTF-8 (with or without BOM) or UTF-16 with a BOM; anything else is an error naming the line."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as e:
            raise MetadataError(f"{path}: not valid UTF-16 ({e.reason})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise MetadataError(f"{path}:{line}: byte {data[e.start:e.start + 1]!r} is not UTF-8 "
                            "(save the file as UTF-8, e.g. from latin-1 or cp1252)") from None


def _read_csv(path: Path, text: str) -> list[dict]:
    # strict: an unbalanced quote is an error instead of swallowing the rest of the file into one cell
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[dict] = []
    header = None
    line = 0  # last line of the previous record
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            what = "an unbalanced quote" if "end of data" in str(e) or "expected" in str(e) else "malformed csv"
            raise MetadataError(f"{path}:{line + 1}: {what} in the record starting here ({e})") from None
        start, line = line + 1, reader.line_num
        if header is None:
            if not record:
                continue
            header = record
            dups = sorted({c for c in header if header.count(c) > 1})
            if dups:
                raise MetadataError(f"{path}:{start}: duplicate column {dups[0]!r} in the header {header}")
            continue
        if not record:
            continue
        if len(record) > len(header):
            raise MetadataError(f"{path}:{start}: more cells than header columns ({header})")
        rec = dict(zip(header, record + [""] * (len(header) - len(record))))
        rows.append({**{k: _clean(k, v) for k, v in rec.items()}, "_line": start})
    if header is None:
        raise MetadataError(f"{path}: empty csv file (no header line)")
    return rows


def _no_duplicate_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    dups = sorted({k for k in keys if keys.count(k) > 1})
    if dups:
        raise ValueError(f"duplicate key {dups[0]!r}")
    return dict(pairs)


def _json(text: str):
    return json.loads(text, object_pairs_hook=_no_duplicate_keys)


def read_metadata(path: str | os.PathLike, required: Iterable[str] = REQUIRED) -> list[dict]:
    """Read every row; each row gets `_line` (1-based line in the file, header = line 1 for csv)."""
    path = Path(path)
    fmt = metadata_format(path)
    if not path.is_file():
        raise MetadataError(f"metadata file not found: {path}")
    text = _decode(path, path.read_bytes())
    rows: list[dict] = []
    if fmt == ".csv":
        rows = _read_csv(path, text)
    elif fmt == ".jsonl":
        for line, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                rec = _json(raw)
            except json.JSONDecodeError as e:
                raise MetadataError(f"{path}:{line}: invalid JSON ({e.msg} at column {e.colno})") from e
            except ValueError as e:
                raise MetadataError(f"{path}:{line}: {e}") from None
            if not isinstance(rec, dict):
                raise MetadataError(f"{path}:{line}: expected a JSON object, got {type(rec).__name__}")
            rows.append({**{k: _clean(k, v) for k, v in rec.items()}, "_line": line})
    else:
        try:
            data = _json(text)
        except json.JSONDecodeError as e:
            raise MetadataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
        except ValueError as e:
            raise MetadataError(f"{path}: {e} in an object") from None
        if not isinstance(data, list):
            raise MetadataError(f"{path}: a .json metadata file must hold an array of objects")
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise MetadataError(f"{path}: element {i} is a {type(rec).__name__}, expected an object")
            rows.append({**{k: _clean(k, v) for k, v in rec.items()}, "_line": i + 1})
    for row in rows:
        for col in required:
            if row.get(col) is None:
                raise MetadataError(f"{path}:{row['_line']}: missing required field {col!r}")
    return rows


def row_where(row: dict, path: str | os.PathLike | None = None) -> str:
    """'file:line (identifier)' for error messages."""
    loc = f"{path}:{row.get('_line', '?')}" if path else f"row {row.get('_line', '?')}"
    return f"{loc} ({row.get('identifier')})"


def whole_number(value) -> int:
    """A metadata value that must be an integer: 3, "3", "3.0" or 3.0 -> 3; anything else raises ValueError
    (csv cells are strings, and pandas-written files turn integer columns with gaps into floats)."""
    if isinstance(value, bool):  # JSON true/false would otherwise pass as 1/0
        raise ValueError(f"{value!r} is not an integer")
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not an integer") from None
    if not math.isfinite(as_float) or as_float != int(as_float):
        raise ValueError(f"{value!r} is not an integer")
    return int(as_float)


def parse_label(row: dict, num_classes: int | None = None, path: str | os.PathLike | None = None) -> int:
    """The row's label as an int in [0, num_classes); a clear error otherwise."""
    value = row.get("label")
    try:
        label = whole_number(value)
    except ValueError:
        raise MetadataError(f"{row_where(row, path)}: label {value!r} is not an integer") from None
    if label >= INT64_LIMIT:  # a label tensor is int64: a larger one would abort a whole batch later
        raise MetadataError(f"{row_where(row, path)}: label {value!r} does not fit a 64-bit integer")
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise MetadataError(f"{row_where(row, path)}: label {label} is outside [0, {num_classes})")
    return label


def resolve_path(
    value: str, row: dict | None = None, meta_path: str | os.PathLike | None = None,
    dataset_dir: str | os.PathLike | None = None,
) -> Path:
    """Absolute path of `value`: as is if absolute, else under dataset_dir, row root_dir, or the file's folder."""
    p = Path(os.path.expanduser(str(value)))
    if p.is_absolute():
        return p
    if dataset_dir:
        return Path(dataset_dir) / p
    if row is not None and row.get("root_dir"):
        root = Path(os.path.expanduser(str(row["root_dir"])))
        if not root.is_absolute() and meta_path is not None:
            root = Path(meta_path).parent / root
        return root / p
    if meta_path is not None:
        return Path(meta_path).parent / p
    return p


def filter_split(rows: list[dict], splits: str | Iterable[str] | None) -> list[dict]:
    """Rows whose `split` is in `splits` (None keeps all). Rows without a split count as 'train'."""
    if splits is None:
        return list(rows)
    wanted = {splits} if isinstance(splits, str) else set(splits)
    return [r for r in rows if (r.get("split") or "train") in wanted]


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def format_metadata(rows: list[dict], fmt: str) -> str:
    rows = [_public(r) for r in rows]
    if fmt == ".jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if fmt == ".json":
        return json.dumps(rows, ensure_ascii=False, indent=1) + "\n"
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return buf.getvalue()


def write_metadata(rows: list[dict], path: str | os.PathLike) -> None:
    """Write rows atomically in the format given by the file's extension (private `_` keys dropped)."""
    atomic_write_text(format_metadata(rows, metadata_format(path)), path)
