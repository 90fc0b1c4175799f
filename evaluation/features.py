"""Feature spaces for the distribution metrics, and the image loading they share.

Three spaces, chosen with `build_extractor(space, ...)`; each maps images [B, 3, H, W] in [-1, 1] to [B, D]:
    classifier  penultimate features of a classifier trained on the real training images by
                `python -m evaluation.train_classifier` (its logits give the class-fidelity score)
    inception   Inception-v3 pool features (2048-d) from a LOCAL weights file (or an hf:// reference); nothing
                is downloaded behind the user's back. Two kinds of file are recognised by their shapes:
                - the FID Inception weights (`weights-inception-2015-12-05-6726825d.pth` of torch-fidelity,
                  the same tensors as pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`; 1008-class head):
                  run through torchmetrics' `NoTrainInceptionV3` (torch-fidelity's network, uint8 input,
                  TensorFlow-style resize to 299). FID/KID from these features are the numbers papers report
                  (at matching sample counts and reference sets). Needs the `torch-fidelity` package.
                - torchvision's ImageNet Inception-v3 state dict (1000 classes): a different network, so
                  its FIDs are NOT comparable to published ones; kept for users who only have that file.
    meditok     the MedITok encoder's `forward_features` (mean encoder token)
Every extractor resizes its input to the size it was built for, so real and generated images of any size
go through the same path.
"""
from __future__ import annotations

import inspect
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets.files import to_uint8  # noqa: F401  (re-exported for the evaluators)
from datasets.image_dataset import ImageDataset
from datasets.metadata import parse_label
from models.checkpoint import (
    CheckpointError,
    atomic_save,
    atomic_write_bytes,
    atomic_write_text,
    extract_state_dict,
    load_checkpoint,
    load_state_dict_strict,
    resolve_weights,
)

SPACES = ("classifier", "inception", "meditok")
CLASSIFIER_KIND = "evaluation_classifier"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------
def class_names_of(rows: Sequence[dict], meta_path=None) -> list[str]:
    """Names indexed by label: the rows' `label_name` where present, else the label itself as text."""
    names: dict[int, str] = {}
    for row in rows:
        if row.get("label") is None:
            continue
        label = parse_label(row, path=meta_path)
        names.setdefault(label, str(row.get("label_name") or label))
    if not names:
        raise ValueError(f"{meta_path or 'metadata'}: no row has a label")
    return [names.get(i, str(i)) for i in range(max(names) + 1)]


# Preprocessing options of the tokenization manifest that decide what a real image looks like (the image
# size, channels and value range are the evaluator's own: features want 3 channels in [-1, 1]).
MANIFEST_READ_OPTIONS = ("window", "intensity", "percentiles", "fit", "max_pixels")


def manifest_read_options(codes=None, meta=None) -> tuple[dict, dict | None]:
    """(ImageDataset options, manifest) that read real images exactly as the codes were made.

    The manifest (tokenizer.json written by batch_infer.py) is the one of `codes` (a code folder, code
    metadata file or the manifest itself), else the one beside `meta` (when `meta` is the code metadata);
    ({}, None) when there is none, and the reader's defaults apply."""
    from datasets.manifest import preprocessing_options, read_manifest

    manifest = read_manifest(codes) if codes is not None else (read_manifest(meta) if meta is not None else None)
    if codes is not None and manifest is None:
        raise FileNotFoundError(f"--codes {codes}: no tokenization manifest (tokenizer.json) there; it is written "
                                f"by batch_infer.py beside its outputs")
    if manifest is None:
        return {}, None
    accepted = inspect.signature(ImageDataset.__init__).parameters
    options = {k: v for k, v in preprocessing_options(manifest).items()
               if k in MANIFEST_READ_OPTIONS and k in accepted}
    return options, manifest


def image_loader(rows: Sequence[dict], meta_path=None, dataset_dir=None, image_size: int = 64,
                 batch_size: int = 64, num_workers: int = 0, **read_options) -> DataLoader:
    """Batches of dicts with `image` [B, 3, S, S] in [-1, 1], `label` [B] and `index` [B], in row order.
    `read_options`: ImageDataset's window / intensity / percentiles / fit (see `manifest_read_options`)."""
    dataset = ImageDataset(list(rows), meta_path=meta_path, dataset_dir=dataset_dir, image_size=image_size,
                           channels=3, value_range=(-1.0, 1.0), **read_options)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def load_images(rows: Sequence[dict], meta_path=None, dataset_dir=None, image_size: int = 64,
                batch_size: int = 64, num_workers: int = 0, desc: str = "reading images",
                **read_options) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows' images in memory: (images [N, 3, S, S] in [-1, 1], labels [N], -1 where unlabelled)."""
    if not rows:
        raise ValueError(f"{meta_path or 'metadata'}: no rows to read ({desc})")
    images, labels = [], []
    loader = image_loader(rows, meta_path, dataset_dir, image_size, batch_size, num_workers, **read_options)
    for batch in tqdm(loader, desc=desc, leave=False):
        images.append(batch["image"])
        labels.append(batch["label"])
    return torch.cat(images), torch.cat(labels)


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] (C = 1 or 3) -> float [N, 3, H, W] in [-1, 1]."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected images [N, H, W, 1|3], got shape {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Square resize with antialiasing; a no-op at the right size."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


