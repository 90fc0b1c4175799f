"""Class-to-image GPT training: data checks, determinism, resume, DDP, accumulation, validation loss.

Tiny real runs on CPU: GPT-Tiny on 4x4 grids of 4 codebooks. Weights are compared between runs
that must be equal (uninterrupted vs killed-and-resumed, 1 vs 2 processes, accumulation vs batch).
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from datasets.code_dataset import CodeDataError, CodeDataset
from models.training import StepBatchSampler
from datasets.metadata import MetadataError, write_metadata
from evaluation.generation import train_c2i
from models.checkpoint import load_checkpoint
from models.gpt import load_gpt

REPO = Path(__file__).resolve().parents[1]
K, GRID, SUB, CLASSES = 4, 4, 16, 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_codes(folder: Path, n_train=24, n_val=4, n_test=2, grid=GRID, seed=0, fmt=".jsonl"):
    """Code files [K, grid, grid] + metadata; each image's first codes carry its label (learnable)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n_train + n_val + n_test):
        label = i % CLASSES
        codes = torch.randint(0, SUB, (K, grid, grid), generator=g)
        codes[:, 0, 0] = label
        torch.save(codes, folder / f"{i}.pt")
        split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
        rows.append({"identifier": f"images/{i}.png", "code_identifier": f"{i}.pt", "label": label,
                     "split": split, "label_name": f"class{label}"})
    meta = folder / f"meta{fmt}"
    write_metadata(rows, meta)
    return meta


def base_args(meta, results, exp, *extra, dropout=True):
    args = ["--code-dir", str(meta), "--results-dir", str(results), "--exp-name", exp, "--gpt-model", "GPT-Tiny",
            "--vocab-size", str(K * SUB), "--num-classes", str(CLASSES), "--global-batch-size", "8", "--epochs", "50",
            "--no-compile", "--no-tensorboard", "--log-every", "2", "--lr", "1e-3"]
    if not dropout:
        args += ["--dropout-p", "0", "--token-dropout-p", "0", "--class-dropout-prob", "0"]
    return args + [str(e) for e in extra]


def train(argv):
    return train_c2i.main(train_c2i.get_parser().parse_args(argv))


def final_weights(results, exp, key="model"):
    return load_checkpoint(Path(results) / exp / "checkpoints" / "latest.pt")[key]


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by {worst}"


def subprocess_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def test_dataset_reads_and_validates(tmp_path):
    meta = make_codes(tmp_path, fmt=".csv")
    ds = CodeDataset(meta, "train", num_classes=CLASSES, num_codebooks=K, vocab_size=K * SUB, progress=False)
    assert len(ds) == 24 and ds.grid_size == GRID and ds.num_codebooks == K
    codes, label = ds[5]
    assert torch.equal(codes, torch.load(tmp_path / "5.pt").flatten(1)) and label == 5 % CLASSES
    assert ds.label_names == {0: "class0", 1: "class1", 2: "class2"}
    # A folder holding one metadata file is accepted as --code-dir (batch_infer's output_dir).
    assert len(CodeDataset(tmp_path, ("val", "test"), progress=False)) == 6

    with pytest.raises(MetadataError, match=r"meta.csv:4 .*label 2 is outside"):
        CodeDataset(meta, "train", num_classes=2, progress=False)
    with pytest.raises(CodeDataError, match="outside a codebook of 8 entries"):
        CodeDataset(meta, "train", vocab_size=K * 8, progress=False)
    with pytest.raises(CodeDataError, match="model expects 8"):
        CodeDataset(meta, "train", num_codebooks=8, progress=False)
    torch.save(torch.zeros(K, GRID + 1, GRID + 1, dtype=torch.long), tmp_path / "3.pt")
    with pytest.raises(CodeDataError, match=r"meta.csv:5 .*shape \(4, 25\)"):
        CodeDataset(meta, "train", progress=False)
    torch.save(torch.zeros(64, GRID, GRID), tmp_path / "3.pt")
    with pytest.raises(CodeDataError, match="float tensor.*--vq-ckpt"):
        CodeDataset(meta, "train", progress=False)
    (tmp_path / "3.pt").unlink()
    with pytest.raises(CodeDataError, match="code file not found"):
        CodeDataset(meta, "train", progress=False)


