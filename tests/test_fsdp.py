"""FSDP2 / HSDP, activation checkpointing and sharded (DCP) checkpoints (models/parallel.py).

GPT-Tiny with every dropout at 0, so runs that see the same global batches must end with the same
weights whatever the number of processes and the data-parallel mode. Multi-process tests use gloo
on 2 CPU processes; the reference is always one plain process (no wrapper, no sharding).
"""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.checkpoint import CheckpointError, load_checkpoint
from models.gpt import GPT_models, TransformerBlock, load_gpt
from models.meditok import build_meditok
from models.parallel import (
    PARTIAL,
    TRAIN_STATE,
    device_mesh,
    find_blocks,
    full_state_dict,
    is_complete,
    load_full_optimizer_state,
    load_full_state_dict,
    load_sharded,
    save_sharded,
    sharded_checkpoints,
    wrap_model,
)
from models.training import update_ema
from scripts.train_tokenizer import adaptive_gan_weight, last_decoder_layer, shard_units
from test_train_c2i import base_args, final_weights, make_codes, subprocess_env, train  # the GPT trainer's tiny runs
from test_train_tokenizer import SIZE as TOKENIZER_SIZE
from test_train_tokenizer import data  # noqa: F401  (fixture: the tokenizer tests' blob images)
from test_train_tokenizer import run as run_tokenizer

REPO = Path(__file__).resolve().parents[1]
K, GRID, SUB, CLASSES, BATCH = 4, 4, 16, 3, 8
BLOCKS = (TransformerBlock,)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_gpt(**kw):
    torch.manual_seed(0)
    return GPT_models["GPT-Tiny"](vocab_size=K * SUB, num_codebooks=K, block_size=GRID * GRID, num_classes=CLASSES,
                                  resid_dropout_p=0.0, ffn_dropout_p=0.0, token_dropout_p=0.0,
                                  class_dropout_prob=0.0, **kw)


def global_batch(step):
    """The global batch of optimizer step `step`: codes [BATCH, K, L], labels [BATCH]."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, SUB, (BATCH, K, GRID * GRID), generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)


def tiny_tokenizer():
    torch.manual_seed(0)
    tok = build_meditok(model_name="MedITok-Tiny", img_size=TOKENIZER_SIZE).train()
    tok.logit_scale.requires_grad_(False)  # as the tokenizer trainer does (0-d: fully_shard cannot split it)
    return tok


def tokenizer_batch():
    return torch.rand(4, 3, TOKENIZER_SIZE, TOKENIZER_SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1


def gan_weight(tok, x):
    """The tokenizer trainer's adaptive GAN weight, with -mean(rec) standing in for the discriminator."""
    rec = tok(x)["rec"]
    return adaptive_gan_weight((rec - x).abs().mean(), -rec.mean(), last_decoder_layer(tok))


def optimizer_for(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05, fused=True)


def train_steps(model, train_model, optimizer, ema, steps, rank=0, world_size=1):
    """Each rank takes its contiguous share of the global batch (as StepBatchSampler does)."""
    share = BATCH // world_size
    for step in steps:
        x, y = global_batch(step)
        x, y = x[rank * share:][:share], y[rank * share:][:share]
        _, loss = train_model(x[:, :, :-1], y, targets=x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # active: its norm must be over all shards
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, model, 0.5)


def assert_close(a, b, atol, what=""):
    assert a.keys() == b.keys(), f"{what}: keys differ"
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"{what}: differs by {worst}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# One process
# ----------------------------------------------------------------------------------------------
def test_blocks_and_activation_checkpointing_keep_gradients_and_keys():
    model = tiny_gpt()
    assert len(find_blocks(model, BLOCKS)) == model.config.n_layer + model.config.n_output_layer
    x, y = global_batch(0)

    def grads(m):
        m.zero_grad()
        m(x[:, :, :-1], y, targets=x)[1].backward()
        return {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in m.named_parameters()}

    plain = grads(model)
    keys = list(model.state_dict())
    ckpt = tiny_gpt()
    wrap_model(ckpt, "ddp", torch.device("cpu"), BLOCKS, grad_checkpointing=True)
    assert "layers.0._checkpoint_wrapped_module.attention.wqkv.weight" in dict(ckpt.named_parameters())
    assert list(ckpt.state_dict()) == keys  # checkpoints keep the plain model's names
    assert_close(plain, grads(ckpt), 1e-6, "gradients with activation checkpointing")


