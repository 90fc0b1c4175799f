"""Helper functions of the trainer and sampler scripts against independent references (issue 19, mutation
testing: docs/MUTATION.md). Each test calls a script's helper in this process (mutmut sees only calls made
here, not those of torchrun subprocesses) and checks it against a value written out by hand: the model's
config field by field, optimizer groups by parameter shape, checkpoint keys, files written and read back,
the learning-rate formula, and the argparse defaults of the official MedITok trainer and sampler
(evaluation/generation/autoregressive/{train,sample}/*_c2i.py and scripts/*_c2i.sh there).
"""
import copy
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.files import atomic_save
from datasets.manifest import build_manifest, write_manifest
from datasets.metadata import write_metadata
from evaluation.generation import sample_c2i, train_c2i
from models.checkpoint import CheckpointError
from models.gpt import ModelArgs, Transformer, VQTokenEmbedder
from models.meditok import build_meditok, save_meditok
from models.training import LRSchedule, StepBatchSampler

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
CPU = torch.device("cpu")


class Log:
    """A logger stand-in that keeps its messages (the scripts call info/warning and isEnabledFor)."""

    def __init__(self):
        self.lines = []

    def info(self, msg):
        self.lines.append(msg)

    warning = info

    def isEnabledFor(self, level):
        return False

    @property
    def text(self):
        return "\n".join(self.lines)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Two MedITok-Tiny checkpoints (32 px) with different weights: (path A, path B, model A)."""
    root = tmp_path_factory.mktemp("tokenizers")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        vq = build_meditok(model_name="MedITok-Tiny", img_size=32)
        paths.append(root / f"vq{seed}.pt")
        save_meditok(vq, paths[-1])
        if seed == 0:
            first = vq.eval()
    return paths[0], paths[1], first


# ==============================================================================================
# evaluation/generation/train_c2i.py
# ==============================================================================================
def c2i_args(*argv, **fields):
    args = train_c2i.get_parser().parse_args(["--code-dir", "unused", "--exp-name", "e", *map(str, argv)])
    for k, v in fields.items():
        setattr(args, k, v)
    return args


def test_train_c2i_defaults_are_the_released_ones():
    """The released train_c2i.py / train_c2i.sh defaults (written out here), where a default changes the run.
    Differences on purpose: --gpt-type c2i (the released script passes it), --vocab-size / --num-codebooks
    from the data (None), --schedule constant (the released 'linear' default builds no scheduler: constant)."""
    a = c2i_args()
    released = dict(gpt_model="GPT-B", cls_token_num=1, dropout_p=0.1, token_dropout_p=0.1, drop_path_rate=0.0,
                    results_dir="results", dataset="c2i_code", downsample_size=16, num_classes=6, epochs=300,
                    lr=1e-4, weight_decay=5e-2, beta1=0.9, beta2=0.95, max_grad_norm=1.0, global_batch_size=256,
                    global_seed=0, log_every=100, ckpt_every=5000, gradient_accumulation_steps=1,
                    mixed_precision="bf16", num_output_layer=1, vq_embed_path=None, gpt_ckpt=None, ema=False,
                    no_compile=False, no_local_save=False)
    assert {k: getattr(a, k) for k in released} == released
    # LlamaGen's model defaults (ModelArgs) and EMA decay, and ours where the release has no flag.
    ours = dict(gpt_type="c2i", vocab_size=None, num_codebooks=None, image_size=None, schedule="constant",
                warmup_steps=None, end_lr=0.0, attn_dropout_p=0.0, class_dropout_prob=0.1, ema_decay=0.9999,
                max_steps=None, keep_last=0, eval_every=0, auto_resume=False, data_parallel="ddp",
                cond_rotation=None, allow_tokenizer_mismatch=False, num_workers=0, tokenizer_name="meditok",
                timing_warmup_steps=2, vq_ckpt=None, grad_checkpointing=False, no_tensorboard=False)
    assert {k: getattr(a, k) for k in ours} == ours
    for required in (["--code-dir", "c"], ["--exp-name", "e"]):
        with pytest.raises(SystemExit):
            train_c2i.get_parser().parse_args(required)


def test_train_c2i_flags_parse_to_their_fields():
    a = train_c2i.get_parser().parse_args([
        "--code-dir", "c", "--exp-name", "e", "--dataset", "c2i_code", "--vq-ckpt", "v", "--allow-tokenizer-mismatch",
        "--tokenizer-name", "t", "--num-classes", "3", "--image-size", "64", "--downsample-size", "8",
        "--num-workers", "2", "--gpt-model", "GPT-Tiny", "--gpt-type", "c2i", "--vocab-size", "64",
        "--num-codebooks", "4", "--num-output-layer", "2", "--vq-embed-path", "q", "--cls-token-num", "3",
        "--cond-rotation", "identity", "--dropout-p", "0.2", "--attn-dropout-p", "0.3", "--token-dropout-p", "0.4",
        "--class-dropout-prob", "0.5", "--drop-path-rate", "0.6", "--epochs", "7", "--max-steps", "9",
        "--global-batch-size", "12", "--gradient-accumulation-steps", "3", "--lr", "0.01", "--end-lr", "0.001",
        "--schedule", "cosine", "--warmup-steps", "4", "--weight-decay", "0.2", "--beta1", "0.8", "--beta2", "0.7",
        "--max-grad-norm", "2", "--ema", "--ema-decay", "0.5", "--mixed-precision", "fp16", "--no-compile",
        "--data-parallel", "fsdp", "--grad-checkpointing", "--global-seed", "5", "--results-dir", "r",
        "--gpt-ckpt", "g", "--auto-resume", "--ckpt-every", "11", "--keep-last", "2", "--no-local-save",
        "--log-every", "13", "--eval-every", "14", "--no-tensorboard", "--timing-warmup-steps", "1"])
    expected = dict(code_dir="c", exp_name="e", dataset="c2i_code", vq_ckpt="v", allow_tokenizer_mismatch=True,
                    tokenizer_name="t", num_classes=3, image_size=64, downsample_size=8, num_workers=2,
                    gpt_model="GPT-Tiny", gpt_type="c2i", vocab_size=64, num_codebooks=4, num_output_layer=2,
                    vq_embed_path="q", cls_token_num=3, cond_rotation="identity", dropout_p=0.2, attn_dropout_p=0.3,
                    token_dropout_p=0.4, class_dropout_prob=0.5, drop_path_rate=0.6, epochs=7, max_steps=9,
                    global_batch_size=12, gradient_accumulation_steps=3, lr=0.01, end_lr=0.001, schedule="cosine",
                    warmup_steps=4, weight_decay=0.2, beta1=0.8, beta2=0.7, max_grad_norm=2.0, ema=True,
                    ema_decay=0.5, mixed_precision="fp16", no_compile=True, data_parallel="fsdp",
                    grad_checkpointing=True, global_seed=5, results_dir="r", gpt_ckpt="g", auto_resume=True,
                    ckpt_every=11, keep_last=2, no_local_save=True, log_every=13, eval_every=14,
                    no_tensorboard=True, timing_warmup_steps=1)
    assert {k: getattr(a, k) for k in expected} == expected
    for bad in (["--dataset", "imagenet"], ["--gpt-type", "t2i"], ["--schedule", "step"], ["--mixed-precision", "fp8"],
                ["--gpt-model", "GPT-Huge"], ["--data-parallel", "zero3"], ["--cond-rotation", "half"]):
        with pytest.raises(SystemExit):
            train_c2i.get_parser().parse_args(["--code-dir", "c", "--exp-name", "e", *bad])


def test_build_model_passes_every_setting_to_the_config():
    args = c2i_args(gpt_model="GPT-Tiny", vocab_size=4 * 16, num_classes=3, cls_token_num=2, cond_rotation="identity",
                    num_output_layer=2, dropout_p=0.3, attn_dropout_p=0.2, token_dropout_p=0.15,
                    class_dropout_prob=0.25, drop_path_rate=0.0)
    c = train_c2i.build_model(args, 4, 3, multiple_of=32).config
    got = {k: getattr(c, k) for k in ("vocab_size", "num_codebooks", "block_size", "num_classes", "cls_token_num",
                                      "cond_rotation", "model_type", "n_output_layer", "resid_dropout_p", "ffn_dropout_p",
                                      "attn_dropout_p", "token_dropout_p", "class_dropout_prob", "drop_path_rate",
                                      "multiple_of", "dim", "n_layer", "vq_embed_width", "vq_embed_path")}
    assert got == dict(vocab_size=64, num_codebooks=4, block_size=9, num_classes=3, cls_token_num=2,
                       cond_rotation="identity", model_type="c2i", n_output_layer=2, resid_dropout_p=0.3,
                       ffn_dropout_p=0.3, attn_dropout_p=0.2, token_dropout_p=0.15, class_dropout_prob=0.25,
                       drop_path_rate=0.0, multiple_of=32, dim=128, n_layer=4, vq_embed_width=0, vq_embed_path=None)
    # Stochastic depth replaces residual/FFN dropout (the released trainer's rule); attention dropout stays.
    c = train_c2i.build_model(c2i_args(gpt_model="GPT-Tiny", vocab_size=64, dropout_p=0.3, attn_dropout_p=0.2,
                                       drop_path_rate=0.1), 4, 3).config
    assert (c.resid_dropout_p, c.ffn_dropout_p, c.attn_dropout_p, c.drop_path_rate) == (0.0, 0.0, 0.2, 0.1)
    # A namespace without cond_rotation / vq_embed_path (older args) builds c2i's default rotation.
    args = c2i_args(gpt_model="GPT-Tiny", vocab_size=64)
    del args.cond_rotation, args.vq_embed_path
    c = train_c2i.build_model(args, 4, 3).config
    assert (c.cond_rotation, c.vq_embed_path) == ("zero", None)
    # train_t2i.py builds through here with --gpt-type t2i (its parser's default) and the caption width.
    c = train_c2i.build_model(c2i_args(gpt_model="GPT-Tiny", vocab_size=64, gpt_type="t2i", cls_token_num=5), 4, 3,
                              caption_dim=24).config
    assert (c.model_type, c.caption_dim, c.cls_token_num, c.cond_rotation) == ("t2i", 24, 5, "identity")


def test_build_model_embeds_through_the_tokenizer_file(tokenizers):
    path, _, vq = tokenizers
    args = c2i_args(gpt_model="GPT-Tiny", vocab_size=vq.vocab_size, num_classes=3, vq_embed_path=path)
    model = train_c2i.build_model(args, vq.num_codebooks, 2)
    c = model.config
    assert isinstance(model.tok_embeddings, VQTokenEmbedder)
    assert (c.vq_embed_path, c.vq_embed_width, c.vq_embed_vocab_width) == (str(path), vq.config.width, vq.vocab_width)
    assert c.vq_embed_heads == vq.config.projection_heads
    mine, theirs = model.tok_embeddings.state_dict(), vq.state_dict()
    for k in theirs:
        if k.startswith(("quantizer.", "post_quant_proj.")):
            assert torch.equal(mine[k], theirs[k]), k  # the file's weights, not a fresh initialisation


def test_build_model_names_the_tokenizer_file_when_its_part_does_not_load(tokenizers, monkeypatch):
    path, _, vq = tokenizers
    real = train_c2i.load_vq_embedding

    def missing_one(p):
        part, dims = real(p)
        return {k: v for k, v in part.items() if k != "post_quant_proj.proj.weight"}, dims

    monkeypatch.setattr(train_c2i, "load_vq_embedding", missing_one)
    args = c2i_args(gpt_model="GPT-Tiny", vocab_size=vq.vocab_size, vq_embed_path=path)
    with pytest.raises(Exception, match=rf"(?s){path} \[post_quant_proj\].*proj\.weight"):
        train_c2i.build_model(args, vq.num_codebooks, 2)


def test_create_optimizer_groups_by_dimension():
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    model[0].weight.requires_grad_(False)  # frozen: left out
    args = c2i_args(weight_decay=0.3, lr=0.02, beta1=0.7, beta2=0.8)
    opt = train_c2i.create_optimizer(model, args)
    assert len(opt.param_groups) == 2
    decay, no_decay = opt.param_groups
    assert [id(p) for p in decay["params"]] == [id(model[1].weight)]
    assert [id(p) for p in no_decay["params"]] == [id(model[1].bias), id(model[2].weight), id(model[2].bias)]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.3, 0.0)
    for g in opt.param_groups:
        assert (g["lr"], g["betas"], g["fused"]) == (0.02, (0.7, 0.8), True)
    assert isinstance(opt, torch.optim.AdamW)


def write_codes(folder: Path, n_train=4, n_val=2, n_test=0, K=2, grid=2, sub=8, extra=0, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n_train + n_val + n_test + extra):
        torch.save(torch.randint(0, sub, (K, grid, grid), generator=g), folder / f"{i}.pt")
        split = ("train" if i < n_train else "val" if i < n_train + n_val else "test" if i < n_train + n_val + n_test
                 else "holdout")
        rows.append({"identifier": f"img/{i}.png", "code_identifier": f"{i}.pt", "label": i % 2, "split": split})
    meta = folder / "meta.jsonl"
    write_metadata(rows, meta)
    return meta


def test_code_settings_without_a_manifest(tmp_path, tokenizers):
    path, _, vq = tokenizers
    meta = write_codes(tmp_path / "c")
    args = c2i_args(vocab_size=None, vq_ckpt=None)  # nothing given: the released vocabulary
    log = Log()
    assert train_c2i.code_settings(args, meta, log, torch.device("cpu")) == (None, {})
    assert args.vocab_size == 32768 and "32768" in log.text
    args = c2i_args(vocab_size=24, vq_ckpt=path)  # given: kept, no tokenizer built
    assert train_c2i.code_settings(args, meta, Log(), torch.device("cpu")) == (None, {})
    assert args.vocab_size == 24
    args = c2i_args(vocab_size=None, vq_ckpt=path)  # from the tokenizer, which is kept for the datasets
    log = Log()
    manifest, cache = train_c2i.code_settings(args, meta, log, torch.device("cpu"))
    assert manifest is None and args.vocab_size == vq.codebook_size * vq.num_codebooks
    assert f"vocabulary {args.vocab_size} from the tokenizer {path}" in log.text
    tok = cache["tokenizer"]
    assert not tok.training and all(torch.equal(a, b) for a, b in zip(tok.state_dict().values(), vq.state_dict().values()))


def manifest_folder(tmp_path, tok_path, infer_type="code"):
    config = build_meditok(tok_path).config
    meta = write_codes(tmp_path / "m", K=config.num_codebooks, sub=config.codebook_size)  # a 2x2 grid
    write_manifest(meta.parent, build_manifest(config, tok_path, image_size=32, infer_type=infer_type))
    return meta, config


def test_code_settings_from_the_manifest(tmp_path, tokenizers):
    made, other, vq = tokenizers
    meta, config = manifest_folder(tmp_path, made)
    vocab, K = config.codebook_size * config.num_codebooks, config.num_codebooks
    args = c2i_args(vocab_size=None, num_codebooks=None, image_size=None)
    del args.vq_embed_path  # callers whose namespace has no such flag
    log = Log()
    manifest, cache = train_c2i.code_settings(args, meta, log, torch.device("cpu"))
    assert cache == {} and manifest["vocab_size"] == vocab
    assert (args.vocab_size, args.num_codebooks, args.vq_ckpt) == (vocab, K, None)  # codes: no tokenizer needed
    assert f"vocabulary {vocab} = {K} codebooks x {config.codebook_size}" in log.text and str(made) in log.text
    # Flags that agree are fine; each one that contradicts is named with both values.
    args = c2i_args(vocab_size=vocab, num_codebooks=K, image_size=32)
    train_c2i.code_settings(args, meta, Log(), torch.device("cpu"))
    for flag, value, right in (("vocab_size", vocab * 2, vocab), ("num_codebooks", K + 1, K), ("image_size", 64, 32)):
        with pytest.raises(ValueError, match=rf"^--{flag.replace('_', '-')} {value} contradicts .*tokenizer\.json: "
                                             rf"the codes were made with {flag} {right} \(leave the flag out"):
            train_c2i.code_settings(c2i_args(**{flag: value}), meta, Log(), torch.device("cpu"))
    # --vq-ckpt and --vq-embed-path must be the tokenizer that made the codes (or explicitly allowed).
    for flag in ("vq_ckpt", "vq_embed_path"):
        with pytest.raises(ValueError, match=r"vq1\.pt.*vq0\.pt"):
            train_c2i.code_settings(c2i_args(**{flag: other}), meta, Log(), torch.device("cpu"))
        with pytest.warns(UserWarning, match=r"vq1\.pt"):
            train_c2i.code_settings(c2i_args(allow_tokenizer_mismatch=True, **{flag: other}), meta, Log(),
                                    torch.device("cpu"))
        train_c2i.code_settings(c2i_args(**{flag: made}), meta, Log(), torch.device("cpu"))


def test_code_settings_latents_take_the_recorded_tokenizer(tmp_path, tokenizers):
    made, other, _ = tokenizers
    meta, _ = manifest_folder(tmp_path, made, infer_type="latent")
    args = c2i_args()
    train_c2i.code_settings(args, meta, Log(), torch.device("cpu"))
    assert args.vq_ckpt == str(made)
    # With --vq-embed-path the recorded tokenizer is not substituted (the embedding path was checked instead).
    args = c2i_args(vq_embed_path=made)
    train_c2i.code_settings(args, meta, Log(), torch.device("cpu"))
    assert args.vq_ckpt is None
    # The recorded file changed since: refused, even though no flag named it.
    meta2, _ = manifest_folder(tmp_path / "x", other, infer_type="latent")
    manifest = json.loads((meta2.parent / "tokenizer.json").read_text())
    manifest["tokenizer"]["path"] = str(made)  # recorded path now holds other weights
    (meta2.parent / "tokenizer.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="is not the one that made the codes"):
        train_c2i.code_settings(c2i_args(), meta2, Log(), torch.device("cpu"))
    # A recorded file that no longer exists: nothing substituted.
    manifest["tokenizer"]["path"] = str(tmp_path / "gone.pt")
    (meta2.parent / "tokenizer.json").write_text(json.dumps(manifest))
    args = c2i_args()
    train_c2i.code_settings(args, meta2, Log(), torch.device("cpu"))
    assert args.vq_ckpt is None


def test_load_data_splits_and_checks(tmp_path):
    def c2i_args_here(**fields):
        return c2i_args(code_dir=str(meta), **fields)

    meta = write_codes(tmp_path / "c", n_train=4, n_val=2, n_test=1, extra=3)
    args = c2i_args(code_dir=str(meta), num_classes=2, vocab_size=16)
    log = Log()
    train, val, path = train_c2i.load_data(args, log, torch.device("cpu"))
    assert path == meta and (len(train), len(val)) == (4, 3) and args.num_codebooks is None
    assert train.codes.shape == (4, 2, 4) and torch.equal(train.labels, torch.tensor([0, 1, 0, 1]))
    assert "4 train rows, 3 val/test rows, 3 rows of other splits not used; codes [K=2, 2x2]" in log.text
    # num_classes, vocab_size and num_codebooks reach the datasets' checks.
    with pytest.raises(ValueError, match="label 1 is outside"):
        train_c2i.load_data(c2i_args_here(num_classes=1, vocab_size=16), Log(), torch.device("cpu"))
    with pytest.raises(ValueError, match="outside a codebook of 4 entries"):
        train_c2i.load_data(c2i_args_here(num_classes=2, vocab_size=8), Log(), torch.device("cpu"))
    with pytest.raises(ValueError, match="model expects 3"):
        train_c2i.load_data(c2i_args_here(num_classes=2, vocab_size=24, num_codebooks=3), Log(), torch.device("cpu"))
    # --image-size / --downsample-size must give the code grid (2 here), when no manifest says.
    train_c2i.load_data(c2i_args_here(num_classes=2, vocab_size=16, image_size=32, downsample_size=16), Log(), "cpu")
    with pytest.raises(ValueError, match="--image-size 64 / --downsample-size 16 gives a 4-grid, but the code files hold a 2-grid"):
        train_c2i.load_data(c2i_args_here(num_classes=2, vocab_size=16, image_size=64), Log(), "cpu")
    args = c2i_args_here(num_classes=2, vocab_size=16)
    args.dataset = "imagenet"
    with pytest.raises(ValueError, match="--dataset 'imagenet': only 'c2i_code'"):
        train_c2i.load_data(args, Log(), "cpu")


def test_load_data_without_val_rows_and_refusals(tmp_path):
    meta = write_codes(tmp_path / "a", n_train=4, n_val=0)
    log = Log()
    train, val, _ = train_c2i.load_data(c2i_args(code_dir=str(meta), num_classes=2, vocab_size=16), log, "cpu")
    assert len(train) == 4 and val is None
    assert "4 train rows, 0 val/test rows; codes [K=2, 2x2]" in log.text  # no "other splits" clause
    # the grid side is image_size // downsample_size (a size that is not a multiple floors)
    train_c2i.load_data(c2i_args(code_dir=str(meta), num_classes=2, vocab_size=16, image_size=40, downsample_size=16),
                        Log(), "cpu")
    # val/test rows get the same checks as train rows
    meta = write_codes(tmp_path / "v", n_train=4, n_val=2, sub=4)
    torch.save(torch.full((2, 2, 2), 6), meta.parent / "5.pt")
    with pytest.raises(ValueError, match=r"meta\.jsonl:6 .*outside a codebook of 4 entries"):
        train_c2i.load_data(c2i_args(code_dir=str(meta), num_classes=2, vocab_size=8), Log(), "cpu")
    meta = write_codes(tmp_path / "b", n_train=0, n_val=2, extra=1)
    with pytest.raises(ValueError, match=r"meta\.jsonl: no training rows \(split 'train' or no split column\) among 3 rows"):
        train_c2i.load_data(c2i_args(code_dir=str(meta), num_classes=2, vocab_size=16), Log(), "cpu")
    meta = write_codes(tmp_path / "c", n_train=4, n_val=2)
    torch.save(torch.zeros(2, 3, 3, dtype=torch.long), meta.parent / "5.pt")  # a val row of another grid
    torch.save(torch.zeros(2, 3, 3, dtype=torch.long), meta.parent / "4.pt")
    with pytest.raises(ValueError, match=r"val/test codes \(2, 9\) differ from train codes \(2, 4\)"):
        train_c2i.load_data(c2i_args(code_dir=str(meta), num_classes=2, vocab_size=16), Log(), "cpu")


def test_load_data_grid_must_match_the_manifest(tmp_path, tokenizers):
    made, _, _ = tokenizers
    meta, config = manifest_folder(tmp_path, made)  # a 2x2 code grid; the 32 px tokenizer makes a larger one
    grid = config.grid_size(32)
    assert grid != 2
    with pytest.raises(ValueError, match=rf"the code files hold a 2-grid, but .*tokenizer\.json records a \[{grid}, {grid}\] grid"):
        train_c2i.load_data(c2i_args(code_dir=str(meta), num_classes=2), Log(), "cpu")


def test_condition_inputs_move_labels_or_captions():
    meta = torch.device("meta")  # a device other than the CPU, available everywhere
    y = torch.tensor([1, 2])
    out = train_c2i.condition_inputs(y, meta)
    assert list(out) == ["cond_idx"] and out["cond_idx"].device == meta and out["cond_idx"].shape == (2,)
    for kind in (tuple, list):
        cap, mask = torch.rand(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)
        out = train_c2i.condition_inputs(kind([cap, mask]), meta)
        assert list(out) == ["cond_idx", "cond_mask"]
        assert out["cond_idx"].shape == (2, 3, 4) and out["cond_mask"].shape == (2, 3)
        assert out["cond_idx"].device == meta and out["cond_mask"].device == meta
        assert out["cond_mask"].dtype == torch.bool


def test_is_training_state():
    assert train_c2i.is_training_state({"optimizer": {}, "steps": 0})
    assert not train_c2i.is_training_state({"optimizer": {}})
    assert not train_c2i.is_training_state({"steps": 3})
    assert not train_c2i.is_training_state([("optimizer", 1), ("steps", 2)])


def save_state(path, steps, **extra):
    atomic_save({"optimizer": {}, "steps": steps, **extra}, path)


def sharded_folder(ckpt_dir, step):
    folder = ckpt_dir / f"{step:07d}"
    folder.mkdir()
    (folder / ".metadata").write_bytes(b"x")
    (folder / "train_state.pt").write_bytes(b"x")
    return folder


def test_find_resume_checkpoint_picks_the_newest_loadable(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    log = Log()
    assert train_c2i.find_resume_checkpoint(d, log) == (None, None)
    save_state(d / "0000003.pt", 3)
    save_state(d / "latest.pt", 5, tag="latest")
    path, ckpt = train_c2i.find_resume_checkpoint(d, log)
    assert path == d / "latest.pt" and ckpt["tag"] == "latest"
    save_state(d / "0000005.pt", 5, tag="numbered")  # a tie: latest.pt wins
    assert train_c2i.find_resume_checkpoint(d, log)[1]["tag"] == "latest"
    save_state(d / "0000007.pt", 7, tag="seven")  # a run extended after latest.pt
    assert train_c2i.find_resume_checkpoint(d, log)[0] == d / "0000007.pt"
    (d / "0000007.pt").unlink()
    # latest.pt without a step count is tried last, after every numbered file.
    atomic_save({"optimizer": {}, "tag": "no steps"}, d / "latest.pt")
    assert train_c2i.find_resume_checkpoint(d, log)[0] == d / "0000005.pt"
    for name in ("0000003.pt", "0000005.pt"):
        (d / name).unlink()
    with pytest.raises(CheckpointError, match=r"latest\.pt \(not a training checkpoint\)"):
        train_c2i.find_resume_checkpoint(d, log)
    save_state(d / "0000002.pt", 2)
    # A truncated latest.pt is tried last; a truncated newer numbered file is skipped, named in the log.
    (d / "latest.pt").write_bytes(b"\x80\x02not a checkpoint")
    (d / "0000009.pt").write_bytes(b"\x80\x02not a checkpoint")
    log = Log()
    path, ckpt = train_c2i.find_resume_checkpoint(d, log)
    assert path == d / "0000002.pt" and ckpt["steps"] == 2
    assert "0000009.pt" in log.text and "falling back to" in log.text and "latest.pt" not in log.text
    # Nothing loads: an error naming every file, not a fresh start.
    (d / "0000002.pt").write_bytes(b"broken")
    with pytest.raises(CheckpointError, match=r"no readable checkpoint(.|\n)*0000002\.pt(.|\n)*latest\.pt"):
        train_c2i.find_resume_checkpoint(d, Log())


def test_find_resume_checkpoint_reads_latest_once_and_tries_it_last_without_steps(tmp_path, monkeypatch):
    import models.training

    d = tmp_path / "checkpoints"
    d.mkdir()
    save_state(d / "latest.pt", 4, tag="latest")
    save_state(d / "0000002.pt", 2)
    reads = []
    real = models.training.load_checkpoint
    monkeypatch.setattr(models.training, "load_checkpoint", lambda p, *a, **k: reads.append(Path(p).name) or real(p, *a, **k))
    path, ckpt = train_c2i.find_resume_checkpoint(d, Log())
    assert path == d / "latest.pt" and ckpt["tag"] == "latest" and reads == []  # read once, to learn its step
    # latest.pt without a step count ranks below every numbered file, step 0 included: no skip is logged.
    atomic_save({"optimizer": {}}, d / "latest.pt")
    (d / "0000002.pt").unlink()
    save_state(d / "0000000.pt", 0)
    log = Log()
    assert train_c2i.find_resume_checkpoint(d, log)[0] == d / "0000000.pt" and log.lines == []
    (d / "latest.pt").write_bytes(b"truncated")  # unreadable: also ranked last
    assert train_c2i.find_resume_checkpoint(d, log)[0] == d / "0000000.pt" and log.lines == []


def test_find_resume_checkpoint_prefers_sharded_folders_that_are_as_new(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    s4 = sharded_folder(d, 4)
    assert train_c2i.find_resume_checkpoint(d, Log()) == (s4, None)
    save_state(d / "latest.pt", 6)
    assert train_c2i.find_resume_checkpoint(d, Log())[0] == d / "latest.pt"  # the file is newer
    s6 = sharded_folder(d, 6)
    assert train_c2i.find_resume_checkpoint(d, Log()) == (s6, None)  # as new: the folder (full training state)
    (d / "latest.pt").write_bytes(b"broken")  # unreadable files and a sharded folder: the folder
    assert train_c2i.find_resume_checkpoint(d, Log()) == (s6, None)
    (s6 / ".metadata").unlink()  # incomplete folders do not count
    assert train_c2i.find_resume_checkpoint(d, Log()) == (s4, None)


class Scaler:
    def __init__(self, enabled):
        self.enabled = enabled

    def is_enabled(self):
        return self.enabled

    def state_dict(self):
        return {"scale": 8.0}


def test_make_checkpoint_holds_the_training_state():
    config = ModelArgs(dim=32, n_layer=1, n_head=2, vocab_size=16, num_codebooks=2, num_classes=3, block_size=4)
    raw = Transformer(config)
    args = c2i_args(gpt_model="GPT-Tiny")
    schedule = LRSchedule(0.1, 10, 2, "cosine", 0.01)
    sampler = StepBatchSampler(24, 8)  # 3 steps per epoch
    weights, ema, opt = {"w": torch.ones(1)}, {"w": torch.zeros(1)}, {"state": {}}
    ckpt = train_c2i.make_checkpoint(raw, weights, ema, opt, Scaler(True), args, 5, 1, 2, schedule, sampler,
                                     ["rng"], {"0": "a", 2: "c"}, 2)
    assert set(ckpt) == {"scheduler", "steps", "epoch", "step_in_epoch", "data", "rng", "world_size", "config",
                         "gpt_model", "label_names", "args", "model", "ema", "optimizer", "scaler"}
    assert ckpt["scheduler"] == dict(lr=0.1, total_steps=10, warmup_steps=2, kind="cosine", end_lr=0.01)
    assert (ckpt["steps"], ckpt["epoch"], ckpt["step_in_epoch"], ckpt["world_size"]) == (5, 1, 2, 2)
    assert ckpt["data"] == sampler.state_dict() and ckpt["rng"] == ["rng"]
    assert ckpt["config"] == asdict(config) and ckpt["gpt_model"] == "GPT-Tiny"
    assert ckpt["label_names"] == {0: "a", 2: "c"} and ckpt["args"] == vars(args)
    assert ckpt["model"] is weights and ckpt["ema"] is ema and ckpt["optimizer"] is opt
    assert ckpt["scaler"] == {"scale": 8.0}
    # The last step of an epoch: resume at the next epoch's start. Missing parts and a disabled scaler: no keys.
    ckpt = train_c2i.make_checkpoint(raw, None, None, None, Scaler(False), args, 6, 1, 3, schedule, sampler, [], {}, 1)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (2, 0)
    assert not {"model", "ema", "optimizer", "scaler"} & set(ckpt)
    ckpt = train_c2i.make_checkpoint(raw, weights, None, None, None, args, 6, 0, 0, schedule, sampler, [], {}, 1)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (0, 0) and "model" in ckpt and "scaler" not in ckpt


def lr_formula(step, lr, end_lr, total, warmup, kind):
    """The schedule written out (models/training.py's docstring): linear warm-up, then constant/cosine/linear."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = min(1.0, (step - warmup) / (total - warmup))
    r = {"constant": 1.0, "cosine": (1 + math.cos(math.pi * p)) / 2, "linear": 1 - p}[kind]
    return end_lr + (lr - end_lr) * r


@pytest.mark.parametrize("kind, epochs, warmup", [("cosine", 3, 2), ("linear", 1, None), ("constant", 1, None)])
def test_c2i_learning_rate_at_every_step(tmp_path, monkeypatch, kind, epochs, warmup):
    """The lr each optimizer step runs with (spied on set_lr), against the formula: total steps from --epochs,
    the default warm-up 3 % of them for cosine/linear (int(0.03 * 72) = 2) and 0 for constant."""
    meta = write_codes(tmp_path / "c", n_train=24, n_val=0)
    seen = []
    monkeypatch.setattr(train_c2i, "set_lr", lambda opt, lr: (seen.append(lr), [g.update(lr=lr) for g in opt.param_groups]))
    argv = ["--code-dir", meta, "--results-dir", tmp_path / "r", "--exp-name", "e", "--gpt-model", "GPT-Tiny",
            "--vocab-size", 16, "--num-classes", 2, "--global-batch-size", 8 if kind != "cosine" else 1,
            "--epochs", epochs, "--schedule", kind, "--lr", 1e-3, "--end-lr", 1e-4, "--no-compile", "--no-tensorboard",
            "--no-local-save", "--log-every", 1000]
    train_c2i.main(train_c2i.get_parser().parse_args([str(a) for a in argv]))
    total = 24 * epochs // (8 if kind != "cosine" else 1)
    default_warmup = 0 if kind == "constant" else int(0.03 * total)
    assert warmup is None or default_warmup == warmup
    assert len(seen) == total
    expected = [lr_formula(s, 1e-3, 1e-4, total, default_warmup, kind) for s in range(total)]
    assert seen == pytest.approx(expected, rel=1e-12, abs=0)


# ==============================================================================================
# evaluation/generation/sample_c2i.py
# ==============================================================================================
def sample_args(*argv, **fields):
    args = sample_c2i.get_parser().parse_args(["--gpt-ckpt", "g.pt", "--vq-ckpt", "v.pt", *map(str, argv)])
    for k, v in fields.items():
        setattr(args, k, v)
    return args


def test_sample_c2i_defaults_are_the_released_ones():
    """The released sample_c2i.py defaults (written out here) for every sampling setting; the model flags
    that the release used to build its GPT are checks here (None: taken from the checkpoint)."""
    a = sample_args()
    released = dict(cfg_scale=1.5, cfg_interval=-1, top_k=0, temperature=1.0, top_p=1.0, global_seed=0,
                    per_proc_batch_size=32, precision="bf16", gpt_type="c2i", from_fsdp=False, compile=False,
                    copy_input=False, vq_embed_path=None)
    assert {k: getattr(a, k) for k in released} == released
    ours = dict(cfg_schedule="constant", gpt_model=None, cls_token_num=None, num_output_layer=None, num_classes=None,
                codebook_size=None, codebook_embed_dim=None, num_codebooks=None, image_size=None,
                image_size_eval=None, downsample_size=None, test_data_path=None, test_split="test",
                num_per_class=None, num_fid_samples=None, output_size=None, grid_columns=8, no_ema=False,
                no_prepack=False, allow_tokenizer_mismatch=False,
                sample_dir=str(Path("outputs") / "generation" / "inference" / "c2i"))
    assert {k: getattr(a, k) for k in ours} == ours
    for missing in (["--gpt-ckpt", "g"], ["--vq-ckpt", "v"]):
        with pytest.raises(SystemExit):
            sample_c2i.get_parser().parse_args(missing)
    for bad in (["--cfg-schedule", "cosine-ish"], ["--precision", "fp8"], ["--gpt-type", "i2i"]):
        with pytest.raises(SystemExit):
            sample_args(*bad)


def test_folder_name_rules():
    assert sample_c2i.folder_name("CT  scan/axial", 0) == "CT_scan_axial"  # a run of unsafe characters: one '_'
    assert sample_c2i.folder_name("x-ray+2.5", 1) == "x-ray+2.5"
    assert sample_c2i.folder_name("__.a b._", 2) == "a_b"
    assert sample_c2i.folder_name("-a", 2) == "-a"
    assert sample_c2i.folder_name("X-ray X", 2) == "X-ray_X"  # only dots and '_' are stripped
    assert sample_c2i.folder_name("Röntgen", 3) == "Röntgen"
    assert sample_c2i.folder_name(7, 4) == "7"
    for empty in ("", "..", "/", "_._"):
        assert sample_c2i.folder_name(empty, 5) == "class_5"


def test_class_names_sources_and_collisions():
    assert sample_c2i.class_names(6, {1: "MRI"}) == ["microscopy", "MRI", "x-ray", "dermoscopy", "histopathology",
                                                     "fundus-photography"]
    assert sample_c2i.class_names(2, None, {}, {1: "b"}) == ["class_0", "b"]  # empty sources are skipped
    assert sample_c2i.class_names(3, {0: "same"}, {0: "other", 1: "same", 2: "Same"}) == ["same_0", "same_1", "Same_2"]
    assert sample_c2i.class_names(2, {0: "a", 1: "b"}) == ["a", "b"]
    assert sample_c2i.class_names(3, {0: "a", 1: "A", 2: "b"}) == ["a_0", "A_1", "b"]  # two that collide
    assert sample_c2i.class_names(0) == []


def test_sample_labels_from_counts_and_rows(tmp_path):
    labels, rows, names = sample_c2i.sample_labels(sample_args(num_per_class=2), 3)
    assert (labels, rows, names) == ([0, 0, 1, 1, 2, 2], None, {})
    with pytest.raises(ValueError, match=r"^give either --test-data-path \(one sample per row\) or --num-per-class, not both$"):
        sample_c2i.sample_labels(sample_args(num_per_class=1, test_data_path="x"), 3)
    with pytest.raises(ValueError, match=r"^give --test-data-path \(one sample per row\) or --num-per-class$"):
        sample_c2i.sample_labels(sample_args(), 3)
    folder = tmp_path / "meta"
    folder.mkdir()
    rows = [dict(identifier="a", label=2, split="test", label_name="two"),
            dict(identifier="b", label=1, split="val"),
            dict(identifier="c", label=1, split="test", label_name=None),
            dict(identifier="d", label=0),  # no split: counts as train
            dict(identifier="e", label=2, split="test", label_name="deux"),
            dict(identifier="f", label=1, split="test", label_name=5)]
    write_metadata(rows, folder / "m.jsonl")
    args = sample_args(test_data_path=str(folder))  # a folder holding one metadata file
    labels, got, names = sample_c2i.sample_labels(args, 3)
    assert args.test_data_path == str(folder / "m.jsonl")
    assert labels == [2, 1, 2, 1] and [r["identifier"] for r in got] == ["a", "c", "e", "f"]
    assert names == {2: "two", 1: "5"}  # the first name of each label; None skipped; text
    labels, got, _ = sample_c2i.sample_labels(sample_args(test_data_path=str(folder), test_split="val,train"), 3)
    assert [r["identifier"] for r in got] == ["b", "d"] and labels == [1, 0]
    labels, _, _ = sample_c2i.sample_labels(sample_args(test_data_path=str(folder), num_fid_samples=2), 3)
    assert labels == [2, 1]
    with pytest.raises(ValueError, match=r"m\.jsonl: no rows with split in \['dev', 'x'\] \(see --test-split\)"):
        sample_c2i.sample_labels(sample_args(test_data_path=str(folder), test_split="x,dev"), 3)
    with pytest.raises(ValueError, match="label 2 is outside"):
        sample_c2i.sample_labels(sample_args(test_data_path=str(folder)), 2)
    write_metadata([dict(identifier="a", label=1), dict(identifier="b", label=0)], tmp_path / "nosplit.csv")
    labels, got, _ = sample_c2i.sample_labels(sample_args(test_data_path=str(tmp_path / "nosplit.csv")), 2)
    assert labels == [1, 0]  # no split column: every row
    write_metadata([dict(identifier="a")], tmp_path / "nolabel.jsonl")
    with pytest.raises(ValueError, match="missing required field 'label'"):
        sample_c2i.sample_labels(sample_args(test_data_path=str(tmp_path / "nolabel.jsonl")), 2)


def test_rank_share_seeds_and_strides():
    args = sample_args(global_seed=3, per_proc_batch_size=2)
    generator, mine, batches = sample_c2i.rank_share(args, 7, 1, 2, torch.device("cpu"))
    assert mine == [1, 3, 5] and batches == [[1, 3], [5]]
    seed = 3 * 2 + 1
    expected = torch.Generator().manual_seed(seed)
    assert torch.equal(torch.rand(4, generator=generator), torch.rand(4, generator=expected))
    after_call = torch.rand(3)  # the global RNG too (dropout-free models still draw from it elsewhere)
    torch.manual_seed(seed)
    assert torch.equal(after_call, torch.rand(3))
    generator, mine, batches = sample_c2i.rank_share(sample_args(per_proc_batch_size=4), 5, 0, 1, torch.device("cpu"))
    assert mine == [0, 1, 2, 3, 4] and batches == [[0, 1, 2, 3], [4]]
    assert generator.initial_seed() == 0


def test_run_id_hashes_labels_and_file_identities(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"12345")
    b.write_bytes(b"1")
    st = a.stat()
    assert sample_c2i._file_id(a) == [str(a.resolve()), 5, st.st_mtime_ns]
    ids = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in (a, b)]
    import hashlib
    expected = hashlib.sha256(json.dumps([[0, 2], ids]).encode()).hexdigest()[:10]
    assert sample_c2i.run_id([0, 2], a, None, b) == expected
    assert sample_c2i.run_id([0, 2], a, b) == expected
    assert sample_c2i.run_id([2, 0], a, b) != expected


