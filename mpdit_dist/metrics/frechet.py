"""Fréchet distance between Gaussians fitted to features: FID (pool_3) and sFID (mixed_6/conv)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from scipy import linalg


@dataclass
class GaussianStats:
    """Mean ``(D,)`` and covariance ``(D, D)`` of a feature set, float64."""

    mu: np.ndarray
    sigma: np.ndarray


def gaussian_stats(
    features: Union[np.ndarray, torch.Tensor], device: Union[str, torch.device, None] = None
) -> GaussianStats:
    """Mean and unbiased covariance (``np.cov(features, rowvar=False)``) in float64.

    Computed with torch so that a GPU does the ``D x N x D`` product when one is given.
    """
    x = torch.as_tensor(features).to(device or "cpu", torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need a (N >= 2, D) feature matrix for a covariance, got {tuple(x.shape)}")
    mu = x.mean(0)
    centred = x - mu
    sigma = centred.T @ centred / (x.shape[0] - 1)
    return GaussianStats(mu.cpu().numpy(), sigma.cpu().numpy())


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``, as ADM's ``FIDStatistics.frechet_distance``.

    The matrix square root is scipy's ``sqrtm`` of ``S1 @ S2``. When that product is so near
    singular that the root is not finite, ``eps`` is added to both diagonals (the TTUR /
    pytorch-fid / ADM fix); a small imaginary part from round-off is dropped, a large one raises.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors differ in length: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"covariances do not fit the means: {sigma1.shape}, {sigma2.shape}, {mu1.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"Fréchet distance: singular product; adding {eps} to the covariance diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_stats(a: GaussianStats, b: GaussianStats, eps: float = 1e-6) -> float:
    """:func:`frechet_distance` of two :class:`GaussianStats`."""
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma, eps=eps)


def frechet_distance_from_features(
    features1: Union[np.ndarray, torch.Tensor],
    features2: Union[np.ndarray, torch.Tensor],
    device: Union[str, torch.device, None] = None,
) -> float:
    """Fréchet distance of the Gaussians fitted to two feature sets, exactly, without a D x D root.

    With centred features ``X1`` (n1 x D), ``X2`` (n2 x D) and unbiased covariances
    ``S = X^T X / (n - 1)``, the non-zero eigenvalues of ``S1 S2`` are those of ``C C^T`` with
    ``C = X1 X2^T / sqrt((n1 - 1)(n2 - 1))``, so ``tr (S1 S2)^(1/2)`` is the sum of the singular
    values of the n1 x n2 matrix ``C``. Same value as :func:`frechet_distance` of
    :func:`gaussian_stats` (up to round-off), at O(n1 n2 D) instead of O(D^3): the fast route
    when there are fewer images than feature dimensions (small in-training references, tests).
    """
    x1 = torch.as_tensor(features1).to(device or "cpu", torch.float64)
    x2 = torch.as_tensor(features2).to(x1.device, torch.float64)
    if x1.ndim != 2 or x2.ndim != 2 or x1.shape[1] != x2.shape[1]:
        raise ValueError(f"need two (N, D) feature sets of equal D, got {tuple(x1.shape)}, {tuple(x2.shape)}")
    if min(len(x1), len(x2)) < 2:
        raise ValueError("a covariance needs at least 2 points per set")
    mu1, mu2 = x1.mean(0), x2.mean(0)
    c1, c2 = x1 - mu1, x2 - mu2
    n1, n2 = len(x1) - 1, len(x2) - 1
    trace_root = torch.linalg.svdvals(c1 @ c2.T).sum() / (n1 * n2) ** 0.5
    diff = mu1 - mu2
    value = diff @ diff + (c1 * c1).sum() / n1 + (c2 * c2).sum() / n2 - 2 * trace_root
    return float(value)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        # scipy warns on ill-conditioned input; the finiteness check above decides what to do
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(matrix)
    return root[0] if isinstance(root, tuple) else root


__all__ = [
    "GaussianStats",
    "gaussian_stats",
    "frechet_distance",
    "frechet_distance_from_features",
    "frechet_distance_stats",
]

