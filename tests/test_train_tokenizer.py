"""scripts/train_tokenizer.py: training lowers the loss, resume equals an uninterrupted run, and the
result loads in batch_infer.py. Tiny images (16 px, a 2x2 grid) of smooth synthetic blobs, on CPU."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datasets.metadata import read_metadata, write_metadata
from models.checkpoint import load_checkpoint
from models.meditok import build_meditok
from models.training import StepBatchSampler
from scripts.train_tokenizer import enable_grad_checkpointing, get_parser, main, train_batches

REPO = Path(__file__).resolve().parents[1]
SIZE = 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """12 train + 4 val grey PNGs of random Gaussian blobs; returns the metadata path."""
    root = tmp_path_factory.mktemp("tok_data")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32] / 32.0
    rows = []
    for i in range(16):
        img = np.zeros((32, 32))
        for _ in range(3):
            cy, cx, s = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.25)
            img += rng.uniform(0.3, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        name = f"img_{i:02d}.png"
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), mode="L").save(root / name)
        rows.append({"identifier": name, "label": i % 2, "split": "val" if i >= 12 else "train"})
    write_metadata(rows, root / "metadata.csv")
    return root / "metadata.csv"


@pytest.fixture(scope="module")
def vgg_weights(tmp_path_factory) -> Path:
    """A torchvision VGG16 features state dict (random weights): what --perceptual-weights reads."""
    from torchvision.models import vgg16

    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in vgg16(weights=None).features.state_dict().items()}, path)
    return path


def run(meta: Path, out: Path, *extra: str):
    args = get_parser().parse_args([
        "--train-data", str(meta), "--out-dir", str(out), "--config", "MedITok-Tiny", "--image-size", str(SIZE),
        "--batch-size", "4", "--warmup-steps", "2", "--log-every", "1", "--eval-every", "0",
        "--no-progress", "--no-tensorboard", *extra,
    ])
    return main(args)


def reference_image(path: Path) -> torch.Tensor:
    """A square 8-bit grey PNG -> [3, SIZE, SIZE] in [-1, 1], made here without datasets/: PIL, / 255,
    bilinear antialiased resize to SIZE, grey replicated to the tokenizer's 3 channels."""
    x = torch.from_numpy(np.array(Image.open(path)) / np.float32(255))[None, None]  # [1, 1, H, W]
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)[0]
    return x.clamp(0, 1).expand(3, -1, -1) * 2 - 1


def images(meta: Path, split: str) -> torch.Tensor:
    rows = [r for r in read_metadata(meta) if r["split"] == split]
    return torch.stack([reference_image(meta.parent / r["identifier"]) for r in rows])


@torch.no_grad()
def rec_mse(model, x: torch.Tensor) -> float:
    return F.mse_loss(model.eval().img_to_reconstructed_img(x), x).item()


def test_batches_resume_and_shard():
    """The batch stream (cached images) started at a step continues the uninterrupted one; two ranks
    see disjoint halves of each global batch; every epoch is a new permutation."""
    cache = torch.arange(10.0)[:, None, None, None]  # image i is the value i

    def stream(world, rank, epoch, first, n):
        sampler = StepBatchSampler(10, 4, world, rank, seed=0)  # 2 steps per epoch
        it = train_batches(None, cache, sampler, epoch, first, 0, None, pin_memory=False)
        return [next(it).flatten().long().tolist() for _ in range(n)]

    straight = stream(1, 0, 0, 0, 6)
    assert stream(1, 0, 1, 1, 3) == straight[3:]  # resumed at step 3 = epoch 1, its second step
    for e in range(3):  # an epoch uses each image at most once; the two left over change
        used = straight[2 * e] + straight[2 * e + 1]
        assert len(set(used)) == 8
    assert straight[0:2] != straight[2:4]
    r0, r1 = stream(2, 0, 0, 0, 2), stream(2, 1, 0, 0, 2)
    for step in range(2):
        assert sorted(r0[step] + r1[step]) == sorted(straight[step]) and not set(r0[step]) & set(r1[step])


