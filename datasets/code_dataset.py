"""Metadata rows -> (codes [K, L] long, label) for training the class-to-image GPT.

Each row's `code_identifier` points at a `.pt` file written by `batch_infer.py`:
    --infer_type code     integer tensor [K, h, w] (or [K, L] with L = h * w)
    --infer_type latent   float tensor [vocab_width, h, w]: turned into exact codes with the tokenizer
                          (`latent_to_idx`, the inverse of `encode_image_vq`), so it needs `vq_ckpt`.
Relative `code_identifier` paths resolve against the metadata file's folder. Without a code_identifier,
an `identifier` ending in `.pt` is the code file (the released metadata, e.g. medmnist-c2i-test.jsonl).

Everything is read and checked upfront (same shape in every file, codes inside the codebooks, labels
inside [0, num_classes)), with errors that name the file and row; the codes then live in one in-memory
tensor, so a training step indexes a tensor instead of opening files.

The order of training batches (per rank, resumable mid-epoch) is `models.training.StepBatchSampler`,
shared with the tokenizer trainer.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from datasets.manifest import MANIFEST_NAME
from datasets.metadata import FORMATS, MetadataError, filter_split, parse_label, read_metadata, resolve_path, row_where
from models.checkpoint import load_checkpoint


class CodeDataError(MetadataError):
    """A code file or row does not fit the others or the model; the message names the row."""


# batch_infer's own files beside the metadata it writes: the manifest and the list of failed rows.
NOT_METADATA = (MANIFEST_NAME, "failures.jsonl")


def find_code_metadata(path: str | os.PathLike) -> Path:
    """The metadata file itself, or the single metadata file inside a folder (batch_infer's output_dir)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p for p in path.iterdir()
                       if p.suffix.lower() in FORMATS and p.is_file() and p.name not in NOT_METADATA)
        if len(found) != 1:
            raise CodeDataError(
                f"{path} is a folder with {len(found)} metadata files ({[p.name for p in found]}); "
                f"pass the metadata file itself"
            )
        return found[0]
    return path


def _as_codes(t: torch.Tensor, where: str) -> torch.Tensor:
    """A code file's tensor -> [K, L] long (accepts [K, h, w] with h == w, or [K, L] with L square)."""
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]  # a stray batch dimension of one
    if t.ndim == 3:
        if t.shape[1] != t.shape[2]:
            raise CodeDataError(f"{where}: code grid {tuple(t.shape[1:])} is not square")
        t = t.flatten(1)
    if t.ndim != 2 or math.isqrt(t.shape[1]) ** 2 != t.shape[1]:
        raise CodeDataError(f"{where}: expected codes [K, h, w] or [K, h*w], got shape {tuple(t.shape)}")
    return t.long()


def _read_tensor(path: Path, where: str) -> torch.Tensor:
    if not path.is_file():
        raise CodeDataError(f"{where}: code file not found: {path}")
    obj = load_checkpoint(path)
    if not isinstance(obj, torch.Tensor):
        raise CodeDataError(f"{where}: {path} holds a {type(obj).__name__}, expected one tensor")
    return obj


def _load_tokenizer(vq_ckpt, device):
    from models.meditok import build_meditok  # only needed for latent files

    return build_meditok(vq_ckpt, device=device).eval()


@torch.no_grad()
def load_codes(
    rows: list[dict],
    meta_path: str | os.PathLike,
    vq_ckpt: Optional[str] = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    tokenizer=None,
    cache: Optional[dict] = None,
) -> torch.Tensor:
    """Read every row's code file -> [N, K, L] long. Latent files become codes through the tokenizer
    (`tokenizer`, or one built from `vq_ckpt` when the first latent file shows up and kept in `cache`
    so that several calls build it once)."""
    codes, ref_shape, ref_row = [], None, None
    cache = {} if cache is None else cache
    tokenizer = tokenizer if tokenizer is not None else cache.get("tokenizer")
    for row in tqdm(rows, desc="reading codes", disable=not progress, leave=False):
        where = row_where(row, meta_path)
        value = row.get("code_identifier")
        if value is None and str(row.get("identifier") or "").endswith(".pt"):
            value = row["identifier"]  # the released code metadata: the identifier is the code file itself
        if value is None:
            raise CodeDataError(f"{where}: empty code_identifier (run batch_infer.py and use the metadata it writes)")
        path = resolve_path(value, None, meta_path)
        t = _read_tensor(path, where)
        if t.is_floating_point():  # a quantized latent [vocab_width, h, w]
            if vq_ckpt is None and tokenizer is None:
                raise CodeDataError(
                    f"{where}: {path} holds a float tensor {tuple(t.shape)} (a latent from --infer_type latent); "
                    f"pass the tokenizer checkpoint (--vq-ckpt / VQ_PATH) to turn latents into codes"
                )
            if tokenizer is None:
                tokenizer = cache["tokenizer"] = _load_tokenizer(vq_ckpt, device)
            if t.ndim != 3 or t.shape[0] != tokenizer.vocab_width:
                raise CodeDataError(
                    f"{where}: latent shape {tuple(t.shape)} does not fit the tokenizer "
                    f"(expected [{tokenizer.vocab_width}, h, w])"
                )
            t = tokenizer.latent_to_idx(t[None].to(device).float())[0].cpu()  # [K, L]
        t = _as_codes(t, where)
        if ref_shape is None:
            ref_shape, ref_row = tuple(t.shape), where
        elif tuple(t.shape) != ref_shape:
            raise CodeDataError(f"{where}: codes have shape {tuple(t.shape)} but {ref_row} has {ref_shape}")
        codes.append(t)
    if not codes:
        raise CodeDataError(f"{meta_path}: no rows to read")
    return torch.stack(codes)


