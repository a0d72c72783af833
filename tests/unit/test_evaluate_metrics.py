"""ADM's metric arithmetic against cases with known answers (no network involved)."""
import numpy as np
import pytest

from mpdit_dist.metrics import (
    frechet_distance,
    frechet_distance_low_rank,
    gaussian_stats,
    inception_score,
    inception_score_from_probs,
    knn_radii,
    precision_recall,
)


# ------------------------------------------------------------------ Fréchet distance


def _diag_closed_form(mu1, var1, mu2, var2):
    # For diagonal covariances (S1 S2)^(1/2) = diag(sqrt(v1 v2)):
    # FD = |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2))


def test_frechet_diagonal_covariances_closed_form():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    var1, var2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    got = frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(_diag_closed_form(mu1, var1, mu2, var2), rel=1e-10, abs=1e-10)


def test_frechet_full_covariance_scaled_closed_form():
    # S2 = a S1 commutes with S1: (S1 S2)^(1/2) = sqrt(a) S1, FD = |dmu|^2 + tr(S1)(1 - sqrt a)^2
    rng = np.random.default_rng(1)
    d, a = 24, 2.5
    m = rng.normal(size=(d, d))
    s1 = m @ m.T / d + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) * (1 - np.sqrt(a)) ** 2
    assert frechet_distance(mu1, s1, mu2, a * s1) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_of_sampled_gaussians_matches_direct_computation_and_truth():
    """FD of statistics of random Gaussian draws: equals a direct eigen computation on the same
    statistics, and approaches the closed form of the generating Gaussians."""
    rng = np.random.default_rng(2)
    d, n = 8, 40000
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    std1, std2 = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    x1 = (rng.normal(size=(n, d)) * std1 + mu1).astype(np.float32)
    x2 = (rng.normal(size=(n, d)) * std2 + mu2).astype(np.float32)
    s1, s2 = gaussian_stats(x1), gaussian_stats(x2)
    np.testing.assert_allclose(s1.sigma, np.cov(x1, rowvar=False), rtol=1e-6, atol=1e-9)
    got = frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    # direct: tr (S1 S2)^(1/2) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))
    w, v = np.linalg.eigh(s1.sigma)
    root1 = (v * np.sqrt(w)) @ v.T
    direct = (
        np.sum((s1.mu - s2.mu) ** 2)
        + np.trace(s1.sigma)
        + np.trace(s2.sigma)
        - 2 * np.sum(np.sqrt(np.linalg.eigvalsh(root1 @ s2.sigma @ root1)))
    )
    assert got == pytest.approx(direct, rel=1e-8)
    assert got == pytest.approx(_diag_closed_form(mu1, std1**2, mu2, std2**2), abs=0.05)


def test_frechet_low_rank_equals_statistics_route():
    rng = np.random.default_rng(3)
    for n1, n2, d in ((20, 25, 60), (20, 400, 60), (100, 400, 40)):  # fewer and more points than dims
        x1 = rng.normal(size=(n1, d))
        x2 = rng.normal(size=(n2, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.2
        a, b = gaussian_stats(x1), gaussian_stats(x2)
        assert frechet_distance_low_rank(x1, b.mu, b.sigma) == pytest.approx(
            frechet_distance(a.mu, a.sigma, b.mu, b.sigma), rel=1e-5
        )


def test_frechet_singular_covariances_stay_finite():
    # rank-deficient covariances (fewer points than dimensions) take ADM's eps path if needed
    rng = np.random.default_rng(4)
    x1, x2 = rng.normal(size=(10, 50)), rng.normal(size=(12, 50)) + 1.0
    a, b = gaussian_stats(x1), gaussian_stats(x2)
    got = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    assert np.isfinite(got)
    assert got == pytest.approx(frechet_distance_low_rank(x1, b.mu, b.sigma), rel=1e-4)


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(np.zeros((1, 3)))


# ------------------------------------------------------------------ Inception Score


def test_inception_score_uniform_one_hot_is_num_classes():
    k = 7
    probs = np.eye(k)[np.arange(5 * k) % k]  # every class equally often, each prediction certain
    assert inception_score_from_probs(probs) == pytest.approx(k, rel=1e-12)


def test_inception_score_identical_predictions_is_one():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(10))
    assert inception_score_from_probs(np.tile(p, (100, 1))) == pytest.approx(1.0, rel=1e-12)


def test_inception_score_splits_like_adm():
    # consecutive splits of split_size, averaged: a certain-class-0 split (IS 1) and a uniform
    # one-hot split over 4 classes (IS 4) average to 2.5; one big split would give a different value
    first = np.eye(4)[np.zeros(8, int)]
    second = np.eye(4)[np.arange(8) % 4]
    probs = np.concatenate([first, second])
    assert inception_score_from_probs(probs, split_size=8) == pytest.approx(2.5, rel=1e-12)
    assert inception_score_from_probs(probs, split_size=16) != pytest.approx(2.5, rel=1e-3)


def test_inception_score_from_logits_softmax():
    k = 5
    logits = 200.0 * np.eye(k)[np.arange(10 * k) % k]  # softmax of these is one-hot to float precision
    assert inception_score(logits) == pytest.approx(k, rel=1e-9)
    assert inception_score(np.zeros((20, k))) == pytest.approx(1.0, rel=1e-12)


# ------------------------------------------------------------------ precision / recall


def _brute_force_pr(ref, sam, k):
    def sq(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    r_ref = np.sort(sq(ref, ref), axis=1)[:, k]
    r_sam = np.sort(sq(sam, sam), axis=1)[:, k]
    d = sq(ref, sam)  # (n_ref, n_sam)
    precision = np.mean((d <= r_ref[:, None]).any(0))
    recall = np.mean((d <= r_sam[None, :]).any(1))
    return precision, recall, r_ref


def test_precision_recall_identical_sets_are_one():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 16)).astype(np.float32)
    assert precision_recall(x, x.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_far_apart_sets_are_zero():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(40, 8)).astype(np.float32)
    sam = rng.normal(size=(30, 8)).astype(np.float32) + 100.0
    assert precision_recall(ref, sam, k=3) == (0.0, 0.0)


