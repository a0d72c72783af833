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


def frechet_distance_low_rank(
    features: Union[np.ndarray, torch.Tensor],
    mu2: np.ndarray,
    sigma2: np.ndarray,
    device: Union[str, torch.device, None] = None,
) -> float:
    """Fréchet distance between the Gaussian fitted to ``features`` and ``(mu2, sigma2)``, exactly,
    without a D x D matrix root.

    With centred features ``X`` (n x D) and ``S1 = X^T X / (n - 1)``, the non-zero eigenvalues of
    ``S1 S2`` are those of the symmetric n x n matrix ``X S2 X^T / (n - 1)``, so
    ``tr (S1 S2)^(1/2)`` is the sum of their square roots. Same value as :func:`frechet_distance`
    of :func:`gaussian_stats` (to round-off), at O(n D^2) instead of scipy's O(D^3) Schur method:
    the route for sample sets smaller than the feature size (quick in-training checks, tests),
    where ``S1`` is singular and ``sqrtm`` is at its slowest and least accurate.
    """
    x = torch.as_tensor(features).to(device or "cpu", torch.float64)
    mu2_t = torch.as_tensor(np.asarray(mu2, np.float64)).to(x.device).reshape(-1)
    sigma2_t = torch.as_tensor(np.asarray(sigma2, np.float64)).to(x.device)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need a (N >= 2, D) feature matrix, got {tuple(x.shape)}")
    d = x.shape[1]
    if mu2_t.shape != (d,) or sigma2_t.shape != (d, d):
        raise ValueError(f"statistics {tuple(mu2_t.shape)}, {tuple(sigma2_t.shape)} do not fit {d}-dim features")
    mu1 = x.mean(0)
    centred = x - mu1
    n1 = x.shape[0] - 1
    inner = centred @ sigma2_t @ centred.T / n1
    eigenvalues = torch.linalg.eigvalsh((inner + inner.T) / 2)
    trace_root = eigenvalues.clamp_min(0).sqrt().sum()  # tiny negatives are round-off of zeros
    diff = mu1 - mu2_t
    value = diff @ diff + (centred * centred).sum() / n1 + torch.trace(sigma2_t) - 2 * trace_root
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
    "frechet_distance_low_rank",
    "frechet_distance_stats",
]