def test_step_sampler_same_global_batches_for_any_split():
    def step_sets(world, accum, start=0):
        out = []
        for r in range(world):
            s = StepBatchSampler(20, 8, world, r, accum, seed=3)
            s.set_epoch(1, start)
            batches = list(s)
            out.append([sum(batches[i * accum:(i + 1) * accum], []) for i in range(len(batches) // accum)])
        return [sorted(sum((o[i] for o in out), [])) for i in range(len(out[0]))]

    ref = step_sets(1, 1)
    assert len(ref) == 2 and all(len(b) == 8 for b in ref)
    assert step_sets(2, 1) == ref and step_sets(2, 2) == ref and step_sets(1, 4) == ref
    assert step_sets(2, 2, start=1) == ref[1:]
    with pytest.raises(ValueError, match="fewer than the global batch"):
        StepBatchSampler(6, 8)


def test_dataset_smaller_than_batch_is_an_error(tmp_path):
    meta = make_codes(tmp_path, n_train=5, n_val=0, n_test=0)
    with pytest.raises(ValueError, match="5 training rows, fewer than the global batch of 8"):
        train(base_args(meta, tmp_path / "res", "small", "--max-steps", "1"))


# ----------------------------------------------------------------------------------------------
# Training runs
# ----------------------------------------------------------------------------------------------
def test_checkpoint_contents_and_validation_loss(tmp_path):
    meta = make_codes(tmp_path)
    stats = train(base_args(meta, tmp_path / "res", "run", "--max-steps", "4", "--ema", "--ema-decay", "0.5",
                            "--ckpt-every", "2"))
    ckpt_dir = tmp_path / "res" / "run" / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.glob("*.pt")) == ["0000002.pt", "latest.pt"]
    ckpt = load_checkpoint(ckpt_dir / "latest.pt")
    for key in ("model", "ema", "optimizer", "scheduler", "steps", "epoch", "step_in_epoch", "rng", "config", "args"):
        assert key in ckpt, key
    assert ckpt["steps"] == 4 and (ckpt["epoch"], ckpt["step_in_epoch"]) == (1, 1)  # 3 steps per epoch
    assert ckpt["label_names"] == {0: "class0", 1: "class1", 2: "class2"}
    assert (tmp_path / "res" / "run" / "log.txt").read_text().count("train loss") >= 2
    w = "layers.0.attention.wqkv.weight"
    assert not torch.equal(ckpt["ema"][w], ckpt["model"][w])  # EMA lags the trained weights
    weights = load_checkpoint(ckpt_dir / "model.safetensors")  # weights-only export: the EMA, and the config
    assert weights["config"] == ckpt["config"] and weights["weights"] == "ema"
    assert all(torch.equal(weights["model"][k], v) for k, v in ckpt["ema"].items())

    # The reported validation loss is the model's mean loss over the 6 val/test rows, in eval mode.
    model, _ = load_gpt(ckpt_dir / "latest.pt", prefer_ema=False)
    val = CodeDataset(meta, ("val", "test"), progress=False)
    x, y = val.__getitems__(list(range(len(val))))
    with torch.no_grad():
        _, loss = model(x[:, :, :-1], y, targets=x)
    assert stats["val_loss"] == pytest.approx(loss.item(), rel=1e-5)
    # And training lowered it below the uniform guess log(16).
    assert stats["val_loss"] < torch.log(torch.tensor(float(SUB))).item()


def test_gradient_accumulation_equals_full_batch(tmp_path):
    meta = make_codes(tmp_path)
    train(base_args(meta, tmp_path, "full", "--max-steps", "3", dropout=False))
    train(base_args(meta, tmp_path, "accum", "--max-steps", "3", "--gradient-accumulation-steps", "2", dropout=False))
    assert_same_weights(final_weights(tmp_path, "full"), final_weights(tmp_path, "accum"), atol=1e-5)


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    meta = make_codes(tmp_path)
    train(base_args(meta, tmp_path, "one", "--max-steps", "4", dropout=False))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "evaluation.generation.train_c2i", *base_args(meta, tmp_path, "two", "--max-steps", "4", dropout=False)]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size=2" in (tmp_path / "two" / "log.txt").read_text()
    assert_same_weights(final_weights(tmp_path, "one"), final_weights(tmp_path, "two"), atol=1e-5)


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted(tmp_path):
    """Dropout and label dropout on, EMA on, 5 warm-up steps; killed after step 4 (mid-epoch: 3 steps/epoch)."""
    meta = make_codes(tmp_path)
    extra = ["--ema", "--ema-decay", "0.9", "--warmup-steps", "5", "--ckpt-every", "2"]
    train(base_args(meta, tmp_path, "straight", "--max-steps", "8", *extra))

    # The victim runs "forever"; we SIGKILL it once its step-4 checkpoint exists.
    cmd = [sys.executable, "-m", "evaluation.generation.train_c2i",
           *base_args(meta, tmp_path, "victim", "--max-steps", "100000", *extra)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt4 = tmp_path / "victim" / "checkpoints" / "0000004.pt"
    try:
        deadline = time.time() + 240
        while not ckpt4.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert ckpt4.exists(), proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "no checkpoint in time"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "victim" / "checkpoints" / "latest.pt").exists()

    c = load_checkpoint(ckpt4)
    assert (c["steps"], c["epoch"], c["step_in_epoch"]) == (4, 1, 1)
    train(base_args(meta, tmp_path, "resumed", "--max-steps", "8", *extra, "--gpt-ckpt", ckpt4))
    for key in ("model", "ema"):
        assert_same_weights(final_weights(tmp_path, "straight", key), final_weights(tmp_path, "resumed", key), atol=1e-6)
    # The optimizer moments too, so the next steps would agree as well.
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "latest.pt")["optimizer"]["state"]
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "latest.pt")["optimizer"]["state"]
    assert all(torch.allclose(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"], atol=1e-9) for i in a)


def test_max_steps_is_the_amount_of_work(tmp_path):
    meta = make_codes(tmp_path)  # 24 train rows, batch 8: 3 steps per epoch
    assert train(base_args(meta, tmp_path, "long", "--epochs", "1", "--max-steps", "5", dropout=False))["steps"] == 5
    assert load_checkpoint(tmp_path / "long" / "checkpoints" / "latest.pt")["scheduler"]["total_steps"] == 5


def test_auto_resume_and_weights_only_start(tmp_path):
    meta = make_codes(tmp_path)
    train(base_args(meta, tmp_path, "run", "--max-steps", "2", dropout=False))
    # Same run asked for more steps: --auto-resume continues from latest.pt (step 2), not from scratch.
    stats = train(base_args(meta, tmp_path, "run", "--max-steps", "3", "--auto-resume", dropout=False))
    assert stats["steps"] == 3
    assert "resumed from" in (tmp_path / "run" / "log.txt").read_text()
    # A plain weights file (the released checkpoint layout) starts a fresh run from those weights.
    released = tmp_path / "released.pt"
    torch.save({"model": final_weights(tmp_path, "run")}, released)
    train(base_args(meta, tmp_path, "ft", "--max-steps", "1", "--gpt-ckpt", released, dropout=False))
    assert load_checkpoint(tmp_path / "ft" / "checkpoints" / "latest.pt")["steps"] == 1


def test_latent_files_become_exact_codes(tmp_path):
    """batch_infer --infer_type latent writes quantized latents [vocab_width, h, w]; the dataset turns
    them back into the tokenizer's own codes (what --infer_type code would have written)."""
    from models.meditok import build_meditok, save_meditok

    vq = build_meditok(model_name="MedITok-Tiny", img_size=32)
    save_meditok(vq, tmp_path / "vq.pt")
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        codes = vq.img_to_idx(images)  # [3, K, L]
        latents = vq.encode_image_vq(images)  # [3, L, vocab_width]
    h = vq.grid_size
    rows = []
    for i in range(3):
        torch.save(latents[i].T.reshape(-1, h, h).clone(), tmp_path / f"{i}.pt")
        rows.append({"identifier": f"{i}.png", "code_identifier": f"{i}.pt", "label": 0})
    write_metadata(rows, tmp_path / "meta.csv")
    ds = CodeDataset(tmp_path / "meta.csv", "train", vq_ckpt=str(tmp_path / "vq.pt"), vocab_size=vq.vocab_size, progress=False)
    assert torch.equal(ds.codes.long(), codes)


# ----------------------------------------------------------------------------------------------
# Settings from the tokenization manifest; checkpoint fallback and pruning
# ----------------------------------------------------------------------------------------------
def tokenize_like_batch_infer(folder: Path, tokenizer_path: Path, size=32, n=10) -> Path:
    """Codes of random images from a saved MedITok-Tiny, metadata, and the manifest batch_infer writes."""
    from datasets.manifest import build_manifest, write_manifest
    from models.meditok import build_meditok

    tok = build_meditok(tokenizer_path)
    images = torch.rand(n, tok.in_chans, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        codes = tok.img_to_idx(images)  # [n, K, L]
    g = tok.config.grid_size(size)
    rows = []
    for i in range(n):
        torch.save(codes[i].view(-1, g, g).clone(), folder / f"{i}.pt")
        rows.append({"identifier": f"{i}.png", "code_identifier": f"{i}.pt", "label": i % 2,
                     "split": "train" if i < n - 2 else "val"})
    write_metadata(rows, folder / "metadata.jsonl")
    write_manifest(folder, build_manifest(tok.config, tokenizer_path, image_size=size, infer_type="code"))
    return folder / "metadata.jsonl"


def test_vocabulary_from_the_manifest_and_wrong_tokenizer_refused(tmp_path):
    from models.meditok import build_meditok, save_meditok

    made, other = tmp_path / "made_codes.pt", tmp_path / "other_tokenizer.pt"
    for seed, path in ((0, made), (1, other)):
        torch.manual_seed(seed)
        save_meditok(build_meditok(model_name="MedITok-Tiny", img_size=32), path)
    codes = tmp_path / "codes"
    codes.mkdir()
    tokenize_like_batch_infer(codes, made)
    tiny = build_meditok(made)
    expected_vocab = tiny.codebook_size * tiny.num_codebooks
    assert expected_vocab != 32768  # the released default would be wrong here

    def run(exp, *extra):
        argv = ["--code-dir", str(codes), "--results-dir", str(tmp_path / "res"), "--exp-name", exp,
                "--gpt-model", "GPT-Tiny", "--num-classes", "2", "--global-batch-size", "4", "--max-steps", "1",
                "--no-compile", "--no-tensorboard", *map(str, extra)]
        train(argv)
        return load_checkpoint(tmp_path / "res" / exp / "checkpoints" / "latest.pt")

    # VOCAB_SIZE unset: the vocabulary and codebook count come from the manifest.
    ckpt = run("from_manifest", "--vq-ckpt", made)
    assert ckpt["config"]["vocab_size"] == expected_vocab and ckpt["config"]["num_codebooks"] == tiny.num_codebooks
    # A contradicting --vocab-size is an error naming both values.
    with pytest.raises(ValueError, match=rf"--vocab-size 32768 contradicts .*tokenizer.json.*vocab_size {expected_vocab}"):
        run("contradicts", "--vocab-size", 32768)
    # The wrong tokenizer is refused, naming both weight files; an explicit flag overrides.
    with pytest.raises(ValueError, match=r"other_tokenizer\.pt.*made_codes\.pt"):
        run("wrong_vq", "--vq-ckpt", other)
    with pytest.warns(UserWarning, match="other_tokenizer"):
        assert run("override", "--vq-ckpt", other, "--allow-tokenizer-mismatch")["steps"] == 1
    # Latents (--infer_type latent) need the tokenizer: without --vq-ckpt, the one the manifest records.
    from datasets.manifest import build_manifest, write_manifest

    latents = tmp_path / "latents"
    latents.mkdir()
    with torch.no_grad():
        z = tiny.encode_image_vq(torch.rand(6, tiny.in_chans, 32, 32) * 2 - 1)  # [6, L, vocab_width]
    g = tiny.config.grid_size(32)
    for i in range(6):
        torch.save(z[i].T.reshape(-1, g, g).clone(), latents / f"{i}.pt")
    write_metadata([{"identifier": f"{i}.png", "code_identifier": f"{i}.pt", "label": i % 2} for i in range(6)],
                   latents / "metadata.csv")
    write_manifest(latents, build_manifest(tiny.config, made, image_size=32, infer_type="latent"))
    codes = latents
    assert run("latents")["config"]["vocab_size"] == expected_vocab

    # Codes from a batch_infer without manifests: the vocabulary of --vq-ckpt, else the released default.
    codes = tmp_path / "codes"
    (codes / "tokenizer.json").unlink()
    assert run("from_vq", "--vq-ckpt", made)["config"]["vocab_size"] == expected_vocab
    assert run("released_default")["config"]["vocab_size"] == 32768


def test_truncated_newest_checkpoint_falls_back_and_keep_last(tmp_path):
    meta = make_codes(tmp_path)
    train(base_args(meta, tmp_path, "straight", "--max-steps", "4", dropout=False))
    train(base_args(meta, tmp_path, "run", "--max-steps", "3", "--ckpt-every", "1", dropout=False))
    ckpt_dir = tmp_path / "run" / "checkpoints"
    for name in ("latest.pt", "0000002.pt"):  # the two newest, cut short as by a full disk
        (ckpt_dir / name).write_bytes((ckpt_dir / name).read_bytes()[:1000])
    stats = train(base_args(meta, tmp_path, "run", "--max-steps", "4", "--auto-resume", dropout=False))
    assert stats["steps"] == 4
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "skipping unreadable checkpoint" in log and "latest.pt" in log and "0000002.pt" in log
    assert "falling back to" in log and "resumed from" in log and "0000001.pt: step 1" in log
    assert_same_weights(final_weights(tmp_path, "straight"), final_weights(tmp_path, "run"), atol=1e-6)

    # --keep-last 2: only the two newest numbered checkpoints stay, and latest.pt (+ its weights-only export).
    train(base_args(meta, tmp_path, "pruned", "--max-steps", "5", "--ckpt-every", "1", "--keep-last", "2", dropout=False))
    names = sorted(p.name for p in (tmp_path / "pruned" / "checkpoints").iterdir())
    assert names == ["0000003.pt", "0000004.pt", "latest.pt", "model.safetensors"]
