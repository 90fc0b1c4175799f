"""The benchmark scripts still run (tiny settings) and print their tables; timing itself is not tested."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CASES = {
    "bench_generate": ["--models", "small", "--grid", "2", "--naive-positions", "2", "--threads", "1"],
    "bench_train_c2i": ["--models", "GPT-Tiny", "--grid", "4", "--steps", "1", "--warmup", "1", "--repeats", "1"],
    "bench_fsdp": ["--models", "GPT-Tiny", "--world-sizes", "2", "--measure", "GPT-Tiny:fsdp:2", "--grid", "4",
                   "--speed-steps", "0"],
    "bench_batch_infer": ["--model", "MedITok-Tiny", "--image_size", "32", "--num_images", "4", "--batch_size", "2",
                          "--num_workers", "0", "--repeats", "1"],
}
EXPECTED = {"bench_generate": "| GPT-Small", "bench_train_c2i": "GPT-Tiny", "bench_batch_infer": "pipeline overhead",
            "bench_fsdp": "measured vs computed, GPT-Tiny fsdp N=2"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_runs(name):
    out = subprocess.run([sys.executable, "-m", f"bench.{name}", *CASES[name]], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert EXPECTED[name] in out.stdout, out.stdout[-2000:]
