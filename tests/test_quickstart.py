"""scripts/quickstart.sh end to end, at toy settings: every stage runs, the report is complete, and a
rerun skips every finished stage. (The real settings and their metrics are in the README.)"""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
STAGES = ["1_data", "2_tokenizer", "3_tokenize", "4_gpt", "5_sample", "6_classifier", "7_eval_tokenizer",
          "8_eval_generation"]


def run_quickstart(out: Path, mode: str = "c2i") -> subprocess.CompletedProcess:
    env = dict(
        os.environ, OUT=str(out), DATA_IMAGE_SIZE="32", IMAGE_SIZE="32", TOKENIZER_STEPS="6",
        TOKENIZER_EPOCHS="1", GPT_STEPS="3", GPT_BATCH_SIZE="8", SAMPLES_PER_CLASS="2", CLASSIFIER_EPOCHS="1",
        GRID_PER_CLASS="2", INFER_BATCH_SIZE="32", T2I_SAMPLES_PER_PROMPT="1",
    )
    return subprocess.run(["bash", "scripts/quickstart.sh", mode], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_quickstart_runs_every_stage_and_resumes(tmp_path):
    out = tmp_path / "qs"
    first = run_quickstart(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for name in STAGES:
        assert (out / "stages" / f"{name}.seconds").is_file(), name
        assert f"== {name}: done in" in first.stdout

    report = json.loads((out / "report.json").read_text())
    for key in ("recon_psnr_db", "sample_class_accuracy", "fid_classifier", "total_seconds"):
        assert np.isfinite(report[key]), key
    assert 0.0 <= report["sample_class_accuracy"] <= 1.0
    assert report["recon_psnr_db"] > 5.0  # a decoder that outputs anything image-like, even after a few steps
    assert abs(report["total_seconds"] - sum(report["stage_seconds"].values())) < 1.0
    assert (out / "report.md").read_text().startswith("# Quickstart report")

    samples = np.load(next((out / "samples").glob("*/samples.npz")))
    assert samples["samples"].shape == (4 * 2, 32, 32, 3) and sorted(samples["labels"]) == [0, 0, 1, 1, 2, 2, 3, 3]
    with Image.open(out / "grid.png") as grid:
        assert grid.height >= 4 * 32 and grid.width >= 2 * 2 * 32  # 4 class rows, 2 real + 2 generated each

    second = run_quickstart(out)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    for name in STAGES:
        assert f"== {name}: skipped" in second.stdout
    assert json.loads((out / "report.json").read_text())["stage_seconds"] == report["stage_seconds"]

    # The t2i mode reuses the data, tokenizer, codes and classifier, and runs only its own stages.
    t2i = run_quickstart(out, "t2i")
    assert t2i.returncode == 0, t2i.stdout[-3000:] + t2i.stderr[-3000:]
    for name in ("1_data", "2_tokenizer", "3_tokenize", "6_classifier"):
        assert f"== {name}: skipped" in t2i.stdout
    for name in ("t2i_1_captions", "t2i_2_gpt", "t2i_3_sample"):
        assert f"== {name}: done in" in t2i.stdout
    t2i_report = json.loads((out / "t2i" / "report.json").read_text())
    assert t2i_report["samples"] == 10 and t2i_report["heldout"]["samples"] == 1  # 10 captions, one held out
    for key in ("t2i_orientation_accuracy", "t2i_level_mae", "t2i_level_mae_shuffled"):
        assert np.isfinite(t2i_report[key]), key
    assert (out / "t2i" / "grid.png").is_file()