@pytest.mark.slow
def test_training_lowers_reconstruction_loss(data, tmp_path):
    x = images(data, "train")
    torch.manual_seed(0)  # the script seeds the same way before building the model
    init = build_meditok(model_name="MedITok-Tiny", img_size=SIZE)
    results = run(data, tmp_path / "out", "--max-steps", "30", "--lr", "2e-3")
    trained = build_meditok(tmp_path / "out" / "tokenizer.pt", prefer_ema=False)
    assert rec_mse(trained, x) < 0.7 * rec_mse(init, x)
    ckpt = load_checkpoint(tmp_path / "out" / "tokenizer.pt")
    assert ckpt["kind"] == "meditok" and ckpt["step"] == 30 and "ema" in ckpt
    # The validation metrics are those of the saved weights.
    val = images(data, "val")
    rec = trained.img_to_reconstructed_img(val).clamp(-1, 1)  # scored as displayed
    psnr = 10 * torch.log10(4 / ((rec - val) ** 2).flatten(1).mean(1)).mean()
    assert results["model"]["psnr"] == pytest.approx(psnr.item(), abs=1e-3)
    # model.safetensors beside tokenizer.pt: the EMA weights, rebuilt from the file alone
    exported = build_meditok(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in ckpt["ema"].items())
    assert all(0 < u <= 1 for u in results["model"]["usage"].tolist())


def test_resume_equals_uninterrupted(data, tmp_path):
    # EMA, the GAN (from step 2) and dead-code restarts all carry state across the interruption.
    opts = ["--max-steps", "6", "--lr", "1e-3", "--disc-weight", "0.5", "--disc-start", "2", "--disc-width", "8",
            "--disc-layers", "1", "--dead-code-every", "2", "--ckpt-every", "2", "--val-max-images", "2"]
    run(data, tmp_path / "straight", *opts)
    run(data, tmp_path / "resumed", *opts, "--stop-at-step", "3")
    assert load_checkpoint(tmp_path / "resumed" / "tokenizer.pt")["step"] == 3
    # The newest checkpoint cut short (a full disk): the rerun falls back to step 2, and says so.
    newest = tmp_path / "resumed" / "checkpoints" / "step_0000003.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    run(data, tmp_path / "resumed", *opts)
    log = (tmp_path / "resumed" / "log.txt").read_text()
    assert "skipping unreadable checkpoint" in log and "step_0000003.pt" in log and "resuming from" in log
    assert "step_0000002.pt (step 2)" in log
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "step_0000006.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "step_0000006.pt")
    for key in ("model", "ema", "disc"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=0, atol=1e-6, msg=f"{key}.{name}")
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i in a["optimizer"]["state"]:
        torch.testing.assert_close(a["optimizer"]["state"][i]["exp_avg"], b["optimizer"]["state"][i]["exp_avg"],
                                   rtol=0, atol=1e-6)
    assert a["step"] == b["step"] == 6 and a["usage_updates"] == b["usage_updates"]
    # Older checkpoints are pruned to --keep-last.
    assert len(list((tmp_path / "resumed" / "checkpoints").glob("step_*.pt"))) == 2