# ----------------------------------------------------------------------------------------------
# The evaluation classifier (trained by evaluation/train_classifier.py)
# ----------------------------------------------------------------------------------------------
def classifier_kwargs(arch: str, width: float) -> dict:
    """timm arguments that scale a ResNet's stage and stem widths by `width` (rounded to multiples of 8)."""
    if width == 1.0:
        return {}
    if not arch.startswith("resnet"):
        raise ValueError(f"--width applies to timm ResNets only, not {arch!r}")
    import inspect

    from timm.models.resnet import ResNet

    default_channels = inspect.signature(ResNet.__init__).parameters["channels"].default  # timm's stage widths
    base = timm.create_model(arch, pretrained=False, num_classes=0)
    stem = base.conv1[0] if isinstance(base.conv1, nn.Sequential) else base.conv1  # deep or plain stem
    scale = lambda c: max(int(round(c * width / 8)) * 8, 8)  # noqa: E731
    return {"channels": tuple(scale(c) for c in default_channels), "stem_width": scale(stem.out_channels)}


def build_classifier(arch: str, num_classes: int, width: float = 1.0, in_chans: int = 3,
                     model_kwargs: dict | None = None) -> nn.Module:
    kwargs = dict(model_kwargs) if model_kwargs is not None else classifier_kwargs(arch, width)
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


def save_classifier(model: nn.Module, path, info: dict) -> None:
    """Self-describing checkpoint: everything `load_classifier` needs to rebuild the network, plus `info`."""
    atomic_save({"kind": CLASSIFIER_KIND, **info, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, path)


def load_classifier(path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode, the checkpoint's description without the weights)."""
    ckpt = load_checkpoint(path, map_location="cpu")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CLASSIFIER_KIND:
        raise CheckpointError(f"{path} is not a checkpoint written by evaluation.train_classifier "
                              f"(kind={ckpt.get('kind') if isinstance(ckpt, dict) else type(ckpt).__name__})")
    info = {k: v for k, v in ckpt.items() if k != "model"}
    model = build_classifier(info["arch"], info["num_classes"], in_chans=info["in_chans"],
                             model_kwargs=info["model_kwargs"])
    state_dict, _ = extract_state_dict(ckpt, prefer=("model",))
    load_state_dict_strict(model, state_dict, context=str(path))
    return model.to(device).eval(), info


# ----------------------------------------------------------------------------------------------
# Extractors
# ----------------------------------------------------------------------------------------------
class FeatureExtractor(nn.Module):
    """images [B, 3, H, W] in [-1, 1] -> features [B, dim]; subclasses set name, image_size, dim."""

    name: str = ""
    image_size: int = 0
    dim: int = 0

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return resize(images.float(), self.image_size)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(self.prepare(images)).flatten(1).float()


class ClassifierFeatures(FeatureExtractor):
    name = "classifier"

    def __init__(self, path, device="cpu"):
        super().__init__()
        self.model, self.info = load_classifier(path, device)
        self.image_size, self.dim = int(self.info["image_size"]), int(self.model.num_features)
        self.class_names = list(self.info["class_names"])

    def features(self, x):
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)  # [B, num_features]

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.prepare(images))  # [B, num_classes]


FID_INCEPTION_CLASSES = 1008  # the FID network's head (TF Inception 2015-12-05); torchvision's has 1000


class InceptionFeatures(FeatureExtractor):
    """Inception-v3 pool features (2048-d) from a local weights file: the FID network when the file holds
    the FID weights (1008-class head), torchvision's Inception-v3 otherwise (see the module docstring)."""

    name, image_size, dim = "inception", 299, 2048

    def __init__(self, weights_path, device="cpu"):
        super().__init__()
        state_dict, _ = extract_state_dict(load_checkpoint(weights_path))  # weights_only / safetensors
        fc = state_dict.get("fc.weight")
        self.kind = "fid" if fc is not None and fc.shape[0] == FID_INCEPTION_CLASSES else "torchvision"
        self.model = (self._fid_network(state_dict, weights_path) if self.kind == "fid"
                      else self._torchvision_network(state_dict, weights_path)).to(device).eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))

    @staticmethod
    def _fid_network(state_dict, weights_path) -> nn.Module:
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
            import torch_fidelity  # noqa: F401  (torchmetrics' FID network lives there)
        except ImportError as e:
            raise ImportError(f"{weights_path} holds the FID Inception weights; torchmetrics runs them with the "
                              f"torch-fidelity package: pip install torch-fidelity") from e
        # torch-fidelity unpickles the file it is given; give it one written here from the tensors that
        # were just read safely, never the user's file itself.
        with tempfile.TemporaryDirectory() as tmp:
            safe_copy = os.path.join(tmp, "inception.pt")
            torch.save({k: v.cpu() for k, v in state_dict.items()}, safe_copy)
            return NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(InceptionFeatures.dim)],
                                      feature_extractor_weights_path=safe_copy)

    @staticmethod
    def _torchvision_network(state_dict, weights_path) -> nn.Module:
        from torchvision.models import inception_v3

        has_aux = any(k.startswith("AuxLogits.") for k in state_dict)
        num_classes = state_dict["fc.weight"].shape[0] if "fc.weight" in state_dict else 1000
        model = inception_v3(weights=None, aux_logits=has_aux, init_weights=False, transform_input=False,
                             num_classes=num_classes)
        load_state_dict_strict(model, state_dict, context=f"Inception-v3 weights {weights_path}")
        model.fc = nn.Identity()  # the pooled 2048-d vector instead of class logits
        return model

    def prepare(self, images):
        if self.kind == "fid":  # uint8 [B, 3, H, W], as the FID tools read image files; resized inside
            return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return (resize(images.float(), self.image_size) * 0.5 + 0.5 - self.mean) / self.std  # ImageNet-normalised

    def features(self, x):
        return self.model(x)


