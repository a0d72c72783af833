"""Inception Score, as ADM computes it (improved-gan's recipe)."""
from __future__ import annotations

import numpy as np
from scipy.special import xlogy


def inception_score_from_probs(probs: np.ndarray, split_size: int = 5000) -> float:
    """Mean over consecutive splits of ``split_size`` of ``exp(E_x KL(p(y|x) || p(y)))``.

    ADM's splits are consecutive chunks of 5000 predictions, so 50,000 samples give 10 splits
    and fewer samples give fewer (the last one possibly shorter). ``0 log 0`` counts as 0.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"need (N >= 1, K) class probabilities, got shape {probs.shape}")
    if split_size < 1:
        raise ValueError(f"split_size must be positive, got {split_size}")
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start : start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        kl = (xlogy(part, part) - xlogy(part, marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """Inception Score of ``(N, K)`` logits (softmax in float64, then :func:`inception_score_from_probs`)."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    return inception_score_from_probs(probs, split_size)
