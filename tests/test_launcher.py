"""scripts/launcher.sh and the wrappers that source it: which Python runs, where relative paths land,
how many processes on which port. Most cases use LAUNCHER_DRY_RUN=1 (the wrapper prints its final
command instead of running it); one runs a real command under torchrun.

The wrappers are copied into a scratch tree without .venv, so "no .venv is created" can be observed, and
the active environment is a fake virtualenv whose bin/python is a shim that logs every call, then runs
the real interpreter; its bin/pip logs and fails."""
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WRAPPERS = {
    "train_tokenizer": ("scripts/train_tokenizer.sh", dict(TRAIN_DATA="data/meta.csv", OUT_DIR="runs/tok")),
    "train_c2i": ("evaluation/generation/scripts/train_c2i.sh", dict(CODE_DIR="codes", EXP_NAME="exp")),
    "sample_c2i": ("evaluation/generation/scripts/sample_c2i.sh", dict(GPT_PATH="gpt.pt", VQ_PATH="tok.pt")),
    "test": ("scripts/test.sh", {}),
}


def write_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def tree(tmp_path):
    """A scratch copy of the launcher, venv.sh, the wrappers and requirements.txt (no .venv)."""
    root = tmp_path / "repo"
    for rel, _ in WRAPPERS.values():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, root / rel)
    for rel in ("scripts/launcher.sh", "scripts/venv.sh", "requirements.txt"):
        shutil.copy2(REPO / rel, root / rel)
    return root


@pytest.fixture
def fake_env(tmp_path):
    """A fake active virtualenv: bin/python logs its arguments then execs this interpreter; bin/pip fails.
    The launcher's probe (`-c "import torch...; print(torch.cuda.device_count())"`) is answered with 0 GPUs
    without importing torch, which keeps these tests fast; the real command below imports it for real."""
    env_dir = tmp_path / "userenv"
    log = tmp_path / "calls.log"
    write_exe(env_dir / "bin" / "python", f"""#!/bin/sh
echo "python $*" >> {log}
case "$*" in "-c import torch"*"device_count()"*) [ -z "$SHIM_REAL_PROBE" ] && echo 0 && exit 0 ;; esac
exec {sys.executable} "$@"
""")
    for pip in ("pip", "pip3"):
        write_exe(env_dir / "bin" / pip, f'#!/bin/sh\necho "pip $*" >> {log}\nexit 1\n')
    return env_dir, log


