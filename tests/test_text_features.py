"""Captions end to end: a tiny random T5 (built from a transformers config, no download) -> stored features
-> train_t2i -> sample_t2i; the built-in word-level encoder path; resumable extraction; the `datasets`
name clash with Hugging Face's package."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.metadata import write_metadata
from datasets.text_features import HFTextEncoder, feature_relpath, get_parser as features_parser, main as extract
from evaluation.generation import sample_t2i, train_t2i
from models.gpt import load_gpt
from models.meditok import build_meditok, save_meditok

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = ["T1-weighted brain MRI, axial slice, upper third", "T1-weighted brain MRI, sagittal slice, middle third",
            "echocardiography frame"]
WORDS = ["<pad>", "</s>", "<unk>"] + sorted({w for c in CAPTIONS for w in c.lower().replace(",", "").split()})

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def save_tiny_t5(folder: Path) -> None:
    """A random 1-layer T5 encoder and a word-level tokenizer, saved in the save_pretrained layout."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>").save_pretrained(folder)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(WORDS), d_model=16, d_kv=4, num_heads=2, d_ff=32, num_layers=1, decoder_start_token_id=0)
    T5EncoderModel(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(root, T5 folder, tokenizer checkpoint, code metadata with a text column)."""
    root = tmp_path_factory.mktemp("t2i")
    save_tiny_t5(root / "t5")
    vq = build_meditok(model_name="MedITok-Tiny", img_size=64)
    save_meditok(vq, root / "vq.pt")
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(10):
        torch.save(torch.randint(0, vq.codebook_size, (vq.num_codebooks, vq.grid_size, vq.grid_size), generator=g),
                   root / f"{i}.pt")
        rows.append({"identifier": f"img/{i}.png", "code_identifier": f"{i}.pt", "text": CAPTIONS[i % 3],
                     "split": "train" if i < 8 else "test"})
    write_metadata(rows, root / "codes.csv")
    return root, root / "t5", root / "vq.pt", root / "codes.csv"


def train(root, meta, exp, *extra):
    argv = ["--code-dir", meta, "--vq-ckpt", root / "vq.pt", "--results-dir", root, "--exp-name", exp, "--gpt-model", "GPT-Tiny",
            "--global-batch-size", 4, "--max-steps", 2, "--ema", "--no-compile", "--no-tensorboard", "--lr", "1e-3", *extra]
    train_t2i.main(train_t2i.get_parser().parse_args([str(a) for a in argv]))
    return root / exp / "checkpoints" / "latest.pt"


def sample(*argv):
    return sample_t2i.main(sample_t2i.get_parser().parse_args([str(a) for a in argv]))


def test_hf_encoder_features_train_and_sample(setup, capsys):
    root, t5, vq, meta = setup
    out = root / "features"
    args = ["--meta", meta, "--encoder", t5, "--output_dir", out, "--max_length", 6, "--batch_size", 2]
    assert extract(features_parser().parse_args([str(a) for a in args])) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["dim"] == 16 and manifest["max_length"] == 6
    assert manifest["encoder_class"] == "T5EncoderModel" and manifest["captions"] == 3  # identical captions share a file
    assert sorted(p.name for p in out.glob("*/*.pt")) == sorted(Path(feature_relpath(c)).name for c in CAPTIONS)

    # The stored features are the encoder's own output at the real tokens (checked with transformers directly).
    from transformers import AutoTokenizer, T5EncoderModel

    tok, model = AutoTokenizer.from_pretrained(t5), T5EncoderModel.from_pretrained(t5).eval()
    ids = tok(CAPTIONS[0], truncation=True, max_length=6, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        direct = model(input_ids=ids).last_hidden_state[0]
    stored = torch.load(out / feature_relpath(CAPTIONS[0]), weights_only=True)
    assert stored.shape == (6, 16)  # the caption has 8 words: cut at max_length
    torch.testing.assert_close(stored, direct)

    # A rerun skips every finished caption; another max_length is refused instead of mixing features.
    capsys.readouterr()
    assert extract(features_parser().parse_args([str(a) for a in args])) == 0
    assert "encoded 0 captions" in capsys.readouterr().out
    with pytest.raises(ValueError, match="max_length"):
        extract(features_parser().parse_args([str(a) for a in args[:-4] + ["--max_length", 7]]))

    ckpt_path = train(root, meta, "hf", "--text-features", out)
    gpt, ckpt = load_gpt(ckpt_path)
    assert gpt.config.model_type == "t2i" and gpt.config.caption_dim == 16 and gpt.config.cls_token_num == 6
    assert gpt.text_encoder is None and ckpt["args"]["text_features_manifest"]["encoder"] == str(t5)

    prompts = root / "prompts.txt"
    prompts.write_text("# comment\nechocardiography frame\n\nT1-weighted brain MRI, axial slice, middle third\n")
    run = sample("--gpt-ckpt", ckpt_path, "--vq-ckpt", vq, "--prompts", prompts, "--num-per-prompt", 2,
                 "--sample-dir", root / "samples", "--cfg-scale", 2.0, "--per-proc-batch-size", 3, "--grid-columns", 2)
    data = np.load(run / "samples.npz")
    assert data["samples"].shape == (4, 64, 64, 3) and list(data["prompts"]) == ["echocardiography frame"] * 2 + [
        "T1-weighted brain MRI, axial slice, middle third"] * 2
    assert len(list(run.glob("*.png"))) == 5  # 4 samples + grid
    grid = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(run / "grid.png"))
    assert grid.shape[0] == 2 * 64 and grid.shape[1] > 2 * 64  # a row per prompt, a text panel on the left
    assert grid[:64, :64].max() > 0  # the prompt is written there


def test_builtin_encoder_train_and_sample_from_metadata(setup):
    root, _, vq, meta = setup
    ckpt_path = train(root, meta, "builtin", "--text-dim", 32, "--text-layers", 1)
    gpt, ckpt = load_gpt(ckpt_path)
    assert gpt.text_encoder is not None and gpt.config.cls_token_num == 7  # the longest caption, in words
    vocab = ckpt["args"]["text_vocab"]
    assert vocab[:2] == ["<pad>", "<unk>"] and "echocardiography" in vocab and gpt.config.text_vocab_size == len(vocab)
    run = sample("--gpt-ckpt", ckpt_path, "--vq-ckpt", vq, "--test-data-path", meta, "--sample-dir", root / "s2",
                 "--cfg-scale", 1.5)
    data = np.load(run / "samples.npz")
    assert list(data["prompts"]) == [CAPTIONS[8 % 3], CAPTIONS[9 % 3]]
    # Resuming keeps the saved vocabulary even when the captions change (ids must not move).
    write_metadata([{"identifier": "x", "code_identifier": f"{i}.pt", "text": "a new caption", "split": "train"}
                    for i in range(4)], root / "other.csv")
    train(root, root / "other.csv", "builtin", "--text-dim", 32, "--text-layers", 1, "--max-steps", 3, "--auto-resume")
    _, resumed = load_gpt(ckpt_path)
    assert resumed["args"]["text_vocab"] == vocab and resumed["steps"] == 3


def test_rows_without_text(tmp_path, setup):
    root, t5, _, _ = setup
    write_metadata([{"identifier": "a", "text": "echocardiography frame"}, {"identifier": "b", "text": "  "}],
                   tmp_path / "m.jsonl")
    args = ["--meta", tmp_path / "m.jsonl", "--encoder", t5, "--output_dir", tmp_path / "f"]
    assert extract(features_parser().parse_args([str(a) for a in args])) == 1
    failure = json.loads((tmp_path / "f" / "failures.jsonl").read_text())
    assert failure["identifier"] == "b" and "m.jsonl:2" in failure["reason"]
    with pytest.raises(FileNotFoundError, match="not a folder"):
        HFTextEncoder(str(tmp_path / "missing"), 8)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["python -m from the repository root", "launcher: PYTHONPATH + PYTHONSAFEPATH"])
def test_huggingface_datasets_never_shadows_ours(setup, tmp_path, how):
    """A stand-in Hugging Face `datasets` distribution (dist-info + a module that refuses to be imported) is
    installed on PYTHONPATH: our entry point still imports our package, and transformers (which then sees
    `datasets` as installed) loads and runs the encoder without importing it."""
    _, t5, _, _ = setup
    site = tmp_path / "site"
    (site / "datasets").mkdir(parents=True)
    (site / "datasets" / "__init__.py").write_text("raise ImportError('the stand-in Hugging Face datasets was imported')\n")
    info = site / "datasets-9.9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: datasets\nVersion: 9.9.9\n")
    (info / "top_level.txt").write_text("datasets\n")
    write_metadata([{"identifier": "a", "text": "echocardiography frame"}], tmp_path / "m.csv")
    # One process: check what is installed and imported, then run the entry point as `python -m` would
    # (`-c` and `-m` both put the working directory first on sys.path; PYTHONSAFEPATH removes it).
    argv = ["datasets.text_features", "--meta", str(tmp_path / "m.csv"), "--encoder", str(t5), "--output_dir", str(tmp_path / "f")]
    script = (
        "import importlib.metadata, runpy, sys, datasets, transformers\n"
        "from transformers.utils import is_datasets_available\n"
        "assert importlib.metadata.version('datasets') == '9.9.9' and is_datasets_available()\n"
        "print('ours:', datasets.__file__, flush=True)\n"
        f"sys.argv = {argv!r}\n"
        "runpy.run_module('datasets.text_features', run_name='__main__', alter_sys=True)\n"
    )
    if how.startswith("python -m"):  # (scripts/test.sh runs pytest with PYTHONSAFEPATH set: not this case)
        env, cwd = {**os.environ, "PYTHONPATH": str(site)}, REPO
        env.pop("PYTHONSAFEPATH", None)
    else:
        env, cwd = {**os.environ, "PYTHONPATH": f"{REPO}:{site}", "PYTHONSAFEPATH": "1"}, tmp_path
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    ours = next(line for line in run.stdout.splitlines() if line.startswith("ours: "))[len("ours: "):]
    assert Path(ours).resolve() == REPO / "datasets" / "__init__.py"
    assert json.loads((tmp_path / "f" / "manifest.json").read_text())["complete"]
