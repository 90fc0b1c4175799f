"""Captions -> text-encoder features, once, for the text-to-image GPT; and reading them back.

    python -m datasets.text_features --meta codes/metadata.csv --encoder google/flan-t5-xl-folder \
        --output_dir outputs/text_features --max_length 120
    torchrun --nproc_per_node 8 -m datasets.text_features ...      (distinct captions split over ranks)

Each row's `text` column is encoded by a Hugging Face encoder through `transformers`: a local folder
(`save_pretrained` layout: config, weights, tokenizer) or `hf://<org>/<repo>[@revision]` (fetched into
the Hub cache; HF_HUB_OFFLINE and HF_TOKEN behave as in every Hub tool). Encoder-decoder models (T5,
Flan-T5, mT5, as LlamaGen uses) run their encoder only; BERT-style encoders run whole. The features of
the real tokens (padding dropped, at most --max_length) are saved per distinct caption:

    OUT/<h[:2]>/<h>.pt    float tensor [n_tokens, dim], h = sha1 of the caption text (identical captions share one file)
    OUT/manifest.json     encoder, its class, dim, max_length, dtype, the number of captions
    OUT/failures.jsonl    rows without usable text (exit status 1), if any

A rerun skips the captions whose file exists (files are written atomically), so a killed run resumes;
a manifest from another encoder or max_length is refused instead of mixing features.

Training and sampling read the features through `CaptionFeatures` (file lookup by caption text) and
`pad_captions` (left padding to the GPT's `cls_token_num` positions, as LlamaGen pads T5 features).
The built-in word-level encoder (`models/text_encoder.py`) needs none of this.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from datasets.files import FolderLock, atomic_save, atomic_write_text
from datasets.metadata import read_metadata, row_where
from models.distributed import barrier, is_dist, setup_distributed
from scripts.cli import ArgumentParser

TEXT_COLUMN = "text"
MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TextFeatureError(ValueError):
    """Features missing or made by another encoder; the message names the file or row."""


# ----------------------------------------------------------------------------------------------
# Captions and files
# ----------------------------------------------------------------------------------------------
def caption_of(row: dict, meta_path=None) -> str:
    """The row's caption, stripped; a clear error when it is missing or blank."""
    text = row.get(TEXT_COLUMN)
    if text is None or not str(text).strip():
        raise TextFeatureError(f"{row_where(row, meta_path)}: no caption in the {TEXT_COLUMN!r} column")
    return str(text).strip()


def feature_relpath(text: str) -> str:
    h = hashlib.sha1(text.encode("utf-8")).hexdigest()
    return f"{h[:2]}/{h}.pt"


def split_hub_reference(ref: str) -> tuple[str, Optional[str]]:
    """'hf://org/repo@rev' -> ('org/repo', 'rev'); a local folder -> (folder, None)."""
    if not ref.startswith("hf://"):
        if not Path(ref).expanduser().is_dir():
            raise FileNotFoundError(f"text encoder {ref!r}: not a folder (save_pretrained layout) nor hf://<org>/<repo>")
        return str(Path(ref).expanduser()), None
    repo, _, revision = ref[len("hf://"):].partition("@")
    if repo.count("/") != 1:
        raise ValueError(f"{ref}: expected hf://<org>/<repo>[@revision]")
    return repo, revision or None


# ----------------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------------
class HFTextEncoder:
    """A Hugging Face tokenizer + encoder: texts -> list of [n_tokens, dim] features (padding dropped)."""

    def __init__(self, ref: str, max_length: int, device: str | torch.device = "cpu", dtype: str = "float32"):
        import transformers

        name, revision = split_hub_reference(ref)
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        kw = dict(revision=revision, local_files_only=offline)
        config = transformers.AutoConfig.from_pretrained(name, **kw)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(name, **kw)
        # T5 families have an encoder-only class (T5EncoderModel, MT5EncoderModel, ...): the decoder is never
        # loaded. Other encoder-decoders run their encoder; BERT-style encoders run whole.
        encoder_only = getattr(transformers, type(config).__name__.replace("Config", "EncoderModel"), None)
        if encoder_only is not None:
            model = encoder_only.from_pretrained(name, **kw)
        else:
            model = transformers.AutoModel.from_pretrained(name, **kw)
            if getattr(config, "is_encoder_decoder", False):
                model = model.get_encoder()
        self.model = model.to(device).eval()
        self.device, self.ref, self.max_length = torch.device(device), ref, max_length
        self.dtype = DTYPES[dtype]
        self.dim = int(getattr(config, "d_model", None) or config.hidden_size)

    def describe(self) -> dict:
        return {"encoder": self.ref, "encoder_class": type(self.model).__name__,
                "tokenizer_class": type(self.tokenizer).__name__, "dim": self.dim,
                "max_length": self.max_length, "dtype": str(self.dtype).replace("torch.", "")}

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> list[torch.Tensor]:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        keep = batch["attention_mask"].bool()
        return [h[m].to("cpu", self.dtype).contiguous() for h, m in zip(hidden, keep)]  # [n_tokens, dim] each


