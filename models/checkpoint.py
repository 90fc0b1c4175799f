"""The one place for checkpoint I/O: where weights come from, safe loading, unwrapping, strict loading.

Everything that reads weights goes through `load_checkpoint` (weights_only=True, or safetensors, never
pickle), everything that writes goes through `datasets.files.atomic_save` (re-exported here).

A weights path is a local file or a Hugging Face Hub reference, resolved by `resolve_weights`:
    hf://<org>/<repo>/<path in repo>[@revision]     e.g. hf://massaki75/meditok/meditok_simple_v1.pth
    hf://<org>/<repo>@<revision>/<path in repo>     (huggingface_hub's own spelling; web URLs work too)
The file is fetched with `huggingface_hub.hf_hub_download` into the Hub cache, so HF_HUB_CACHE, HF_HOME,
HF_TOKEN and HF_HUB_OFFLINE (read when the path is resolved) behave as in every other Hub tool.

`.safetensors` files are read without pickle. Ours (written by `save_safetensors`, e.g. through
`python -m models.export`) carry the model's description in the file's metadata, so they load into the
same dict as the `.pt` checkpoint they came from: {"config": ..., "img_size": ..., "model": tensors}.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from datasets.files import atomic_save, atomic_write_bytes, atomic_write_text  # noqa: F401  (re-exported)

# Keys under which training frameworks commonly wrap a state dict, in the order we look for them.
WRAPPER_KEYS = ("model", "state_dict", "module", "ema")


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or does not fit the model; the message says which keys/file."""


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
HUB_PREFIXES = ("hf://", "https://huggingface.co/")
# Top-level checkpoint fields whose JSON object keys are integers (JSON turns them into strings).
INT_KEYED_FIELDS = ("label_names",)


def is_hub_reference(path: Any) -> bool:
    return isinstance(path, str) and path.startswith(HUB_PREFIXES)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def parse_hub_reference(ref: str):
    """huggingface_hub's HfUri (type, id, revision, path_in_repo) of `ref`; also accepts the revision
    after the file (`hf://org/repo/file.pt@rev`)."""
    from huggingface_hub.errors import HfUriError
    from huggingface_hub.utils import parse_hf_uri

    text = ref
    head, _, last = ref.rpartition("/")
    if ref.startswith("hf://") and "@" in last and "@" not in head:
        # hf://org/repo/dir/file.pt@rev -> hf://org/repo@rev/dir/file.pt (the library's grammar)
        name, revision = last.rsplit("@", 1)
        parts = f"{head}/{name}"[len("hf://"):].split("/")
        text = "hf://" + "/".join(parts[:2]) + f"@{revision}/" + "/".join(parts[2:])
    try:
        uri = parse_hf_uri(text)
    except HfUriError as e:
        raise ValueError(f"{ref}: not a valid Hub reference ({e}); expected hf://<org>/<repo>/<path in repo>[@revision]") from e
    if not uri.path_in_repo:
        raise ValueError(f"{ref}: names a repository, not a file; expected hf://<org>/<repo>/<path in repo>[@revision]")
    return uri


def download_command(ref: str) -> str:
    """The `hf download` command that puts the file of `ref` into the Hub cache (and a local folder)."""
    uri = parse_hub_reference(ref)
    revision = f" --revision {uri.revision}" if uri.revision else ""
    kind = "" if uri.type == "model" else f" --repo-type {uri.type}"
    local = f"weights/{uri.id.split('/')[-1]}"
    return f"hf download {uri.id} {uri.path_in_repo}{kind}{revision} --local-dir {local}"


