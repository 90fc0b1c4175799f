"""torch.distributed setup and rank-aware logging shared by the torchrun scripts (tokenizer training,
GPT training and sampling). One process without torchrun; NCCL on GPUs, gloo on CPUs under torchrun."""
from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist


def setup_distributed(timeout: datetime.timedelta | None = None) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). torchrun sets RANK/WORLD_SIZE; without them we run in one process.
    `timeout`: how long a collective (e.g. a barrier where ranks wait for the slowest) may block;
    None keeps torch's default."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank), timeout=timeout)
            return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank)
        dist.init_process_group("gloo", timeout=timeout)
        return dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def create_logger(name: str, log_dir: Path | None, rank: int) -> logging.Logger:
    """Rank 0 logs to stdout and log_dir/log.txt (when given); other ranks only warn."""
    logger = logging.getLogger(f"{name}.{os.getpid()}")
    for h in list(logger.handlers):  # a previous main() in this process (tests, benchmarks)
        h.close()
        logger.removeHandler(h)
    logger.propagate = False
    fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    handlers = [logging.StreamHandler()]
    if rank == 0 and log_dir is not None:
        handlers.append(logging.FileHandler(Path(log_dir) / "log.txt"))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    return logger