def test_killed_save_is_not_a_checkpoint_and_loads_are_strict(tmp_path, monkeypatch):
    model, ema = tiny_gpt(), tiny_gpt()
    opt = optimizer_for(model)
    train_steps(model, model, opt, ema, [0])
    save_sharded(tmp_path / "0000001", model, opt, ema, {"steps": 1})
    assert [s for s, _ in sharded_checkpoints(tmp_path)] == [1]

    # A save killed before its last file: only a .partial folder, which is neither listed nor loadable.
    import models.parallel as parallel

    def killed(*a, **k):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(parallel, "atomic_save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_sharded(tmp_path / "0000002", model, opt, ema, {"steps": 2})
    assert (tmp_path / f"0000002{PARTIAL}" / ".metadata").is_file()
    assert [s for s, _ in sharded_checkpoints(tmp_path)] == [1]
    with pytest.raises(CheckpointError, match="not a complete sharded checkpoint"):
        load_sharded(tmp_path / f"0000002{PARTIAL}", model, opt, ema)
    monkeypatch.undo()
    save_sharded(tmp_path / "0000003", model, opt, ema, {"steps": 3})  # the next save removes the debris
    assert not (tmp_path / f"0000002{PARTIAL}").exists()
    assert [s for s, _ in sharded_checkpoints(tmp_path)] == [1, 3]

    # Loading checks names both ways and loads exactly.
    fresh, fresh_ema = tiny_gpt(), tiny_gpt()
    fresh_opt = optimizer_for(fresh)
    assert load_sharded(tmp_path / "0000003", fresh, fresh_opt, fresh_ema) == {"steps": 3}
    assert_close(model.state_dict(), fresh.state_dict(), 0.0, "weights")
    assert_close(ema.state_dict(), fresh_ema.state_dict(), 0.0, "ema")
    with pytest.raises(CheckpointError, match=r"missing \(\d+\): model.layers.4"):
        load_sharded(tmp_path / "0000003", tiny_gpt(n_layer=5), None, None)


# ----------------------------------------------------------------------------------------------
# Two processes (gloo): FSDP / HSDP equal one process; checkpoints move between 1 and 2 processes
# ----------------------------------------------------------------------------------------------
def _two_process_worker(rank, world_size, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    cpu = torch.device("cpu")
    try:
        for mode, shard_size in (("fsdp", None), ("hsdp", 1)):  # hsdp: 2 replicas of 1 shard each
            model, ema = tiny_gpt(), tiny_gpt()
            train_model = wrap_model(model, mode, cpu, BLOCKS, mesh=device_mesh(mode, cpu, shard_size),
                                     grad_checkpointing=mode == "fsdp", ema=ema)
            # Dim 0 split over the shard group: SUB rows of the output layer -> SUB / 2 (fsdp) or SUB (hsdp).
            assert train_model is model
            assert model.output.linear_head.weight.to_local().shape[0] == SUB // (2 if mode == "fsdp" else 1)
            opt = optimizer_for(model)
            train_steps(model, model, opt, ema, [0, 1], rank, world_size)
            save_sharded(out / f"{mode}_2", model, opt, ema, {"steps": 2})
            train_steps(model, model, opt, ema, [2], rank, world_size)
            weights, ema_weights = full_state_dict(model), full_state_dict(ema)
            if rank == 0:
                torch.save({"model": weights, "ema": ema_weights}, out / f"{mode}_final.pt")
        # A single-file training checkpoint of the plain model (index-keyed optimizer state, as ddp runs
        # write) continued on 2 FSDP processes.
        model, ema = tiny_gpt(), tiny_gpt()
        wrap_model(model, "fsdp", cpu, BLOCKS, mesh=device_mesh("fsdp", cpu), ema=ema)
        opt = optimizer_for(model)
        ckpt = torch.load(out / "one_2.pt", weights_only=True)
        load_full_state_dict(model, ckpt["model"])
        load_full_state_dict(ema, ckpt["ema"])
        load_full_optimizer_state(model, opt, ckpt["optimizer"])
        train_steps(model, model, opt, ema, [2], rank, world_size)
        weights, ema_weights = full_state_dict(model), full_state_dict(ema)
        if rank == 0:
            torch.save({"model": weights, "ema": ema_weights}, out / "file_to_two_final.pt")
        # 1 -> 2: continue the single process's step-2 checkpoint on 2 processes.
        model, ema = tiny_gpt(), tiny_gpt()
        wrap_model(model, "fsdp", cpu, BLOCKS, mesh=device_mesh("fsdp", cpu), ema=ema)
        opt = optimizer_for(model)
        assert load_sharded(out / "one_2", model, opt, ema)["steps"] == 2
        train_steps(model, model, opt, ema, [2], rank, world_size)
        weights, ema_weights = full_state_dict(model), full_state_dict(ema)
        if rank == 0:
            torch.save({"model": weights, "ema": ema_weights}, out / "one_to_two_final.pt")
        # The tokenizer trainer's adaptive GAN weight differentiates w.r.t. the output conv's weight,
        # which under FSDP must be the gathered one (looked up after the forward).
        tok = tiny_tokenizer()
        wrap_model(tok, "fsdp", cpu, shard_units(tok), mesh=device_mesh("fsdp", cpu))
        weights = [None] * world_size
        dist.all_gather_object(weights, gan_weight(tok, tokenizer_batch()[rank * 2:][:2]).item())
        if rank == 0:
            torch.save(weights, out / "gan_weights.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_hsdp_equal_one_process_and_checkpoints_reshard(tmp_path):
    # One plain process: 3 steps, a sharded checkpoint after step 2.
    model, ema = tiny_gpt(), tiny_gpt()
    opt = optimizer_for(model)
    train_steps(model, model, opt, ema, [0, 1])
    save_sharded(tmp_path / "one_2", model, opt, ema, {"steps": 2})
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "one_2.pt")
    train_steps(model, model, opt, ema, [2])
    ref = {"model": model.state_dict(), "ema": ema.state_dict()}

    mp.spawn(_two_process_worker, args=(2, free_port(), tmp_path), nprocs=2)
    for name in ("fsdp_final", "hsdp_final", "one_to_two_final", "file_to_two_final"):
        got = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        for key in ("model", "ema"):
            assert_close(ref[key], got[key], 1e-5, f"{name} {key}")

    tok = tiny_tokenizer()
    expected = [gan_weight(tok, tokenizer_batch()[r * 2:][:2]).item() for r in range(2)]
    assert torch.load(tmp_path / "gan_weights.pt") == pytest.approx(expected, rel=1e-5)

    # 2 -> 1: the FSDP run's step-2 checkpoint continued by one plain process.
    model, ema = tiny_gpt(), tiny_gpt()
    opt = optimizer_for(model)
    assert load_sharded(tmp_path / "fsdp_2", model, opt, ema)["steps"] == 2
    train_steps(model, model, opt, ema, [2])
    assert_close(ref["model"], model.state_dict(), 1e-5, "2 -> 1 weights")
    assert_close(ref["ema"], ema.state_dict(), 1e-5, "2 -> 1 ema")


# ----------------------------------------------------------------------------------------------
# The trainer: train_c2i.py --data-parallel fsdp
# ----------------------------------------------------------------------------------------------
EXTRA = ["--ema", "--ema-decay", "0.9", "--warmup-steps", "5", "--ckpt-every", "2"]


def torchrun_train_c2i(nproc, argv, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "evaluation.generation.train_c2i", *argv]
    return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, **popen)  # own process group: SIGKILL reaches the workers


def assert_weights_equal(a, b, atol, what):
    assert a.keys() == b.keys(), what
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"{what}: differs by {worst}"


@pytest.mark.slow
def test_train_c2i_fsdp_equals_one_process_ddp_and_latest_loads(tmp_path):
    """2 processes, FSDP + activation checkpointing + 2 micro-batches per step vs 1 plain DDP process,
    same global batch of 8."""
    meta = make_codes(tmp_path)
    train(base_args(meta, tmp_path, "ddp", "--max-steps", "6", *EXTRA, "--eval-every", "2", dropout=False))
    proc = torchrun_train_c2i(2, base_args(meta, tmp_path, "fsdp", "--max-steps", "6", *EXTRA, "--eval-every", "2",
                                           "--data-parallel", "fsdp", "--grad-checkpointing",
                                           "--gradient-accumulation-steps", "2", dropout=False))
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert "world_size=2" in (tmp_path / "fsdp" / "log.txt").read_text()
    for key in ("model", "ema"):
        assert_weights_equal(final_weights(tmp_path, "ddp", key), final_weights(tmp_path, "fsdp", key), 1e-4, key)
    # The validation loss (mid-training too: a sharded forward in eval mode between training steps).
    val = {run: [float(line.rsplit("val loss ", 1)[1].split()[0]) for line in
                 (tmp_path / run / "log.txt").read_text().splitlines() if "val loss" in line] for run in ("ddp", "fsdp")}
    assert len(val["fsdp"]) == 3 and val["fsdp"] == pytest.approx(val["ddp"], abs=2e-4)

    # Training state in one DCP folder per checkpoint (the last step included); latest.pt is consolidated.
    ckpts = tmp_path / "fsdp" / "checkpoints"
    assert [s for s, _ in sharded_checkpoints(ckpts)] == [2, 4, 6]
    assert sorted(p.name for p in (ckpts / "0000006").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", TRAIN_STATE]
    latest = load_checkpoint(ckpts / "latest.pt")
    assert "optimizer" not in latest and latest["steps"] == 6 and latest["config"]["n_layer"] == 4
    gpt, _ = load_gpt(ckpts / "latest.pt")  # EMA weights, config from the file
    assert_weights_equal(gpt.state_dict(), latest["ema"], 0.0, "load_gpt")
    assert torch.isfinite(gpt(torch.zeros(2, K, GRID * GRID - 1, dtype=torch.long), torch.tensor([0, 1]))[0]).all()


def test_train_c2i_fsdp_auto_resume_finds_the_sharded_folder(tmp_path):
    """One process with --data-parallel fsdp (nothing to split, checkpoints still DCP folders): a rerun
    asking for more steps continues from the folder, not from latest.pt (weights only) or from scratch."""
    meta = make_codes(tmp_path)
    train(base_args(meta, tmp_path, "run", "--max-steps", "2", "--data-parallel", "fsdp", dropout=False))
    ckpts = tmp_path / "run" / "checkpoints"
    assert [s for s, _ in sharded_checkpoints(ckpts)] == [2] and "optimizer" not in load_checkpoint(ckpts / "latest.pt")
    stats = train(base_args(meta, tmp_path, "run", "--max-steps", "3", "--auto-resume", "--data-parallel", "fsdp",
                            dropout=False))
    assert stats["steps"] == 3 and f"resumed from {ckpts / '0000002'}: step 2" in (tmp_path / "run" / "log.txt").read_text()
    assert [s for s, _ in sharded_checkpoints(ckpts)] == [2, 3]


@pytest.mark.slow
def test_train_c2i_fsdp_killed_on_two_processes_resumes_on_one(tmp_path):
    """SIGKILL a 2-process FSDP run after its step-4 checkpoint (mid-epoch: 3 steps per epoch); one
    process continues it to step 6 and must end where an uninterrupted run ends."""
    meta = make_codes(tmp_path)
    victim = torchrun_train_c2i(2, base_args(meta, tmp_path, "victim", "--max-steps", "100000", *EXTRA,
                                             "--data-parallel", "fsdp", dropout=False))
    ckpt4 = tmp_path / "victim" / "checkpoints" / "0000004"
    try:
        deadline = time.time() + 300
        while not is_complete(ckpt4) and victim.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert is_complete(ckpt4), victim.stderr.read().decode()[-3000:] if victim.poll() is not None else "no checkpoint in time"
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
    # Whatever the kill interrupted, every folder that looks like a checkpoint is one.
    for p in (tmp_path / "victim" / "checkpoints").iterdir():
        assert p.name.endswith(PARTIAL) or is_complete(p), f"{p} looks like a checkpoint but is incomplete"
    state = load_checkpoint(ckpt4 / TRAIN_STATE)
    assert (state["steps"], state["epoch"], state["step_in_epoch"], state["world_size"]) == (4, 1, 1, 2)

    train(base_args(meta, tmp_path, "straight", "--max-steps", "6", *EXTRA, dropout=False))
    train(base_args(meta, tmp_path, "resumed", "--max-steps", "6", *EXTRA, "--data-parallel", "fsdp",
                    "--gpt-ckpt", ckpt4, dropout=False))
    log = (tmp_path / "resumed" / "log.txt").read_text()
    assert "resumed from" in log and "step 4, epoch 1, step 1 of 3" in log
    for key in ("model", "ema"):
        assert_weights_equal(final_weights(tmp_path, "straight", key), final_weights(tmp_path, "resumed", key), 1e-4, key)


# ----------------------------------------------------------------------------------------------
# The tokenizer trainer: scripts/train_tokenizer.py --data-parallel fsdp
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_tokenizer_fsdp_stops_on_two_processes_and_finishes_on_one(data, tmp_path):
    """MedITok-Tiny with EMA and the GAN loss from step 0: 2 FSDP processes stop at step 2 (a sharded
    checkpoint), 1 process continues the same folder to step 4; its tokenizer.pt must equal that of
    1 process running the 4 steps straight."""
    # A fixed GAN weight: the adaptive one is computed per process from its share of the batch, so no
    # data-parallel run (ddp either) equals one process with it.
    extra = ["--max-steps", "4", "--ema-decay", "0.9", "--disc-weight", "0.1", "--disc-start", "0", "--disc-layers", "1",
             "--no-disc-adaptive", "--eval-every", "2"]
    run_tokenizer(data, tmp_path / "straight", *extra)
    argv = ["--train-data", str(data), "--out-dir", str(tmp_path / "split"), "--config", "MedITok-Tiny",
            "--image-size", str(TOKENIZER_SIZE), "--batch-size", "4", "--warmup-steps", "2", "--log-every", "1",
            "--no-progress", "--no-tensorboard", *extra, "--stop-at-step", "2", "--data-parallel", "fsdp"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "scripts.train_tokenizer", *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = tmp_path / "split" / "checkpoints"
    assert [s for s, _ in sharded_checkpoints(ckpts, "step_")] == [2]
    assert "world_size=2" in (tmp_path / "split" / "log.txt").read_text()

    run_tokenizer(data, tmp_path / "split", *extra, "--data-parallel", "fsdp")  # 1 process resumes the folder
    assert "resuming from" in (tmp_path / "split" / "log.txt").read_text()
    a = load_checkpoint(tmp_path / "straight" / "tokenizer.pt")
    b = load_checkpoint(tmp_path / "split" / "tokenizer.pt")
    assert a["step"] == b["step"] == 4
    for key in ("model", "ema"):
        assert_weights_equal(a[key], b[key], 1e-4, f"tokenizer {key}")