def run_wrapper(rel, root: Path, cwd: Path, env_extra: dict, dry: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHON", "NPROC_PER_NODE", "MASTER_PORT", "MASTER_ADDR",
                        "NNODES", "NODE_RANK", "PYTHONPATH", "PYTHONSAFEPATH")}
    if dry:
        env["LAUNCHER_DRY_RUN"] = "1"
    env.update(env_extra)
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["bash", str(root / rel)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def command_of(result) -> list[str]:
    assert result.returncode == 0, result.stdout + result.stderr
    return shlex.split(result.stdout.strip().splitlines()[-1])


def flag(cmd: list[str], name: str):
    return cmd[cmd.index(name) + 1] if name in cmd else None


@pytest.mark.parametrize("name", list(WRAPPERS))
def test_active_env_is_used_as_is(name, tree, fake_env, tmp_path):
    env_dir, log = fake_env
    rel, variables = WRAPPERS[name]
    cmd = command_of(run_wrapper(rel, tree, tmp_path / "work", dict(variables, VIRTUAL_ENV=str(env_dir))))
    assert cmd[0] == str(env_dir / "bin" / "python")
    assert not (tree / ".venv").exists()  # venv.sh was never sourced
    calls = log.read_text()
    assert "pip" not in calls  # neither bin/pip nor `python -m pip`
    assert "import torch" in calls  # the launcher checked that the environment has torch


def test_conda_env_and_PYTHON_override(tree, fake_env, tmp_path):
    env_dir, _ = fake_env
    rel, variables = WRAPPERS["sample_c2i"]
    cmd = command_of(run_wrapper(rel, tree, tmp_path / "w", dict(variables, CONDA_PREFIX=str(env_dir))))
    assert cmd[0] == str(env_dir / "bin" / "python")
    # PYTHON wins over an active environment; a relative PYTHON is taken from the caller's folder.
    other = write_exe(tmp_path / "w" / "py" / "python", f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    cmd = command_of(run_wrapper(rel, tree, tmp_path / "w", dict(variables, VIRTUAL_ENV=str(env_dir), PYTHON="py/python")))
    assert cmd[0] == str(other)


def test_falls_back_to_repo_venv_only_without_any_torch(tree, tmp_path):
    """No active environment and no python with torch on PATH: scripts/venv.sh is sourced (stubbed here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "sh", "mkdir", "chmod"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    write_exe(bin_dir / "python", "#!/bin/sh\nexit 1\n")  # a python without torch
    (tree / "scripts" / "venv.sh").write_text(
        f'mkdir -p "$REPO_ROOT/.venv/bin"\nprintf \'#!/bin/sh\\nexec {sys.executable} "$@"\\n\' > "$REPO_ROOT/.venv/bin/python"\n'
        'chmod +x "$REPO_ROOT/.venv/bin/python"\n')
    rel, variables = WRAPPERS["train_c2i"]
    cmd = command_of(run_wrapper(rel, tree, tmp_path / "w", dict(variables, PATH=str(bin_dir))))
    assert cmd[0] == str(tree / ".venv" / "bin" / "python")


def test_relative_paths_land_in_the_callers_folder(tree, fake_env, tmp_path):
    env_dir, _ = fake_env
    caller = tmp_path / "elsewhere" / "project"
    base = dict(VIRTUAL_ENV=str(env_dir))
    cmd = command_of(run_wrapper(WRAPPERS["train_c2i"][0], tree, caller, dict(
        base, CODE_DIR="codes/meta.jsonl", EXP_NAME="e", RES_DIR="results", VQ_PATH="../tok.pt",
        EXTRA_ARGS="--gpt-ckpt ckpt/gpt.pt")))
    assert flag(cmd, "--code-dir") == f"{caller}/codes/meta.jsonl"
    assert flag(cmd, "--results-dir") == f"{caller}/results"
    assert flag(cmd, "--vq-ckpt") == f"{caller}/../tok.pt"
    assert flag(cmd, "--gpt-ckpt") == "ckpt/gpt.pt"  # EXTRA_ARGS untouched: python runs in the caller's folder
    cmd = command_of(run_wrapper(WRAPPERS["sample_c2i"][0], tree, caller, dict(
        base, GPT_PATH="/abs/gpt.pt", VQ_PATH="tok.pt", SAMPLE_DIR="out", TEST_DATA_PATH="meta.csv")))
    assert (flag(cmd, "--gpt-ckpt"), flag(cmd, "--vq-ckpt")) == ("/abs/gpt.pt", f"{caller}/tok.pt")
    assert (flag(cmd, "--sample-dir"), flag(cmd, "--test-data-path")) == (f"{caller}/out", f"{caller}/meta.csv")
    cmd = command_of(run_wrapper(WRAPPERS["train_tokenizer"][0], tree, caller, dict(
        base, TRAIN_DATA="d/m.csv", OUT_DIR="o", INIT_CKPT="w.pth")))
    assert [flag(cmd, f) for f in ("--train-data", "--out-dir", "--init-ckpt")] == [
        f"{caller}/d/m.csv", f"{caller}/o", f"{caller}/w.pth"]
    # Hub references are not paths: passed on as given
    hub = "hf://massaki75/meditok/meditok_simple_v1.pth"
    cmd = command_of(run_wrapper(WRAPPERS["sample_c2i"][0], tree, caller, dict(
        base, GPT_PATH="hf://massaki75/meditok/llamagen_meditok/meditok_c2i_gptb.pt", VQ_PATH=hub)))
    assert (flag(cmd, "--gpt-ckpt"), flag(cmd, "--vq-ckpt")) == (
        "hf://massaki75/meditok/llamagen_meditok/meditok_c2i_gptb.pt", hub)


def test_flags_only_when_set_and_process_settings(tree, fake_env, tmp_path):
    env_dir, _ = fake_env
    rel, variables = WRAPPERS["train_c2i"]
    base = dict(variables, VIRTUAL_ENV=str(env_dir))
    cmd = command_of(run_wrapper(rel, tree, tmp_path / "w", base))
    for absent in ("--global-batch-size", "--vocab-size", "--lr", "--epochs", "--num-classes", "--gpt-model"):
        assert absent not in cmd  # the .py's defaults apply
    assert flag(cmd, "-m") == "torch.distributed.run"
    assert "--nproc_per_node=1" in cmd or any(a.startswith("--nproc_per_node=") for a in cmd)
    port = next(a for a in cmd if a.startswith("--master_port=")).split("=")[1]
    assert port.isdigit() and 0 < int(port) < 65536

    cmd = command_of(run_wrapper(rel, tree, tmp_path / "w", dict(
        base, NPROC_PER_NODE="3", MASTER_PORT="12345", BATCH_SIZE="64", LR="3e-4")))
    assert "--nproc_per_node=3" in cmd and "--master_port=12345" in cmd
    assert (flag(cmd, "--global-batch-size"), flag(cmd, "--lr")) == ("64", "3e-4")

    multi = run_wrapper(rel, tree, tmp_path / "w", dict(base, NNODES="2", NODE_RANK="1"))
    assert multi.returncode != 0 and "MASTER_ADDR" in multi.stderr
    cmd = command_of(run_wrapper(rel, tree, tmp_path / "w", dict(
        base, NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1", NPROC_PER_NODE="8")))
    assert {"--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29500",
            "--nproc_per_node=8"} <= set(cmd)


def test_missing_required_variable_is_named(tree, fake_env, tmp_path):
    env_dir, _ = fake_env
    r = run_wrapper(WRAPPERS["sample_c2i"][0], tree, tmp_path / "w", dict(VIRTUAL_ENV=str(env_dir), GPT_PATH="g.pt"))
    assert r.returncode != 0 and "VQ_PATH" in r.stderr


@pytest.mark.slow
def test_real_command_from_another_folder(fake_env, tmp_path):
    """The real wrapper, from a folder that holds a decoy `datasets` package: torchrun starts the script
    with the active environment's Python and the repository's packages."""
    env_dir, log = fake_env
    caller = tmp_path / "caller"
    (caller / "datasets").mkdir(parents=True)
    (caller / "datasets" / "__init__.py").write_text("raise ImportError('the decoy datasets package was imported')\n")
    r = run_wrapper("scripts/train_tokenizer.sh", REPO, caller, dict(
        VIRTUAL_ENV=str(env_dir), SHIM_REAL_PROBE="1", TRAIN_DATA="m.csv", OUT_DIR="o", EXTRA_ARGS="--help"),
        dry=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "--train-data" in r.stdout and "--foo_bar" in r.stdout  # the script's own help (scripts.cli note)
    calls = log.read_text()
    assert "-m torch.distributed.run" in calls and "--nproc_per_node=1" in calls  # no GPU here: one process
    assert not list(caller.glob("o*"))  # --help wrote nothing
