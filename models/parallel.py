"""Data parallelism for the trainers, on the engines PyTorch ships: DDP, FSDP2 (`fully_shard`) and HSDP
(FSDP2 on a 2-D replicate x shard device mesh), activation checkpointing, and training checkpoints saved
through `torch.distributed.checkpoint` (DCP) that load on another number of processes.

    ddp   every process holds the full weights, gradients and optimizer state (16 bytes per parameter
          with fp32 AdamW); gradients are all-reduced.
    fsdp  weights, gradients and optimizer state are split in dim 0 over all processes (16 / N bytes per
          parameter); each transformer block gathers its weights just before its forward and backward.
    hsdp  split within a group of `shard_size` processes (one node by default), replicated across groups:
          the all-gathers stay on the fast intra-node links.

With one process fsdp/hsdp leave the model as it is (nothing to split) but checkpoints are still DCP
folders, so a run can move between 1 and N processes in both directions.

Sharded checkpoint layout (one folder per step, written by all ranks):

    <dir>/<prefix>NNNNNNN/.metadata         DCP index: every tensor's global shape and where its chunks lie
    <dir>/<prefix>NNNNNNN/__<rank>_0.distcp  each rank's chunks of "model.*", "optimizer.*", "ema.*"
    <dir>/<prefix>NNNNNNN/train_state.pt     what is not sharded (step, data position, every rank's RNG,
                                             schedule, config, args), written last by rank 0

A save goes to `<prefix>NNNNNNN.partial/` and is renamed when every file is on disk, so a folder with a
plain numbered name is complete; `sharded_checkpoints` also requires the two index files.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from datasets.files import atomic_save, fsync_dir
from models.checkpoint import CheckpointError, check_state_dict, load_checkpoint, state_dict_to_cpu

DATA_PARALLEL = ("ddp", "fsdp", "hsdp")
TRAIN_STATE = "train_state.pt"
PARTIAL = ".partial"


# ----------------------------------------------------------------------------------------------
# Processes -> device mesh
# ----------------------------------------------------------------------------------------------
def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def device_mesh(mode: str, device: torch.device, shard_size: Optional[int] = None) -> Optional[DeviceMesh]:
    """The mesh fully_shard splits over: all processes (fsdp), or replicate x shard with `shard_size`
    processes per shard group (hsdp; default: the processes of one node, torchrun's LOCAL_WORLD_SIZE).
    None for ddp and for one process."""
    if mode not in DATA_PARALLEL:
        raise ValueError(f"data parallel mode {mode!r}: expected one of {DATA_PARALLEL}")
    _, world_size = world()
    if mode == "ddp" or world_size == 1:
        return None
    if mode == "fsdp":
        return init_device_mesh(device.type, (world_size,), mesh_dim_names=("shard",))
    shard = shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if shard < 1 or world_size % shard:
        raise ValueError(f"hsdp: {world_size} processes cannot be split into shard groups of {shard} "
                         f"(shard size = processes per node unless given)")
    return init_device_mesh(device.type, (world_size // shard, shard), mesh_dim_names=("replicate", "shard"))


# ----------------------------------------------------------------------------------------------
# Wrapping
# ----------------------------------------------------------------------------------------------
def find_blocks(model: nn.Module, block_types: tuple[type, ...]) -> list[nn.Module]:
    """The outermost submodules of the given types, in module order (e.g. the GPT's transformer blocks
    of the main stack and of the multi-codebook head)."""
    blocks: list[nn.Module] = []
    prefixes: list[str] = []
    for name, m in model.named_modules():
        if m is model or not isinstance(m, block_types):
            continue
        if any(name.startswith(p + ".") for p in prefixes):
            continue
        blocks.append(m)
        prefixes.append(name)
    return blocks


def checkpoint_activations(model: nn.Module, block_types: tuple[type, ...]) -> None:
    """Recompute each block's activations in the backward pass instead of storing them (torch's
    non-reentrant checkpoint; the RNG state is replayed, so dropout is the same). State-dict keys do
    not change: the wrapper's hooks remove its `_checkpoint_wrapped_module.` level."""
    targets = set(map(id, find_blocks(model, block_types)))
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: id(m) in targets,
    )