def resolve_weights(path: str | os.PathLike) -> Path:
    """A local file for a weights path: the path itself, or for a Hub reference the cached copy
    (downloaded on first use unless HF_HUB_OFFLINE is set). Errors say what to run to get the file."""
    if not is_hub_reference(path):
        local = Path(path).expanduser()
        if not local.is_file():
            hint = " (a folder: name the weights file inside it)" if local.is_dir() else ""
            raise FileNotFoundError(f"checkpoint not found: {local}{hint}")
        return local
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    ref = str(path)
    uri = parse_hub_reference(ref)
    offline = _env_true("HF_HUB_OFFLINE")
    cache = os.environ.get("HF_HUB_CACHE") or None  # None: the library's default under HF_HOME
    try:
        return Path(hf_hub_download(uri.id, uri.path_in_repo, repo_type=uri.type, revision=uri.revision,
                                    cache_dir=cache, local_files_only=offline))
    except LocalEntryNotFoundError as e:
        where = cache or "the default Hugging Face cache"
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise FileNotFoundError(
            f"{ref}: not in {where} and {why}. Download it on a machine with internet access:\n"
            f"    {download_command(ref)}\n"
            f"then pass the local file (or copy the Hub cache folder and keep the hf:// path)") from e
    except GatedRepoError as e:
        raise CheckpointError(f"{ref}: {uri.id} is gated; accept its terms on the Hub and set HF_TOKEN") from e
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        raise FileNotFoundError(f"{ref}: {type(e).__name__}: no such repository, revision or file on the Hub "
                                f"(private repositories need HF_TOKEN)") from e


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Read a checkpoint safely from a local path or Hub reference: `.safetensors` via safetensors,
    anything else with torch.load(weights_only=True)."""
    path = resolve_weights(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path, map_location)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle errors, truncated zip files, ...
        raise CheckpointError(
            f"could not read {path} with torch.load(weights_only=True): {type(e).__name__}: {e}"
        ) from e


# ----------------------------------------------------------------------------------------------
# safetensors: weights plus the model's description in the metadata
# ----------------------------------------------------------------------------------------------
def _read_safetensors(path: Path, map_location) -> Any:
    """A plain state dict, or for a file with a "config"/"kind" in its metadata the checkpoint dict
    {metadata fields (JSON-decoded)..., "model": state dict}."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"could not read {path} as safetensors: {type(e).__name__}: {e}") from e
    if not metadata.keys() & {"config", "kind"}:  # not written by save_safetensors
        return tensors
    ckpt = {}
    for key, text in metadata.items():
        if key == "format":
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text  # metadata written by another tool: kept as the string it is
        if key in INT_KEYED_FIELDS and isinstance(value, dict):
            value = {int(k): v for k, v in value.items()}
        elif isinstance(value, dict):  # configs keep tuples as tuples (JSON made them lists)
            value = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
        ckpt[key] = value
    ckpt["model"] = tensors
    return ckpt


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     info: Mapping[str, Any] | None = None) -> Path:
    """Write weights-only `path` atomically; `info` (config, img_size, kind, ...: JSON-serialisable)
    goes into the metadata, one JSON string per field, so `load_checkpoint` returns {**info, "model": ...}."""
    from safetensors.torch import save

    if "model" in (info or {}):
        raise ValueError("info must not have a 'model' field: the tensors are the model")
    tensors, seen = {}, set()
    for k, v in state_dict.items():
        v = v.detach().to("cpu").contiguous()
        if v.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage (tied weights)
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        tensors[k] = v
    metadata = {"format": "pt", **{k: json.dumps(v) for k, v in (info or {}).items()}}
    atomic_write_bytes(save(tensors, metadata=metadata), path)
    return Path(path)


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def extract_state_dict(obj: Any, prefer: Iterable[str] = WRAPPER_KEYS) -> tuple[dict, str]:
    """Return (state_dict, where) from a plain state dict or one wrapped under a known key.

    `prefer` gives the order in which wrapper keys are tried, e.g. ("ema", "model") to take EMA weights
    when a checkpoint has them. `where` names the key used ("" for a plain state dict).
    """
    if is_state_dict(obj):
        return dict(obj), ""
    if isinstance(obj, Mapping):
        for key in prefer:
            if key in obj and is_state_dict(obj[key]):
                return dict(obj[key]), key
        found = [k for k in obj.keys()][:20]
        raise CheckpointError(
            f"no state dict found in checkpoint; looked for a plain tensor dict or one under "
            f"{list(prefer)}; top-level keys are {found}"
        )
    raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state dict")


def _describe(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], context: str = "") -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped keys, if there are any."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return
    lines = [f"checkpoint does not match the model{f' ({context})' if context else ''}:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {_describe(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_describe(unexpected)}")
    if shapes:
        lines.append(f"  shape mismatches ({len(shapes)}): {_describe(shapes, 6)}")
    raise CheckpointError("\n".join(lines))


def load_state_dict_strict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], context: str = "", assign: bool = False
) -> nn.Module:
    """Strict load with a readable error. `assign=True` for models built on the meta device."""
    check_state_dict(model, state_dict, context)
    model.load_state_dict(state_dict, strict=True, assign=assign)
    return model


def state_dict_to_cpu(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state dict (for saving while training goes on)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