def check_manifest(found: dict, wanted: dict, where) -> None:
    """Refuse features made with another encoder, max_length or dtype."""
    diff = {k: (found.get(k), v) for k, v in wanted.items() if k in ("encoder", "encoder_class", "dim", "max_length", "dtype")
            and found.get(k) != v}
    if diff:
        raise TextFeatureError(f"{where} was made with other settings {diff} (found, wanted): use another --output_dir")


# ----------------------------------------------------------------------------------------------
# Reading back
# ----------------------------------------------------------------------------------------------
def read_feature_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise TextFeatureError(f"{path} not found: run `python -m datasets.text_features` for this folder first")
    manifest = json.loads(path.read_text())
    if not manifest.get("complete"):
        raise TextFeatureError(f"{path}: the feature extraction did not finish; rerun it (it resumes)")
    return manifest


class CaptionFeatures:
    """Caption text -> its stored features [n_tokens, dim] (float32), from a datasets.text_features folder."""

    def __init__(self, folder: str | os.PathLike, cache_size: int = 4096):
        self.folder = Path(folder)
        self.manifest = read_feature_manifest(self.folder)
        self.dim, self.max_length = int(self.manifest["dim"]), int(self.manifest["max_length"])
        self.cache_size, self._cache = cache_size, {}  # a plain dict: picklable for loader workers

    def _read(self, text: str) -> torch.Tensor:
        path = self.folder / feature_relpath(text)
        if not path.is_file():
            raise TextFeatureError(f"no features for caption {text!r} in {self.folder} ({path.name}): "
                                   f"rerun datasets.text_features on this metadata")
        t = torch.load(path, map_location="cpu", weights_only=True)
        if t.ndim != 2 or t.shape[1] != self.dim:
            raise TextFeatureError(f"{path}: features {tuple(t.shape)}, expected [n_tokens, {self.dim}]")
        return t.float()

    def check(self, texts: Sequence[str]) -> None:
        """Fail early, naming a caption, when any feature file is missing."""
        missing = [t for t in dict.fromkeys(texts) if not (self.folder / feature_relpath(t)).is_file()]
        if missing:
            raise TextFeatureError(f"{self.folder}: {len(missing)} captions have no features, e.g. {missing[0]!r}; "
                                   f"rerun datasets.text_features on this metadata")

    def _load(self, text: str) -> torch.Tensor:
        if text not in self._cache:
            if len(self._cache) >= self.cache_size:
                self._cache.clear()
            self._cache[text] = self._read(text)
        return self._cache[text]

    def __call__(self, texts: Sequence[str]) -> list[torch.Tensor]:
        return [self._load(t) for t in texts]


