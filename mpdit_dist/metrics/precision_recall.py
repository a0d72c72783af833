"""Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds, as ADM computes them.

Each feature set spans a manifold: the union of balls around its points whose radius is the
distance to the point's k-th nearest neighbour in the same set (k = 3 in ADM). Precision is the
fraction of samples inside the reference manifold; recall the fraction of reference points
inside the sample manifold. Distances are squared Euclidean (the ordering is all that matters),
computed block by block so that 50,000 x 50,000 never sits in memory at once.
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from .numerics import full_fp32

Device = Union[str, torch.device, None]


def pairwise_sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|a_i - b_j|^2`` for all pairs, ``(len(a), len(b))``, clamped at 0 against round-off."""
    sq_a = (a * a).sum(1, keepdim=True)
    sq_b = (b * b).sum(1).unsqueeze(0)
    return (sq_a - 2.0 * (a @ b.T) + sq_b).clamp_min_(0.0)


def _as_features(x, device: Device) -> torch.Tensor:
    t = torch.as_tensor(x).to(device or "cpu", torch.float32)
    if t.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(t.shape)}")
    return t


def knn_radii(
    features: Union[np.ndarray, torch.Tensor], k: int = 3, batch_size: int = 10000, device: Device = None
) -> np.ndarray:
    """Squared distance of every point to its k-th nearest neighbour in the same set, ``(N,)``.

    The point itself is its own 0-th neighbour (distance 0), as in ADM, so k=3 means the third
    *other* point.
    """
    if k < 1:
        raise ValueError(f"k={k}: the k-th nearest neighbour needs k >= 1 (k=0 is the point itself)")
    with full_fp32():
        feats = _as_features(features, device)
        n = feats.shape[0]
        if n <= k:
            raise ValueError(f"k={k} nearest neighbours need more than {k} points, got {n}")
        radii = torch.empty(n, dtype=torch.float32, device=feats.device)
        for r0 in range(0, n, batch_size):
            rows = feats[r0 : r0 + batch_size]
            nearest: Optional[torch.Tensor] = None  # the k+1 smallest distances seen so far
            for c0 in range(0, n, batch_size):
                block = pairwise_sq_distances(rows, feats[c0 : c0 + batch_size])
                if nearest is not None:
                    block = torch.cat([nearest, block], dim=1)
                nearest = block.topk(min(k + 1, block.shape[1]), dim=1, largest=False, sorted=True).values
            radii[r0 : r0 + batch_size] = nearest[:, k]
        return radii.cpu().numpy()


def precision_recall(
    ref_features: Union[np.ndarray, torch.Tensor],
    sample_features: Union[np.ndarray, torch.Tensor],
    k: int = 3,
    batch_size: int = 10000,
    device: Device = None,
    ref_radii: Optional[np.ndarray] = None,
    sample_radii: Optional[np.ndarray] = None,
) -> tuple[float, float]:
    """``(precision, recall)`` of samples against reference features (ADM's ``compute_prec_recall``).

    A point is inside a manifold when its distance to *some* point of that manifold is at most
    that point's radius (``<=``, as ADM). Radii are computed here unless given.
    """
    if ref_radii is None:
        ref_radii = knn_radii(ref_features, k, batch_size, device)
    if sample_radii is None:
        sample_radii = knn_radii(sample_features, k, batch_size, device)
    with full_fp32():
        ref = _as_features(ref_features, device)
        sam = _as_features(sample_features, device)
        if ref.shape[1] != sam.shape[1]:
            raise ValueError(f"feature sizes differ: reference {ref.shape[1]}, samples {sam.shape[1]}")
        r_ref = torch.as_tensor(ref_radii).to(ref.device, torch.float32).reshape(-1)
        r_sam = torch.as_tensor(sample_radii).to(ref.device, torch.float32).reshape(-1)
        if len(r_ref) != len(ref) or len(r_sam) != len(sam):
            raise ValueError("one radius per point is needed")
        ref_inside = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)  # -> recall
        sam_inside = torch.zeros(len(sam), dtype=torch.bool, device=ref.device)  # -> precision
        for r0 in range(0, len(ref), batch_size):
            ref_block, ref_r = ref[r0 : r0 + batch_size], r_ref[r0 : r0 + batch_size]
            for s0 in range(0, len(sam), batch_size):
                dist = pairwise_sq_distances(ref_block, sam[s0 : s0 + batch_size])
                ref_inside[r0 : r0 + batch_size] |= (dist <= r_sam[s0 : s0 + batch_size].unsqueeze(0)).any(1)
                sam_inside[s0 : s0 + batch_size] |= (dist <= ref_r.unsqueeze(1)).any(0)
        return float(sam_inside.double().mean()), float(ref_inside.double().mean())
