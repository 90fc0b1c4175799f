"""The quickstart's text-to-image stage: captions for the demo images, and the prompt-following report.

    python -m scripts.quickstart_t2i captions --data_meta OUT/data/metadata.csv --codes OUT/codes --out OUT/t2i
    python -m scripts.quickstart_t2i report --data_meta ... --t2i_dir OUT/t2i --samples .../samples.npz \
        --classifier OUT/eval/classifier.pt --stage_dir OUT/stages

Captions say what the demo data knows about each image (datasets/demo.py): the orientation and the slice
level in words, e.g. "T1-weighted brain MRI, axial slice, upper third"; echocardiography frames are
"echocardiography frame". Every training brain image also gets a second row captioned with its orientation
alone (`orientation_only`); prompts always name both. The level of a brain slice is its position in its
class's ordered slices, in [0, 1]: inferior -> superior (axial), posterior -> anterior (coronal); for
sagittal slices the distance from the midline (the MNI152 template is left-right symmetric, so the side
cannot be seen). Thirds of it name the level ("medial/middle/lateral third" for sagittal, so that "middle
third" goes with every orientation). One caption is held out of training (--heldout_caption, by default the axial middle third: its training
rows get the split "heldout_caption", which the GPT does not train on), so its words are only seen in
other combinations ("middle third" with coronal and sagittal slices, "axial" with the other levels).

The report measures prompt-following on the samples of every caption:
  t2i_orientation_accuracy   the quickstart classifier's class (3 orientations + echo) vs the prompt's
  t2i_level_mae              brain samples: |level of the nearest real training image of the prompted
                             orientation (pixels, 32 px) - the level the prompt asks (its third's centre)|
  t2i_level_mae_shuffled     the same with the prompts' levels shuffled among samples of the same
                             orientation (mean over 20 permutations): the no-prompt-following baseline
  real_val_level_mae         the same measure on the held-out real images (the measure's own error)
  heldout                    the same numbers for the held-out caption's samples alone
  trained_captions           the same numbers for the other captions' samples
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from datasets.code_dataset import find_code_metadata
from datasets.files import atomic_write_text
from datasets.metadata import read_metadata, resolve_path, write_metadata
from evaluation.features import ClassifierFeatures, from_uint8, load_images
from scripts.cli import ArgumentParser

BRAIN = {  # label_name -> (orientation words, level words for the three thirds of the level)
    "brain_mri_axial": ("axial slice", ("lower third", "middle third", "upper third")),
    "brain_mri_coronal": ("coronal slice", ("posterior third", "middle third", "anterior third")),
    "brain_mri_sagittal": ("sagittal slice", ("medial third", "middle third", "lateral third")),
}
MODALITY = "T1-weighted brain MRI"  # the first words of every brain caption
ECHO = "echocardiography frame"
HELDOUT = "T1-weighted brain MRI, axial slice, middle third"
HELDOUT_SPLIT = "heldout_caption"
NN_SIZE = 32


def slice_index(row: dict) -> int:
    """Position of the row's image in its class's ordered slices/frames (datasets.demo names files so)."""
    match = re.search(r"_(\d+)\.\w+$", str(row["identifier"]))
    if match is None:
        raise ValueError(f"{row['identifier']}: not a datasets.demo file name (<class>_<index>.png)")
    return int(match.group(1))


def levels(rows: list[dict]) -> list[float | None]:
    """Level in [0, 1] of each brain row (None for echo): index / last index of its class; sagittal folded."""
    last: dict[str, int] = {}
    for r in rows:
        last[r["label_name"]] = max(last.get(r["label_name"], 0), slice_index(r))
    out = []
    for r in rows:
        name = r["label_name"]
        if name not in BRAIN:
            out.append(None)
            continue
        f = slice_index(r) / max(last[name], 1)
        out.append(abs(2 * f - 1) if name == "brain_mri_sagittal" else f)
    return out


def caption(label_name: str, level: float | None) -> str:
    if label_name not in BRAIN:
        return ECHO
    orientation, words = BRAIN[label_name]
    return f"{MODALITY}, {orientation}, {words[min(int(level * 3), 2)]}"


def orientation_only(rows: list[dict]) -> list[dict]:
    """A second caption for every training brain image, its orientation alone ("T1-weighted brain MRI, axial
    slice"): same codes, a copy of the row. Reports name the level or not; these rows tie each orientation
    word to all of its images, so a caption pairing it with an unseen level is still read by its orientation."""
    return [dict(r, text=f"{MODALITY}, {BRAIN[r['label_name']][0]}") for r in rows
            if r.get("split") == "train" and r["label_name"] in BRAIN]


def all_prompts(label_names: dict[int, str]) -> list[dict]:
    """Every caption once: {text, label, level (the third's centre, None for echo)}."""
    out = []
    for label, name in sorted(label_names.items()):
        if name in BRAIN:
            out += [{"text": caption(name, (k + 0.5) / 3), "label": label, "level": (k + 0.5) / 3} for k in range(3)]
        else:
            out.append({"text": caption(name, None), "label": label, "level": None})
    return out


# ----------------------------------------------------------------------------------------------
# captions
# ----------------------------------------------------------------------------------------------
def captions(args) -> None:
    """OUT/codes.csv: the code metadata with `text` and `level` (code paths made absolute, so the file can
    live here); OUT/prompts.txt and OUT/prompts.jsonl: every caption once, for sampling and the report."""
    code_meta = find_code_metadata(args.codes)
    rows = read_metadata(code_meta, required=("code_identifier",))
    for r, level in zip(rows, levels(rows)):
        r["code_identifier"] = str(resolve_path(r["code_identifier"], r, code_meta).resolve())
        r["level"] = None if level is None else round(level, 4)
        r["text"] = caption(r["label_name"], level)
        if r["text"] == args.heldout_caption and r.get("split") == "train":
            r["split"] = HELDOUT_SPLIT
    out = Path(args.out)
    rows += orientation_only(rows)
    write_metadata(rows, out / "codes.csv")
    names = {int(r["label"]): r["label_name"] for r in rows}
    prompts = all_prompts(names)
    for p in prompts:
        p["heldout"] = p["text"] == args.heldout_caption
    atomic_write_text("".join(p["text"] + "\n" for p in prompts), out / "prompts.txt")
    atomic_write_text("".join(json.dumps(p) + "\n" for p in prompts), out / "prompts.jsonl")
    held = sum(r.get("split") == HELDOUT_SPLIT for r in rows)
    print(f"[quickstart_t2i] held out of GPT training: {args.heldout_caption!r} ({held} training rows)")
    seen = {(r["text"], r.get("split")) for r in rows}
    print(f"[quickstart_t2i] {len(rows)} captioned rows ({len({r['text'] for r in rows})} distinct captions) in "
          f"{out / 'codes.csv'}; {len(prompts)} prompts in {out / 'prompts.txt'}; captions of val rows: "
          f"{sorted({t for t, s in seen if s == 'val'})}")


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def small(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [-1, 1] -> grayscale [N, NN_SIZE * NN_SIZE] for the nearest-neighbour level."""
    x = F.interpolate(images.float().mean(1, keepdim=True), size=(NN_SIZE, NN_SIZE), mode="bilinear", antialias=True)
    return x.flatten(1)


def nn_levels(queries: torch.Tensor, refs: torch.Tensor, ref_levels: torch.Tensor) -> torch.Tensor:
    return ref_levels[torch.cdist(small(queries), small(refs)).argmin(1)]


def level_errors(images, orientations, asked, refs_by_label) -> np.ndarray:
    """|nearest real training image's level - asked level| per image, searched in the asked orientation."""
    err = np.zeros(len(asked))
    for label, (ref_x, ref_lv) in refs_by_label.items():
        idx = np.flatnonzero(orientations == label)
        if len(idx):
            got = nn_levels(images[idx], ref_x, ref_lv).numpy()
            err[idx] = np.abs(got - asked[idx])
    return err


def report(args) -> None:
    data_meta = Path(args.data_meta)
    rows = read_metadata(data_meta)
    for r, level in zip(rows, levels(rows)):
        r["level"] = level
    image_size = args.image_size
    train = [r for r in rows if r.get("split") == "train" and r["level"] is not None]
    val = [r for r in rows if r.get("split") == "val" and r["level"] is not None]
    train_x, _ = load_images(train, data_meta, image_size=image_size, desc="real train images")
    refs = {}
    for label in sorted({int(r["label"]) for r in train}):
        keep = [i for i, r in enumerate(train) if int(r["label"]) == label]
        refs[label] = (train_x[keep], torch.tensor([train[i]["level"] for i in keep]))

    prompts = {p["text"]: p for p in map(json.loads, Path(args.t2i_dir, "prompts.jsonl").read_text().splitlines())}
    data = np.load(args.samples)
    texts = [str(t) for t in data["prompts"]]
    unknown = sorted(set(texts) - set(prompts))
    if unknown:
        raise ValueError(f"{args.samples}: prompts not in prompts.jsonl: {unknown[:3]}")
    samples = from_uint8(data["samples"])
    labels = np.array([prompts[t]["label"] for t in texts])
    classifier = ClassifierFeatures(args.classifier)
    with torch.no_grad():
        preds = torch.cat([classifier.logits(x).argmax(1) for x in samples.split(64)]).numpy()
    brain = np.array([prompts[t]["level"] is not None for t in texts])
    asked = np.array([prompts[t]["level"] if prompts[t]["level"] is not None else np.nan for t in texts])
    err = level_errors(samples[brain], labels[brain], asked[brain], refs)
    rng = np.random.default_rng(0)
    shuffled = []
    for _ in range(20):
        perm_asked = asked[brain].copy()
        for label in np.unique(labels[brain]):
            idx = np.flatnonzero(labels[brain] == label)
            perm_asked[idx] = perm_asked[rng.permutation(idx)]
        shuffled.append(level_errors(samples[brain], labels[brain], perm_asked, refs).mean())
    val_x, _ = load_images(val, data_meta, image_size=image_size, desc="real val images")
    val_asked = np.array([(min(int(r["level"] * 3), 2) + 0.5) / 3 for r in val])
    val_err = level_errors(val_x, np.array([int(r["label"]) for r in val]), val_asked, refs)

    err_all = np.full(len(texts), np.nan)
    err_all[brain] = err
    per_prompt = {}
    for text in prompts:
        idx = np.flatnonzero(np.array(texts) == text)
        if len(idx):
            per_prompt[text] = {"samples": int(len(idx)), "orientation_accuracy": float((preds[idx] == labels[idx]).mean()),
                                "classified_as": dict(Counter(classifier.class_names[p] for p in preds[idx]).most_common())}
            if prompts[text]["level"] is not None:
                per_prompt[text]["level_mae"] = float(err_all[idx].mean())
    held = np.array([bool(prompts[t].get("heldout")) for t in texts])

    def subset(keep):  # the report's numbers for some of the samples
        kb = keep[brain]
        return {"captions": sorted({t for t, k in zip(texts, keep) if k}), "samples": int(keep.sum()),
                "orientation_accuracy": float((preds[keep] == labels[keep]).mean()),
                "level_mae": float(err[kb].mean()) if kb.any() else None}

    heldout = subset(held) if held.any() else {}
    trained = subset(~held) if (~held).any() else {}
    stages = {p.stem: float(p.read_text()) for p in Path(args.stage_dir).glob("t2i_*.seconds")}
    result = {
        "t2i_orientation_accuracy": float((preds == labels).mean()),
        "t2i_level_mae": float(err.mean()),
        "t2i_level_mae_shuffled": float(np.mean(shuffled)),
        "real_val_level_mae": float(val_err.mean()),
        "samples": int(len(texts)),
        "brain_samples": int(brain.sum()),
        "heldout": heldout,
        "trained_captions": trained,
        "per_prompt": per_prompt,
        "t2i_stage_seconds": stages,
        "t2i_total_seconds": round(sum(stages.values()), 1),
        "targets": {"t2i_orientation_accuracy >= 0.9": float((preds == labels).mean()) >= 0.9,
                    "t2i_level_mae clearly below t2i_level_mae_shuffled": float(err.mean()) < 0.75 * float(np.mean(shuffled))},
        "samples_npz": str(args.samples),
        "level_measure": f"nearest real training image of the prompted orientation, grayscale {NN_SIZE}px L2",
    }
    out = Path(args.t2i_dir)
    atomic_write_text(json.dumps(result, indent=1) + "\n", out / "report.json")
    grid = Path(args.samples).parent / "grid.png"
    if grid.is_file():
        shutil.copyfile(grid, out / "grid.png")
    print(f"[quickstart_t2i] orientation accuracy {result['t2i_orientation_accuracy']:.3f}, level MAE "
          f"{result['t2i_level_mae']:.3f} (shuffled prompts {result['t2i_level_mae_shuffled']:.3f}, real val images "
          f"{result['real_val_level_mae']:.3f}) on {len(texts)} samples -> {out / 'report.json'}, {out / 'grid.png'}")


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("captions", help="caption the demo code metadata; write the prompts")
    c.add_argument("--codes", required=True, help="the quickstart's code metadata (or its folder)")
    c.add_argument("--out", required=True, help="folder for codes.csv, prompts.txt, prompts.jsonl")
    c.add_argument("--heldout_caption", default=HELDOUT, help="caption whose training rows the GPT does not see ('' for none)")
    r = sub.add_parser("report", help="prompt-following metrics of the samples -> T2I_DIR/report.json")
    r.add_argument("--data_meta", required=True, help="the demo's metadata.csv (real images)")
    r.add_argument("--t2i_dir", required=True, help="folder holding prompts.jsonl; report.json and grid.png go there")
    r.add_argument("--samples", required=True, help="samples.npz written by sample_t2i")
    r.add_argument("--classifier", required=True, help="the quickstart's evaluation classifier")
    r.add_argument("--stage_dir", required=True, help="the quickstart's stage markers (t2i_*.seconds)")
    r.add_argument("--image_size", type=int, default=64, help="side the real images are read at")
    args = parser.parse_args(argv)
    {"captions": captions, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
