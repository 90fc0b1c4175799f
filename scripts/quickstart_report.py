"""Assemble the quickstart's results: grid.png, report.json and report.md.

    python -m scripts.quickstart_report --out outputs/quickstart --meta_path outputs/quickstart/data/metadata.csv \
        --samples outputs/quickstart/samples --stage_dir outputs/quickstart/stages \
        --tokenizer_eval outputs/quickstart/eval/tokenizer/tokenizer_metrics.json \
        --generation_eval outputs/quickstart/eval/generation/generation_metrics.json \
        --classifier_eval outputs/quickstart/eval/classifier.json

grid.png has one row per class: real images of the class, the tokenizer's reconstructions of those same
images (with --tokenizer and --codes), then generated ones.
report.json holds the headline metrics (recon_psnr_db, sample_class_accuracy, fid_classifier), the
seconds and the command of every stage (stage_seconds, total_seconds, stage_commands) and the targets;
report.md says the same in a few lines. Metrics that were not produced are reported as null, never guessed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datasets.code_dataset import find_code_metadata, load_codes
from datasets.files import atomic_write_text, to_uint8, write_png
from datasets.metadata import filter_split, parse_label, read_metadata, resolve_path
from models.meditok import build_meditok
from scripts.cli import ArgumentParser

# report.json key -> (which evaluation JSON, path of keys in it).
METRICS = {
    "recon_psnr_db": ("tokenizer", ("recon_psnr_db",)),
    "recon_ssim": ("tokenizer", ("recon_ssim",)),
    "sample_class_accuracy": ("generation", ("sample_class_accuracy",)),
    "heldout_class_accuracy": ("generation", ("heldout_class_accuracy",)),
    "fid_classifier": ("generation", ("fid",)),
    "fid_classifier_heldout_floor": ("generation", ("heldout_reference", "fid")),
    "kid_classifier": ("generation", ("kid_mean",)),
    "precision": ("generation", ("precision",)),
    "memorisation_nn_ratio": ("generation", ("memorisation", "nn_ratio")),
    "memorisation_fraction_below_heldout_q05": ("generation", ("memorisation", "fraction_below_threshold")),
    "recall": ("generation", ("recall",)),
    "precision_heldout_ceiling": ("generation", ("heldout_reference", "precision")),
    "recall_heldout_ceiling": ("generation", ("heldout_reference", "recall")),
    "precision_recall_k_real": ("generation", ("k_real",)),
    "precision_recall_k_samples": ("generation", ("k_fake",)),
    "classifier_val_accuracy": ("classifier", ("val_accuracy",)),
}
# The quickstart's goals; precision/recall "clearly above 0" is read as at least a quarter.
TARGETS = {"recon_psnr_db": (">=", 27.0), "sample_class_accuracy": (">=", 0.9), "fid_over_heldout_floor": ("<=", 2.0),
           "precision": (">=", 0.25), "recall": (">=", 0.25), "total_seconds": ("<=", 900.0)}


# ----------------------------------------------------------------------------------------------
# Reading the pieces
# ----------------------------------------------------------------------------------------------
def find_samples(path: Path) -> Path:
    """The samples .npz: `path` itself, or the newest .npz anywhere under the folder `path`."""
    if path.is_file():
        return path
    found = sorted(path.rglob("*.npz"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no .npz of generated samples under {path}")
    return found[-1]


def load_samples(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, H, W, C] uint8, labels [N]) from sample_c2i's npz."""
    with np.load(path) as data:
        if "samples" not in data or "labels" not in data:
            raise KeyError(f"{path}: expected arrays 'samples' and 'labels', found {list(data.keys())}")
        samples, labels = data["samples"], data["labels"]
    if samples.ndim != 4 or samples.dtype != np.uint8 or len(samples) != len(labels):
        raise ValueError(f"{path}: samples {samples.shape} {samples.dtype}, labels {labels.shape}: "
                         f"expected [N, H, W, C] uint8 and N labels")
    return samples, labels.astype(np.int64)