def pad_captions(features: Sequence[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n_i, dim] each -> (features [B, length, dim] left-padded with zeros, mask [B, length] bool).
    Captions longer than `length` keep their first `length` tokens."""
    dim = features[0].shape[-1]
    out = torch.zeros(len(features), length, dim, dtype=torch.float32)
    mask = torch.zeros(len(features), length, dtype=torch.bool)
    for b, f in enumerate(features):
        n = min(len(f), length)
        if n == 0:
            raise TextFeatureError(f"caption {b} has no tokens")
        out[b, length - n:] = f[:n].float()
        mask[b, length - n:] = True
    return out, mask


class FeatureCaptions:
    """Captions -> (features [B, T, dim], mask [B, T]) from stored features (picklable, for loader workers)."""

    def __init__(self, features: CaptionFeatures, length: int):
        self.features, self.length = features, length

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_captions(self.features(texts), self.length)


class WordCaptions:
    """Captions -> (word ids [B, T], mask [B, T]) for a GPT with the built-in text encoder."""

    def __init__(self, vocab, length: int):
        self.vocab, self.length = vocab, length

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vocab.encode(texts, self.length)


class CaptionDataset(Dataset):
    """Codes of a CodeDataset paired with each row's caption: a batch is (codes [B, K, L], (caption, mask)),
    the caption given by `condition` (FeatureCaptions or WordCaptions)."""

    def __init__(self, codes, texts: Sequence[str], condition, model_kwargs: Optional[dict] = None):
        if len(texts) != len(codes):
            raise ValueError(f"{len(texts)} captions for {len(codes)} code rows")
        self.codes, self.texts, self.condition = codes, list(texts), condition
        self.model_kwargs = model_kwargs or {}  # ModelArgs fields the captions decide (train_c2i.build_model)
        self.rows, self.label_names = codes.rows, codes.label_names

    num_codebooks = property(lambda self: self.codes.num_codebooks)
    seq_len = property(lambda self: self.codes.seq_len)
    grid_size = property(lambda self: self.codes.grid_size)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitems__(self, indices: list[int]):
        x, _ = self.codes.__getitems__(indices)
        return x, self.condition([self.texts[i] for i in indices])


# ----------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------
def main(args) -> int:
    rank, world, device = setup_distributed()
    out = Path(args.output_dir)
    rows = read_metadata(args.meta)
    texts, failures = [], []
    for row in rows:
        try:
            texts.append(caption_of(row, args.meta))
        except TextFeatureError as e:
            failures.append({"line": row.get("_line"), "identifier": row.get("identifier"), "reason": str(e)})
    distinct = sorted(set(texts))
    # One run per output folder at a time (rank 0 holds the lock; the kernel drops it if the run dies).
    lock = FolderLock(out, ".text_features.lock").acquire() if rank == 0 else None
    try:
        return _extract(args, rows, distinct, failures, out, rank, world, device)
    finally:
        if lock is not None:
            lock.release()


def _extract(args, rows, distinct, failures, out: Path, rank: int, world: int, device) -> int:
    encoder = HFTextEncoder(args.encoder, args.max_length, device, args.dtype)
    wanted = encoder.describe()
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        check_manifest(json.loads(manifest_path.read_text()), wanted, manifest_path)
    barrier()  # every rank has checked the old manifest before rank 0 replaces it
    if rank == 0:
        atomic_write_text(json.dumps({**wanted, "complete": False}, indent=1) + "\n", manifest_path)

    # Distinct captions strided over ranks; finished files are skipped (atomic writes: a file is whole).
    mine = distinct[rank::world]
    todo = [t for t in mine if not (out / feature_relpath(t)).is_file()]
    if rank == 0:
        print(f"[text_features] {len(rows)} rows, {len(distinct)} distinct captions, {len(failures)} without text; "
              f"{wanted['encoder_class']} (dim {encoder.dim}) on {device}" + (f", {world} processes" if world > 1 else ""),
              flush=True)
    t0 = time.time()
    for i in range(0, len(todo), args.batch_size):
        chunk = todo[i:i + args.batch_size]
        for text, feats in zip(chunk, encoder.encode(chunk)):
            atomic_save(feats, out / feature_relpath(text))
    print(f"[text_features] rank {rank}: encoded {len(todo)} captions in {time.time() - t0:.1f}s, "
          f"{len(mine) - len(todo)} already there", flush=True)
    barrier()
    status = 0
    if rank == 0:
        missing = [t for t in distinct if not (out / feature_relpath(t)).is_file()]
        if missing:
            raise TextFeatureError(f"{len(missing)} captions have no features after encoding, e.g. {missing[0]!r}")
        failures_path = out / FAILURES
        if failures:
            atomic_write_text("".join(json.dumps(f) + "\n" for f in failures), failures_path)
            print(f"[text_features] {len(failures)} rows without text listed in {failures_path}", flush=True)
            status = 1
        elif failures_path.exists():
            failures_path.unlink()
        atomic_write_text(json.dumps({**wanted, "captions": len(distinct), "complete": True}, indent=1) + "\n",
                          manifest_path)
        print(f"[text_features] wrote {out} ({len(distinct)} captions, manifest {manifest_path})", flush=True)
    barrier()
    if is_dist():
        dist.destroy_process_group()
    return status


def get_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meta", required=True, help="metadata file (csv/jsonl/json) with a 'text' column")
    parser.add_argument("--encoder", required=True,
                        help="Hugging Face encoder: a local folder (save_pretrained layout) or hf://<org>/<repo>[@revision]")
    parser.add_argument("--output_dir", required=True, help="folder for the feature files and manifest.json")
    parser.add_argument("--max_length", type=int, default=120, help="tokens kept per caption (LlamaGen: 120)")
    parser.add_argument("--batch_size", type=int, default=32, help="captions per encoder call")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="storage dtype of the features (float16 halves the disk for T5-XL's 2048-d features)")
    return parser


if __name__ == "__main__":
    raise SystemExit(main(get_parser().parse_args()))
