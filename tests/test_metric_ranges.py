"""evaluation/metrics.py: value ranges, clamping and argument checks of the PSNR/SSIM inputs, against
values written out here (cases mutation testing found unguarded; see scripts/mutation.sh)."""
import math

import numpy as np
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


# ----------------------------------------------------------------------------------------------
# k-NN radii, KID subsets, memorisation summary: against brute force written out here
# ----------------------------------------------------------------------------------------------
def brute_distances(x, y):
    return np.sqrt(((x[:, None, :] - y[None, :, :]) ** 2).sum(-1))


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_knn_radii_are_the_kth_nearest_other_row(k):
    x = np.random.default_rng(0).normal(size=(60, 4))
    d = brute_distances(x, x)
    expected = [np.sort(np.delete(d[i], i))[k - 1] for i in range(len(x))]
    radii = metrics.knn_radii(x, k) if k != 3 else metrics.knn_radii(x)  # 3 is the default
    np.testing.assert_allclose(radii, expected, rtol=1e-9)


def test_knn_radii_need_k_other_rows():
    x = np.random.default_rng(1).normal(size=(4, 2))
    metrics.knn_radii(x, 3)
    with pytest.raises(ValueError, match=r"k=4 must be in \[1, 3\] for 4 feature vectors"):
        metrics.knn_radii(x, 4)


def test_kid_subsets_are_drawn_without_replacement_and_sized():
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(40, 3)), rng.normal(0.5, 1, size=(40, 3))
    # subsets as large as the sets: every subset is a permutation of the whole set (no repeats), so
    # every MMD equals the full-set value and the spread is 0
    mean, std = metrics.kid(real, fake, subsets=5, subset_size=40)
    assert mean == pytest.approx(metrics.mmd2_unbiased(real, fake), rel=1e-9) and std == pytest.approx(0, abs=1e-12)
    # smaller subsets vary; the defaults are 50 subsets of 1000 rows (capped at the set size) with seed 0
    assert metrics.kid(real, fake, subsets=5, subset_size=10)[1] > 1e-6
    assert metrics.kid(real, fake) == metrics.kid(real, fake, subsets=50, subset_size=1000, seed=0)
    assert metrics.kid(real, fake, subset_size=10) == metrics.kid(real, fake, subsets=50, subset_size=10, seed=0)


def test_memorisation_summary_against_brute_force():
    rng = np.random.default_rng(3)
    train, held, samples = rng.normal(size=(30, 4)), rng.normal(size=(20, 4)), rng.normal(size=(12, 4))
    samples[:3] = train[[5, 9, 11]]  # exact copies
    out = metrics.memorisation(samples, train, held, quantile=0.1)
    d_s, d_h = brute_distances(samples, train), brute_distances(held, train)
    nn_s, near_s, near_h = d_s.argmin(1), d_s.min(1), d_h.min(1)
    threshold = np.quantile(near_h, 0.1)
    assert out["sample_nn_index"][:3].tolist() == [5, 9, 11] and np.array_equal(out["sample_nn_index"], nn_s)
    np.testing.assert_allclose(out["sample_nn_distance"], near_s, atol=1e-6)
    np.testing.assert_allclose(out["heldout_nn_distance"], near_h, atol=1e-6)
    assert out["sample_nn_median"] == pytest.approx(np.median(near_s), abs=1e-6)
    assert out["heldout_nn_median"] == pytest.approx(np.median(near_h), abs=1e-6)
    assert out["nn_ratio"] == pytest.approx(np.median(near_s) / np.median(near_h), rel=1e-6)
    assert out["threshold"] == pytest.approx(threshold, abs=1e-6) and out["threshold_quantile"] == 0.1
    assert out["fraction_below_threshold"] == pytest.approx((near_s < threshold).mean())
    assert out["fraction_below_threshold"] >= 3 / 12
    # a sample exactly at the threshold distance is not below it
    held[0] = train[0] + np.array([0.01, 0, 0, 0])
    samples[3] = held[0]
    out = metrics.memorisation(samples, train, held, quantile=0.0)
    assert out["sample_nn_distance"][3] == out["threshold"]
    assert out["fraction_below_threshold"] == pytest.approx((out["sample_nn_distance"] < out["threshold"]).mean())
    assert out["fraction_below_threshold"] == pytest.approx(3 / 12)


def test_pairwise_distances_in_chunks_and_small_sets():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(10, 3)), rng.normal(size=(7, 3))
    np.testing.assert_allclose(metrics.pairwise_distances(x, y, chunk=3), brute_distances(x, y), atol=1e-9)
    mu, sigma = metrics.feature_stats(x[:2])  # two rows are enough for a covariance
    assert mu.shape == (3,) and sigma.shape == (3, 3)
    with pytest.raises(ValueError, match="feature statistics differ in shape"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(3))
