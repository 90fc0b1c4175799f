"""models/training.py: the contracts that mutation testing (scripts/mutation.sh) found unchecked, each
against a hand-computed value or the library's own generator: optimizer groups, the data order of one
rank written out by hand, per-rank seeds, RNG states across processes, warnings that name what changed,
checkpoint discovery order, autocast settings."""
from __future__ import annotations

import logging
import random
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from models import training
from models.checkpoint import CheckpointError
from models.training import (
    LRSchedule, StepBatchSampler, autocast_context, data_position, gather_rng_states, load_newest_checkpoint,
    prune_checkpoints, restore_rng_states, rng_state, seed_process, set_lr, set_rng_state,
)

LOG = logging.getLogger("test_training_mutants")
CPU = torch.device("cpu")


def test_set_lr_sets_every_group():
    opt = SimpleNamespace(param_groups=[{"lr": 1.0}, {"lr": 2.0}])  # all set_lr reads of an optimizer
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]


def test_schedule_change_on_resume_is_logged(caplog):
    s = LRSchedule(1e-3, 100, 10, "cosine")
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        s.log_change(None, LOG)  # an older checkpoint without a schedule
        s.log_change(s.state_dict(), LOG)  # unchanged
        assert caplog.text == ""
        s.log_change({**s.state_dict(), "kind": "linear"}, LOG)
    assert "schedule changed on resume" in caplog.text and "'linear'" in caplog.text and "'cosine'" in caplog.text


def test_schedule_one_decay_step():
    # total - warmup = 1: the single step after warm-up is already the end (p = 1).
    s = LRSchedule(1.0, 11, 10, "linear", end_lr=0.1)
    assert s(10) == pytest.approx(1.0) and s(11) == pytest.approx(0.1)


# ----------------------------------------------------------------------------------------------
# Data order
# ----------------------------------------------------------------------------------------------
def test_sampler_batches_of_one_rank_by_hand():
    # 10 rows, global batch 4 -> 2 steps per epoch (rows 8, 9 unused); 2 ranks -> shares of 2; accum 2 ->
    # micro-batches of 1. Unshuffled, step s covers rows 4s..4s+3 and rank 1 takes the second half.
    s = StepBatchSampler(10, 4, world_size=2, rank=1, accum=2, shuffle=False)
    assert (s.micro, s.steps_per_epoch, len(s)) == (1, 2, 4)
    assert list(s) == [[2], [3], [6], [7]]
    s.set_epoch(3, start_step=1)  # resume at the second step
    assert list(s) == [[6], [7]] and len(s) == 2
    assert StepBatchSampler(10, 4, world_size=2, rank=0, shuffle=False).__iter__().__next__() == [0, 1]
    assert len(StepBatchSampler(10, 4, accum=4, shuffle=False)) == 8


def test_sampler_defaults_and_arguments():
    # Defaults: one process, no accumulation, seed 0, shuffled, epoch 0 from its first step.
    s = StepBatchSampler(12, 4)
    expected = torch.randperm(12, generator=torch.Generator().manual_seed(0)).tolist()
    assert list(s) == [expected[0:4], expected[4:8], expected[8:12]]
    # What checkpoints store to compare data orders (keys read back by later versions).
    assert s.state_dict() == {"num_samples": 12, "global_batch_size": 4, "seed": 0}
    assert len(list(StepBatchSampler(8, 8))) == 1  # exactly one global batch of rows is enough
    with pytest.raises(ValueError, match="global batch 6 is not divisible by world size 2 x gradient accumulation steps 2"):
        StepBatchSampler(12, 6, world_size=2, accum=2)


def test_sampler_order_is_the_documented_permutation():
    # "each epoch shuffles the N indices with a generator seeded by seed + epoch"
    s = StepBatchSampler(12, 4, seed=5)
    for epoch in (0, 2):
        expected = torch.randperm(12, generator=torch.Generator().manual_seed(5 + epoch))
        assert torch.equal(s.order(epoch), expected)
        s.set_epoch(epoch)
        assert sum(list(s), []) == expected.tolist()
    assert not torch.equal(s.order(0), s.order(1))


def test_data_order_change_is_logged(caplog):
    sampler = StepBatchSampler(20, 8, seed=1)
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        assert data_position({"seed": 0}, sampler, step=3, epoch=1, step_in_epoch=1, log=LOG, where="run.pt") == (1, 0)
    assert "run.pt: data order changed" in caplog.text and "{'seed': 0}" in caplog.text
    assert "starting epoch 1 from its beginning" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        data_position(None, sampler, step=3, epoch=1, step_in_epoch=1, log=LOG)
    assert caplog.text.count("checkpoint: data order changed") == 1


# ----------------------------------------------------------------------------------------------
# Seeds and RNG states
# ----------------------------------------------------------------------------------------------
def _firsts():
    return random.random(), float(np.random.rand()), torch.rand(1).item()


def _expected_firsts(seed: int, np_seed: int):
    return (random.Random(seed).random(), float(np.random.RandomState(np_seed).rand()),
            torch.rand(1, generator=torch.Generator().manual_seed(seed)).item())


@pytest.mark.parametrize("seed, world, rank, own", [(3, 4, 2, 14), (5, 1, 0, 5), (0, 2, 1, 1)])
def test_seed_process_gives_each_rank_its_own_seed(seed, world, rank, own):
    seed_process(seed, world, rank)
    assert _firsts() == _expected_firsts(own, own)


def test_seed_process_large_seed_wraps_for_numpy():
    own = 2 ** 32 + 100  # numpy takes seeds below 2 ** 32: it gets own mod 2 ** 32
    seed_process(own)
    assert _firsts() == _expected_firsts(own, 100)