def test_file_id_of_a_hub_reference_is_the_cached_file(tmp_path, monkeypatch):
    cached = tmp_path / "cache" / "w.pt"
    cached.parent.mkdir()
    cached.write_bytes(b"abc")
    asked = []
    monkeypatch.setattr(sample_c2i, "resolve_weights", lambda ref: asked.append(ref) or cached)
    assert sample_c2i._file_id("hf://org/repo/w.pt") == [str(cached.resolve()), 3, cached.stat().st_mtime_ns]
    assert asked == ["hf://org/repo/w.pt"]
    assert sample_c2i._file_id(str(cached)) == [str(cached.resolve()), 3, cached.stat().st_mtime_ns]
    assert asked == ["hf://org/repo/w.pt"]  # a local path is not resolved through the Hub


def test_run_name_spells_every_setting():
    args = sample_args(cfg_scale=2.0, cfg_schedule="linear", cfg_interval=-1, top_k=5, top_p=0.75, temperature=0.5,
                       global_seed=4)
    name = sample_c2i.run_name(args, "res/run7/checkpoints/0000100.pt", "w/vq.pth", 64, "ema")
    assert name == "run7-0000100-ema-vq-size64-cfg2-linear-topk5-topp0.75-temp0.5-seed4"
    args = sample_args(cfg_scale=1.5, cfg_interval=0, output_size=128)
    name = sample_c2i.run_name(args, "gpt_b.pt", "vq.pth", 256, "model", 12, 2, "abc")
    assert name == "gpt_b-model-vq-size256-out128-cfg1.5-constant-interval0-topk0-topp1-temp1-seed0-n12-ws2-abc"
    del args.output_size  # a namespace without the flag (older callers)
    assert "-out" not in sample_c2i.run_name(args, "g.pt", "vq.pth", 256, "model")