def test_fixed_work_gives_the_same_tokenizer(data, tmp_path):
    """The amount learned is set by --max-steps: two runs of one command give identical weights."""
    opts = ["--max-steps", "3", "--lr", "1e-3", "--dead-code-every", "2", "--val-max-images", "2"]
    run(data, tmp_path / "a", *opts)
    run(data, tmp_path / "b", *opts)
    a, b = (load_checkpoint(tmp_path / r / "tokenizer.pt") for r in ("a", "b"))
    assert a["step"] == b["step"] == 3
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_max_minutes_is_only_a_safety_stop(data, tmp_path):
    """--max-minutes stops early and saves, but never changes the schedule: a rerun without it finishes
    the same run."""
    t0 = time.time()
    run(data, tmp_path / "out", "--max-steps", "100000", "--max-minutes", "0.002", "--val-max-images", "2")
    assert time.time() - t0 < 60
    stopped = load_checkpoint(tmp_path / "out" / "tokenizer.pt")["step"]
    assert 1 <= stopped < 100000
    ckpt = load_checkpoint(tmp_path / "out" / "checkpoints" / f"step_{stopped:07d}.pt")
    assert ckpt["scheduler"]["total_steps"] == 100000  # the schedule of the full run
    assert "--max-minutes 0.002 reached" in (tmp_path / "out" / "log.txt").read_text()
    run(data, tmp_path / "out", "--max-steps", str(stopped + 1), "--val-max-images", "2")
    assert load_checkpoint(tmp_path / "out" / "tokenizer.pt")["step"] == stopped + 1


def test_loss_options_run(data, tmp_path, vgg_weights):
    """Perceptual loss from a user file, entropy loss, flips, random CT windows and uncached reading."""
    run(data, tmp_path / "out", "--max-steps", "2", "--perceptual-weights", str(vgg_weights), "--entropy-weight", "0.1",
        "--hflip", "0.5", "--random-ct-window", "--ema-decay", "0", "--val-max-images", "2")
    ckpt = load_checkpoint(tmp_path / "out" / "tokenizer.pt")
    assert "ema" not in ckpt and ckpt["config"]["use_entropy_loss"] is True
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_each_loss_option_changes_the_gradient(data, tmp_path, vgg_weights):
    """Each loss option reaches the gradient of the first step: perceptual, entropy, L1, VQ weights, flips,
    and the GAN term (adaptive weight) once it starts."""
    import logging

    from scripts.train_tokenizer import augment, build_or_resume, train_step

    x = images(data, "train")[:4]

    def gradient(*extra):
        args = get_parser().parse_args(["--train-data", str(data), "--out-dir", str(tmp_path), "--config",
                                        "MedITok-Tiny", "--image-size", str(SIZE), "--ema-decay", "0", *map(str, extra)])
        parts, _, _ = build_or_resume(args, torch.device("cpu"), tmp_path / "none", 1, 0, logging.getLogger("t"))
        train_step(parts, augment(x, args, args.seed, 0, 0), 0, 0.0, 0.0, args)  # lr 0: the weights stay put
        return torch.cat([p.grad.flatten() for p in parts.raw.parameters() if p.grad is not None])

    base = gradient()
    assert base.abs().sum() > 0
    for option in (["--perceptual-weights", vgg_weights], ["--entropy-weight", 0.5], ["--l1", 0], ["--vq-weight", 0],
                   ["--hflip", 1.0], ["--disc-weight", 1.0, "--disc-start", 0, "--disc-width", 8, "--disc-layers", 1]):
        g = gradient(*option)
        assert g.shape == base.shape and (g - base).abs().max() > 1e-6 * base.abs().max(), option
    # The GAN term only from --disc-start on.
    assert torch.equal(gradient("--disc-weight", 1.0, "--disc-start", 5, "--disc-width", 8, "--disc-layers", 1), base)


def test_fine_tune_from_checkpoint(data, tmp_path):
    run(data, tmp_path / "a", "--max-steps", "2", "--val-max-images", "2")
    start = build_meditok(tmp_path / "a" / "tokenizer.pt")
    run(data, tmp_path / "b", "--max-steps", "1", "--val-max-images", "2",
        "--init-ckpt", str(tmp_path / "a" / "tokenizer.pt"), "--ema-decay", "0")
    tuned = load_checkpoint(tmp_path / "b" / "tokenizer.pt")
    # Started from A's (EMA) weights: one small step away from them, far from a fresh initialisation.
    diff = max((tuned["model"][k] - v).abs().max().item() for k, v in start.named_parameters())
    assert 0 < diff < 0.05