def mixed_precision_policy(device: torch.device, precision: str) -> Optional[MixedPrecisionPolicy]:
    """bf16 weights in forward/backward, fp32 gradient reduction and fp32 master weights (the shards
    the optimizer updates); None (fp32 throughout) on CPU or with precision "none"."""
    if device.type != "cuda" or precision in ("none", "fp32"):
        return None
    if precision != "bf16":
        raise ValueError(f"--mixed-precision {precision}: fsdp/hsdp support bf16 or none (fp16 would need a "
                         f"gradient scaler over sharded gradients)")
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard(model: nn.Module, mesh: Optional[DeviceMesh], block_types: tuple[type, ...],
          mp_policy: Optional[MixedPrecisionPolicy] = None) -> nn.Module:
    """fully_shard each block, then the root (the embeddings, final norm and output layers). In place;
    nothing happens without a mesh (one process)."""
    if mesh is None:
        return model
    kwargs = {"mesh": mesh}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    blocks = find_blocks(model, block_types)
    for i, block in enumerate(blocks):
        # The last block in module order (the GPT's last to run forward, first in backward) stays gathered
        # from its forward to its backward: resharding it in between would only cost one more all-gather.
        fully_shard(block, reshard_after_forward=i < len(blocks) - 1, **kwargs)
    # fully_shard cannot split 0-d parameters (MedITok's frozen logit_scale): they stay whole on every
    # rank, which is only right when nothing trains them (FSDP would not reduce their gradients).
    scalars = {p for p in model.parameters() if p.dim() == 0}
    trained = [n for n, p in model.named_parameters() if p in scalars and p.requires_grad]
    if trained:
        raise ValueError(f"fsdp/hsdp cannot shard the trained 0-d parameters {trained}; make them 1-d")
    # The root's weights are used again at the start of backward: keep them gathered in between.
    fully_shard(model, reshard_after_forward=False, ignored_params=scalars or None, **kwargs)
    return model