def pick_metrics(reports: dict[str, dict]) -> dict:
    """The METRICS found in the evaluation reports; None where absent or not a finite number."""
    picked = {}
    for name, (source, keys) in METRICS.items():
        value = reports.get(source, {})
        for k in keys:
            value = value.get(k) if isinstance(value, dict) else None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        picked[name] = float(value) if ok else None
    return picked


def read_json(path: str | None) -> dict:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        print(f"[report] warning: {p} not found; its metrics are reported as null")
        return {}
    return json.loads(p.read_text())


def read_stages(stage_dir: Path) -> tuple[dict, dict]:
    """({stage: seconds}, {stage: command}) from the `<NN>_<stage>.seconds` / `.cmd` files that quickstart.sh
    writes when a stage finishes, in stage order."""
    seconds, commands = {}, {}
    for f in sorted(stage_dir.glob("*.seconds"), key=lambda p: int(p.stem.split("_", 1)[0])):
        name = f.stem.split("_", 1)[-1]
        seconds[name] = round(float(f.read_text().strip()), 1)
        cmd = f.with_suffix(".cmd")
        commands[name] = cmd.read_text().strip() if cmd.is_file() else None
    return seconds, commands


# ----------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------
def to_tile(image: np.ndarray, size: int) -> np.ndarray:
    """Any 2-D or [H, W, C] uint8 image -> [size, size, 3] uint8."""
    pil = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image)
    return np.asarray(pil.convert("RGB").resize((size, size), Image.BICUBIC))


def example_rows(meta_path: Path, split: str, per_class: int) -> dict[int, list[dict]]:
    """`per_class` rows of each class, evenly spaced through the class's rows of `split`."""
    by_class: dict[int, list[dict]] = {}
    for r in filter_split(read_metadata(meta_path), split):
        by_class.setdefault(parse_label(r, path=meta_path), []).append(r)
    out = {}
    for label, mine in sorted(by_class.items()):
        picks = np.linspace(0, len(mine) - 1, num=min(per_class, len(mine))).round().astype(int)
        out[label] = [mine[i] for i in picks]
    return out


def real_images(rows: dict[int, list[dict]], meta_path: Path) -> dict[int, list[np.ndarray]]:
    return {label: [np.asarray(Image.open(resolve_path(r["identifier"], r, meta_path))) for r in mine]
            for label, mine in rows.items()}


@torch.no_grad()
def reconstructions(rows: dict[int, list[dict]], code_meta: Path, tokenizer_path: str) -> dict[int, list[np.ndarray]]:
    """The tokenizer's own reconstructions of the same rows: their codes (written by batch_infer) decoded.

    Shows what the GPT can at best produce: blur here is the tokenizer's, blur only in the samples is the GPT's.
    """
    coded = {r["identifier"]: r for r in read_metadata(code_meta)}
    tok = build_meditok(tokenizer_path).eval()
    out = {}
    for label, mine in rows.items():
        found = [coded[r["identifier"]] for r in mine if r["identifier"] in coded]
        if found:
            codes = load_codes(found, code_meta, progress=False)  # [n, K, L]
            out[label] = list(to_uint8(tok.idx_to_img(codes)))
    return out


def class_names(meta_path: Path) -> dict[int, str]:
    return {parse_label(r, path=meta_path): r.get("label_name") or str(r["label"]) for r in read_metadata(meta_path)}


def make_grid(blocks: list[dict[int, list[np.ndarray]]], per_class: int, tile: int, pad: int) -> np.ndarray:
    """Rows = classes; one block of `per_class` tiles per entry of `blocks` (e.g. real, reconstructed,
    generated), blocks separated by a wider gap."""
    classes = sorted(set().union(*blocks))
    block_w = per_class * (tile + pad) + 2 * pad
    grid = np.full((len(classes) * (tile + pad) + pad, len(blocks) * block_w + pad, 3), 255, dtype=np.uint8)
    for row, label in enumerate(classes):
        top = pad + row * (tile + pad)
        for b, block in enumerate(blocks):
            for col, img in enumerate(block.get(label, [])[:per_class]):
                left = pad + b * block_w + col * (tile + pad)
                grid[top:top + tile, left:left + tile] = to_tile(img, tile)
    return grid