def test_make_grid_by_hand():
    H, W = 2, 3
    images = np.stack([np.full((H, W, 3), 10 * (i + 1), dtype=np.uint8) for i in range(5)])
    grid = sample_c2i.make_grid(images, [2, 0, 2, 2, 1], 2)
    assert grid.shape == (3 * H, 2 * W, 3) and grid.dtype == np.uint8
    expected = np.zeros((3 * H, 2 * W, 3), dtype=np.uint8)
    for r, c, i in ((0, 0, 1), (1, 0, 4), (2, 0, 0), (2, 1, 2)):  # class 0: image 1; class 1: 4; class 2: 0, 2
        expected[r * H:(r + 1) * H, c * W:(c + 1) * W] = 10 * (i + 1)
    assert np.array_equal(grid, expected)


@pytest.fixture(scope="module")
def gpt_files(tokenizers, tmp_path_factory):
    """GPT checkpoints matching the 32 px MedITok-Tiny (K 8, 512 codes, 4x4 grid): ours (config, model, ema,
    label names, args) and the released layout (weights only, under 'model')."""
    root = tmp_path_factory.mktemp("gpts")
    path, _, vq = tokenizers
    config = ModelArgs(dim=32, n_layer=1, n_head=2, multiple_of=32, num_classes=3, num_codebooks=vq.num_codebooks,
                       vocab_size=vq.vocab_size, block_size=vq.grid_size ** 2)
    torch.manual_seed(0)
    gpt = Transformer(config)
    ema = {k: v + 1 for k, v in gpt.state_dict().items()}
    ours = root / "ours.pt"
    atomic_save({"config": asdict(config), "model": gpt.state_dict(), "ema": ema, "gpt_model": "GPT-Tiny",
                 "label_names": {0: "zero"}}, ours)
    released = root / "released.pt"
    atomic_save({"model": gpt.state_dict()}, released)
    return dict(ours=ours, released=released, config=config, gpt=gpt, ema=ema, vq_path=path)


