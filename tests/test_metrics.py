"""Distribution metrics over feature arrays (evaluation/metrics.py): agreement with direct formulas and
with torchmetrics' own pieces, and the behaviour that gives the numbers their meaning."""
import numpy as np
import pytest
import scipy.linalg
import torch

from evaluation import metrics


def gaussian(n, d, seed, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    return rng.normal(shift, scale, size=(n, d))


def test_fid_equals_direct_formula_from_means_and_covariances():
    rng = np.random.default_rng(0)
    a = gaussian(300, 12, 1)
    b = gaussian(250, 12, 2) @ rng.normal(size=(12, 12)) * 0.3 + 0.5
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    direct = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean)
    assert metrics.fid(a, b) == pytest.approx(direct, rel=1e-6)
    # ... and torchmetrics' own Frechet computation on the same statistics
    from torchmetrics.image.fid import _compute_fid

    tm = _compute_fid(*(torch.from_numpy(v) for v in (mu_a, cov_a, mu_b, cov_b)))
    assert metrics.fid(a, b) == pytest.approx(float(tm), rel=1e-6)


def test_fid_properties():
    a, b = gaussian(400, 8, 3), gaussian(400, 8, 4)
    assert metrics.fid(a, a) == pytest.approx(0.0, abs=1e-8)
    assert metrics.fid(a, b) == pytest.approx(metrics.fid(b, a), rel=1e-6)
    # equal covariances: the distance is the squared distance of the means
    shift = np.arange(8) / 4.0
    assert metrics.fid(a, a + shift) == pytest.approx((shift ** 2).sum(), rel=1e-6)
    # singular covariances (fewer rows than dimensions) still give a finite, non-negative number
    value = metrics.fid(gaussian(10, 32, 5), gaussian(10, 32, 6))
    assert np.isfinite(value) and value > 0


def test_same_distribution_scores_far_below_a_different_one():
    real = gaussian(500, 16, 7)
    half_a, half_b = real[:250], real[250:]
    other = gaussian(250, 16, 8, shift=1.0, scale=2.0)
    assert metrics.fid(half_a, half_b) < 0.1 * metrics.fid(half_a, other)
    kid_same, _ = metrics.kid(half_a, half_b, subsets=10, subset_size=100)
    kid_other, _ = metrics.kid(half_a, other, subsets=10, subset_size=100)
    assert abs(kid_same) < 0.1 * kid_other


def test_unbiased_mmd_matches_torchmetrics_and_a_loop():
    from torchmetrics.image.kid import poly_mmd

    x, y = gaussian(20, 5, 9), gaussian(20, 5, 10, shift=0.3)  # torchmetrics assumes equal sizes
    ours = metrics.mmd2_unbiased(x, y)
    assert ours == pytest.approx(float(poly_mmd(torch.from_numpy(x), torch.from_numpy(y))), rel=1e-6)
    k = lambda u, v: (u @ v / x.shape[1] + 1) ** 3  # noqa: E731
    xx = np.mean([k(x[i], x[j]) for i in range(len(x)) for j in range(len(x)) if i != j])
    yy = np.mean([k(y[i], y[j]) for i in range(len(y)) for j in range(len(y)) if i != j])
    xy = np.mean([k(x[i], y[j]) for i in range(len(x)) for j in range(len(y))])
    assert ours == pytest.approx(xx + yy - 2 * xy, rel=1e-9)
    y = y[:15]  # our estimator also handles unequal sizes
    xx_yy = xx + np.mean([k(y[i], y[j]) for i in range(len(y)) for j in range(len(y)) if i != j])
    xy = np.mean([k(x[i], y[j]) for i in range(len(x)) for j in range(len(y))])
    assert metrics.mmd2_unbiased(x, y) == pytest.approx(xx_yy - 2 * xy, rel=1e-9)


def test_precision_recall_on_k_nn_manifolds():
    real = gaussian(300, 4, 11)
    same = metrics.precision_recall(real, gaussian(300, 4, 12), k=5)
    assert same["precision"] > 0.8 and same["recall"] > 0.8
    far = metrics.precision_recall(real, gaussian(300, 4, 13, shift=50.0), k=5)
    assert far == {"precision": 0.0, "recall": 0.0}
    # mode collapse: fake covers one small region of the real data -> precise but not diverse
    collapsed = real[np.argsort(np.linalg.norm(real - real[0], axis=1))[:30]]
    pr = metrics.precision_recall(real, collapsed, k=5)
    assert pr["precision"] == 1.0 and pr["recall"] < 0.5 < same["recall"]


def test_nearest_neighbours_and_memorisation_flag_copies():
    train, held = gaussian(200, 6, 14), gaussian(100, 6, 15)
    d, idx = metrics.nearest_neighbours(train[[5, 17]], train)
    assert np.allclose(d, 0, atol=1e-6) and list(idx) == [5, 17]
    brute = np.linalg.norm(held[:, None] - train[None], axis=-1)
    d, idx = metrics.nearest_neighbours(held, train)
    assert np.allclose(d, brute.min(1)) and (idx == brute.argmin(1)).all()

    copies = metrics.memorisation(train[:50] + 1e-3, train, held)
    novel = metrics.memorisation(gaussian(50, 6, 16), train, held)
    assert copies["fraction_below_threshold"] == 1.0 and copies["nn_ratio"] < 0.01
    assert novel["fraction_below_threshold"] < 0.3 and 0.5 < novel["nn_ratio"] < 2.0


def test_bad_input_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="2-D"):
        metrics.fid(np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        metrics.fid(np.full((4, 2), np.nan), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="k=10"):
        metrics.knn_radii(np.zeros((5, 2)), k=10)