def test_precision_recall_subset():
    # reference = two far-apart clusters A and B; samples = exactly the points of A:
    # every sample lies on the reference manifold (precision 1), only A's share of the
    # reference lies on the sample manifold (recall |A| / (|A| + |B|))
    rng = np.random.default_rng(2)
    a = rng.normal(size=(30, 8)).astype(np.float32)
    b = rng.normal(size=(50, 8)).astype(np.float32) + 50.0
    ref = np.concatenate([a, b])
    precision, recall = precision_recall(ref, a.copy(), k=3)
    assert precision == 1.0
    assert recall == pytest.approx(30 / 80)


def test_precision_recall_blocked_equals_brute_force():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(37, 6)).astype(np.float32)
    sam = (rng.normal(size=(29, 6)) + 1.5).astype(np.float32)
    want_p, want_r, want_radii = _brute_force_pr(ref.astype(np.float64), sam.astype(np.float64), 3)
    np.testing.assert_allclose(knn_radii(ref, k=3, batch_size=7), want_radii, rtol=1e-4)
    got_p, got_r = precision_recall(ref, sam, k=3, batch_size=5)  # many blocks, ragged ends
    assert (got_p, got_r) == (pytest.approx(want_p), pytest.approx(want_r))
    assert 0.0 < got_p < 1.0 and 0.0 < got_r < 1.0  # the case is not trivial
    assert precision_recall(ref, sam, k=3, batch_size=1000) == (got_p, got_r)


def test_knn_radii_needs_more_points_than_k():
    with pytest.raises(ValueError, match="more than 3"):
        knn_radii(np.zeros((3, 2), np.float32), k=3)


@pytest.mark.parametrize("k", [0, -1])
def test_knn_radii_rejects_k_below_one(k):
    # k=0 is each point's distance to itself (0): precision and recall would silently be ~0
    x = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=f"k={k}: .*k >= 1"):
        knn_radii(x, k=k)
    with pytest.raises(ValueError, match=f"k={k}"):
        precision_recall(x, x.copy(), k=k)


# ------------------------------------------------------------------ sample order and IS splits


def _one_hot_logits(labels, num_classes=1008):
    logits = np.zeros((len(labels), num_classes), np.float32)
    logits[np.arange(len(labels)), labels] = 12.0  # a confident classifier that is always right
    return logits


def test_class_sorted_samples_cap_inception_score_and_are_flagged():
    """ADM's IS averages consecutive splits, so the sample order matters: 50 per class over 1,000
    classes in class order gives each split of 5,000 only 100 classes. mpdit_dist.sample's
    --num-per-class plan is shuffled; the evaluation flags a grouped order."""
    from mpdit_dist.evaluate import label_order_warning
    from mpdit_dist.sample import plan_labels

    sorted_labels = np.repeat(np.arange(1000), 50)
    planned = np.array(plan_labels(range(1000), None, 50, seed=0))  # --num-per-class 50
    assert np.array_equal(np.bincount(planned), np.full(1000, 50))
    assert inception_score(_one_hot_logits(sorted_labels)) < 100
    assert inception_score(_one_hot_logits(planned)) > 800
    warning = label_order_warning(sorted_labels)
    assert "sorted by class" in warning and "holds 100 classes" in warning and "995" in warning
    assert label_order_warning(planned) is None
    uniform = np.array(plan_labels(range(1000), 50000, None, seed=0))  # the official recipe
    assert label_order_warning(uniform) is None
    # grouped but not sorted (classes in blocks, blocks in random order) is flagged too
    blocks = np.random.default_rng(0).permutation(1000)
    assert "grouped by class" in label_order_warning(np.repeat(blocks, 50))
    # one split only: the order cannot matter
    assert label_order_warning(np.repeat(np.arange(10), 10), split_size=100) is None
