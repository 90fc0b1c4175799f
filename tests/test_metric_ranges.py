"""evaluation/metrics.py: value ranges, clamping and argument checks of the PSNR/SSIM inputs, against
values written out here (cases mutation testing found unguarded; see scripts/mutation.sh)."""
import math

import pytest
import torch

from evaluation import metrics


def test_to_unit_range_maps_linearly_and_clamps():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 4.0])
    assert metrics.to_unit_range(x, (-1, 1)).tolist() == [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]
    assert metrics.to_unit_range(torch.tensor([0.0, 51.0, 300.0]), (0, 255)).tolist() == pytest.approx([0, 0.2, 1])
    assert metrics.to_unit_range(torch.tensor([12.0, 14.0, 20.0]), (10, 20)).tolist() == pytest.approx([0.2, 0.4, 1.0])


@pytest.mark.parametrize("value_range", [(1, 1), (1, -1)])
def test_to_unit_range_refuses_an_empty_range(value_range):
    with pytest.raises(ValueError, match=r"value_range .* high > low"):
        metrics.to_unit_range(torch.zeros(3), value_range)


def test_psnr_scores_the_displayed_image():
    # A reconstruction overshooting the range is scored as displayed (clamped): 1.5 shows as 1.0.
    target = torch.full((1, 1, 4, 4), 0.5)
    pred = torch.full((1, 1, 4, 4), 1.5)
    # on [0, 1]: 0.75 against 1.0, MSE 0.0625 -> 10 log10(1 / 0.0625) = 12.04 dB
    assert metrics.psnr(pred, target, (-1, 1)).item() == pytest.approx(10 * math.log10(1 / 0.0625), abs=1e-4)
    low = torch.full((1, 1, 4, 4), -2.0)  # shows as -1 (0 on [0, 1]) against 0.75: MSE 0.5625
    assert metrics.psnr(low, target, (-1, 1)).item() == pytest.approx(10 * math.log10(1 / 0.5625), abs=1e-4)


def test_psnr_and_ssim_are_per_image():
    target = torch.zeros(3, 1, 16, 16)
    pred = target.clone()
    pred[1] += 0.2
    pred[2] += 0.4
    p = metrics.psnr(pred, target, (-1, 1))
    s = metrics.ssim(pred, target, (-1, 1))
    assert p.shape == s.shape == (3,)
    assert math.isinf(p[0].item()) and p[1] > p[2] and s[0] == pytest.approx(1.0) and s[1] > s[2]


@pytest.mark.parametrize("shapes", [((2, 1, 8, 8), (2, 1, 8, 9)), ((1, 8, 8), (1, 8, 8))])
def test_image_pairs_must_be_batches_of_one_shape(shapes):
    a, b = torch.zeros(shapes[0]), torch.zeros(shapes[1])
    for fn in (metrics.psnr, metrics.ssim):
        with pytest.raises(ValueError, match=r"\[B, C, H, W\] of one shape, got " + r"\(" + ", ".join(map(str, shapes[0]))):
            fn(a, b, (0, 1))
