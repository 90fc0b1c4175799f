"""models/losses.py is LPIPS(vgg): checked against torchmetrics' own LPIPS network (random backbone, the
learned linear layers from the torchmetrics package in both), and the backbone file is never downloaded."""
from __future__ import annotations

import pytest
import torch

from models import losses


@pytest.fixture(scope="module")
def lpips_pair(tmp_path_factory):
    from torchmetrics.functional.image.lpips import _LPIPS

    torch.manual_seed(0)
    reference = _LPIPS(pretrained=True, net="vgg", pnet_rand=True).eval()  # lin layers: torchmetrics' vgg.pth
    # its random backbone, written as torchvision's VGG16 state dict (slice k holds features.N)
    backbone = {f"features.{k.split('.', 2)[1]}.{k.split('.', 2)[2]}": v
                for k, v in reference.net.state_dict().items()}
    path = tmp_path_factory.mktemp("vgg") / "vgg16_features.pth"
    torch.save(backbone, path)
    return reference, losses.PerceptualLoss(path)


@pytest.mark.slow  # building torchmetrics' VGG16 (random init of its 120M-parameter classifier) takes seconds
def test_perceptual_loss_is_torchmetrics_lpips(lpips_pair):
    reference, ours = lpips_pair
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1, torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        expected = reference(a, b).mean()  # [B, 1, 1, 1] -> batch mean
        torch.testing.assert_close(ours(a, b), expected, rtol=1e-4, atol=1e-6)


def test_missing_backbone_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty hub cache
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth") as e:
        losses.PerceptualLoss()
    assert "--perceptual-weights" in str(e.value) and "weights='DEFAULT'" in str(e.value)
    assert len(losses.lpips_linear_weights()) == 5  # the layer weights need no file from the user
