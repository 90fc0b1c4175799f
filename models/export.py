"""Weights-only `.safetensors` from any of our checkpoints (tokenizer, GPT, evaluation classifier).

    python -m models.export outputs/tokenizer/tokenizer.pt weights/tokenizer.safetensors --ema
    python -m models.export outputs/generation/run/checkpoints/latest.pt weights/gpt.safetensors --ema
    python -m models.export hf://massaki75/meditok/meditok_simple_v1.pth weights/meditok.safetensors

The file holds the model weights (the EMA weights with --ema) and, in its metadata, what rebuilds the model:
the config, image size, kind, GPT size name and class names. `build_meditok`, `load_gpt`, `load_classifier`,
`--vq-ckpt`, `--gpt-ckpt` and the evaluators read it like the checkpoint it came from, without pickle.
Optimizer, RNG and data-order state stay behind: a safetensors file is for using a model, not resuming.
A plain state dict (the released weights) is written as it is; its config is inferred from the shapes
when it is loaded, exactly as for the original file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from models.checkpoint import CheckpointError, extract_state_dict, load_checkpoint, save_safetensors
from scripts.cli import ArgumentParser

# Fields of our checkpoints that describe the model (everything else is training state).
DESCRIPTION_FIELDS = ("kind", "config", "img_size", "gpt_model", "label_names", "arch", "model_kwargs",
                      "num_classes", "class_names", "image_size", "in_chans")


def describe(ckpt: Any) -> dict:
    """The model-describing fields of a checkpoint dict (empty for a plain state dict)."""
    if not isinstance(ckpt, Mapping):
        return {}
    info = {k: ckpt[k] for k in DESCRIPTION_FIELDS if k in ckpt}
    if "config" in info and "kind" not in info:
        info["kind"] = "gpt" if "gpt_model" in ckpt or "n_layer" in info["config"] else "unknown"
    for key in ("steps", "step"):  # provenance only
        if isinstance(ckpt.get(key), int):
            info["step"] = ckpt[key]
    return info


def export(src: str, out: str | Path, ema: bool = False) -> dict:
    """Write the weights of checkpoint `src` (a path or hf:// reference) to `out`; returns the metadata."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: the output name must end in .safetensors")
    ckpt = load_checkpoint(src)
    if ema and not (isinstance(ckpt, Mapping) and "ema" in ckpt):
        found = list(ckpt)[:12] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(f"{src}: --ema asked for, but the checkpoint has no 'ema' weights (it has {found})")
    prefer = ("ema",) if ema else ("model", "state_dict", "module", "ema")
    state_dict, where = extract_state_dict(ckpt, prefer=prefer)
    info = describe(ckpt)
    if info:
        info["weights"] = where or "model"
        info["source"] = str(src)
    save_safetensors(state_dict, out, info)
    return info


def main(args):
    info = export(args.ckpt, args.out, ema=args.ema)
    what = f"{info.get('kind', 'model')} ({info.get('weights', 'plain')} weights)" if info else "plain state dict"
    print(f"[export] wrote {args.out}: {what}")


if __name__ == "__main__":
    parser = ArgumentParser(description="Write a weights-only .safetensors file from one of our checkpoints.")
    parser.add_argument("ckpt", help="checkpoint: tokenizer.pt, a GPT checkpoint, a classifier, a released "
                                     ".pth/.pt, or an hf://<org>/<repo>/<file> reference")
    parser.add_argument("out", help="output file, *.safetensors")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights (an error if there are none)")
    main(parser.parse_args())
