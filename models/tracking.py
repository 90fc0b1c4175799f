"""Experiment tracking for both trainers: tensorboard by default, Weights & Biases when asked.

    tracker = Tracker(out_dir / "tb", args, tensorboard=True)   # on rank 0 only
    tracker.add_scalar("train/loss", 0.3, step); tracker.add_image("val/grid", image_chw_in_0_1, step)
    tracker.close()

`Tracker` has the SummaryWriter calls the trainers use (add_scalar, add_image, close) and sends each to
tensorboard (unless --no-tensorboard) and to wandb (with --wandb). wandb is optional and off by default:
`--wandb-project`, `--wandb-run-name`, `--wandb-entity` pick where the run goes; WANDB_MODE=offline (or
WANDB_MODE=disabled) and the other WANDB_* variables are honoured by wandb itself. wandb files go to
OUT/wandb; the run id is kept in OUT/wandb_run_id so a resumed training continues the same wandb run.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


def add_tracking_args(group: argparse._ActionsContainer) -> None:
    """--wandb and its options, added to a trainer's logging argument group."""
    group.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (WANDB_MODE=offline works)")
    group.add_argument("--wandb-project", default="meditok", help="wandb project")
    group.add_argument("--wandb-run-name", default=None, help="wandb run name (default: the output folder's name)")
    group.add_argument("--wandb-entity", default=None, help="wandb entity (user or team; default: wandb's)")


class Tracker:
    """Rank-0 logger: tensorboard under `log_dir`, and wandb when `args.wandb` (files in log_dir/../wandb)."""

    def __init__(self, log_dir: str | os.PathLike, args: argparse.Namespace | None = None, tensorboard: bool = True):
        self.log_dir = Path(log_dir)
        self.tb = self.run = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.log_dir))
        if args is not None and getattr(args, "wandb", False):
            self.run = self._start_wandb(args)

    def _start_wandb(self, args):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("--wandb needs the wandb package: pip install wandb") from e
        root = self.log_dir.parent
        root.mkdir(parents=True, exist_ok=True)
        id_file = root / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else None  # None: wandb makes one
        config = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in vars(args).items()}
        run = wandb.init(project=args.wandb_project, entity=args.wandb_entity, name=args.wandb_run_name or root.name,
                         dir=str(root), id=run_id, resume="allow" if run_id else None, config=config)
        if run_id is None:
            id_file.write_text(run.id + "\n")
        return run

    def add_scalar(self, tag: str, value: Any, step: int) -> None:
        if self.tb is not None:
            self.tb.add_scalar(tag, value, step)
        if self.run is not None:
            self.run.log({tag: float(value)}, step=step)

    def add_image(self, tag: str, image, step: int) -> None:
        """image: [3, H, W] tensor in [0, 1] (SummaryWriter's default layout)."""
        if self.tb is not None:
            self.tb.add_image(tag, image, step)
        if self.run is not None:
            import wandb

            array = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
            self.run.log({tag: wandb.Image(array)}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.run is not None:
            self.run.finish()