class MedITokFeatures(FeatureExtractor):
    name = "meditok"

    def __init__(self, ckpt_path, device="cpu", img_size: int | None = None):
        super().__init__()
        from models.meditok import build_meditok

        self.model = build_meditok(ckpt_path, img_size=img_size, device=device).eval()
        self.image_size, self.dim = int(self.model.img_size), int(self.model.config.width)

    def features(self, x):
        return self.model.forward_features(x)  # [B, width]


def build_extractor(space: str, classifier_ckpt=None, inception_weights=None, meditok_ckpt=None,
                    device: str | torch.device = "cpu") -> FeatureExtractor:
    """The feature extractor of `space`, from the file that space needs (a clear error if it is missing)."""
    needs = {"classifier": (classifier_ckpt, "--classifier_ckpt (train one with python -m evaluation.train_classifier)"),
             "inception": (inception_weights, "--inception_weights (the FID Inception weights file, e.g. torch-fidelity's "
                                              "weights-inception-2015-12-05-6726825d.pth)"),
             "meditok": (meditok_ckpt, "--meditok_ckpt (a MedITok checkpoint)")}
    if space not in needs:
        raise ValueError(f"unknown feature space {space!r}; choose from {SPACES}")
    path, flag = needs[space]
    if path is None:
        raise ValueError(f"feature space {space!r} needs {flag}")
    try:
        resolve_weights(path)  # a local file or a cached / downloadable hf:// reference
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{flag.split()[0]}: {e}") from e
    cls = {"classifier": ClassifierFeatures, "inception": InceptionFeatures, "meditok": MedITokFeatures}[space]
    return cls(path, device=device)


@torch.no_grad()
def extract_features(extractor: nn.Module, batches: Iterable[torch.Tensor] | torch.Tensor, batch_size: int = 64,
                     device: str | torch.device = "cpu", desc: str = "features") -> np.ndarray:
    """Features [N, D] (float32 numpy) of images given as one tensor [N, 3, H, W] or an iterable of
    batches (tensors or dataset dicts with `image`), all in [-1, 1]."""
    if isinstance(batches, torch.Tensor):
        batches = batches.split(batch_size)
    out = []
    for batch in tqdm(batches, desc=desc, leave=False):
        images = batch["image"] if isinstance(batch, dict) else batch
        out.append(extractor(images.to(device)).cpu())
    if not out:
        raise ValueError(f"no images to extract features from ({desc})")
    return torch.cat(out).numpy()


# ----------------------------------------------------------------------------------------------
# Reports shared by the tokenizer and generation evaluations
# ----------------------------------------------------------------------------------------------
def write_report(out_dir, stem: str, result: dict, markdown: str) -> list[Path]:
    """Write OUT/stem.json and OUT/stem.md atomically; returns the paths."""
    out_dir = Path(out_dir)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    atomic_write_text(json.dumps(result, indent=1, default=_json_default) + "\n", paths[0])
    atomic_write_text(markdown, paths[1])
    return paths


def _json_default(value):
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item() if value.ndim == 0 else value.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _save_figure(fig, path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    atomic_write_bytes(buf.getvalue(), path)
    return Path(path)


def plot_per_class(per_class: dict[str, dict], metrics: Sequence[str], path, title: str = "") -> Path | None:
    """One bar chart per metric, classes on the x axis; metrics missing for a class are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if any(v.get(m) is not None for v in per_class.values())]
    if not metrics:
        return None
    names = list(per_class)
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(3.0, 0.7 * len(names) + 1.5) * len(metrics), 3.4),
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        values = [per_class[n].get(metric) for n in names]
        ax.bar(range(len(names)), [np.nan if v is None else v for v in values], color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=10)
        for i, v in enumerate(values):
            if v is not None:
                ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save_figure(fig, path)


def plot_image_rows(rows: Sequence[tuple[str, np.ndarray]], captions: Sequence[str], path, title: str = "") -> Path:
    """A grid: one row per (row label, uint8 images [N, H, W, C]); `captions` label the columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n, 1.75 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            if c < len(images):
                image = images[c]
                ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == 0 and c < len(captions):
                ax.set_title(captions[c], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save_figure(fig, path)