def test_load_models_weights_and_settings(gpt_files, capsys):
    f = gpt_files
    args = sample_args(gpt_ckpt=str(f["ours"]), vq_ckpt=str(f["vq_path"]))
    gpt, vq, weights, ckpt = sample_c2i.load_models(args, torch.device("cpu"))
    assert weights == "ema" and ckpt["label_names"] == {0: "zero"} and not gpt.training
    assert all(torch.equal(gpt.state_dict()[k], v) for k, v in f["ema"].items())
    assert vq.img_size == 32 and "--precision bf16 applies on a GPU" in capsys.readouterr().out
    args = sample_args(gpt_ckpt=str(f["ours"]), vq_ckpt=str(f["vq_path"]), no_ema=True, precision="none")
    gpt, _, weights, _ = sample_c2i.load_models(args, torch.device("cpu"))
    assert weights == "model" and all(torch.equal(gpt.state_dict()[k], v) for k, v in f["gpt"].state_dict().items())
    assert "--precision" not in capsys.readouterr().out
    # Every check, given its right value, passes.
    vq_embed_dim = vq.vocab_width // vq.num_codebooks
    sample_c2i.load_models(sample_args(
        gpt_ckpt=str(f["ours"]), vq_ckpt=str(f["vq_path"]), gpt_model="GPT-Tiny", num_classes=3,
        codebook_size=vq.vocab_size, num_codebooks=vq.num_codebooks, num_output_layer=1, cls_token_num=1,
        codebook_embed_dim=vq_embed_dim, downsample_size=vq.config.downsample), torch.device("cpu"))


