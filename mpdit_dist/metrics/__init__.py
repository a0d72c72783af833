"""ADM's sample-quality metrics as plain functions of Inception features.

These reproduce the arithmetic of openai/guided-diffusion ``evaluations/evaluator.py``:
FID and sFID (:mod:`.frechet`), Inception Score (:mod:`.inception_score`), and precision and
recall with k-NN manifolds (:mod:`.precision_recall`). They know nothing about images, files or
networks; :mod:`mpdit_dist.evaluate` feeds them.
"""
from .frechet import (
    GaussianStats,
    frechet_distance,
    frechet_distance_low_rank,
    frechet_distance_stats,
    gaussian_stats,
)
from .inception_score import inception_score, inception_score_from_probs
from .precision_recall import knn_radii, pairwise_sq_distances, precision_recall

__all__ = [
    "GaussianStats",
    "frechet_distance",
    "frechet_distance_low_rank",
    "frechet_distance_stats",
    "gaussian_stats",
    "inception_score",
    "inception_score_from_probs",
    "knn_radii",
    "pairwise_sq_distances",
    "precision_recall",
]
