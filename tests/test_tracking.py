"""models/tracking.py: tensorboard by default, wandb (offline) when asked, one run across a resume."""
from __future__ import annotations

import argparse

import pytest
import torch

from models.tracking import Tracker, add_tracking_args


def parse(argv):
    parser = argparse.ArgumentParser()
    add_tracking_args(parser)
    return parser.parse_args(argv)


def test_tensorboard_only_by_default(tmp_path):
    args = parse([])
    assert args.wandb is False
    tracker = Tracker(tmp_path / "tb", args)
    tracker.add_scalar("train/loss", 1.5, 1)
    tracker.close()
    assert tracker.run is None and list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert not (tmp_path / "wandb").exists()


@pytest.mark.slow
def test_wandb_offline_logs_scalars_and_images_and_resumes_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = parse(["--wandb", "--wandb-project", "test", "--wandb-run-name", "tiny"])
    tracker = Tracker(tmp_path / "tb", args, tensorboard=False)
    tracker.add_scalar("train/loss", 0.5, 1)
    tracker.add_image("val/grid", torch.rand(3, 8, 8), 1)
    run_id = tracker.run.id
    tracker.close()
    assert tracker.tb is None and (tmp_path / "wandb_run_id").read_text().strip() == run_id
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert runs and list(runs[0].glob("*.wandb"))
    again = Tracker(tmp_path / "tb", args, tensorboard=False)  # a resumed training: the same wandb run
    assert again.run.id == run_id
    again.close()
