"""Distribution metrics over feature arrays: FID, KID, k-NN precision/recall, nearest-neighbour distances.

Every function takes plain arrays of features, [N, D] (numpy or torch, any float dtype), so the same code
serves every feature space (classifier, Inception-v3, MedITok encoder; see evaluation/features.py).
Computation is in float64.

    fid(real, fake)                     Frechet distance between Gaussians fitted to the two sets
    kid(real, fake)                     unbiased MMD^2 with the cubic polynomial kernel, over random subsets
    precision_recall(real, fake, k)     fraction of fake inside the real k-NN manifold and vice versa
                                        (k: sqrt of each set's size unless given; see auto_k)
    nearest_neighbours(query, ref)      distance and index of each query's nearest reference row
    memorisation(samples, train, held)  samples' nearest-training distances against those of held-out real data

Scores depend on the feature space: compare numbers only within one space and one reference set.

Reconstruction quality of image pairs (tensors [B, C, H, W]; the one PSNR/SSIM of the project, used by the
tokenizer evaluation, the tokenizer trainer's validation and the quickstart):
    psnr(pred, target, value_range)     per-image PSNR in dB = 10 log10(range^2 / MSE)
    ssim(pred, target, value_range)     per-image SSIM (Gaussian window 11, sigma 1.5) on images mapped to [0, 1]
"""
from __future__ import annotations

import numpy as np
import torch


def as_features(x, name: str = "features") -> np.ndarray:
    """[N, D] float64 numpy array; a clear error for anything else."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return x


# ----------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------
def feature_stats(x) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], unbiased covariance [D, D]) of features [N, D]; needs N >= 2."""
    x = as_features(x)
    if len(x) < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {len(x)}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a (numerically) positive semi-definite matrix via eigh."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    Tr((S1 S2)^(1/2)) equals the sum of square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), which is
    symmetric PSD: eigh on it is stable even when the covariances are singular (N < D), where sqrtm of the
    non-symmetric product S1 S2 returns complex noise.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    s1 = _psd_sqrt(sigma1)
    middle = s1 @ sigma2 @ s1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean
    return float(max(value, 0.0))  # tiny negatives are rounding error


def fid(real, fake) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets [N, D] and [M, D]."""
    return frechet_distance(*feature_stats(real), *feature_stats(fake))


# ----------------------------------------------------------------------------------------------
# Kernel distance
# ----------------------------------------------------------------------------------------------
def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                      coef: float = 1.0) -> np.ndarray:
    """(gamma <x, y> + coef)^degree, gamma = 1 / D by default (the usual KID kernel)."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (gamma * x @ y.T + coef) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, **kernel) -> float:
    """Unbiased estimate of MMD^2 between samples x [m, D] and y [n, D] (diagonals left out)."""
    m, n = len(x), len(y)
    kxx, kyy, kxy = polynomial_kernel(x, x, **kernel), polynomial_kernel(y, y, **kernel), polynomial_kernel(x, y, **kernel)
    sum_xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    sum_yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sum_xx + sum_yy - 2 * kxy.mean())


def kid(real, fake, subsets: int = 50, subset_size: int = 1000, seed: int = 0, **kernel) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 over `subsets` random subsets of `subset_size` rows of each set.

    The subset size is capped at the smaller set; with both sets smaller than it, every subset is the
    whole set and the std is 0.
    """
    real, fake = as_features(real, "real features"), as_features(fake, "fake features")
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError(f"KID needs at least 2 rows in each set, got {len(real)} and {len(fake)}")
    rng = np.random.default_rng(seed)
    values = [
        mmd2_unbiased(real[rng.choice(len(real), size, replace=False)],
                      fake[rng.choice(len(fake), size, replace=False)], **kernel)
        for _ in range(subsets)
    ]
    return float(np.mean(values)), float(np.std(values))


# ----------------------------------------------------------------------------------------------
# k-NN manifolds and nearest neighbours
# ----------------------------------------------------------------------------------------------
def pairwise_distances(x: np.ndarray, y: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Euclidean distances [len(x), len(y)], computed in row chunks to bound memory."""
    x, y = as_features(x, "query"), as_features(y, "reference")
    y2 = (y * y).sum(1)
    out = np.empty((len(x), len(y)))
    for start in range(0, len(x), chunk):
        xb = x[start:start + chunk]
        d2 = (xb * xb).sum(1)[:, None] + y2[None, :] - 2 * xb @ y.T
        out[start:start + chunk] = np.sqrt(np.clip(d2, 0, None))
    return out


