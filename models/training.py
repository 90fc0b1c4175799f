"""What both trainers share (scripts/train_tokenizer.py and evaluation/generation/train_c2i.py).

- `LRSchedule`: linear warm-up, then constant / cosine / linear decay to `end_lr`; stored in checkpoints
  as a plain dict so a resumed run can say when its schedule changed.
- `update_ema` / `ema_decay_at`: ema <- decay * ema + (1 - decay) * weights, optionally with the
  (1 + t) / (10 + t) warm-up of the decay.
- `StepBatchSampler`: the data order, deterministic in (seed, epoch), resumable mid-epoch, equal for
  any number of processes; `data_position` turns a checkpoint back into (epoch, step in the epoch).
- `seed_process`, `rng_state` / `set_rng_state` / `gather_rng_states` / `restore_rng_states`: python,
  numpy, torch CPU and the process's CUDA device, one seed and one state per rank.
- `numbered_checkpoints` / `load_newest_checkpoint` / `prune_checkpoints`: the numbered training
  checkpoints of a folder, the newest one that still loads (a truncated file is skipped, with a warning),
  and keeping only the last N.
- `autocast_context`: bf16/fp16 autocast on GPU, nothing on CPU.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from models.checkpoint import CheckpointError, load_checkpoint

SCHEDULES = ("constant", "cosine", "linear")


# ----------------------------------------------------------------------------------------------
# Learning-rate schedule
# ----------------------------------------------------------------------------------------------
@dataclass
class LRSchedule:
    """Learning rate of optimizer step `step` (0-based): `lr * (step + 1) / warmup_steps` during warm-up,
    then `end_lr + (lr - end_lr) * r` with r = 1 (constant), (1 + cos(pi p)) / 2 (cosine) or 1 - p (linear),
    p = (step - warmup_steps) / (total_steps - warmup_steps) clipped to [0, 1]."""

    lr: float
    total_steps: int
    warmup_steps: int = 0
    kind: str = "cosine"
    end_lr: float = 0.0

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule {self.kind!r}: expected one of {SCHEDULES}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        ratio = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1.0 - progress
        return self.end_lr + (self.lr - self.end_lr) * ratio

    def state_dict(self) -> dict:
        return asdict(self)

    def log_change(self, saved: Optional[dict], log: logging.Logger) -> None:
        """On resume: the command line decides the schedule; say so when it differs from the saved one."""
        if saved and saved != self.state_dict():
            log.warning(f"learning-rate schedule changed on resume: {saved} -> {self.state_dict()}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ----------------------------------------------------------------------------------------------
# EMA of the weights
# ----------------------------------------------------------------------------------------------
def ema_decay_at(decay: float, step: int, warmup: bool) -> float:
    """The decay of update `step` (0-based). With warm-up it is min(decay, (1 + step) / (10 + step)), so a
    short run averages its recent weights rather than keeping the random initialisation."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for every parameter (one fused pass); buffers (running
    statistics such as codebook usage) are copied by name."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    buffers = dict(model.named_buffers())
    for name, b in ema.named_buffers():
        if name in buffers:
            b.copy_(buffers[name])


# ----------------------------------------------------------------------------------------------
# Data order
# ----------------------------------------------------------------------------------------------
class StepBatchSampler:
    """Per-rank micro-batches for optimizer steps, deterministic in (seed, epoch) and resumable mid-epoch.

    Each epoch shuffles the N indices with a generator seeded by seed + epoch and keeps
    steps_per_epoch = N // global_batch whole global batches. Global batch s is split in world_size
    contiguous shares (rank r takes share r), each share in `accum` micro-batches. The union over
    ranks and micro-batches of step s is the same set of indices whatever world_size and accum are."""

    def __init__(self, num_samples: int, global_batch: int, world_size: int = 1, rank: int = 0,
                 accum: int = 1, seed: int = 0, shuffle: bool = True):
        if global_batch % (world_size * accum):
            raise ValueError(
                f"global batch {global_batch} is not divisible by world size {world_size} x gradient "
                f"accumulation steps {accum}"
            )
        if num_samples < global_batch:
            raise ValueError(f"the dataset has {num_samples} training rows, fewer than the global batch of {global_batch}")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.world_size, self.rank, self.accum = world_size, rank, accum
        self.micro = global_batch // (world_size * accum)
        self.seed, self.shuffle = seed, shuffle
        self.steps_per_epoch = num_samples // global_batch
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate epoch `epoch`, skipping its first `start_step` optimizer steps (resume)."""
        self.epoch, self.start_step = epoch, start_step

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self):
        perm = self.order(self.epoch)
        share = self.global_batch // self.world_size
        for step in range(self.start_step, self.steps_per_epoch):
            mine = perm[step * self.global_batch + self.rank * share:][:share]
            for a in range(self.accum):
                yield mine[a * self.micro:(a + 1) * self.micro].tolist()

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum

    def state_dict(self) -> dict:
        """What the data order depends on (saved in checkpoints; `data_position` compares it)."""
        return {"num_samples": self.num_samples, "global_batch_size": self.global_batch, "seed": self.seed}


def data_position(saved: Optional[dict], sampler: StepBatchSampler, step: int, epoch: int, step_in_epoch: int,
                  log: logging.Logger, where: str = "checkpoint") -> tuple[int, int]:
    """(epoch, step in the epoch) to resume at. The saved position holds when the data order is the same
    (`saved` is `sampler.state_dict()` of the saving run); otherwise the epoch `step` falls in restarts."""
    if step_in_epoch >= sampler.steps_per_epoch:  # saved at the end of an epoch
        epoch, step_in_epoch = epoch + 1, 0
    if saved == sampler.state_dict():
        return epoch, step_in_epoch
    epoch = step // sampler.steps_per_epoch
    log.warning(f"{where}: data order changed ({saved} -> {sampler.state_dict()}); starting epoch {epoch} from its beginning")
    return epoch, 0


# ----------------------------------------------------------------------------------------------
# RNG state (one per rank, so dropout and augmentation continue exactly after a resume)
# ----------------------------------------------------------------------------------------------
def seed_process(seed: int, world_size: int = 1, rank: int = 0) -> None:
    """Seed python, numpy and torch (CPU and GPU) with this rank's own seed (seed * world_size + rank), so
    ranks draw different dropout and augmentation; a single process gets `seed` itself."""
    own = seed * world_size + rank
    random.seed(own)
    np.random.seed(own % 2 ** 32)
    torch.manual_seed(own)


def rng_state(device: torch.device) -> dict:
    """This process's python, numpy, torch CPU and (on GPU) CUDA generator states, in tensors and plain
    types that `torch.load(weights_only=True)` reads back."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = {"device": device.index or 0, "state": torch.cuda.get_rng_state(device)}
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"]["state"], device)