def test_rng_state_from_a_gpu_run_restores_on_a_cpu():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = rng_state(CPU)
    state["cuda"] = {"device": 0, "state": torch.zeros(16, dtype=torch.uint8)}  # as saved by a GPU run
    first = _firsts()
    set_rng_state(state, CPU)  # the CUDA part is ignored on a CPU
    assert _firsts() == first


def test_restore_warning_names_both_process_counts(caplog):
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        assert not restore_rng_states([rng_state(CPU)] * 3, 0, 2, CPU, LOG)
        assert not restore_rng_states({"torch": 0}, 0, 2, CPU, LOG, where="old.pt")
    lines = caplog.text.splitlines()
    assert "checkpoint: saved by 3 processes, resumed by 2: RNG streams restart" in lines[0]
    assert "old.pt: saved by an older version, without per-rank states, resumed by 2" in lines[1]


def _gather_worker(rank: int, world: int, init: str, out: str):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        seed_process(7, world, rank)
        states = gather_rng_states(CPU)
        if rank == 0:
            torch.save(states, out)
    finally:
        dist.destroy_process_group()


def test_gather_rng_states_one_per_rank_in_rank_order(tmp_path):
    # Rank 0 runs in this process (so coverage-based test selection, e.g. mutmut's, sees the call), rank 1
    # in a forked child.
    args = (2, f"file://{tmp_path / 'init'}", str(tmp_path / "states.pt"))
    child = mp.get_context("fork").Process(target=_gather_worker, args=(1, *args))
    child.start()
    _gather_worker(0, *args)
    child.join()
    assert child.exitcode == 0
    states = torch.load(tmp_path / "states.pt", weights_only=False)
    assert len(states) == 2
    for rank, state in enumerate(states):  # rank r was seeded with 7 * 2 + r
        assert torch.equal(state["torch"], torch.Generator().manual_seed(14 + rank).get_state())
        set_rng_state(state, CPU)
        assert _firsts() == _expected_firsts(14 + rank, 14 + rank)


def test_gather_rng_states_single_process():
    torch.manual_seed(4)
    states = gather_rng_states(CPU)
    assert len(states) == 1 and torch.equal(states[0]["torch"], torch.Generator().manual_seed(4).get_state())


# ----------------------------------------------------------------------------------------------
# Checkpoint discovery
# ----------------------------------------------------------------------------------------------
def test_newest_checkpoint_ties_keep_the_given_order_and_reasons_are_named(tmp_path, caplog):
    a, b, bad = tmp_path / "latest.pt", tmp_path / "step_5.pt", tmp_path / "step_9.pt"
    torch.save({"which": "a"}, a)
    torch.save({"which": "b"}, b)
    torch.save([1, 2], bad)  # loads, but is not a training checkpoint (default validity: a dict)
    assert load_newest_checkpoint([(5, a), (5, b)], LOG)[1] == {"which": "a"}
    assert load_newest_checkpoint([(5, b), (5, a)], LOG)[1] == {"which": "b"}
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        assert load_newest_checkpoint([(5, a), (9, bad)], LOG)[0] == a
    assert f"skipping unreadable checkpoint {bad} (not a training checkpoint); falling back to {a}" in caplog.text
    (tmp_path / "cut.pt").write_bytes(a.read_bytes()[:50])
    with pytest.raises(CheckpointError) as err:
        load_newest_checkpoint([(9, bad), (10, tmp_path / "cut.pt")], LOG)
    lines = str(err.value).splitlines()
    assert lines[0] == "no readable checkpoint to resume from:"
    assert lines[1].startswith(f"  {tmp_path / 'cut.pt'} (could not read") and lines[2] == f"  {bad} (not a training checkpoint)"
    assert lines[3] == "move these files away to start over"


def test_preloaded_checkpoints_are_not_read_again(tmp_path):
    gone = tmp_path / "step_7.pt"  # never written: only the preloaded contents can be returned
    assert load_newest_checkpoint([(7, gone)], LOG, preloaded={gone: {"step": 7}}) == (gone, {"step": 7})
    with pytest.raises(CheckpointError, match=r"step_7.pt \(checkpoint not found"):
        load_newest_checkpoint([(7, gone)], LOG, preloaded={tmp_path / "other.pt": {}})


def test_prune_keep_one_negative_and_vanished_files(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        torch.save({}, tmp_path / f"{step}.pt")
    assert prune_checkpoints(tmp_path, keep=-1) == [] and len(list(tmp_path.iterdir())) == 3  # < 0: keep all
    assert prune_checkpoints(tmp_path, keep=1) == [tmp_path / "1.pt", tmp_path / "2.pt"]
    assert [p.name for p in tmp_path.iterdir()] == ["3.pt"]
    # A file another process pruned between listing and deleting is not an error.
    monkeypatch.setattr(training, "numbered_checkpoints", lambda folder, prefix: [(1, tmp_path / "1.pt"), (3, tmp_path / "3.pt")])
    assert prune_checkpoints(tmp_path, keep=1) == [tmp_path / "1.pt"]


# ----------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", None),
                                              ("none", None)])
def test_autocast_context(precision, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # building a CUDA autocast on a machine without CUDA warns
        ctx = autocast_context(torch.device("cuda", 0), precision)
    if dtype is None:
        assert not isinstance(ctx, torch.autocast)
    else:
        assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == dtype
    assert not isinstance(autocast_context(CPU, precision), torch.autocast)  # never on a CPU
