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
    assert (far["precision"], far["recall"]) == (0.0, 0.0)
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


def test_precision_recall_known_answers():
    # identical sets: every point lies on its own ball's centre -> 1 and 1
    x = gaussian(40, 3, 21)
    pr = metrics.precision_recall(x, x.copy(), k=3)
    assert (pr["precision"], pr["recall"]) == (1.0, 1.0)
    # a hand-computed case on a line: real at 0, 1, 3, 7 with k = 1 -> radii 1, 1, 2, 4 (balls [-1, 1],
    # [0, 2], [1, 5], [3, 11]); fake at 0.5, 5.5, 12, 20 -> radii 5, 5, 6.5, 8 (balls [-4.5, 5.5],
    # [0.5, 10.5], [5.5, 18.5], [12, 28]).
    real = np.array([[0.0], [1.0], [3.0], [7.0]])
    fake = np.array([[0.5], [5.5], [12.0], [20.0]])
    assert metrics.knn_radii(real, 1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert metrics.manifold_coverage(real, fake, 1).tolist() == [True, True, False, False]
    assert metrics.manifold_coverage(fake, real, 1).tolist() == [True, True, True, True]
    assert metrics.precision_recall(real, fake, k=1) == {"precision": 0.5, "recall": 1.0, "k_real": 1, "k_fake": 1}
    # k = 2: real radii 3, 2, 3, 6 -> the ball [1, 13] of 7 now holds 12 as well
    assert metrics.precision_recall(real, fake, k=2)["precision"] == 0.75


def test_knn_radii_equal_a_brute_force_sort():
    # 600 points and k up to half of them: numpy's partition sorts small blocks completely (a wrong
    # partition index still lands on the right value there), so the k-th neighbour is checked where the
    # blocks no longer cover it. Random points: the k-th and (k+1)-th distances differ on almost every row.
    x = gaussian(600, 3, 31)
    brute = np.sort(np.linalg.norm(x[:, None] - x[None], axis=-1), axis=1)[:, 1:]  # column 0: the point itself
    for k in (1, 2, 3, 7, 24, 150, 300, 599):
        np.testing.assert_allclose(metrics.knn_radii(x, k), brute[:, k - 1], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(metrics.knn_radii(x), brute[:, 2], rtol=1e-9, atol=1e-9)  # default k = 3
    with pytest.raises(ValueError, match=r"k=600 must be in \[1, 599\] for 600 feature vectors"):
        metrics.knn_radii(x, 600)  # the point itself is no neighbour: at most n - 1


def test_a_query_on_a_ball_boundary_is_covered():
    # Closed k-NN balls (distance <= radius, as in improved precision/recall); whole numbers on a line
    # give exact distances. k = 1 radii of 0, 1, 3, 6: 1, 1, 2, 3.
    manifold = np.array([[0.0], [1.0], [3.0], [6.0]])
    query = np.array([[9.0], [10.0], [-1.0], [-1.5], [5.0]])
    assert metrics.knn_radii(manifold, 1).tolist() == [1.0, 1.0, 2.0, 3.0]
    # 9 and -1 lie exactly on the balls of 6 and 0; 10 and -1.5 just outside every ball
    assert metrics.manifold_coverage(manifold, query, 1).tolist() == [True, False, True, False, True]
    # default k = 3: radii 6, 5, 3, 6 (the 3rd nearest of the other three points)
    assert metrics.manifold_coverage(manifold, query).tolist() == [True] * 5


def test_near_duplicate_reference_shrinks_the_k_nn_balls():
    """Why a reference of consecutive slices/frames gives precision ~0 at small k: each point's k nearest
    neighbours are its own near-copies, so the balls are tiny and even new real data falls outside them."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(30, 8))
    train = np.repeat(centres, 4, axis=0) + rng.normal(scale=1e-3, size=(120, 8))  # 4 near-copies each
    held = centres + rng.normal(scale=0.3, size=(30, 8))  # new data from around the same points
    assert metrics.precision_recall(train, held, k=3)["precision"] == 0.0  # radii: near-copy distances
    assert metrics.precision_recall(train, held, k=8)["precision"] > 0.5  # radii reach other centres
    auto = metrics.precision_recall(train, held)  # k = sqrt(set size): 11 for the 120 training points
    assert (auto["k_real"], auto["k_fake"]) == (11, 5) and auto["precision"] > 0.5
    assert [metrics.auto_k(n) for n in (2, 4, 10, 400, 10_000)] == [1, 3, 3, 20, 100]


def test_psnr_is_ten_log10_range_squared_over_mse():
    target = torch.full((2, 3, 8, 8), -1.0)
    target[1] = 0.5
    pred = target.clone()
    pred[0] += 0.2  # [-1, 1] images, range 2: MSE 0.04 -> 10 log10(4 / 0.04) = 20 dB
    pred[1, :, :4] += 0.1  # half the pixels off by 0.1: MSE 0.005 -> 10 log10(4 / 0.005) = 29.03 dB
    expected = [10 * np.log10(2.0 ** 2 / 0.04), 10 * np.log10(2.0 ** 2 / 0.005)]
    assert metrics.psnr(pred, target, (-1, 1)).tolist() == pytest.approx(expected, abs=1e-4)
    # the same images stored in [0, 255]: the same decibels
    as_bytes = lambda x: (x + 1) * 127.5  # noqa: E731
    assert metrics.psnr(as_bytes(pred), as_bytes(target), (0, 255)).tolist() == pytest.approx(expected, abs=1e-4)
    # a wrong data range is off by 20 log10(2) = 6.02 dB: this test would catch it
    assert abs(metrics.psnr(pred, target, (0, 1))[0].item() - expected[0]) > 1  # (values clamp, too)


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two 2-D images in [0, 1] from its definition (Wang et al. 2004): Gaussian-weighted local
    means, variances and covariance (sigma 1.5, 11 taps), C1 = 0.01^2, C2 = 0.03^2; borders mirrored and
    the map averaged over every pixel (the torchmetrics convention; the original MATLAB code averages
    only positions whose window lies inside, which differs in the third decimal on small images)."""
    import scipy.ndimage

    def blur(x):
        return scipy.ndimage.gaussian_filter(x, sigma=1.5, truncate=5 / 1.5, mode="mirror")

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def test_ssim_known_values():
    # constant images: only the luminance term is left, (2ab + C1) / (a^2 + b^2 + C1) on [0, 1]
    a, b = torch.full((1, 1, 16, 16), -0.5), torch.full((1, 1, 16, 16), 0.5)  # 0.25 and 0.75 on [0, 1]
    c1 = 0.01 ** 2
    expected = (2 * 0.25 * 0.75 + c1) / (0.25 ** 2 + 0.75 ** 2 + c1)
    assert metrics.ssim(a, b, (-1, 1)).item() == pytest.approx(expected, abs=1e-4)  # 0.600; on [-1, 1] it is -1
    # a textured pair against the definition
    rng = np.random.default_rng(0)
    x = rng.random((32, 32))
    y = np.clip(x + rng.normal(scale=0.1, size=(32, 32)), 0, 1)
    ours = metrics.ssim(torch.tensor(y)[None, None] * 2 - 1, torch.tensor(x)[None, None] * 2 - 1, (-1, 1)).item()
    assert ours == pytest.approx(_ssim_reference(y, x), abs=1e-6)
    assert metrics.ssim(torch.tensor(x)[None, None], torch.tensor(x)[None, None], (0, 1)).item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# Kernel options, KID subset sizes, argument names in messages (mutation-testing survivors,
# docs/MUTATION.md): against loops and formulas written out here
# ----------------------------------------------------------------------------------------------
def _mmd2_loop(x, y, degree, gamma, coef):
    k = lambda u, v: (gamma * (u @ v) + coef) ** degree  # noqa: E731
    xx = np.mean([k(x[i], x[j]) for i in range(len(x)) for j in range(len(x)) if i != j])
    yy = np.mean([k(y[i], y[j]) for i in range(len(y)) for j in range(len(y)) if i != j])
    xy = np.mean([k(x[i], y[j]) for i in range(len(x)) for j in range(len(y))])
    return xx + yy - 2 * xy


def test_kernel_options_reach_every_kernel_term():
    x, y = gaussian(12, 4, 41), gaussian(9, 4, 42, shift=0.4)
    opts = {"degree": 2, "gamma": 0.7, "coef": 0.5}
    np.testing.assert_allclose(metrics.polynomial_kernel(x, y, **opts), (0.7 * x @ y.T + 0.5) ** 2, rtol=1e-12)
    np.testing.assert_allclose(metrics.polynomial_kernel(x, y), (x @ y.T / 4 + 1) ** 3, rtol=1e-12)  # the defaults
    expected = _mmd2_loop(x, y, **opts)
    assert expected != pytest.approx(_mmd2_loop(x, y, 3, 1 / 4, 1.0), rel=1e-3)  # the options matter here
    assert metrics.mmd2_unbiased(x, y, **opts) == pytest.approx(expected, rel=1e-9)
    # KID passes them on: subsets as large as both sets are the whole sets (spread 0)
    whole = metrics.kid(x[:9], y, subsets=3, subset_size=100, **opts)
    assert whole[0] == pytest.approx(_mmd2_loop(x[:9], y, **opts), rel=1e-9) and whole[1] == pytest.approx(0, abs=1e-12)


def test_kid_default_subset_size_is_1000_rows():
    # 1000 rows: every subset is the whole set, so two subsets agree; 1001 rows: they differ
    real, fake = gaussian(1001, 2, 43), gaussian(1001, 2, 44, shift=0.2)
    mean, std = metrics.kid(real[:1000], fake[:1000], subsets=2)
    assert std == pytest.approx(0, abs=1e-12)
    assert mean == pytest.approx(metrics.mmd2_unbiased(real[:1000], fake[:1000]), rel=1e-9)
    assert metrics.kid(real, fake, subsets=2)[1] > 1e-9


def test_kid_subset_size_is_capped_by_the_smaller_set_either_way():
    a, b = gaussian(6, 3, 45), gaussian(15, 3, 46, shift=0.3)
    for real, fake in ((a, b), (b, a)):
        mean, std = metrics.kid(real, fake, subsets=4)  # subsets of 6 rows of each
        assert np.isfinite(mean) and std > 0
    # the smaller set is drawn whole every time (a permutation), the larger one in 6-row subsets
    mean, _ = metrics.kid(a, b[:6], subsets=3)
    assert mean == pytest.approx(_mmd2_loop(a, b[:6], 3, 1 / 3, 1.0), rel=1e-9)


def test_kid_needs_two_rows_in_each_set():
    two_a, two_b = gaussian(2, 3, 47), gaussian(2, 3, 48, shift=1.0)
    mean, std = metrics.kid(two_a, two_b, subsets=2)  # the smallest sets the unbiased estimate allows
    assert mean == pytest.approx(_mmd2_loop(two_a, two_b, 3, 1 / 3, 1.0), rel=1e-9)
    assert std == pytest.approx(0, abs=1e-12)
    with pytest.raises(ValueError, match=r"^KID needs at least 2 rows in each set, got 1 and 5$"):
        metrics.kid(gaussian(1, 3, 49), gaussian(5, 3, 50))
    with pytest.raises(ValueError, match=r"^KID needs at least 2 rows in each set, got 4 and 1$"):
        metrics.kid(gaussian(4, 3, 49), gaussian(1, 3, 50))


def test_feature_errors_name_the_argument():
    """Each public function names the argument that is wrong: users see these messages."""
    ok, flat, bad = np.zeros((4, 2)), np.zeros(5), np.full((4, 2), np.nan)
    for fn in (metrics.kid, metrics.precision_recall):
        with pytest.raises(ValueError, match=r"^real features must be a 2-D array \[N, D\], got shape \(5,\)$"):
            fn(flat, ok)
        with pytest.raises(ValueError, match=r"^fake features must be a 2-D array \[N, D\], got shape \(5,\)$"):
            fn(ok, flat)
        with pytest.raises(ValueError, match="^real features contain NaN or infinite values$"):
            fn(bad, ok)
        with pytest.raises(ValueError, match="^fake features contain NaN or infinite values$"):
            fn(ok, bad)
    for fn in (metrics.pairwise_distances, metrics.nearest_neighbours):
        with pytest.raises(ValueError, match=r"^query must be a 2-D array \[N, D\], got shape \(5,\)$"):
            fn(flat, ok)
        with pytest.raises(ValueError, match=r"^reference must be a 2-D array \[N, D\], got shape \(5,\)$"):
            fn(ok, flat)
        with pytest.raises(ValueError, match="^query contain NaN or infinite values$"):
            fn(bad, ok)
        with pytest.raises(ValueError, match="^reference contain NaN or infinite values$"):
            fn(ok, bad)
    with pytest.raises(ValueError, match=r"^features must be a 2-D array \[N, D\], got shape \(2, 2, 2\)$"):
        metrics.fid(np.zeros((2, 2, 2)), ok)


def test_recall_uses_the_fake_manifold_k():
    # the line of test_precision_recall_known_answers with the roles swapped: recall is now the share
    # of (0.5, 5.5, 12, 20) inside the k = 1 balls [-1, 1], [0, 2], [1, 5], [3, 11] of (0, 1, 3, 7): 2 of 4
    # (k = 3 balls, [-7, 7], [-5, 7], [-1, 7], [0, 14], would hold 3 of 4)
    real = np.array([[0.5], [5.5], [12.0], [20.0]])
    fake = np.array([[0.0], [1.0], [3.0], [7.0]])
    assert metrics.precision_recall(real, fake, k=1) == {"precision": 1.0, "recall": 0.5, "k_real": 1, "k_fake": 1}
    assert metrics.manifold_coverage(fake, real, 3).mean() == 0.75


def test_memorisation_ratio_of_small_distances():
    # features whose nearest-neighbour distances are far below 1: the ratio is still the plain ratio
    train, held = gaussian(30, 4, 51, scale=1e-3), gaussian(20, 4, 52, scale=1e-3)
    samples = gaussian(10, 4, 53, scale=1e-3)
    brute = lambda q: np.linalg.norm(q[:, None] - train[None], axis=-1).min(1)  # noqa: E731
    out = metrics.memorisation(samples, train, held)
    assert np.median(brute(held)) < 1e-2
    assert out["nn_ratio"] == pytest.approx(np.median(brute(samples)) / np.median(brute(held)), rel=1e-6)
    # held-out rows that are training rows: distance 0, and the ratio stays finite
    assert np.isfinite(metrics.memorisation(samples, train, train[:5])["nn_ratio"])


def test_features_become_float64_numpy_from_any_input():
    a, b = gaussian(30, 4, 54), gaussian(25, 4, 55, shift=0.5)
    for x in (a.astype(np.float32), a.astype(np.float16), np.arange(8).reshape(4, 2), torch.from_numpy(a).float(),
              torch.tensor(a, requires_grad=True), [[1, 2], [3, 4]]):
        out = metrics.as_features(x)
        assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == np.shape(x)
    # torch tensors, even ones that require grad, give the numbers of the same numpy array
    ta, tb = torch.tensor(a, requires_grad=True), torch.from_numpy(b)
    assert metrics.fid(ta, tb) == metrics.fid(a, b)
    assert metrics.precision_recall(ta, tb, k=3) == metrics.precision_recall(a, b, k=3)


def test_covariance_needs_two_rows():
    with pytest.raises(ValueError, match="^need at least 2 feature vectors for a covariance, got 1$"):
        metrics.fid(np.zeros((1, 3)), np.zeros((4, 3)))
