"""Perceptual loss from user-supplied VGG16 weights (nothing is downloaded).

`PerceptualLoss(weights_path)` compares channel-normalised VGG16 features of two images at the five
stages LPIPS uses (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3). The file may be
  - torchvision's ImageNet VGG16 state dict (`vgg16-397923af.pth`; keys `features.N.weight`), the
    stages then averaged with equal weights, or
  - a dict holding such a state dict plus LPIPS' learned per-channel weights under `lin0.model.1.weight`
    ... `lin4.model.1.weight` (as in the LPIPS repository's `vgg.pth` merged with the backbone), which
    then weight the squared feature differences.
Images are in [-1, 1]; the network is frozen and always runs in fp32.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.checkpoint import CheckpointError, load_checkpoint, load_state_dict_strict

# Indices (in torchvision's vgg16.features) of the ReLUs whose outputs LPIPS compares.
VGG16_TAPS = (3, 8, 15, 22, 29)
VGG16_WIDTHS = (64, 128, 256, 512, 512)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PerceptualLoss(nn.Module):
    def __init__(self, weights_path: str | os.PathLike):
        super().__init__()
        from torchvision.models import vgg16

        ckpt = load_checkpoint(weights_path)
        if not isinstance(ckpt, dict):
            raise CheckpointError(f"{weights_path}: expected a state dict of VGG16 weights")
        features = vgg16(weights=None).features[: VGG16_TAPS[-1] + 1]
        backbone = {k[len("features."):]: v for k, v in ckpt.items() if k.startswith("features.")
                    and int(k.split(".")[1]) <= VGG16_TAPS[-1]}
        if not backbone:
            raise CheckpointError(
                f"{weights_path}: no 'features.N.weight' keys; pass torchvision's VGG16 ImageNet state dict"
            )
        load_state_dict_strict(features, backbone, context=f"VGG16 features from {weights_path}")
        self.features = features.eval().requires_grad_(False)
        lin = [ckpt.get(f"lin{i}.model.1.weight") for i in range(len(VGG16_TAPS))]
        if all(w is not None for w in lin):
            weights = [w.reshape(1, -1, 1, 1).float() for w in lin]
        else:
            weights = [torch.full((1, c, 1, 1), 1.0 / c) for c in VGG16_WIDTHS]
        for i, w in enumerate(weights):
            self.register_buffer(f"lin{i}", w, persistent=False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: always in eval mode

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = ((x + 1) / 2 - self.mean) / self.std  # [-1, 1] -> ImageNet-normalised
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG16_TAPS:
                out.append(F.normalize(x, dim=1, eps=1e-10))
        return out

    def forward(self, rec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of the summed per-stage distances: scalar."""
        with torch.autocast(rec.device.type, enabled=False):
            a, b = self._taps(rec.float()), self._taps(target.float())
            return sum((getattr(self, f"lin{i}") * (fa - fb).square()).sum(1).mean()
                       for i, (fa, fb) in enumerate(zip(a, b)))