def label_names_of(rows: list[dict], meta_path=None) -> dict[int, str]:
    """{label: label_name} from the rows that have a label_name; one name per label."""
    names: dict[int, str] = {}
    for row in rows:
        name = row.get("label_name")
        if name is None:
            continue
        label = parse_label(row, None, meta_path)
        if names.setdefault(label, str(name)) != str(name):
            raise CodeDataError(f"{row_where(row, meta_path)}: label {label} is named {name!r} here and {names[label]!r} before")
    return names


class CodeDataset(Dataset):
    """The rows of `splits` of a code metadata file, read and checked upfront.

    codes [N, K, L] (stored in the smallest integer type that holds them), labels [N].
    Indexing with a list of indices (`__getitems__`) returns a whole batch (codes long, labels long)."""

    def __init__(
        self,
        meta_path: str | os.PathLike,
        splits: str | Iterable[str] | None = "train",
        num_classes: Optional[int] = None,
        num_codebooks: Optional[int] = None,
        vocab_size: Optional[int] = None,
        vq_ckpt: Optional[str] = None,
        device: str | torch.device = "cpu",
        progress: bool = True,
        rows: Optional[list[dict]] = None,
        cache: Optional[dict] = None,
    ):
        self.meta_path = find_code_metadata(meta_path)
        all_rows = rows if rows is not None else read_metadata(self.meta_path)  # code_identifier: see load_codes
        self.rows = filter_split(all_rows, splits)
        self.splits = splits
        if not self.rows:
            self.codes = torch.zeros(0, num_codebooks or 0, 0, dtype=torch.long)
            self.labels = torch.zeros(0, dtype=torch.long)
            self.label_names = {}
            return
        self.labels = torch.tensor([parse_label(r, num_classes, self.meta_path) for r in self.rows], dtype=torch.long)
        self.label_names = label_names_of(self.rows, self.meta_path)
        codes = load_codes(self.rows, self.meta_path, vq_ckpt, device, progress, cache=cache)
        K = codes.shape[1]
        if num_codebooks is not None and K != num_codebooks:
            raise CodeDataError(
                f"{self.meta_path}: code files have {K} codebooks ({row_where(self.rows[0], self.meta_path)}), "
                f"the model expects {num_codebooks}"
            )
        if vocab_size is not None:
            if vocab_size % K:
                raise CodeDataError(f"vocab_size={vocab_size} is not divisible by the {K} codebooks of the data")
            sub = vocab_size // K
            bad = ((codes < 0) | (codes >= sub)).flatten(1).any(1).nonzero()
            if len(bad):
                i = bad[0].item()
                raise CodeDataError(
                    f"{row_where(self.rows[i], self.meta_path)}: codes in [{codes[i].min().item()}, {codes[i].max().item()}] "
                    f"fall outside a codebook of {sub} entries (vocab_size={vocab_size} over {K} codebooks)"
                    f"{f'; {len(bad)} rows in all' if len(bad) > 1 else ''}"
                )
        small = torch.int16 if codes.max() <= torch.iinfo(torch.int16).max else torch.int32
        self.codes = codes.to(small)

    @property
    def num_codebooks(self) -> int:
        return self.codes.shape[1]

    @property
    def seq_len(self) -> int:
        return self.codes.shape[2]

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.seq_len)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.codes[i].long(), int(self.labels[i])

    def __getitems__(self, indices: list[int]):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.codes[idx].long(), self.labels[idx]


def collate_batch(batch):
    """collate_fn for DataLoaders over `__getitems__`: the batch is already (codes [B, K, L], labels [B])."""
    return batch
