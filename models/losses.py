"""Perceptual loss: LPIPS (VGG16) with the learned layer weights that torchmetrics ships.

`PerceptualLoss(weights_path)` compares unit-normalised VGG16 features of two images at the five stages
LPIPS uses (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3), weights the squared differences per channel with
LPIPS' learned linear layers, averages over positions and sums over stages: LPIPS(vgg) exactly.

Two kinds of weights are involved:
  - LPIPS' linear layers (`lin0.model.1.weight` ... `lin4.model.1.weight`, 1.5k numbers): shipped inside the
    torchmetrics package (`torchmetrics/functional/image/lpips_models/vgg.pth`) and read from there; a file
    that has its own `linN` tensors overrides them.
  - The VGG16 ImageNet backbone (torchvision's `vgg16-397923af.pth`, 528 MB): no installed package ships it.
    It is taken from `weights_path` (a path or hf:// reference; torchvision's state dict, keys
    `features.N.weight`), else from torch's hub cache where torchvision keeps it after one download
    (`<torch hub dir>/checkpoints/vgg16-397923af.pth`, e.g. after `python -c "import torchvision;
    torchvision.models.vgg16(weights='DEFAULT')"` on a machine with internet). Nothing is downloaded here.
Images are in [-1, 1]; the network is frozen and always runs in fp32.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.checkpoint import CheckpointError, load_checkpoint, load_state_dict_strict

# Indices (in torchvision's vgg16.features) of the ReLUs whose outputs LPIPS compares.
VGG16_TAPS = (3, 8, 15, 22, 29)
VGG16_WIDTHS = (64, 128, 256, 512, 512)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 weights, as named in its hub cache


def lpips_linear_weights() -> list[torch.Tensor]:
    """LPIPS' learned per-channel weights for the five VGG16 stages, from the torchmetrics package."""
    import torchmetrics.functional.image.lpips as tm_lpips

    path = Path(tm_lpips.__file__).parent / "lpips_models" / "vgg.pth"
    state = load_checkpoint(path)
    try:
        return [state[f"lin{i}.model.1.weight"].reshape(1, -1, 1, 1).float() for i in range(len(VGG16_TAPS))]
    except KeyError as e:
        raise CheckpointError(f"{path}: no LPIPS layer {e}; this torchmetrics version stores them differently") from e


def default_backbone_path() -> Path:
    """torchvision's VGG16 file in torch's hub cache (where `vgg16(weights='DEFAULT')` downloads it)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


class PerceptualLoss(nn.Module):
    def __init__(self, weights_path: str | os.PathLike | None = None):
        super().__init__()
        from torchvision.models import vgg16

        if weights_path is None:
            weights_path = default_backbone_path()
            if not weights_path.is_file():
                raise FileNotFoundError(
                    f"the perceptual loss needs the VGG16 ImageNet backbone ({VGG16_FILE}), which no installed "
                    f"package ships and which is not in torch's hub cache ({weights_path}). On a machine with "
                    f"internet: python -c \"import torchvision; torchvision.models.vgg16(weights='DEFAULT')\" "
                    f"(fills that cache), or pass the file with --perceptual-weights PATH")
        ckpt = load_checkpoint(weights_path)
        if not isinstance(ckpt, dict):
            raise CheckpointError(f"{weights_path}: expected a state dict of VGG16 weights")
        with torch.device("meta"):  # shapes only: the file's tensors are assigned below (no random init)
            features = vgg16(weights=None).features[: VGG16_TAPS[-1] + 1]
        backbone = {k[len("features."):]: v for k, v in ckpt.items() if k.startswith("features.")
                    and int(k.split(".")[1]) <= VGG16_TAPS[-1]}
        if not backbone:
            raise CheckpointError(
                f"{weights_path}: no 'features.N.weight' keys; pass torchvision's VGG16 ImageNet state dict"
            )
        load_state_dict_strict(features, backbone, context=f"VGG16 features from {weights_path}", assign=True)
        self.features = features.eval().requires_grad_(False)
        own = [ckpt.get(f"lin{i}.model.1.weight") for i in range(len(VGG16_TAPS))]
        weights = ([w.reshape(1, -1, 1, 1).float() for w in own] if all(w is not None for w in own)
                   else lpips_linear_weights())
        for i, w in enumerate(weights):
            self.register_buffer(f"lin{i}", w, persistent=False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: always in eval mode

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        # [-1, 1] -> ImageNet-normalised; the same affine map as LPIPS' scaling layer
        x = ((x + 1) / 2 - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG16_TAPS:
                out.append(F.normalize(x, dim=1, eps=1e-10))
        return out

    def forward(self, rec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """LPIPS averaged over the batch: scalar."""
        with torch.autocast(rec.device.type, enabled=False):
            a, b = self._taps(rec.float()), self._taps(target.float())
            return sum((getattr(self, f"lin{i}") * (fa - fb).square()).sum(1).mean()
                       for i, (fa, fb) in enumerate(zip(a, b)))