def by_label(samples: np.ndarray, labels: np.ndarray) -> dict[int, list[np.ndarray]]:
    return {int(k): list(samples[labels == k]) for k in np.unique(labels)}


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------
def fmt_value(v) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def check_targets(report: dict) -> dict:
    out = {}
    for name, (op, bound) in TARGETS.items():
        value = report.get(name)
        ok = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out[name] = {"target": f"{op} {bound:g}", "value": value, "met": ok}
    return out


def markdown(report: dict, names: dict[int, str]) -> str:
    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    def goal(name: str) -> str:
        op, bound = TARGETS[name]
        return f"{op} {bound:g}"

    lines = [
        "# Quickstart report",
        "",
        f"Real medical images ({', '.join(names[k] for k in sorted(names))}) -> MedITok tokenizer -> "
        f"class-conditional GPT -> generated images. `grid.png`: one row per class: real images, the tokenizer's reconstructions of them, generated images.",
        "",
        "| metric | value | target |",
        "|---|---|---|",
        f"| tokenizer reconstruction PSNR on val images (dB) | {fmt(report['recon_psnr_db'], '.2f')} | {goal('recon_psnr_db')} |",
        f"| tokenizer reconstruction SSIM on val images | {fmt(report['recon_ssim'], '.3f')} | |",
        f"| classifier accuracy on generated images | {fmt(report['sample_class_accuracy'], '.3f')} | {goal('sample_class_accuracy')} |",
        f"| FID in the classifier's features (generated vs real train) | {fmt(report['fid_classifier'], '.3f')} | "
        f"floor (real val vs train): {fmt(report['fid_classifier_heldout_floor'], '.3f')}; "
        f"FID / floor {goal('fid_over_heldout_floor')} |",
        f"| precision in the classifier's features (samples inside the real k-NN manifold, k = "
        f"{fmt(report['precision_recall_k_real'], '.0f')}) | {fmt(report['precision'], '.3f')} | "
        f"ceiling (real val vs train): {fmt(report['precision_heldout_ceiling'], '.3f')}; {goal('precision')} |",
        f"| recall (real train inside the samples' k-NN manifold, k = {fmt(report['precision_recall_k_samples'], '.0f')}) "
        f"| {fmt(report['recall'], '.3f')} | ceiling (real val vs train): {fmt(report['recall_heldout_ceiling'], '.3f')}; {goal('recall')} |",
        f"| classifier accuracy on real val images | {fmt(report['classifier_val_accuracy'], '.3f')} | |",
        f"| memorisation: median nearest-train distance, samples / held-out real (< 1: closer to the training "
        f"set than unseen images) | {fmt(report['memorisation_nn_ratio'], '.3f')} | |",
        f"| memorisation: samples closer to a training image than 95 % of held-out real images | "
        f"{fmt(report['memorisation_fraction_below_heldout_q05'], '.3f')} | |",
        f"| total seconds (sum of stages) | {fmt(report['total_seconds'], '.0f')} | {goal('total_seconds')} |",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in report["stage_seconds"].items()],
        "",
        "Precision: share of generated images that fall inside the union of balls around the real training "
        "images, each ball reaching its image's k-th nearest real neighbour (looks like some real image). Recall: "
        "share of real training images inside the same kind of balls around the generated images (how much of the "
        "real variety is covered). k = sqrt(set size): with k = 3 (the value published for 50k images) on these "
        "few hundred consecutive slices/frames each ball only reaches the image's near-copies, and even real "
        "held-out images score far below 1. The ceiling is what held-out real images score in place of the samples.",
        "",
        "Timings are wall-clock seconds of the run that produced each stage's output (stages skipped on a "
        "rerun keep their earlier time); `report.json` lists the command of each stage under `stage_commands`.",
        "",
    ]
    return "\n".join(lines)


