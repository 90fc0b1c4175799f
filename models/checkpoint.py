"""The one place for checkpoint I/O: safe loading, unwrapping, strict loading, atomic saving.

Everything that reads weights goes through `load_checkpoint` (weights_only=True, or safetensors),
everything that writes goes through `datasets.files.atomic_save` (re-exported here).
"""
from __future__ import annotations

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
def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Read a checkpoint safely: `.safetensors` via safetensors, anything else with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(map_location))
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle errors, truncated zip files, ...
        raise CheckpointError(
            f"could not read {path} with torch.load(weights_only=True): {type(e).__name__}: {e}"
        ) from e


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