@pytest.mark.parametrize("field, value, message", [
    ("num_classes", 4, "--num-classes 4 but the GPT has 3 classes"),
    ("codebook_size", 512, r"--codebook-size 512 \(the total vocabulary, as released\) but the GPT's is 4096"),
    ("num_codebooks", 4, "--num-codebooks 4 but the GPT has 8"),
    ("num_output_layer", 2, "--num-output-layer 2 but the GPT's head has 1 blocks"),
    ("cls_token_num", 2, "--cls-token-num 2 but the GPT was trained with 1"),
    ("codebook_embed_dim", 16, "--codebook-embed-dim 16 but the tokenizer's codebooks hold 8-d codes"),
    ("downsample_size", 16, "--downsample-size 16 but the tokenizer downsamples by 8"),
    ("gpt_model", "GPT-B", "holds a GPT-Tiny, not the --gpt-model GPT-B"),
])
def test_load_models_names_each_contradiction(gpt_files, field, value, message):
    f = gpt_files
    args = sample_args(gpt_ckpt=str(f["ours"]), vq_ckpt=str(f["vq_path"]), **{field: value})
    with pytest.raises(ValueError, match=message):
        sample_c2i.load_models(args, torch.device("cpu"))


def test_load_models_gpt_that_does_not_fit_the_tokenizer(gpt_files, tmp_path):
    f = gpt_files
    for change, message in ((dict(num_codebooks=4, vocab_size=2048), "tokenizer has 8 codebooks, the GPT 4"),
                            (dict(vocab_size=8 * 256), "tokenizer codebooks hold 512 codes, the GPT's 256"),
                            (dict(block_size=9), r"tokenizer grid 4x4 \(image size 32\) but the GPT generates 9 positions"),
                            (dict(model_type="t2i", caption_dim=8), "a t2i GPT: use evaluation/generation/sample_t2i.py")):
        config = ModelArgs(**{**asdict(f["config"]), **change})
        path = tmp_path / "other.pt"
        atomic_save({"config": asdict(config), "model": Transformer(config).state_dict()}, path)
        with pytest.raises(ValueError, match=rf"other\.pt / .*vq0\.pt: {message}"):
            sample_c2i.load_models(sample_args(gpt_ckpt=str(path), vq_ckpt=str(f["vq_path"])), torch.device("cpu"))