@pytest.mark.slow
def test_checkpoint_loads_in_batch_infer(data, tmp_path):
    run(data, tmp_path / "out", "--max-steps", "2", "--val-max-images", "2")
    ckpt = tmp_path / "out" / "tokenizer.pt"
    out = tmp_path / "codes"
    proc = subprocess.run(
        [sys.executable, "batch_infer.py", "--output_dir", str(out), "--pretrained_path", str(ckpt),
         "--meta_path", str(data), "--infer_type", "code", "--batch_size", "4", "--num_workers", "0", "--no_progress"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = build_meditok(ckpt)
    written = {r["identifier"]: r for r in read_metadata(out / data.name)}
    assert len(written) == 16
    rows = read_metadata(data)
    for i in (0, 13):
        codes = torch.load(out / written[rows[i]["identifier"]]["code_identifier"], weights_only=True)
        grid = SIZE // model.config.downsample
        assert codes.shape == (model.num_codebooks, grid, grid)
        with torch.no_grad():
            expected = model.img_to_idx(reference_image(data.parent / rows[i]["identifier"])[None])[0]
        assert torch.equal(codes, expected.view_as(codes))

    # The GPT trainer takes the vocabulary from the manifest batch_infer wrote (no --vocab-size), and
    # refuses a tokenizer other than the one that made the codes, naming both files.
    from evaluation.generation import train_c2i
    from models.meditok import save_meditok

    def train_gpt(exp, *extra):
        argv = ["--code-dir", str(out), "--results-dir", str(tmp_path / "gpt"), "--exp-name", exp, "--gpt-model",
                "GPT-Tiny", "--num-classes", "2", "--global-batch-size", "4", "--max-steps", "1", "--no-compile",
                "--no-tensorboard", *map(str, extra)]
        train_c2i.main(train_c2i.get_parser().parse_args(argv))
        return load_checkpoint(tmp_path / "gpt" / exp / "checkpoints" / "latest.pt")["config"]

    config = train_gpt("gpt", "--vq-ckpt", ckpt)
    assert config["vocab_size"] == model.codebook_size * model.num_codebooks != 32768
    assert config["num_codebooks"] == model.num_codebooks
    save_meditok(build_meditok(model_name="MedITok-Tiny", img_size=SIZE), tmp_path / "other_tokenizer.pt")
    with pytest.raises(ValueError, match=r"other_tokenizer\.pt.*out/tokenizer\.pt"):
        train_gpt("wrong", "--vq-ckpt", tmp_path / "other_tokenizer.pt")


def test_grad_checkpointing_keeps_keys_and_gradients():
    torch.manual_seed(0)
    model = build_meditok(model_name="MedITok-Tiny", img_size=SIZE).train()
    x = torch.rand(2, model.in_chans, SIZE, SIZE) * 2 - 1

    def grads():
        model.zero_grad()
        out = model(x)
        (F.mse_loss(out["rec"], x) + out["vq_loss"]).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    keys, before = list(model.state_dict()), grads()
    enable_grad_checkpointing(model)
    assert list(model.state_dict()) == keys  # checkpoints stay loadable either way
    after = grads()
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], msg=name)


@pytest.mark.slow
def test_launcher_two_processes_from_another_folder(data, tmp_path):
    """scripts/train_tokenizer.sh: variables from the environment, relative paths, DDP over 2 CPU processes."""
    env = {**os.environ, "TRAIN_DATA": str(data), "OUT_DIR": "run", "IMAGE_SIZE": str(SIZE),
           "BATCH_SIZE": "4", "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1",
           "EXTRA_ARGS": "--max-steps 2 --val-max-images 2 --no-progress --no-tensorboard"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "train_tokenizer.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size=2" in (tmp_path / "run" / "log.txt").read_text()
    model = build_meditok(tmp_path / "run" / "tokenizer.pt")
    assert model.img_size == SIZE and load_checkpoint(tmp_path / "run" / "tokenizer.pt")["step"] == 2
