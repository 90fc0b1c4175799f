"""Plant known, costly bugs one at a time in a scratch copy of the tree and show that the tests catch each.

    python -m scripts.planted_bugs              # every bug, with the test files that guard it
    python -m scripts.planted_bugs psnr ema     # some of them
    python -m scripts.planted_bugs --all-tests  # every bug against the whole suite except slow tests (long)

These are the silent bugs an audit of the suite once found unguarded (issue 19): each must make at least one
test fail. A bug whose code has moved (its `old` text is no longer in the file exactly once) is an error, not
a pass: update the edit below. Not part of CI: it copies the tree and reruns test files once per bug.
Exit status 1 when a bug survives or cannot be planted.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from scripts.cli import ArgumentParser

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Bug:
    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


BUGS = (
    Bug("decoder_grid", "the tokenizer decoder reads its token grid transposed",
        "models/meditok.py",
        "x = x.transpose(1, 2).reshape(B, C, *hw)",
        "x = x.transpose(1, 2).reshape(B, C, hw[1], hw[0]).transpose(2, 3)",
        ("tests/test_meditok_mutants.py", "tests/test_meditok.py")),
    Bug("ema", "the EMA update moves by `decay` where `1 - decay` belongs",
        "models/training.py",
        "[p.detach() for p in model.parameters()], 1.0 - decay)",
        "[p.detach() for p in model.parameters()], decay)",
        ("tests/test_training.py", "tests/test_training_mutants.py")),
    Bug("rank_rows", "every rank of batch_infer processes every row",
        "batch_infer.py",
        "for name in list(first_row)[rank::world]}",
        "for name in list(first_row)}",
        ("tests/test_batch_infer_mutants.py", "tests/test_batch_infer.py")),
    Bug("sample_labels", "labels reversed inside a sampling batch",
        "evaluation/generation/sample_c2i.py",
        "cond = torch.tensor([labels[i] for i in batch], device=device)",
        "cond = torch.tensor([labels[i] for i in batch][::-1], device=device)",
        ("tests/test_sample_c2i_refs.py", "tests/test_sample_c2i.py")),
    Bug("psnr", "PSNR with the wrong data range (+6 dB)",
        "evaluation/metrics.py",
        "peak_signal_noise_ratio(a, b, data_range=1.0,",
        "peak_signal_noise_ratio(a, b, data_range=2.0,",
        ("tests/test_metrics.py", "tests/test_metric_ranges.py")),
    Bug("superior_flip", "coronal/sagittal slices lose the superior-at-top flip",
        "datasets/readers.py",
        "        out = out[::-1]  # coronal / sagittal slices: superior at the top",
        "        pass",
        ("tests/test_readers.py",)),
)


def copy_tree(dest: Path) -> None:
    """The working tree as it is (tracked and untracked files, not what .gitignore excludes)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def plant(tree: Path, bug: Bug) -> None:
    path = tree / bug.path
    text = path.read_text()
    count = text.count(bug.old)
    if count != 1:
        raise LookupError(f"{bug.path}: the text to change occurs {count} times (expected once): {bug.old!r}")
    path.write_text(text.replace(bug.old, bug.new))


def run_tests(tree: Path, tests: list[str]) -> tuple[int, str]:
    """(failed test count, pytest's summary line); the tests run in the planted copy."""
    env = {**os.environ, "PYTHONSAFEPATH": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-m", "not slow", *tests]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else proc.stderr.strip()[-200:]
    failed = sum(int(n) for n in re.findall(r"(\d+) (?:failed|error)", summary))
    if proc.returncode not in (0, 1) and failed == 0:
        failed = -1  # pytest itself broke (collection, usage): not a catch
    return failed, summary


def main(args) -> int:
    chosen = [b for b in BUGS if not args.bugs or b.name in args.bugs]
    unknown = set(args.bugs) - {b.name for b in BUGS}
    if unknown:
        raise SystemExit(f"unknown bug(s) {sorted(unknown)}; known: {[b.name for b in BUGS]}")
    results = []
    with tempfile.TemporaryDirectory(prefix="planted-") as tmp:
        clean = Path(tmp) / "clean"
        clean.mkdir()
        copy_tree(clean)
        # the control: without a planted bug the same tests pass, so a failure below is the bug's doing
        control = ["tests"] if args.all_tests else sorted({t for b in chosen for t in b.tests})
        failed, summary = run_tests(clean, control)
        print(f"{'(no bug)':14s} {'passes' if failed == 0 else 'FAILS':10s} {summary}", flush=True)
        if failed != 0:
            print("the tests fail without a planted bug: fix them first", file=sys.stderr)
            return 1
        for bug in chosen:
            tree = Path(tmp) / bug.name
            shutil.copytree(clean, tree)
            t0 = time.time()
            try:
                plant(tree, bug)
                failed, summary = run_tests(tree, ["tests"] if args.all_tests else list(bug.tests))
            except LookupError as e:
                failed, summary = -1, str(e)
            results.append((bug, failed, summary))
            verdict = "caught" if failed > 0 else "NOT CAUGHT" if failed == 0 else "ERROR"
            print(f"{bug.name:14s} {verdict:10s} {summary}  ({time.time() - t0:.0f} s)", flush=True)
            shutil.rmtree(tree)
    print("\n| bug | planted in | tests run | result |\n|---|---|---|---|")
    for bug, failed, summary in results:
        tests = "whole suite (not slow)" if args.all_tests else ", ".join(Path(t).name for t in bug.tests)
        result = f"caught: {summary}" if failed > 0 else f"**not caught**: {summary}" if failed == 0 else summary
        print(f"| {bug.what} | `{bug.path}` | {tests} | {result} |")
    return 0 if all(failed > 0 for _, failed, _ in results) else 1


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bugs", nargs="*", help=f"which bugs (default all): {', '.join(b.name for b in BUGS)}")
    p.add_argument("--all-tests", action="store_true", help="run the whole suite (except slow tests) per bug")
    return p.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))
