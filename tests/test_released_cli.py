"""The released MedITok command lines run unchanged against our scripts under torchrun.

The flags and their spelling are those of the released evaluation/generation/scripts/train_c2i.sh (hyphens,
with its commented-out --vq-embed-path, --no-compile and --ema switched on) and sample_c2i.sh plus every
other flag of the released sampler (underscores). Only the values are tiny: a MedITok-Tiny tokenizer with
16x downsampling at 64 px (a 4x4 grid, 8 codebooks of 512 codes) and GPT-Tiny, on random codes in the
released metadata layout (`identifier` is the code file; no code_identifier column).

The sampler's --compile is passed with TORCHDYNAMO_DISABLE=1: torch.compile then returns the function as
is, so the flag is parsed and reaches generate() without minutes of CPU compilation."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.metadata import write_metadata
from models.checkpoint import load_checkpoint
from models.meditok import build_meditok, save_meditok

REPO = Path(__file__).resolve().parents[1]
CLASSES = 3


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def torchrun(module: str, flags: list, cwd: Path, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=1",
           f"--master_port={free_port()}", "-m", module, *map(str, flags)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_released_train_and_sample_command_lines(tmp_path):
    torch.manual_seed(0)
    vq = build_meditok(model_name="MedITok-Tiny", img_size=64, downsample=16)
    vq_path = tmp_path / "weights" / "meditok" / "meditok.pth"
    vq_path.parent.mkdir(parents=True)
    save_meditok(vq, vq_path)
    K, g, sub = vq.num_codebooks, vq.grid_size, vq.codebook_size
    assert (K, g, sub) == (8, 4, 512)
    gen = torch.Generator().manual_seed(0)
    codes_dir = tmp_path / "codes"
    codes_dir.mkdir()
    rows = {"train": [], "test": []}
    for i in range(12):
        split = "train" if i < 8 else "test"
        path = codes_dir / f"medmnist-{split}-{i:04d}.pt"
        torch.save(torch.randint(0, sub, (K, g, g), generator=gen), path)
        rows[split].append({"identifier": str(path), "label": i % CLASSES, "split": split})
    train_meta, test_meta = tmp_path / "medmnist-c2i-train.jsonl", tmp_path / "medmnist-c2i-test.jsonl"
    write_metadata(rows["train"], train_meta)
    write_metadata(rows["test"], test_meta)

    # evaluation/generation/scripts/train_c2i.sh, with its commented-out lines switched on.
    def train(exp_name, *extra):
        torchrun("evaluation.generation.train_c2i", [
            "--exp-name", exp_name, "--code-dir", train_meta, "--tokenizer-name", "meditok", "--gpt-type", "c2i",
            "--dataset", "c2i_code", "--image-size", 64, "--epochs", 2, "--lr", "1e-4", "--num-classes", CLASSES,
            "--global-batch-size", 4, "--vocab-size", K * sub, "--results-dir", tmp_path / "outputs" / "generation",
            "--gpt-model", "GPT-Tiny", "--no-compile", "--ema", *extra], cwd=tmp_path)
        ckpt = tmp_path / "outputs" / "generation" / exp_name / "checkpoints" / "latest.pt"
        assert ckpt.is_file()
        return ckpt

    plain_ckpt = train("meditok_c2i_gpt")
    vq_ckpt = train("meditok_c2i_gpt_embed", "--vq-embed-path", vq_path)
    saved = load_checkpoint(vq_ckpt)
    assert saved["steps"] == 4 and "ema" in saved and saved["config"]["vq_embed_width"] == vq.config.width

    # The released sampler keeps weights only (an FSDP state dict is plain): --from_fsdp.
    fsdp_path = tmp_path / "weights" / "generation" / "meditok_c2i_gpt_fsdp.pt"
    fsdp_path.parent.mkdir(parents=True)
    torch.save(load_checkpoint(plain_ckpt)["ema"], fsdp_path)

    sample_dir = tmp_path / "outputs" / "generation" / "inference" / "c2i"
    common = ["--test_data_path", test_meta, "--num_classes", CLASSES, "--cls_token_num", 1, "--global_seed", 0,
              "--gpt_model", "GPT-Tiny", "--sample_dir", sample_dir, "--vq_ckpt", vq_path, "--temperature", 1.0,
              "--gpt_type", "c2i", "--precision", "bf16", "--codebook_size", K * sub, "--codebook_embed_dim", 8,
              "--image_size", 64, "--cfg_scale", 1.5, "--cfg_interval", 2, "--per_proc_batch_size", 2,
              "--top_k", 100, "--top_p", 0.95, "--num_codebooks", K, "--num_output_layer", 1]
    first = torchrun("evaluation.generation.sample_c2i", common + ["--gpt_ckpt", fsdp_path, "--from_fsdp", "--compile"],
                     cwd=tmp_path, TORCHDYNAMO_DISABLE="1")
    second = torchrun("evaluation.generation.sample_c2i", common + ["--gpt_ckpt", vq_ckpt, "--vq_embed_path", vq_path],
                      cwd=tmp_path)
    runs = sorted(p for p in sample_dir.iterdir() if p.is_dir())
    assert len(runs) == 2, runs
    for run in runs:
        data = np.load(run / "samples.npz")
        assert data["samples"].shape == (4, 64, 64, 3)
        assert data["labels"].tolist() == [r["label"] for r in rows["test"]]
        assert len(list(run.glob("*/*.png"))) == 4
    assert "generated 4 images" in first.stdout and "generated 4 images" in second.stdout
