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


# ----------------------------------------------------------------------------------------------
# scripts/cli.py: one helper gives every script both spellings and the vocabulary's synonyms
# ----------------------------------------------------------------------------------------------
def test_both_spellings_groups_subcommands_and_synonyms():
    from scripts.cli import ArgumentParser

    p = ArgumentParser()
    p.add_argument("--code-dir")
    p.add_argument("--global-seed", type=int)
    group = p.add_argument_group("g")
    group.add_argument("--meta_path")
    group.add_argument("--mixed-precision", choices=["none", "fp16", "bf16"])
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("run").add_argument("--output_dir")
    a = p.parse_args(["--code_dir", "c", "--global_seed=3", "--meta-path", "m", "--mixed_precision", "bf16"])
    assert (a.code_dir, a.global_seed, a.meta_path, a.mixed_precision) == ("c", 3, "m", "bf16")
    # synonyms of the vocabulary, and value synonyms
    a = p.parse_args(["--seed", "4", "--meta", "x", "--precision", "fp32", "run", "--out-dir", "o"])
    assert (a.global_seed, a.meta_path, a.mixed_precision, a.cmd, a.output_dir) == (4, "x", "none", "run", "o")
    with pytest.raises(SystemExit):  # an unknown flag is still refused
        p.parse_args(["--no_such_flag", "1"])
    assert "--foo_bar" in p.format_help() and "--seed -> --global-seed" in p.format_help()

    # A synonym never chooses between two flags a script defines.
    q = ArgumentParser()
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--global-seed", type=int, default=0)
    assert vars(q.parse_args(["--global_seed", "2"])) == {"seed": 0, "global_seed": 2}


def test_every_script_uses_the_helper():
    """Every script that parses a command line builds its parser with scripts.cli.ArgumentParser."""
    offenders, users = [], []
    for path in sorted(REPO.glob("**/*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0] in ("tests", ".venv") or rel.as_posix() == "scripts/cli.py":
            continue
        text = path.read_text(encoding="utf-8")
        if "argparse.ArgumentParser(" in text:
            offenders.append(str(rel))
        if "from scripts.cli import ArgumentParser" in text:
            users.append(rel.as_posix())
    assert not offenders, offenders
    assert {"batch_infer.py", "evaluation/generation/sample_c2i.py", "evaluation/generation/train_c2i.py",
            "scripts/train_tokenizer.py", "datasets/prepare.py"} <= set(users)


def test_released_sampler_flags_have_their_released_meaning():
    """The released sampler's command line parses; --codebook_size is the total vocabulary and
    --image_size the tokenizer's input size (checked in sample_c2i.load_models)."""
    from evaluation.generation import sample_c2i

    argv = ["--gpt_model", "GPT-B", "--gpt_ckpt", "g.pt", "--gpt_type", "c2i", "--from_fsdp", "--cls_token_num", "1",
            "--precision", "bf16", "--compile", "--vq_ckpt", "v.pth", "--codebook_size", "32768",
            "--codebook_embed_dim", "8", "--image_size", "256", "--num_classes", "6", "--cfg_scale", "1",
            "--cfg_interval", "-1", "--sample_dir", "s", "--per_proc_batch_size", "32", "--global_seed", "0",
            "--top_k", "0", "--temperature", "1.0", "--top_p", "1.0", "--num_codebooks", "8", "--num_output_layer", "1",
            "--vq_embed_path", "v.pth", "--test_data_path", "t.jsonl", "--num_fid_samples", "1000", "--copy_input",
            "--downsample_size", "16"]
    a = sample_c2i.get_parser().parse_args(argv)
    assert (a.codebook_size, a.image_size, a.codebook_embed_dim, a.vq_embed_path, a.from_fsdp) == (32768, 256, 8, "v.pth", True)
    # and in the hyphen spelling of the older release
    b = sample_c2i.get_parser().parse_args([x.replace("_", "-") if x.startswith("--") else x for x in argv])
    assert vars(a) == vars(b)


def test_released_trainer_flags_parse():
    from evaluation.generation import train_c2i

    a = train_c2i.get_parser().parse_args([
        "--exp-name", "e", "--code-dir", "c.jsonl", "--tokenizer-name", "meditok", "--gpt-type", "c2i",
        "--dataset", "c2i_code", "--image-size", "256", "--epochs", "300", "--lr", "1e-4", "--num-classes", "6",
        "--global-batch-size", "128", "--vocab-size", "32768", "--results-dir", "r", "--vq-embed-path", "v.pth",
        "--no-compile", "--ema", "--mixed-precision", "bf16", "--downsample-size", "16", "--global-seed", "0"])
    assert (a.vq_embed_path, a.no_compile, a.ema, a.global_batch_size) == ("v.pth", True, True, 128)


@pytest.mark.parametrize("flags, reason", [
    (["--gpt_type", "t2i"], "sample_t2i.py"),
    (["--image_size_eval", "256"], "never uses it"),
])
def test_released_flags_we_cannot_honour_are_refused_with_the_reason(flags, reason):
    from evaluation.generation import sample_c2i

    args = sample_c2i.get_parser().parse_args(["--gpt_ckpt", "g.pt", "--vq_ckpt", "v.pth", *flags])
    with pytest.raises(ValueError, match=reason):
        sample_c2i.main(args)