def wrap_model(model: nn.Module, mode: str, device: torch.device, block_types: tuple[type, ...], *,
               mesh: Optional[DeviceMesh] = None, precision: str = "none", grad_checkpointing: bool = False,
               compile: bool = False, ema: Optional[nn.Module] = None) -> nn.Module:
    """The module to call for training. `model` (and `ema`, a copy of it) are built identically on every
    rank, on the CPU or on `device`; they end on `device`, whole (ddp, one process) or as shards.

    ddp: `model` stays the plain module (save and load through it); the returned one is DDP(compiled).
    fsdp/hsdp: `model` itself is sharded in place and returned (its parameters become DTensors); `ema`
    is sharded the same way, so the EMA update (`models.training.update_ema`) runs on the local shards.
    Create the optimizer after this call."""
    if mode not in DATA_PARALLEL:
        raise ValueError(f"data parallel mode {mode!r}: expected one of {DATA_PARALLEL}")
    if grad_checkpointing:
        checkpoint_activations(model, block_types)
    _, world_size = world()
    if mode == "ddp" or mesh is None:
        if mode != "ddp" and world_size > 1:
            raise ValueError(f"{mode} with {world_size} processes needs a device mesh (models.parallel.device_mesh)")
        for m in (model, ema):
            if m is not None:
                m.to(device)
    if mode == "ddp":
        train_model = torch.compile(model) if compile else model
        if world_size > 1:
            # Gradients as views into DDP's all-reduce buckets: one gradient copy instead of two.
            train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None,
                              gradient_as_bucket_view=True)
        return train_model
    if compile:  # per block and in place, so the parameter names stay those of the plain model
        for block in find_blocks(model, block_types):
            block.compile()
    shard(model, mesh, block_types, mixed_precision_policy(device, precision))
    if ema is not None:
        shard(ema, mesh, block_types)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule) or any(isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def gathered(module: nn.Module):
    """For code that calls a sharded module's methods other than forward (evaluation helpers such as
    `img_to_idx`): the root's weights are gathered for the duration (its blocks gather their own when
    called). Every rank must enter it. Nothing happens for a plain module."""
    if not isinstance(module, FSDPModule):
        yield module
        return
    module.unshard()
    try:
        yield module
    finally:
        module.reshard()


def gradient_sync(model: nn.Module, sync: bool):
    """Context for one micro-batch's backward. DDP skips the all-reduce until the last micro-batch
    (`no_sync`); FSDP reduce-scatters every micro-batch into the sharded gradients, because holding
    unsharded gradients between micro-batches would cost the full gradient memory FSDP saves."""
    if not sync and isinstance(model, DDP):
        return model.no_sync()
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# Consolidated weights (the single-file checkpoints)
# ----------------------------------------------------------------------------------------------
def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full, unsharded CPU state dict of `module` with the plain model's keys. For a sharded module
    it is a collective (every rank calls it) and only rank 0 receives the tensors (others get {})."""
    if is_sharded(module):
        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state_dict_to_cpu(module)


def load_full_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor], context: str = "") -> None:
    """Load a full state dict (every rank holds it) into a plain or sharded module, strictly; a
    mismatch names the keys (the sharded module's state dict has the global shapes)."""
    check_state_dict(module, state_dict, context)
    if is_sharded(module):
        set_model_state_dict(module, state_dict, options=StateDictOptions(full_state_dict=True, strict=True))
    else:
        module.load_state_dict(state_dict, strict=True)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, optim_sd: dict) -> None:
    """An `Optimizer.state_dict()` saved with the plain model (a single-file training checkpoint) into the
    optimizer of a plain or sharded `model`."""
    if not is_sharded(model):
        optimizer.load_state_dict(optim_sd)
        return
    set_optimizer_state_dict(model, optimizer, _optimizer_state_by_name(optim_sd, model, optimizer),
                             options=StateDictOptions(full_state_dict=True, strict=True))


def _optimizer_state_by_name(optim_sd: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """`optim_sd` keyed by parameter index re-keyed by parameter name, the form set_optimizer_state_dict
    takes. Requires the same parameter groups in the same order (the trainers build them one way)."""
    names = {id(p): n for n, p in _plain_named_parameters(model)}
    groups = optimizer.param_groups
    if len(groups) != len(optim_sd["param_groups"]) or any(
            len(g["params"]) != len(s["params"]) for g, s in zip(groups, optim_sd["param_groups"])):
        raise CheckpointError("optimizer state: its parameter groups differ from the model's")
    index_to_name = {}
    for g, s in zip(groups, optim_sd["param_groups"]):
        for p, idx in zip(g["params"], s["params"]):
            index_to_name[idx] = names[id(p)]
    return {
        "state": {index_to_name[i]: v for i, v in optim_sd["state"].items()},
        "param_groups": [{**s, "params": [index_to_name[i] for i in s["params"]]} for s in optim_sd["param_groups"]],
    }


def _plain_named_parameters(model: nn.Module):
    """named_parameters with the names of the unwrapped model (no activation-checkpoint wrapper level)."""
    for n, p in model.named_parameters():
        yield n.replace("_checkpoint_wrapped_module.", ""), p


# ----------------------------------------------------------------------------------------------
# Sharded training checkpoints (DCP)
# ----------------------------------------------------------------------------------------------
def sharded_checkpoints(folder: str | Path, prefix: str = "") -> list[tuple[int, Path]]:
    """(step, path) of the complete sharded checkpoints `<prefix><digits>/` in `folder`, oldest first.
    Folders of killed saves (`.partial`, or without both index files) are left out."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)")
    found = []
    for p in Path(folder).glob(f"{prefix}*"):
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune_sharded(folder: str | Path, keep: int, prefix: str = "") -> list[Path]:
    """Delete all but the newest `keep` complete sharded checkpoints (`keep` <= 0: keep all)."""
    old = sharded_checkpoints(folder, prefix)[:-keep] if keep > 0 else []
    for _, p in old:
        shutil.rmtree(p, ignore_errors=True)
    return [p for _, p in old]


def is_complete(path: str | Path) -> bool:
    path = Path(path)
    return (path / ".metadata").is_file() and (path / TRAIN_STATE).is_file()


def _training_state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], ema: Optional[nn.Module]) -> dict:
    """The DCP state dict: plain tensors for a plain model, DTensors (local shards) for a sharded one."""
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optimizer": osd}
    else:
        state = {"model": get_model_state_dict(model)}
    if ema is not None:
        state["ema"] = get_model_state_dict(ema)
    return state


def save_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema: Optional[nn.Module],
                 train_state: dict) -> Path:
    """Write the training state to the folder `path` (a collective: every rank calls it with the same
    path, on a file system all ranks see). `train_state` (rank 0's copy is written) holds what is not a
    sharded tensor: step, data position, the RNG states of every rank, config, args."""
    path = Path(path)
    rank, _ = world()
    partial = path.with_name(path.name + PARTIAL)
    if rank == 0:
        for stale in path.parent.glob(f"*{PARTIAL}"):  # left by killed saves; saves never overlap
            shutil.rmtree(stale, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    dcp.save(_training_state(model, optimizer, ema), checkpoint_id=str(partial))
    if rank == 0:
        atomic_save(train_state, partial / TRAIN_STATE)
        if path.exists():  # the same step saved again (e.g. the last step of a resumed run)
            shutil.rmtree(path)
        os.rename(partial, path)
        fsync_dir(path.parent)
    _barrier()
    return path


def load_sharded(path: str | Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                 ema: Optional[nn.Module]) -> dict:
    """Load a `save_sharded` folder into `model`, `optimizer` and `ema` (plain or sharded, any number of
    processes: DCP reads each rank's part of every tensor from whichever files hold it) -> train_state.
    Strict: tensors missing from the checkpoint or not in the model are named. A checkpoint without
    EMA initialises `ema` from the weights."""
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete sharded checkpoint (needs .metadata and {TRAIN_STATE}; "
                              f"a killed save leaves a '{PARTIAL}' folder or misses them)")
    saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    has_ema = any(k.startswith("ema.") for k in saved)
    state = _training_state(model, optimizer, ema if has_ema else None)
    expected = set(_flat_keys(state))
    missing = sorted(k for k in expected if k not in saved and not k.startswith("optimizer."))
    unexpected = sorted(k for k in saved if k.startswith("model.") and k not in expected)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match the model:"
                              + (f"\n  missing ({len(missing)}): {', '.join(missing[:12])}" if missing else "")
                              + (f"\n  unexpected ({len(unexpected)}): {', '.join(unexpected[:12])}" if unexpected else ""))
    dcp.load(state, checkpoint_id=str(path))
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    else:
        set_model_state_dict(model, state["model"])
    if ema is not None:
        if has_ema:
            set_model_state_dict(ema, state["ema"])
        else:
            set_model_state_dict(ema, get_model_state_dict(model))
    return load_checkpoint(path / TRAIN_STATE)


def _flat_keys(state: dict, prefix: str = "") -> Iterable[str]:
    """DCP's flattened key names ("model.layers.0.attention.wqkv.weight", ...) of a nested state dict."""
    for k, v in state.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flat_keys(v, key + ".")
        else:
            yield key


def _barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
