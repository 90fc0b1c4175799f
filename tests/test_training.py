"""models/training.py against independent references: the EMA and schedule formulas written out by hand,
generators drawn after a restore, checkpoint discovery over a folder with a truncated newest file."""
from __future__ import annotations

import logging
import math
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from models.checkpoint import CheckpointError
from models.training import (
    LRSchedule, StepBatchSampler, data_position, ema_decay_at, load_newest_checkpoint, numbered_checkpoints,
    prune_checkpoints, restore_rng_states, rng_state, set_rng_state, update_ema,
)

LOG = logging.getLogger("test_training")


# ----------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------
def test_ema_follows_the_formula():
    torch.manual_seed(0)
    model, ema = nn.BatchNorm1d(5), nn.BatchNorm1d(5)
    with torch.no_grad():
        for m in (model, ema):
            m.weight.normal_()
            m.bias.normal_()
        model.running_mean.normal_()
    w0 = {n: p.clone() for n, p in ema.named_parameters()}
    decay = 0.8  # far from 0.5, so swapping decay and 1 - decay changes the result
    update_ema(ema, model, decay)
    for name, p in model.named_parameters():
        expected = decay * w0[name] + (1 - decay) * p
        torch.testing.assert_close(dict(ema.named_parameters())[name], expected, rtol=1e-6, atol=1e-6)
    # Buffers (running statistics) are copied, not averaged.
    assert torch.equal(ema.running_mean, model.running_mean)
    # Ten updates towards a fixed weight: the distance shrinks by decay ** 10.
    for _ in range(9):
        update_ema(ema, model, decay)
    torch.testing.assert_close(ema.weight - model.weight, (w0["weight"] - model.weight) * decay ** 10, rtol=1e-5, atol=1e-7)


def test_ema_decay_warm_up():
    assert ema_decay_at(0.999, 0, warmup=False) == 0.999
    assert ema_decay_at(0.999, 0, warmup=True) == pytest.approx(1 / 10)
    assert ema_decay_at(0.999, 90, warmup=True) == pytest.approx(91 / 100)
    assert ema_decay_at(0.99, 10_000, warmup=True) == 0.99  # the warm-up only ever lowers the decay


# ----------------------------------------------------------------------------------------------
# Learning-rate schedule
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_at_chosen_steps(kind):
    lr, end, warm, total = 1e-3, 1e-4, 10, 110
    s = LRSchedule(lr, total, warm, kind, end)
    # Warm-up: step s runs at lr * (s + 1) / warm, reaching lr at its last step.
    assert s(0) == pytest.approx(lr / 10) and s(4) == pytest.approx(lr * 5 / 10) and s(9) == pytest.approx(lr)
    # After warm-up, p = (step - warm) / (total - warm) = 0, 1/4, 1/2, 1.
    decayed = {
        "cosine": lambda p: end + (lr - end) * 0.5 * (1 + math.cos(math.pi * p)),
        "linear": lambda p: end + (lr - end) * (1 - p),
        "constant": lambda p: lr,
    }[kind]
    for step, p in [(10, 0.0), (35, 0.25), (60, 0.5), (110, 1.0), (500, 1.0)]:
        assert s(step) == pytest.approx(decayed(p), rel=1e-12), (kind, step)
    if kind == "cosine":
        assert s(60) == pytest.approx((lr + end) / 2) and s(110) == pytest.approx(end)
    with pytest.raises(ValueError, match="schedule 'step'"):
        LRSchedule(lr, total, warm, "step")


# ----------------------------------------------------------------------------------------------
# RNG state and data position
# ----------------------------------------------------------------------------------------------
def draws():
    return (random.random(), np.random.rand(), np.random.randn(), torch.rand(3).tolist(), torch.randn(2).tolist())


def test_rng_restore_repeats_the_next_draws(tmp_path):
    device = torch.device("cpu")
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # a cached Gaussian in numpy's state
    state = rng_state(device)
    torch.save([state], tmp_path / "rng.pt")  # the way checkpoints carry it
    first = draws()
    assert draws() != first  # the generators moved on
    saved = torch.load(tmp_path / "rng.pt", weights_only=True)
    assert restore_rng_states(saved, rank=0, world_size=1, device=device, log=LOG)
    assert draws() == first
    # Saved by another number of processes: nothing restored, the caller is told.
    assert not restore_rng_states(saved, rank=0, world_size=2, device=device, log=LOG)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_rng_restore_cuda():
    device = torch.device("cuda", torch.cuda.current_device())
    state = rng_state(device)
    a = torch.rand(4, device=device)
    set_rng_state(state, device)
    assert torch.equal(torch.rand(4, device=device), a)


def test_data_position():
    sampler = StepBatchSampler(20, 8, seed=1)  # 2 steps per epoch
    same = sampler.state_dict()
    assert data_position(same, sampler, step=5, epoch=2, step_in_epoch=1, log=LOG) == (2, 1)
    assert data_position(same, sampler, step=6, epoch=2, step_in_epoch=2, log=LOG) == (3, 0)  # end of an epoch
    other = {**same, "num_samples": 30}  # the data changed: restart the epoch that step 5 falls in
    assert data_position(other, sampler, step=5, epoch=1, step_in_epoch=2, log=LOG) == (2, 0)


# ----------------------------------------------------------------------------------------------
# Checkpoint discovery and pruning
# ----------------------------------------------------------------------------------------------
def test_newest_readable_checkpoint_and_pruning(tmp_path, caplog):
    for step in (2, 4, 6):
        torch.save({"step": step, "w": torch.full((100,), float(step))}, tmp_path / f"step_{step:07d}.pt")
    torch.save({"step": 6}, tmp_path / "latest.pt")
    (tmp_path / "step_notes.pt").write_text("not numbered")
    found = numbered_checkpoints(tmp_path, "step_")
    assert [s for s, _ in found] == [2, 4, 6]

    newest = tmp_path / "step_0000006.pt"
    newest.write_bytes(newest.read_bytes()[:200])  # truncated, as by a full disk
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        path, ckpt = load_newest_checkpoint(found, LOG)
    assert path == tmp_path / "step_0000004.pt" and ckpt["step"] == 4
    assert "step_0000006.pt" in caplog.text and "falling back to" in caplog.text and "step_0000004.pt" in caplog.text
    # A checkpoint that loads but is not a training state is skipped too.
    path, _ = load_newest_checkpoint(found, LOG, valid=lambda c: c["step"] < 4)
    assert path == tmp_path / "step_0000002.pt"
    assert load_newest_checkpoint([], LOG) == (None, None)
    # Files exist but none loads: an error, never a silent fresh start.
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        load_newest_checkpoint(found[2:], LOG)

    deleted = prune_checkpoints(tmp_path, keep=2, prefix="step_")
    assert deleted == [tmp_path / "step_0000002.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt", "step_0000004.pt", "step_0000006.pt", "step_notes.pt"]
    assert prune_checkpoints(tmp_path, keep=0, prefix="step_") == []  # 0: keep all
