"""The tokenization manifest: what made a folder of codes, written beside them as `tokenizer.json`.

batch_infer.py writes `<output_dir>/tokenizer.json` (atomically, rank 0) before any output:

    {"version": 1,
     "tokenizer": {"path": "weights/meditok_simple_v1.pth", "sha256": "<hex of the weights file>",
                   "config": {<MedITokConfig fields>}},
     "image_size": 256, "infer_type": "code",
     "num_codebooks": 8, "codebook_size": 4096, "vocab_size": 32768, "grid": [16, 16],
     "output": {"shape": [8, 16, 16], "dtype": "int64"},
     "preprocessing": {"window": null, "intensity": "auto", "percentiles": [0.5, 99.5], "fit": "pad",
                       "model_input_min": -1.0, "model_input_max": 1.0, "model_input_channel": 3,
                       "max_pixels": 100000000}}

Later steps read it instead of asking the user to repeat the settings:
    read_manifest(path)               the manifest of a code folder / code metadata file, or None
    preprocessing_options(manifest)   ImageDataset kwargs that preprocess real images as the codes were made
    check_tokenizer(manifest, path)   refuse a tokenizer whose weights differ from the ones that made the codes
    manifest_differences(old, new)    what changed between two runs, in words (reruns of batch_infer)
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Mapping

from datasets.files import atomic_write_text

MANIFEST_NAME = "tokenizer.json"
VERSION = 1
# Fields that do not change any output: a rerun that differs only here reuses the outputs.
# (`max_pixels` only decides which rows are refused; a row that was tokenized is the same row.)
IGNORED_DIFFERENCES = ("tokenizer.path", "preprocessing.max_pixels")
OUTPUT_DTYPES = {"code": "int64", "latent": "float32", "vector": "float32", "image": "uint8"}

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def tokenizer_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a weights file, read in 1 MiB blocks; cached per (path, size, mtime) in this process.
    An hf:// reference is hashed as its file in the Hugging Face cache."""
    from models.checkpoint import is_hub_reference, resolve_weights  # the one resolver of weights paths

    path = Path(resolve_weights(path) if is_hub_reference(path) else path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def output_spec(config, infer_type: str, image_size: int) -> tuple[list[int], str]:
    """(shape, dtype name) of one output of batch_infer for a MedITokConfig at `image_size`."""
    g = config.grid_size(image_size)
    shapes = {
        "code": [config.num_codebooks, g, g],
        "latent": [config.vocab_width, g, g],
        "vector": [config.embed_dim],
        "image": [image_size, image_size, config.in_chans],  # PNG, height x width x channels
    }
    if infer_type not in shapes:
        raise ValueError(f"infer_type {infer_type!r} is not one of {tuple(shapes)}")
    return shapes[infer_type], OUTPUT_DTYPES[infer_type]


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def build_manifest(
    config, tokenizer_path: str | os.PathLike, *, image_size: int, infer_type: str, window=None,
    intensity: str = "auto", percentiles=(0.5, 99.5), fit: str = "pad", model_input_min: float = -1.0,
    model_input_max: float = 1.0, model_input_channel: int | None = None, max_pixels: int | None = None,
) -> dict:
    """The manifest (a JSON-able dict) of codes made by the tokenizer `config` loaded from `tokenizer_path`."""
    config_dict = asdict(config) if is_dataclass(config) else dict(config)
    shape, dtype = output_spec(config, infer_type, image_size)
    g = config.grid_size(image_size)
    return _jsonable({
        "version": VERSION,
        "tokenizer": {"path": str(tokenizer_path), "sha256": tokenizer_sha256(tokenizer_path), "config": config_dict},
        "image_size": int(image_size),
        "infer_type": infer_type,
        "num_codebooks": int(config.num_codebooks),
        "codebook_size": int(config.codebook_size),
        "vocab_size": int(config.codebook_size * config.num_codebooks),
        "grid": [g, g],
        "output": {"shape": shape, "dtype": dtype},
        "preprocessing": {
            "window": None if window is None else (window if isinstance(window, str) else list(window)),
            "intensity": intensity,
            "percentiles": [float(p) for p in percentiles],
            "fit": fit,
            "model_input_min": float(model_input_min),
            "model_input_max": float(model_input_max),
            "model_input_channel": int(model_input_channel if model_input_channel is not None else config.in_chans),
            "max_pixels": None if not max_pixels else int(max_pixels),
        },
    })


def write_manifest(output_dir: str | os.PathLike, manifest: Mapping) -> Path:
    path = Path(output_dir) / MANIFEST_NAME
    atomic_write_text(json.dumps(manifest, indent=1) + "\n", path)
    return path


def manifest_path(path: str | os.PathLike) -> Path:
    """Where the manifest of `path` lives: a folder's tokenizer.json, the one beside a metadata file, or the file."""
    path = Path(path)
    if path.is_dir():
        return path / MANIFEST_NAME
    if path.name == MANIFEST_NAME:
        return path
    return path.parent / MANIFEST_NAME


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The manifest for a code folder, a code metadata file (tokenizer.json beside it) or the manifest
    itself; None when there is none (codes made before manifests existed). A malformed one raises."""
    where = manifest_path(path)
    if not where.is_file():
        return None
    try:
        manifest = json.loads(where.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: not a valid tokenization manifest ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("tokenizer"), dict):
        raise ValueError(f"{where}: not a tokenization manifest (no 'tokenizer' entry)")
    version = manifest.get("version")
    if version != VERSION:
        raise ValueError(f"{where}: manifest version {version!r}; this code reads version {VERSION}")
    manifest["_path"] = str(where)  # for messages; never written back
    return manifest


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if str(k).startswith("_"):
            continue
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def _label(key: str) -> str:
    # "preprocessing.fit" -> "fit"; "tokenizer.config.width" -> "tokenizer config width"
    if key.startswith("preprocessing."):
        key = key[len("preprocessing."):]
    return key.replace(".", " ")


def _show(key: str, value: Any) -> str:
    if key.endswith("sha256") and isinstance(value, str):
        return value[:12] + "…"
    return json.dumps(value, ensure_ascii=False)


def manifest_differences(old: Mapping, new: Mapping, ignore=IGNORED_DIFFERENCES) -> list[str]:
    """What differs between two manifests in anything that changes the outputs, e.g. 'fit: "pad" -> "crop"',
    'tokenizer sha256: ab12… -> cd34…'. Empty when outputs made under `old` are valid under `new`."""
    a, b = _flatten(old), _flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if key in ignore or key.startswith(tuple(i + "." for i in ignore)):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            va = _show(key, a[key]) if key in a else "(absent)"
            vb = _show(key, b[key]) if key in b else "(absent)"
            out.append(f"{_label(key)}: {va} -> {vb}")
    return out


def preprocessing_options(manifest: Mapping) -> dict:
    """Keyword arguments for `datasets.image_dataset.ImageDataset` that preprocess real images exactly
    as the codes were made (size, channels, value range, CT window, intensity scaling, fit, pixel cap)."""
    pre = manifest["preprocessing"]
    window = pre.get("window")
    return {
        "image_size": int(manifest["image_size"]),
        "channels": int(pre["model_input_channel"]),
        "value_range": (float(pre["model_input_min"]), float(pre["model_input_max"])),
        "window": tuple(window) if isinstance(window, list) else window,
        "intensity": pre["intensity"],
        "percentiles": tuple(pre["percentiles"]),
        "fit": pre["fit"],
        "max_pixels": pre.get("max_pixels"),
    }


def check_tokenizer(manifest: Mapping, vq_path: str | os.PathLike, allow_mismatch: bool = False) -> str | None:
    """Refuse `vq_path` when its weights file differs (sha256) from the one that made the codes.

    Raises ValueError naming both files and hashes; with `allow_mismatch` warns instead and returns the
    message. Returns None when the weights match."""
    expected = manifest["tokenizer"]["sha256"]
    actual = tokenizer_sha256(vq_path)
    if actual == expected:
        return None
    where = manifest.get("_path", MANIFEST_NAME)
    message = (f"tokenizer {vq_path} (sha256 {actual[:16]}…) is not the one that made the codes: "
               f"{manifest['tokenizer'].get('path')} (sha256 {expected[:16]}…, recorded in {where})")
    if not allow_mismatch:
        raise ValueError(message + "; pass the tokenizer that made the codes, or override explicitly")
    warnings.warn(message, stacklevel=2)
    return message
