"""PatchGAN discriminator and hinge losses for the tokenizer's adversarial term.

A stack of strided 4x4 convolutions (pix2pix / VQGAN style) that scores overlapping patches of an image:
image [B, C, H, W] in [-1, 1] -> logits [B, 1, H', W'] (one score per receptive-field patch).
GroupNorm rather than BatchNorm: its output does not depend on the batch split across processes.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _norm(channels: int) -> nn.GroupNorm:
    # At most 32 groups, and a group count that divides the width.
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class PatchDiscriminator(nn.Module):
    def __init__(self, in_chans: int = 3, width: int = 64, num_layers: int = 3, max_mult: int = 8):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_chans, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        ch = width
        for i in range(1, num_layers + 1):
            out = width * min(2 ** i, max_mult)
            # The last of these keeps the resolution (stride 1), as in the pix2pix PatchGAN.
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride=stride, padding=1, bias=False), _norm(out), nn.LeakyReLU(0.2, True)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # [B, 1, H', W']


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: push real scores above +1 and fake scores below -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator (tokenizer) side of the hinge GAN: raise the scores of reconstructions."""
    return -logits_fake.mean()