def test_load_models_released_layout(gpt_files, tmp_path):
    f = gpt_files
    args = sample_args(gpt_ckpt=str(f["released"]), vq_ckpt=str(f["vq_path"]), cls_token_num=2, gpt_model="GPT-Tiny")
    gpt, _, weights, _ = sample_c2i.load_models(args, torch.device(CPU))
    # block_size from the tokenizer's grid, cls_token_num from the flag, n_head from --gpt-model's size (the
    # weights alone say 32 wide: the registry has no such size, and GPT-Tiny has 4 heads)
    c = gpt.config
    assert (weights, c.block_size, c.cls_token_num, c.n_head) == ("model", 16, 2, 4)
    gpt, _, _, _ = sample_c2i.load_models(sample_args(gpt_ckpt=str(f["released"]), vq_ckpt=str(f["vq_path"]),
                                                      gpt_model="GPT-Tiny"), torch.device(CPU))
    assert gpt.config.cls_token_num == 1
    with pytest.raises(CheckpointError, match="cannot infer n_head for dim=32"):  # what --gpt-model supplies
        sample_c2i.load_models(sample_args(gpt_ckpt=str(f["released"]), vq_ckpt=str(f["vq_path"])), CPU)
    plain = tmp_path / "plain.pt"
    atomic_save(f["gpt"].state_dict(), plain)  # --from-fsdp: a plain state dict, checked
    sample_c2i.load_models(sample_args(gpt_ckpt=str(plain), vq_ckpt=str(f["vq_path"]), from_fsdp=True,
                                       gpt_model="GPT-Tiny"), CPU)
    with pytest.raises(ValueError, match=r"--from-fsdp: .*released\.pt is not a plain state dict \(top-level keys \['model'\]\)"):
        sample_c2i.load_models(sample_args(gpt_ckpt=str(f["released"]), vq_ckpt=str(f["vq_path"]), from_fsdp=True), CPU)


def test_check_codes_tokenizer_reads_both_manifests(tmp_path, tokenizers):
    made, other, _ = tokenizers
    test_codes, train_codes = tmp_path / "test", tmp_path / "train"
    config = build_meditok(made).config
    for folder in (test_codes, train_codes):
        folder.mkdir()
        write_manifest(folder, build_manifest(config, made, image_size=32, infer_type="code"))
    # The test rows' manifest
    args = sample_args(vq_ckpt=str(other), test_data_path=str(test_codes))
    with pytest.raises(ValueError, match=r"vq1\.pt.*vq0\.pt"):
        sample_c2i.check_codes_tokenizer(args, {})
    args.allow_tokenizer_mismatch = True
    with pytest.warns(UserWarning, match=r"vq1\.pt"):
        sample_c2i.check_codes_tokenizer(args, {})
    # The training codes' manifest, found through the checkpoint's --code-dir
    args = sample_args(vq_ckpt=str(other))
    with pytest.raises(ValueError, match=r"vq1\.pt.*vq0\.pt"):
        sample_c2i.check_codes_tokenizer(args, {"args": {"code_dir": str(train_codes)}})
    for ckpt in ({"args": {"code_dir": str(tmp_path / "moved")}}, {"args": {"code_dir": ""}}, {"args": "x"},
                 ["not a dict"], {}):
        sample_c2i.check_codes_tokenizer(args, ckpt)  # nothing to check against
    sample_c2i.check_codes_tokenizer(sample_args(vq_ckpt=str(made), test_data_path=str(test_codes)),
                                     {"args": {"code_dir": str(train_codes)}})


def test_check_vq_embedding(tokenizers, gpt_files, capsys):
    made, other, vq = tokenizers
    args = sample_args(gpt_ckpt="gpt.pt", vq_embed_path=str(made))
    with pytest.raises(ValueError, match=r"^--vq-embed-path .*vq0\.pt: gpt\.pt embeds its tokens with one table per "
                                         r"codebook, not through a tokenizer; drop the flag$"):
        sample_c2i.check_vq_embedding(args, gpt_files["gpt"])
    gpt = train_c2i.build_model(c2i_args(gpt_model="GPT-Tiny", vocab_size=vq.vocab_size, num_classes=3,
                                         vq_embed_path=made), vq.num_codebooks, 4)
    sample_c2i.check_vq_embedding(args, gpt)
    assert capsys.readouterr().out == ""
    sample_c2i.check_vq_embedding(args, copy.deepcopy(gpt).to(torch.bfloat16))  # a bf16 GPT: compared in its dtype
    assert capsys.readouterr().out == ""
    real = sample_c2i.load_vq_embedding
    with pytest.MonkeyPatch.context() as mp:  # a tensor the file lacks counts as differing
        mp.setattr(sample_c2i, "load_vq_embedding",
                   lambda p: ({k: v for k, v in real(p)[0].items() if k != "post_quant_proj.proj.bias"}, None))
        sample_c2i.check_vq_embedding(args, gpt)
    assert "in 1 tensors (e.g. post_quant_proj.proj.bias)" in capsys.readouterr().out
    with torch.no_grad():
        gpt.tok_embeddings.post_quant_proj.state_dict()[next(iter(gpt.tok_embeddings.post_quant_proj.state_dict()))].add_(1)
    sample_c2i.check_vq_embedding(args, gpt)
    first = next(iter(gpt.tok_embeddings.post_quant_proj.state_dict()))
    assert f"differs from {made} in 1 tensors (e.g. post_quant_proj.{first})" in capsys.readouterr().out
    # Against the other tokenizer: every tensor of the GPT whose values differ from that file.
    b = build_meditok(other).state_dict()
    emb = gpt.tok_embeddings
    mine = {**{f"quantizer.{k}": v for k, v in emb.quantizer.state_dict().items()},
            **{f"post_quant_proj.{k}": v for k, v in emb.post_quant_proj.state_dict().items()}}
    n = sum(not torch.equal(v, b[k]) for k, v in mine.items())
    assert 1 < n < len(mine)  # some tensors (norms at their initial ones) agree
    sample_c2i.check_vq_embedding(sample_args(gpt_ckpt="gpt.pt", vq_embed_path=str(other)), gpt)
    assert f"in {n} tensors (e.g. quantizer." in capsys.readouterr().out