def gather_rng_states(device: torch.device) -> list[dict]:
    """Every rank's `rng_state`, in rank order (a collective: every rank calls it)."""
    state = rng_state(device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, state)
    return out


def restore_rng_states(states: Optional[list], rank: int, world_size: int, device: torch.device,
                       log: logging.Logger, where: str = "checkpoint") -> bool:
    """Set this rank's generators from `gather_rng_states` output; False (and a warning) when the run was
    saved by another number of processes, whose streams cannot be mapped onto this one's."""
    if not isinstance(states, list) or len(states) != world_size:
        saved_by = f"{len(states)} processes" if isinstance(states, list) else "an older version, without per-rank states"
        log.warning(f"{where}: saved by {saved_by}, resumed by {world_size}: RNG streams restart")
        return False
    set_rng_state(states[rank], device)
    return True


# ----------------------------------------------------------------------------------------------
# Numbered checkpoints: discovery with fallback, pruning
# ----------------------------------------------------------------------------------------------
def numbered_checkpoints(folder: str | Path, prefix: str = "") -> list[tuple[int, Path]]:
    """(step, path) of the files `<prefix><digits>.pt` in `folder`, oldest first."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.pt")
    found = []
    for p in Path(folder).glob(f"{prefix}*.pt"):
        m = pattern.fullmatch(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def load_newest_checkpoint(candidates: list[tuple[int, Path]], log: logging.Logger,
                           valid: Callable[[dict], bool] = lambda c: isinstance(c, dict),
                           preloaded: Optional[dict] = None) -> tuple[Optional[Path], Optional[dict]]:
    """The newest of (step, path) `candidates` that loads and passes `valid`, as (path, checkpoint); ties
    keep the order given. A newer file that does not (truncated by a full disk, a half-copied folder) is
    skipped with a warning naming it and the file used instead. (None, None) when there are no candidates;
    an error when there are some but none loads (starting over would silently throw a run away).
    `preloaded` maps paths already read (to learn their step) to their contents."""
    skipped = []
    for _, path in sorted(candidates, key=lambda c: c[0], reverse=True):
        try:
            ckpt = preloaded[path] if preloaded and path in preloaded else load_checkpoint(path)
        except (CheckpointError, OSError) as e:
            skipped.append(f"{path} ({str(e).splitlines()[0][:200]})")
            continue
        if not valid(ckpt):
            skipped.append(f"{path} (not a training checkpoint)")
            continue
        for s in skipped:
            log.warning(f"skipping unreadable checkpoint {s}; falling back to {path}")
        return path, ckpt
    if skipped:
        raise CheckpointError("no readable checkpoint to resume from:\n  " + "\n  ".join(skipped)
                              + "\nmove these files away to start over")
    return None, None


def prune_checkpoints(folder: str | Path, keep: int, prefix: str = "") -> list[Path]:
    """Delete all but the newest `keep` numbered checkpoints (`keep` <= 0: keep all); other files
    (latest.pt, final weights) are never touched. Returns the deleted paths."""
    old = numbered_checkpoints(folder, prefix)[:-keep] if keep > 0 else []
    for _, p in old:
        p.unlink(missing_ok=True)
    return [p for _, p in old]


# ----------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------
def autocast_context(device: torch.device, precision: str):
    """bf16/fp16 autocast on GPU; on a CPU (or with "none"/"fp32") nothing: there it is slower and
    changes the numbers for nothing."""
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if device.type != "cuda" or precision not in dtypes:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtypes[precision])