def main(args):
    out = Path(args.out)
    meta_path = Path(args.meta_path)
    sources = {"tokenizer": args.tokenizer_eval, "generation": args.generation_eval, "classifier": args.classifier_eval}
    report = pick_metrics({k: read_json(v) for k, v in sources.items()})
    feature_space = read_json(args.generation_eval).get("feature_space")
    if feature_space not in (None, "classifier"):
        print(f"[report] warning: the generation metrics use {feature_space} features, not the classifier's")
    report["stage_seconds"], commands = read_stages(Path(args.stage_dir)) if args.stage_dir else ({}, {})
    report["total_seconds"] = round(sum(report["stage_seconds"].values()), 1) if report["stage_seconds"] else None
    fid, floor = report.get("fid_classifier"), report.get("fid_classifier_heldout_floor")
    report["fid_over_heldout_floor"] = round(fid / floor, 3) if fid is not None and floor else None
    report["targets"] = check_targets(report)
    report["sources"] = dict(sources)
    report["stage_commands"] = commands

    names = class_names(meta_path)
    if args.samples:
        samples_path = find_samples(Path(args.samples))
        samples, labels = load_samples(samples_path)
        rows = example_rows(meta_path, args.real_split, args.per_class)
        blocks = [real_images(rows, meta_path)]
        if args.tokenizer and args.codes:
            blocks.append(reconstructions(rows, find_code_metadata(args.codes), args.tokenizer))
        blocks.append(by_label(samples, labels))
        tile = args.tile or samples.shape[1]
        write_png(make_grid(blocks, args.per_class, tile, args.pad), out / "grid.png")
        report["sources"]["samples"] = str(samples_path)
        report["num_samples"] = int(len(samples))
        report["grid_columns"] = ["real", "reconstructed", "generated"] if len(blocks) == 3 else ["real", "generated"]
        print(f"[report] wrote {out / 'grid.png'} ({len(names)} classes; blocks of {args.per_class}: "
              f"{', '.join(report['grid_columns'])})")

    atomic_write_text(json.dumps(report, indent=1) + "\n", out / "report.json")
    atomic_write_text(markdown(report, names), out / "report.md")
    print(f"[report] wrote {out / 'report.json'} and {out / 'report.md'}")
    for name, t in report["targets"].items():
        print(f"[report] {name:22s} {fmt_value(t['value']):>10} target {t['target']:8s} "
              f"{'met' if t['met'] else 'NOT met' if t['met'] is False else 'n/a'}")


if __name__ == "__main__":
    parser = ArgumentParser(description="Assemble the quickstart's grid.png, report.json and report.md.")
    parser.add_argument("--out", required=True, help="folder for grid.png, report.json, report.md")
    parser.add_argument("--meta_path", required=True, help="metadata of the real images (labels, label_name, split)")
    parser.add_argument("--samples", default=None, help="samples .npz of sample_c2i, or a folder searched for the newest .npz")
    parser.add_argument("--tokenizer_eval", default=None, help="JSON written by the tokenizer evaluation (PSNR/SSIM)")
    parser.add_argument("--generation_eval", default=None, help="JSON written by the generation evaluation (FID, accuracy)")
    parser.add_argument("--classifier_eval", default=None, help="JSON summary written by evaluation.train_classifier")
    parser.add_argument("--stage_dir", default=None,
                        help="folder of the <NN>_<stage>.seconds and .cmd files written by quickstart.sh")
    parser.add_argument("--tokenizer", default=None, help="tokenizer checkpoint: adds its reconstructions to the grid")
    parser.add_argument("--codes", default=None, help="batch_infer output (folder or metadata) holding the real rows' codes")
    parser.add_argument("--real_split", default="train", help="split the real grid images are drawn from")
    parser.add_argument("--per_class", type=int, default=6, help="real and generated images per class in the grid")
    parser.add_argument("--tile", type=int, default=0, help="tile side in pixels (0: the generated images' size)")
    parser.add_argument("--pad", type=int, default=2, help="white pixels between tiles")
    main(parser.parse_args())