def reference_uint8(vq, codes):
    with torch.no_grad():
        img = vq.idx_to_img(codes).clamp(-1, 1)
    return ((img + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_copy_inputs_decodes_this_ranks_rows(tmp_path, tokenizers):
    """Rank 1 of 2 decodes rows 1, 3, 5 (row 3 is already there: kept, and row 5 still done); row 5 is a
    latent (batch_infer --infer_type latent), which needs the tokenizer passed along."""
    _, _, vq = tokenizers
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(6):
        if i == 5:
            with torch.no_grad():
                z = vq.encode_image_vq(torch.rand(1, vq.in_chans, 32, 32, generator=g) * 2 - 1)[0]  # [L, vocab_width]
            torch.save(z.T.reshape(-1, 4, 4).clone(), tmp_path / f"{i}.pt")
        else:
            torch.save(torch.randint(0, vq.codebook_size, (vq.num_codebooks, 4, 4), generator=g), tmp_path / f"{i}.pt")
        rows.append({"identifier": f"{i}.png", "code_identifier": f"{i}.pt", "label": i % 2})
    write_metadata(rows, tmp_path / "m.jsonl")
    from datasets.metadata import read_metadata
    rows = read_metadata(tmp_path / "m.jsonl")
    args = sample_args(test_data_path=str(tmp_path / "m.jsonl"))
    run = tmp_path / "run"
    (run / "input" / "b").mkdir(parents=True)
    (run / "input" / "b" / "000003.png").write_bytes(b"kept")  # already there: not redone
    sample_c2i.copy_inputs(args, run, rows, [i % 2 for i in range(6)], ["a", "b"], vq, 1, 2, CPU)
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*.png")) == [
        "input/b/000001.png", "input/b/000003.png", "input/b/000005.png"]
    assert (run / "input" / "b" / "000003.png").read_bytes() == b"kept"
    codes = torch.load(tmp_path / "1.pt").flatten(1)[None]
    assert np.array_equal(np.asarray(Image.open(run / "input" / "b" / "000001.png")), reference_uint8(vq, codes)[0])
    with torch.no_grad():
        codes5 = vq.latent_to_idx(torch.load(tmp_path / "5.pt").flatten(1).T[None])  # the tokenizer's own codes
    assert np.array_equal(np.asarray(Image.open(run / "input" / "b" / "000005.png")), reference_uint8(vq, codes5)[0])
    # --output-size resizes the copies too
    sample_c2i.copy_inputs(sample_args(test_data_path=str(tmp_path / "m.jsonl"), output_size=8), tmp_path / "small",
                           rows, [0] * 6, ["a"], vq, 0, 3, CPU)
    small = sorted((tmp_path / "small" / "input" / "a").iterdir())
    assert [p.name for p in small] == ["000000.png", "000003.png"]
    assert np.asarray(Image.open(small[0])).shape == (8, 8, 3)


def test_gather_outputs_files_read_back(tmp_path):
    run = tmp_path / "run"
    labels, names = [1, 0, 1], ["zero", "one"]
    paths = [run / names[lab] / f"{i:06d}.png" for i, lab in enumerate(labels)]
    images = [np.random.default_rng(i).integers(0, 256, (2, 3, 3), dtype=np.uint8) for i in range(3)]
    for p, im in zip(paths, images):
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(p)
    rows = [{"identifier": "src/a.png"}, {"identifier": "src/b.png"}, {}]
    sample_c2i.gather_outputs(sample_args(grid_columns=1), run, paths, labels, names, rows)
    data = np.load(run / "samples.npz")
    assert sorted(data.files) == ["arr_0", "labels", "samples"]
    assert np.array_equal(data["samples"], np.stack(images)) and np.array_equal(data["arr_0"], np.stack(images))
    assert data["labels"].tolist() == labels and data["labels"].dtype == np.int64
    got = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert got == [
        {"identifier": "one/000000.png", "label": 1, "label_name": "one", "split": "generated", "source_identifier": "src/a.png"},
        {"identifier": "zero/000001.png", "label": 0, "label_name": "zero", "split": "generated", "source_identifier": "src/b.png"},
        {"identifier": "one/000002.png", "label": 1, "label_name": "one", "split": "generated", "source_identifier": None}]
    grid = np.asarray(Image.open(run / "grid.png"))  # one column: class 0's first image over class 1's
    assert np.array_equal(grid, np.concatenate([images[1], images[0]]))
    sample_c2i.gather_outputs(sample_args(), run, paths, labels, names, None)
    assert all("source_identifier" not in json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines())


def test_read_samples_converts_and_refuses(tmp_path):
    grey = np.arange(6, dtype=np.uint8).reshape(2, 3) * 40
    Image.fromarray(grey).save(tmp_path / "g.png")
    rgb = np.full((2, 3, 3), 7, dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    out = sample_c2i.read_samples([tmp_path / "g.png", tmp_path / "c.png"])
    assert out.shape == (2, 2, 3, 3) and out.dtype == np.uint8
    assert np.array_equal(out[0], np.repeat(grey[..., None], 3, axis=2)) and np.array_equal(out[1], rgb)
    Image.fromarray(np.zeros((3, 3, 3), dtype=np.uint8)).save(tmp_path / "odd.png")
    with pytest.raises(RuntimeError, match=r"odd\.png: \(3, 3, 3\) but the first sample is \(2, 3, 3\); delete the stray file"):
        sample_c2i.read_samples([tmp_path / "c.png", tmp_path / "odd.png"])
    with pytest.raises(RuntimeError, match=r"^2 samples are missing after sampling, e\.g\. \[.*x\.png.*y\.png"):
        sample_c2i.read_samples([tmp_path / "x.png", tmp_path / "c.png", tmp_path / "y.png"])
    with pytest.raises(RuntimeError, match=r"^4 samples are missing") as e:  # the first three are named
        sample_c2i.read_samples([tmp_path / f"m{i}.png" for i in range(4)])
    assert "m2.png" in str(e.value) and "m3.png" not in str(e.value)


def test_save_samples_keys(tmp_path):
    s = np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3)
    sample_c2i.save_samples(tmp_path, s, labels=np.array([3, 4]))
    data = np.load(tmp_path / "samples.npz")
    assert sorted(data.files) == ["arr_0", "labels", "samples"]
    assert np.array_equal(data["arr_0"], s) and np.array_equal(data["samples"], s) and data["labels"].tolist() == [3, 4]


# ==============================================================================================
# scripts/train_tokenizer.py
# ==============================================================================================
from scripts import train_tokenizer as tt  # noqa: E402  (grouped with its tests)


def tok_args(*argv, **fields):
    args = tt.get_parser().parse_args(["--train-data", "unused", "--out-dir", "unused", *map(str, argv)])
    for k, v in fields.items():
        setattr(args, k, v)
    return args


def test_train_tokenizer_defaults():
    a = tok_args()
    expected = dict(train_split="train", val_data=None, val_split="val", val_max_images=512, dataset_dir=None,
                    image_size=256, window=None, fit="pad", hflip=0.0, random_ct_window=False, cache_gb=2.0,
                    num_workers=0, config="MedITok-Tiny", init_ckpt=None, grad_checkpointing=False,
                    data_parallel="ddp", precision="bf16", batch_size=32, epochs=10, max_steps=0, max_minutes=0.0,
                    stop_at_step=0, lr=5e-4, end_lr_ratio=0.1, warmup_steps=100, weight_decay=0.02, beta1=0.9,
                    beta2=0.95, grad_clip=10.0, ema_decay=0.999, seed=0, l1=0.2, l2=1.0, vq_weight=1.0,
                    entropy_weight=0.0, perceptual_weights=None, perceptual_weight=1.0, disc_weight=0.0,
                    disc_start=2000, disc_adaptive=True, disc_lr=2e-5, disc_width=64, disc_layers=3,
                    dead_code_every=0, dead_code_threshold=0.03, log_every=20, eval_every=500, grid_images=8,
                    ckpt_every=1000, keep_last=2, no_tensorboard=False, no_progress=False)
    assert {k: getattr(a, k) for k in expected} == expected
    assert tok_args("--no-disc-adaptive").disc_adaptive is False
    for missing in (["--train-data", "t"], ["--out-dir", "o"]):
        with pytest.raises(SystemExit):
            tt.get_parser().parse_args(missing)


def test_random_ct_window_formula():
    """level uniform in [-600, 600] HU, width log-uniform in [80, 2000], from the item's own seeded generator."""
    for seed, epoch, index in ((0, 0, 0), (3, 1, 7), (5, 2, 11)):
        g = torch.Generator().manual_seed(hash((seed, epoch, index)) & (2 ** 63 - 1))
        u, v = torch.rand((), generator=g).item(), torch.rand((), generator=g).item()
        level, width = tt.random_ct_window(seed, epoch, index)
        assert level == pytest.approx(1200 * u - 600, abs=1e-9)
        assert width == pytest.approx(80 * 25 ** v, rel=1e-12)
    draws = [tt.random_ct_window(1, 0, i) for i in range(200)]
    levels, widths = zip(*draws)
    assert -600 <= min(levels) < -500 and 500 < max(levels) <= 600
    assert 80 <= min(widths) < 100 and 1600 < max(widths) <= 2000
    assert sum(w < math.sqrt(80 * 2000) for w in widths) in range(70, 131)  # log-uniform: half below the geometric mean
    assert len(set(draws)) == 200 and tt.random_ct_window(1, 0, 5) == draws[5]
    assert tt.random_ct_window(1, 1, 5) != draws[5] and tt.random_ct_window(2, 0, 5) != draws[5]


def test_ct_window_jitter_follows_its_epoch():
    jitter = tt.CTWindowJitter(4)
    assert (jitter.seed, jitter.epoch) == (4, 0)
    assert jitter({"identifier": "x"}, 3) == {"window": tt.random_ct_window(4, 0, 3)}
    jitter.epoch = 2
    assert jitter({}, 3) == {"window": tt.random_ct_window(4, 2, 3)}


def test_augment_flips_whole_images_by_the_documented_draw():
    x = torch.arange(6 * 2 * 3 * 4, dtype=torch.float32).reshape(6, 2, 3, 4)
    assert tt.augment(x, tok_args(hflip=0.0), 1, 2, 0) is x
    assert torch.equal(tt.augment(x, tok_args(hflip=1.0), 1, 2, 0), x.flip(-1))
    seed, step, rank = 3, 5, 1
    g = torch.Generator().manual_seed((seed * 1000003 + step) * 1009 + rank)
    flip = torch.rand(6, generator=g) < 0.5
    assert 0 < flip.sum() < 6
    out = tt.augment(x, tok_args(hflip=0.5), seed, step, rank)
    for i in range(6):
        assert torch.equal(out[i], x[i].flip(-1) if flip[i] else x[i])  # left-right only, never up-down
    assert not torch.equal(tt.augment(x, tok_args(hflip=0.5), seed, step, 0), out)  # each rank its own draw


def test_adaptive_gan_weight_is_the_gradient_norm_ratio():
    layer = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    a, b = torch.tensor([[1.0, -2.0], [0.5, 2.0]]), torch.tensor([[3.0, 0.0], [4.0, 0.0]])
    shared = layer * 2  # both losses go through one intermediate: the graph must survive both grads
    rec, gan = (shared * a).sum(), (shared * b).sum()
    w = tt.adaptive_gan_weight(rec, gan, layer)
    # d rec / d layer = 2a, d gan / d layer = 2b: ||2a|| / (||2b|| + 1e-4)
    expected = (2 * a).norm() / ((2 * b).norm() + 1e-4)
    assert w.item() == pytest.approx(expected.item(), rel=1e-6) and not w.requires_grad
    (rec + gan).backward()  # the graph is still there
    assert torch.equal(layer.grad, 2 * a + 2 * b)
    layer2 = torch.ones(2, requires_grad=True)
    big = tt.adaptive_gan_weight((layer2 * 10).sum(), (layer2 * 0).sum(), layer2)
    assert big.item() == 1e4  # clamped: 14.1 / 1e-4 would be 1.4e5
    zero = tt.adaptive_gan_weight((layer2 * 0).sum(), (layer2 * 3).sum(), layer2)
    assert zero.item() == 0.0


def test_tokenizer_is_training_state():
    assert tt.is_training_state({"optimizer": {}, "step": 1})
    assert not tt.is_training_state({"optimizer": {}, "steps": 1})
    assert not tt.is_training_state({"step": 1})
    assert not tt.is_training_state([("optimizer", 0), ("step", 0)])


def test_tokenizer_optimizers_exclude_codebooks_from_decay():
    model = torch.nn.ModuleDict({"codebook": torch.nn.Embedding(4, 3), "proj": torch.nn.Linear(3, 2),
                                 "norm": torch.nn.LayerNorm(2), "frozen": torch.nn.Linear(2, 2)})
    model["frozen"].requires_grad_(False)
    disc = torch.nn.Linear(2, 1)
    args = tok_args(weight_decay=0.3, lr=0.01, beta1=0.6, beta2=0.7, disc_lr=0.002)
    opt, disc_opt = tt.build_optimizers(args, model, disc)
    decay, no_decay = opt.param_groups
    assert [id(p) for p in decay["params"]] == [id(model["proj"].weight)]
    assert [id(p) for p in no_decay["params"]] == [id(p) for p in (model["codebook"].weight, model["proj"].bias,
                                                                    model["norm"].weight, model["norm"].bias)]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.3, 0.0)
    for g in opt.param_groups:
        assert (g["lr"], g["betas"], g["eps"], g["fused"]) == (0.01, (0.6, 0.7), 1e-8, True)
    (g,) = disc_opt.param_groups
    assert [id(p) for p in g["params"]] == [id(disc.weight), id(disc.bias)]
    assert (g["lr"], g["betas"], g["weight_decay"], g["fused"]) == (0.002, (0.5, 0.9), 0.3, True)
    assert tt.build_optimizers(args, model, None)[1] is None


