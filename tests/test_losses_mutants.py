"""models/losses.py: what the perceptual loss's reference test alone leaves open (mutation-testing survivors).

Each test builds its own PerceptualLoss (not a shared fixture), so that mutmut attributes the constructor to it.
References: torchvision's VGG16 run directly (`reference_perceptual` of test_tokenizer_losses), torch.hub's
own cache layout, and the files written here.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import models.losses as losses
from models.checkpoint import CheckpointError
from models.losses import PerceptualLoss, default_backbone_path, lpips_linear_weights
from test_tokenizer_losses import reference_perceptual

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
WIDTHS = (64, 128, 256, 512, 512)


def vgg_features(scale: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    from torchvision.models import vgg16

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in vgg16(weights=None).state_dict().items() if k.startswith("features.")}
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * scale * (0.05 if len(s) > 1 else 0.01) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vgg")
    sd = vgg_features()
    g = torch.Generator().manual_seed(1)
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(WIDTHS)}
    torch.save(sd, root / "features.pth")
    torch.save({**sd, **lin}, root / "with_lin.pth")
    torch.save(vgg_features(scale=1e-3), root / "quiet.pth")
    return root, sd, lin


def images(seed=2, channels=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(2, channels, 32, 32, generator=g) * 2 - 1 for _ in range(2)]


def test_a_files_own_lpips_weights_replace_the_shipped_ones(files):
    root, sd, lin = files
    a, b = images()
    with torch.no_grad():
        got = PerceptualLoss(root / "with_lin.pth")(a, b)
        expected, _ = reference_perceptual(sd, lin, a, b)
        shipped, _ = reference_perceptual(sd, None, a, b)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert abs(got - shipped) > 1e-3 * abs(shipped)  # the file's weights made a difference


def test_small_features_are_normalised_with_a_tiny_eps(files):
    """Features of norm below 1 (weights scaled down): a large eps would shrink them and the loss."""
    root, _, _ = files
    sd = torch.load(root / "quiet.pth", weights_only=True)
    a, b = images(3)
    with torch.no_grad():
        loss = PerceptualLoss(root / "quiet.pth")
        got = loss(a, b)
        expected, _ = reference_perceptual(sd, None, a, b)
        x = ((a + 1) / 2 - loss.mean) / loss.std
        first_tap = loss.features[: losses.VGG16_TAPS[0] + 1](x)
    assert first_tap.norm(dim=1).max() < 1e-2  # the premise: features far below norm 1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-9)
    assert expected > 1e-5  # unit-normalised: not shrunk towards 0 with the features


def test_frozen_in_eval_and_only_the_backbone_in_its_state_dict(files):
    root, sd, _ = files
    loss = PerceptualLoss(root / "with_lin.pth")
    assert set(loss.state_dict()) == set(sd)  # LPIPS weights and ImageNet mean/std are not saved with it
    assert all(not p.requires_grad for p in loss.parameters()) and all(p.device.type == "cpu" for p in loss.parameters())
    loss.train()
    assert not any(m.training for m in loss.modules())
    # every backbone tensor is the file's (no random init left over)
    for k, v in loss.features.state_dict().items():
        assert torch.equal(v, sd[f"features.{k}"])


def test_the_default_backbone_is_where_torchvision_downloads_it(tmp_path, monkeypatch):
    from torchvision.models import VGG16_Weights

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    expected = tmp_path / "hub" / "checkpoints" / Path(VGG16_Weights.IMAGENET1K_V1.url).name
    assert default_backbone_path() == expected
    with pytest.raises(FileNotFoundError) as e:
        PerceptualLoss()
    assert str(expected) in str(e.value) and "--perceptual-weights" in str(e.value)


def test_refusals_name_the_file_and_what_is_wrong(files, tmp_path):
    root, sd, _ = files
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(CheckpointError, match=r"tensor\.pth: expected a state dict of VGG16 weights"):
        PerceptualLoss(tmp_path / "tensor.pth")
    torch.save({"classifier.0.weight": torch.zeros(2, 2)}, tmp_path / "head.pth")
    with pytest.raises(CheckpointError, match=r"head\.pth: no 'features\.N\.weight' keys"):
        PerceptualLoss(tmp_path / "head.pth")
    torch.save({k: v for k, v in sd.items() if k != "features.28.bias"}, tmp_path / "short.pth")
    with pytest.raises(CheckpointError, match=r"\(VGG16 features from .*short\.pth\)") as e:
        PerceptualLoss(tmp_path / "short.pth")
    assert "28.bias" in str(e.value)


def test_shipped_lpips_weights_and_a_torchmetrics_without_them(monkeypatch):
    weights = lpips_linear_weights()
    assert [tuple(w.shape) for w in weights] == [(1, c, 1, 1) for c in WIDTHS]
    monkeypatch.setattr(losses, "load_checkpoint", lambda path: {})
    with pytest.raises(CheckpointError, match=r"vgg\.pth: no LPIPS layer 'lin0\.model\.1\.weight'; this torchmetrics"):
        lpips_linear_weights()