def knn_radii(x, k: int = 3) -> np.ndarray:
    """Distance of each row of x to its k-th nearest other row (the radius of its k-NN ball)."""
    x = as_features(x)
    if not 1 <= k < len(x):
        raise ValueError(f"k={k} must be in [1, {len(x) - 1}] for {len(x)} feature vectors")
    d = pairwise_distances(x, x)
    np.fill_diagonal(d, np.inf)  # a point is not its own neighbour
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def manifold_coverage(manifold, query, k: int = 3) -> np.ndarray:
    """For each query row, whether it lies inside the union of k-NN balls of `manifold`'s rows."""
    radii = knn_radii(manifold, k)
    d = pairwise_distances(query, manifold)
    return (d <= radii[None, :]).any(axis=1)


def auto_k(n: int) -> int:
    """k of the k-NN manifold of n points when none is given: round(sqrt(n)), at least 3, at most n - 1.

    The published k = 3 was chosen for 50k-image sets. On a few hundred images, and worse on consecutive
    slices or video frames (each image's 3 nearest neighbours are its own near-copies), 3-NN balls are so
    small that even held-out real images fall outside them; sqrt(n) grows the balls with the set."""
    return max(1, min(max(3, round(n ** 0.5)), n - 1))


def precision_recall(real, fake, k: int | None = None) -> dict[str, float]:
    """Improved precision/recall (k-NN manifolds): precision = share of fake inside the real manifold
    (fidelity), recall = share of real inside the fake manifold (diversity / coverage).

    `k` None: each manifold uses `auto_k` of its own size (k_real for precision, k_fake for recall).
    Read the numbers next to the same ones for held-out real images in place of `fake` (the ceiling)."""
    real, fake = as_features(real, "real features"), as_features(fake, "fake features")
    k_real = auto_k(len(real)) if k is None else k
    k_fake = auto_k(len(fake)) if k is None else k
    return {
        "precision": float(manifold_coverage(real, fake, k_real).mean()),
        "recall": float(manifold_coverage(fake, real, k_fake).mean()),
        "k_real": int(k_real), "k_fake": int(k_fake),
    }


def nearest_neighbours(query, reference) -> tuple[np.ndarray, np.ndarray]:
    """(distance [N], index [N]) of each query row's nearest reference row."""
    d = pairwise_distances(query, reference)
    index = d.argmin(axis=1)
    return d[np.arange(len(d)), index], index


def memorisation(samples, train, heldout, quantile: float = 0.05) -> dict:
    """Compare the nearest-training-image distances of generated samples with those of held-out real images.

    Held-out real images were never trained on, so their distances to the training set are what "new
    images from the same distribution" look like. Samples much closer than that (below the held-out
    `quantile`) are candidate copies. Returns summary numbers plus per-sample distances and neighbours.
    """
    d_sample, nn_sample = nearest_neighbours(samples, train)
    d_held, _ = nearest_neighbours(heldout, train)
    threshold = float(np.quantile(d_held, quantile))
    return {
        "sample_nn_median": float(np.median(d_sample)),
        "heldout_nn_median": float(np.median(d_held)),
        # < 1: samples sit closer to training images than unseen real images do
        "nn_ratio": float(np.median(d_sample) / max(np.median(d_held), 1e-12)),
        "threshold": threshold,
        "threshold_quantile": quantile,
        "fraction_below_threshold": float((d_sample < threshold).mean()),
        "sample_nn_distance": d_sample,
        "sample_nn_index": nn_sample,
        "heldout_nn_distance": d_held,
    }


# ----------------------------------------------------------------------------------------------
# Reconstruction quality: PSNR and SSIM of image pairs
# ----------------------------------------------------------------------------------------------
def to_unit_range(images: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """Images whose valid values span `value_range` (e.g. (-1, 1)) -> float in [0, 1], clamped: a
    reconstruction is scored as the image it displays as."""
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise ValueError(f"value_range {value_range} must be (low, high) with high > low")
    return ((images.float() - lo) / (hi - lo)).clamp(0, 1)


def _pair(pred: torch.Tensor, target: torch.Tensor, value_range) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"expected two image batches [B, C, H, W] of one shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    # float64: SSIM's variances are differences of means, and float32 rounding of them is not small
    # next to C2 = 9e-4 (it moves SSIM in the 4th decimal)
    return to_unit_range(pred, value_range).double(), to_unit_range(target, value_range).double()


def psnr(pred: torch.Tensor, target: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """PSNR in dB of each image pair [B]: 10 log10(range^2 / MSE), MSE over all pixels and channels of
    the image. Computed on [0, 1] (range 1), which gives the same number as on the images' own range."""
    a, b = _pair(pred, target, value_range)
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(pred: torch.Tensor, target: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """SSIM of each image pair [B] with the usual settings (Gaussian window 11 px, sigma 1.5, K1 0.01,
    K2 0.03), on images mapped to [0, 1]. Unlike PSNR, SSIM depends on where zero is (its luminance term
    compares means), so it is always taken on [0, 1]: SSIM of [-1, 1] images with range 2 is another number."""
    a, b = _pair(pred, target, value_range)
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")
