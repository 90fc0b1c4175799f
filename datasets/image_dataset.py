"""Metadata rows -> normalised image tensors for the tokenizer.

Each item is a dict:
    image   float [C, S, S] in `value_range` (what the tokenizer takes)
    label   int (-1 when the row has no label)
    index   int, the row's position in `rows`
    ok      bool; False when reading failed and `on_error='report'` (then `image` is zeros)
    error   str, '' or the reason (names the file / metadata line)

A row's optional `window` column (preset, 'level,width', or the file's own 'file' / 'file:N' /
'file:NAME') overrides the dataset's window. An `identifier` may be a folder holding one DICOM series
or a DICOMDIR; the row's `series_uid` (or `SeriesInstanceUID`) column picks a series where several are.
`max_pixels` caps the pixels decoded per row (checked from the header before decoding; None/0: none).

Hooks for training-time augmentation:
    read_options(row, index) -> dict   per-item overrides of the reading options (e.g. a random CT
                                       window: {"window": (level, width)}); called in the worker
    transform(image) -> image          applied to the [C, S, S] tensor in [0, 1] before value_range
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from datasets.metadata import filter_split, parse_label, read_metadata, resolve_path, row_where
from datasets.readers import DEFAULT_MAX_PIXELS, FIT_MODES, ReadError, read_image_tensor

ON_ERROR = ("raise", "report")


def row_image_path(row: dict, meta_path=None, dataset_dir=None) -> Path:
    return resolve_path(str(row["identifier"]), row, meta_path, dataset_dir)


class ImageDataset(Dataset):
    def __init__(
        self,
        rows: Sequence[dict] | str | os.PathLike,
        meta_path: str | os.PathLike | None = None,
        dataset_dir: str | os.PathLike | None = None,
        image_size: int = 256,
        channels: int = 3,
        value_range: tuple[float, float] = (-1.0, 1.0),
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        read_options: Callable[[dict, int], dict] | None = None,
        window=None,
        intensity: str = "auto",
        percentiles: tuple[float, float] = (0.5, 99.5),
        fit: str = "pad",
        num_classes: int | None = None,
        split: str | Sequence[str] | None = None,
        on_error: str = "raise",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        if isinstance(rows, (str, os.PathLike)):  # a metadata file path
            meta_path = rows if meta_path is None else meta_path
            rows = read_metadata(rows)
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error {on_error!r} is not one of {ON_ERROR}")
        if fit not in FIT_MODES:
            raise ValueError(f"fit {fit!r} is not one of {FIT_MODES}")
        self.rows = filter_split(list(rows), split)
        self.meta_path = meta_path
        self.dataset_dir = dataset_dir
        self.image_size = image_size
        self.channels = channels
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.transform = transform
        self.read_options = read_options
        self.options = dict(window=window, intensity=intensity, percentiles=tuple(percentiles), fit=fit,
                            max_pixels=max_pixels)
        self.num_classes = num_classes
        self.on_error = on_error

    def __len__(self) -> int:
        return len(self.rows)

    def path_of(self, index: int) -> Path:
        return row_image_path(self.rows[index], self.meta_path, self.dataset_dir)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        """(image [C, S, S] in value_range, label); raises with the metadata line on failure."""
        row = self.rows[index]
        label = -1
        if row.get("label") is not None:
            label = parse_label(row, self.num_classes, self.meta_path)
        options = dict(self.options)
        if row.get("window") is not None:  # a per-row CT window (e.g. written by `prepare volumes --window`)
            options["window"] = row["window"]
        if self.read_options is not None:
            options.update(self.read_options(row, index))
        series_uid = row.get("series_uid") or row.get("SeriesInstanceUID")
        image = read_image_tensor(
            self.path_of(index), row.get("slice_index"), row.get("slice_axis"),
            channels=self.channels, image_size=self.image_size, series_uid=series_uid, **options,
        )
        if self.transform is not None:
            image = self.transform(image)
        lo, hi = self.value_range
        return image * (hi - lo) + lo, label

    def __getitem__(self, index: int) -> dict:
        try:
            image, label = self.load(index)
            return {"image": image, "label": label, "index": index, "ok": True, "error": ""}
        except Exception as e:
            where = row_where(self.rows[index], self.meta_path)
            reason = f"{type(e).__name__}: {e}"
            if self.on_error == "raise":
                raise ReadError(f"{where}: {reason}") from e
            image = torch.zeros(self.channels, self.image_size, self.image_size)
            return {"image": image, "label": -1, "index": index, "ok": False, "error": reason}
