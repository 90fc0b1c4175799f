"""Train the text-to-image GPT on tokenized images and their captions (torchrun; CPU or GPU).

    torchrun --standalone --nproc_per_node=4 -m evaluation.generation.train_t2i \
        --code-dir codes/metadata.jsonl --exp-name my_t2i --gpt-model GPT-B \
        --text-features outputs/text_features          # features from `python -m datasets.text_features`
    python -m evaluation.generation.train_t2i --code-dir codes/metadata.csv --exp-name demo_t2i --gpt-model GPT-Tiny
                                                       # no --text-features: the built-in word-level encoder

The code metadata needs a `text` column (one caption per row). Everything else is train_c2i.py: the same
flags, launcher, schedule, EMA, resume (exact, mid-epoch), DDP/FSDP and checkpoints; only the data
differ (`load_caption_data` is passed to `train_c2i.main`). The caption length T (the GPT's
cls_token_num) is the feature extraction's max_length, or the longest caption in words for the built-in
encoder, unless --cls-token-num is given. The checkpoint's `args` record what sampling needs to encode
prompts the same way: `text_vocab` (built-in encoder) or `text_features_manifest` (the HF encoder).
"""
from __future__ import annotations

import logging
from pathlib import Path

from datasets.code_dataset import CodeDataset, find_code_metadata
from datasets.metadata import read_metadata
from datasets.text_features import CaptionDataset, CaptionFeatures, FeatureCaptions, WordCaptions, caption_of
from evaluation.generation import train_c2i
from models.checkpoint import load_checkpoint
from models.text_encoder import WordVocab, words


def resumed_text_settings(args, logger) -> tuple[list | None, int | None, str | None]:
    """(word list, caption length T, cond_rotation) of the checkpoint this run resumes or starts from, if
    any: word ids, the number of caption positions and how attention reads them must not change under the
    trained weights (a checkpoint from before cond_rotation existed was trained with "zero")."""
    ckpt = None
    if args.gpt_ckpt is not None:
        ckpt = load_checkpoint(args.gpt_ckpt)
    elif args.auto_resume:
        checkpoint_dir = Path(args.results_dir) / args.exp_name / "checkpoints"
        _, ckpt = train_c2i.find_resume_checkpoint(checkpoint_dir, logger)
        if ckpt is None and (checkpoint_dir / "latest.pt").is_file():  # a sharded run's state: its latest.pt has the args
            ckpt = load_checkpoint(checkpoint_dir / "latest.pt")
    if not isinstance(ckpt, dict):
        return None, None, None
    config = ckpt.get("config") or {}
    return ckpt.get("args", {}).get("text_vocab"), config.get("cls_token_num"), config.get("cond_rotation", "zero")


def load_caption_data(args, logger, device):
    """(train CaptionDataset, val CaptionDataset or None, metadata path), every row checked upfront."""
    meta_path = find_code_metadata(args.code_dir)
    _, cache = train_c2i.code_settings(args, meta_path, logger, device)
    rows = read_metadata(meta_path, required=("code_identifier",))
    texts = {id(r): caption_of(r, meta_path) for r in rows}  # a row without a caption stops here, named
    # CodeDataset reads a label per row; captions replace labels here, so a row without one gets 0.
    for r in rows:
        if r.get("label") is None:
            r["label"] = 0
    common = dict(num_classes=None, num_codebooks=args.num_codebooks, vocab_size=args.vocab_size, vq_ckpt=args.vq_ckpt,
                  device=device, progress=logger.isEnabledFor(logging.INFO), rows=rows, cache=cache)
    train_codes = CodeDataset(meta_path, splits="train", **common)
    if len(train_codes) == 0:
        raise ValueError(f"{meta_path}: no training rows (split 'train' or no split column) among {len(rows)} rows")
    val_codes = CodeDataset(meta_path, splits=("val", "test"), **common)
    if len(val_codes) and val_codes.codes.shape[1:] != train_codes.codes.shape[1:]:
        raise ValueError(f"{meta_path}: val/test codes {tuple(val_codes.codes.shape[1:])} differ from train codes "
                         f"{tuple(train_codes.codes.shape[1:])}")
    train_texts = [texts[id(r)] for r in train_codes.rows]
    val_texts = [texts[id(r)] for r in val_codes.rows]

    saved_vocab, saved_T, saved_rotation = resumed_text_settings(args, logger)
    args.cond_rotation = args.cond_rotation or saved_rotation
    if args.text_features:
        features = CaptionFeatures(args.text_features)
        features.check(train_texts + val_texts)
        T = args.cls_token_num or saved_T or features.max_length
        condition = FeatureCaptions(features, T)
        model_kwargs = dict(caption_dim=features.dim)
        args.text_features_manifest = {k: v for k, v in features.manifest.items()}
        what = f"{features.manifest['encoder_class']} features ({features.dim}-d) from {args.text_features}"
    else:
        vocab = WordVocab(saved_vocab) if saved_vocab else WordVocab.build(train_texts)
        T = args.cls_token_num or saved_T or max(len(words(t)) for t in train_texts + val_texts)
        condition = WordCaptions(vocab, T)
        model_kwargs = dict(caption_dim=args.text_dim, text_vocab_size=len(vocab), text_layers=args.text_layers)
        args.text_vocab = vocab.tokens
        what = f"the built-in word-level encoder ({len(vocab)} words{', from the checkpoint' if saved_vocab else ''}, width {args.text_dim})"
    args.cls_token_num = T
    others = len(rows) - len(train_codes) - len(val_codes)
    logger.info(f"{meta_path}: {len(train_codes)} train rows, {len(val_codes)} val/test rows, "
                f"{f'{others} rows of other splits not used, ' if others else ''}"
                f"{len(set(train_texts))} distinct training captions; T = {T} caption positions; {what}")
    train = CaptionDataset(train_codes, train_texts, condition, model_kwargs)
    val = CaptionDataset(val_codes, val_texts, condition, model_kwargs) if len(val_codes) else None
    return train, val, meta_path


def main(args):
    if args.gpt_type != "t2i":
        raise ValueError("train_t2i.py trains text-to-image models; use train_c2i.py for class-to-image")
    return train_c2i.main(args, load=load_caption_data)


def get_parser():
    parser = train_c2i.get_parser()
    parser.description = __doc__
    g = parser.add_argument_group("text")
    g.add_argument("--text-features", type=str, default=None,
                   help="folder written by `python -m datasets.text_features` for this metadata (a Hugging Face "
                        "encoder's features); without it the built-in word-level encoder is trained with the GPT")
    g.add_argument("--text-dim", type=int, default=256, help="width of the built-in text encoder")
    g.add_argument("--text-layers", type=int, default=0,
                   help="bidirectional blocks of the built-in text encoder (0: word + position embeddings, which the "
                        "GPT's attention composes; blocks suit longer free-text captions)")
    # --cls-token-num None: the caption length comes from the data (see the module docstring).
    parser.set_defaults(gpt_type="t2i", cls_token_num=None)
    return parser


if __name__ == "__main__":
    main(get_parser().parse_args())