def test_budget_is_a_safety_stop_only():
    off = tt.Budget(0, CPU)
    assert off.deadline is None and not off.spent()
    assert tt.Budget(-1, CPU).deadline is None
    import time
    before = time.time()
    on = tt.Budget(2.0, CPU)
    assert before + 119 <= on.deadline <= time.time() + 121 and not on.spent()
    on.deadline = time.time() - 1
    assert on.spent() is True


def grey_pngs(folder: Path, splits):
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, split in enumerate(splits):
        Image.fromarray(np.full((8, 12), 20 * i, dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append({"identifier": f"{i}.png", "split": split})
    write_metadata(rows, folder / "meta.csv")
    return folder / "meta.csv"


def test_tokenizer_load_data(tmp_path):
    meta = grey_pngs(tmp_path / "d", ["train"] * 5 + ["val"] * 7 + ["test"])
    args = tok_args(train_data=str(meta), image_size=8, batch_size=2, val_max_images=3, fit="stretch")
    log = Log()
    data = tt.load_data(args, 1, 2, 1, log, progress=False)
    assert len(data.train_set) == 5 and data.jitter is None
    assert (data.sampler.world_size, data.sampler.rank) == (2, 1)
    # 7 val rows, at most 3: every ceil(7 / 3) = 3rd row (rows 5, 8, 11), in order
    assert data.val_images.shape == (3, 1, 8, 8)
    levels = [round((v.mean().item() + 1) / 2 * 255) for v in data.val_images]
    assert levels == [100, 160, 220]
    assert data.cache.shape == (5, 1, 8, 8)  # small: decoded once
    assert [round((c.mean().item() + 1) / 2 * 255) for c in data.cache] == [0, 20, 40, 60, 80]
    assert "5 train images (train), 3 val images (val)" in log.text
    # No cache when it does not fit (or with random CT windows: every epoch reads again); splits by comma.
    data = tt.load_data(tok_args(train_data=str(meta), image_size=8, batch_size=2, cache_gb=0.0, train_split="train,test",
                                 val_split="test"), 1, 1, 0, Log(), progress=False)
    assert data.cache is None and len(data.train_set) == 6 and data.val_images.shape[0] == 1
    data = tt.load_data(tok_args(train_data=str(meta), image_size=8, batch_size=2, random_ct_window=True, seed=9),
                        1, 1, 0, Log(), progress=False)
    assert data.cache is None and data.jitter.seed == 9
    other = grey_pngs(tmp_path / "v", ["val"] * 2)  # --val-data: its own file
    data = tt.load_data(tok_args(train_data=str(meta), val_data=str(other), image_size=8, batch_size=2), 1, 1, 0,
                        Log(), progress=False)
    assert data.val_images.shape[0] == 2
    log = Log()
    data = tt.load_data(tok_args(train_data=str(meta), image_size=8, batch_size=2, val_split="none"), 1, 1, 0, log,
                        progress=False)
    assert data.val_images is None and "no validation rows" in log.text
    with pytest.raises(ValueError, match=r"meta\.csv: 5 rows of split 'train', fewer than one batch of 6"):
        tt.load_data(tok_args(train_data=str(meta), image_size=8, batch_size=6), 1, 1, 0, Log(), progress=False)


def test_build_tokenizer_sources_and_frozen_head(tmp_path, tokenizers):
    made, _, vq = tokenizers
    model = tt.build_tokenizer(tok_args(config="MedITok-Tiny", image_size=16, entropy_weight=0.1), CPU, None, Log())
    assert model.training and model.img_size == 16 and model.config.use_entropy_loss is True
    assert not any(p.requires_grad for p in model.fc_norm.parameters())
    assert not any(p.requires_grad for p in model.projection.parameters()) and not model.logit_scale.requires_grad
    assert all(p.requires_grad for p in model.decoder.parameters())
    assert tt.build_tokenizer(tok_args(image_size=16), CPU, None, Log()).config.use_entropy_loss is False
    log = Log()
    tuned = tt.build_tokenizer(tok_args(init_ckpt=str(made), image_size=32), CPU, None, log)
    assert all(torch.equal(tuned.state_dict()[k], v) for k, v in vq.state_dict().items())
    assert f"fine-tuning from {made}" in log.text
    with pytest.raises(ValueError, match=rf"the model in {made} is built for 32 px, but --image-size is 16"):
        tt.build_tokenizer(tok_args(image_size=16), CPU, Path(made), Log())
    resumed = tt.build_tokenizer(tok_args(image_size=32, init_ckpt="ignored.pt"), CPU, Path(made), Log())
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in vq.state_dict().items())
    ckpt = tt.build_tokenizer(tok_args(image_size=16, grad_checkpointing=True), CPU, None, Log())
    assert isinstance(ckpt.decoder.blocks, tt.CheckpointedSequential)


def test_tokenizer_train_cache_limit_is_float32_bytes_against_gib(tmp_path):
    """The train images are cached when N * C * S^2 float32 bytes fit in --cache-gb GiB, exactly at the limit
    too; a batch as large as the set is allowed."""
    meta = grey_pngs(tmp_path / "d", ["train"] * 5 + ["val"])
    size_bytes = 5 * 1 * 8 ** 2 * 4
    for limit, cached in ((size_bytes, True), (size_bytes - 1, False)):
        data = tt.load_data(tok_args(train_data=str(meta), image_size=8, batch_size=5, cache_gb=limit / 2 ** 30),
                            1, 1, 0, Log(), progress=False)
        assert (data.cache is not None) is cached, limit
