"""Reference statistics that cannot fit the samples' features are refused with the file and key
named, before any image goes through the feature network (a 50,000-sample extraction is minutes
of GPU time). Small random feature network at 75x75: spatial features are 7 * 3 * 3 = 63 values."""
import numpy as np
import pytest

from mpdit_dist.evaluate import EvaluationError, compute_metrics, evaluate_npz

SPATIAL = 63  # 7 channels x 3 x 3 at a 75x75 input


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("samples") / "samples.npz"
    np.savez(path, images)
    return path, images


def _reference(path, spatial=SPATIAL, **override):
    rng = np.random.default_rng(1)
    stats = {"mu": np.zeros(2048), "sigma": np.eye(2048), "mu_s": np.zeros(spatial), "sigma_s": np.eye(spatial)}
    stats.update(override)
    np.savez(path, arr_0=rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8), **stats)
    return path


@pytest.mark.parametrize("override,message", [
    ({"sigma_s": np.eye(SPATIAL)[:, :-1]}, r"'mu_s' \(63,\) and 'sigma_s' \(63, 62\) are not a mean"),
    ({"mu": np.zeros((1, 2048))}, r"'mu' \(1, 2048\) and 'sigma' \(2048, 2048\) are not a mean"),
    ({"sigma": np.full((2048, 2048), np.nan)}, r"'mu' or 'sigma' holds non-finite values"),
])
def test_malformed_statistics_name_the_file_and_key(tmp_path, net, forwards, samples, override, message):
    ref = _reference(tmp_path / "ref.npz", **override)
    with pytest.raises(EvaluationError, match=f"ref.npz: {message}"):
        evaluate_npz(samples[0], ref, net, batch_size=4, device="cpu", use_cache=False)
    assert forwards == []  # refused before the reference's or the samples' images were seen


def test_statistics_of_another_feature_size_are_refused_before_any_features(tmp_path, net, forwards, samples):
    # ADM's statistics (sFID on 2023 values at 299x299) with a network of another input size
    ref = _reference(tmp_path / "adm_ref.npz", spatial=2023)
    with pytest.raises(EvaluationError, match=r"adm_ref.npz: reference 'mu_s' \(2023,\).*63-dim spatial"):
        evaluate_npz(samples[0], ref, net, batch_size=4, device="cpu", use_cache=False)
    with pytest.raises(EvaluationError, match=r"adm_ref.npz: reference 'mu_s' \(2023,\)"):
        compute_metrics(samples[1], str(ref), net, batch_size=4, device="cpu", use_cache=False)
    assert forwards == []


def test_given_statistics_are_checked_before_the_samples_features(net, forwards, samples):
    stats = {"mu": np.zeros(2048), "sigma": np.eye(2048), "mu_s": np.zeros(SPATIAL + 1), "sigma_s": np.eye(SPATIAL + 1)}
    with pytest.raises(EvaluationError, match=r"reference statistics: reference 'mu_s' \(64,\) / 'sigma_s' \(64, 64\)"):
        compute_metrics(samples[1], stats, net, batch_size=4, device="cpu")
    assert forwards == []
    stats["mu_s"], stats["sigma_s"] = np.zeros(SPATIAL), np.eye(SPATIAL)
    assert np.isfinite(compute_metrics(samples[1], stats, net, batch_size=4, device="cpu")["sfid"])
    assert sum(forwards) == len(samples[1])
