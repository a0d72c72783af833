"""Awkward inputs to the evaluation: damaged files, non-finite numbers, too few images, a reference of
another resolution, a reference cache given as the reference, a reference rewritten in place.

Each is refused with the file or key named (before any feature is computed where that is possible),
or reported in ``warnings``; none is silently turned into a number. A small random feature network at
75x75 (spatial features: 7 * 3 * 3 = 63 values) keeps every test at a few seconds on a CPU."""
import json
import os
import zipfile

import numpy as np
import pytest
import torch

from mpdit_dist import evaluate
from mpdit_dist.evaluate import EvaluationError, compute_metrics, evaluate_npz, file_sha256, open_npz_images
from mpdit_dist.inception import FeatureNetError, load_feature_net, random_feature_net

SPATIAL = 63


def _images(seed, n, size=16):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _flip_member_byte(path, member, offset):
    """Flip one byte ``offset`` bytes into the stored data of ``member`` (as a bad copy or disk would)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    data = bytearray(path.read_bytes())
    name_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    data[info.header_offset + 30 + name_len + extra_len + offset] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damaged", ["images", "compressed images", "labels", "reference statistics"])
def test_damaged_npz_is_an_error_naming_the_file(tmp_path, net, damaged):
    """A byte flipped inside an npz member surfaced as zipfile's ``BadZipFile: Bad CRC-32 for file
    'arr_0.npy'`` (or a zlib error), naming neither the file nor what to do; the command line, which
    turns only EvaluationError into a one-line message, printed a traceback."""
    samples, reference = tmp_path / "samples.npz", tmp_path / "reference.npz"
    save = np.savez_compressed if damaged == "compressed images" else np.savez
    save(samples, _images(0, 6), np.arange(6))
    np.savez(reference, _images(1, 6), mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(SPATIAL),
             sigma_s=np.eye(SPATIAL))
    target, member, offset = {
        "images": (samples, "arr_0.npy", 300),
        "compressed images": (samples, "arr_0.npy", 40),
        "labels": (samples, "arr_1.npy", 130),
        "reference statistics": (reference, "sigma.npy", 5000),
    }[damaged]
    _flip_member_byte(target, member, offset)
    with pytest.raises(EvaluationError, match=rf"{target}: damaged or truncated npz file"):
        evaluate_npz(samples, reference, net, batch_size=4, device="cpu", k=1, use_cache=False, progress=False)


def test_non_finite_features_are_an_error(net):
    """A feature network giving NaN (damaged weights) made the Inception Score NaN without a word, left a
    NaN sample outside every precision/recall ball, and made the Fréchet distance fail with an opaque
    ``linalg.eigh: The algorithm failed to converge``."""
    stats = {"mu": np.zeros(2048), "sigma": np.eye(2048), "mu_s": np.zeros(SPATIAL), "sigma_s": np.eye(SPATIAL)}
    bad = random_feature_net(seed=0, input_size=75)
    with torch.no_grad():
        bad.fc.weight[5, 7] = float("nan")  # only the logits: FID and sFID stay finite
    with pytest.raises(EvaluationError, match=r"samples: the feature network gave non-finite logits features for "
                                              r"8 of 8 images \(first: image 0\)"):
        compute_metrics(_images(0, 8), stats, bad, batch_size=4, device="cpu")

    def one_nan(module, args, out):
        out.pool[1, 3] = float("nan")
        return out

    handle = net.register_forward_hook(one_nan)
    try:
        with pytest.raises(EvaluationError, match=r"non-finite pool features for 2 of 8 images \(first: image 1\)"):
            compute_metrics(_images(0, 8), stats, net, batch_size=4, device="cpu")
    finally:
        handle.remove()


def test_weights_file_with_non_finite_values_is_refused(tmp_path, net):
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["Mixed_7c.branch1x1.conv.weight"][0, 0] = float("inf")
    path = tmp_path / "inception.pth"
    torch.save(state, path)
    with pytest.raises(FeatureNetError, match=rf"{path}: 1 tensors hold NaN or infinite values \(e.g. "
                                              r"Mixed_7c.branch1x1.conv.weight\)"):
        load_feature_net(path, "cpu", input_size=75)


@pytest.mark.parametrize("override,message", [
    ({"sigma": np.diag(np.r_[np.nan, np.ones(2047)])}, r"reference statistics: 'mu' or 'sigma' holds non-finite values"),
    ({"pool_features": np.full((5, 2048), np.nan, np.float32)}, r"'pool_features' \(5, 2048\) must be \(N, D\) finite"),
    ({"pool_features": np.zeros((5, 100), np.float32)}, r"'pool_features' \(5, 100\) do not fit the samples' 2048-dim"),
])
def test_given_statistics_are_checked_for_non_finite_values_and_feature_sizes(net, forwards, override, message):
    """A dict of statistics with a NaN failed inside the linear algebra; NaN pool features gave precision
    and recall 0 without a word; pool features of another width failed after the samples' features."""
    stats = {"mu": np.zeros(2048), "sigma": np.eye(2048), "mu_s": np.zeros(SPATIAL), "sigma_s": np.eye(SPATIAL)}
    stats.update(override)
    with pytest.raises(EvaluationError, match=message):
        compute_metrics(_images(0, 8), stats, net, batch_size=4, device="cpu")
    assert forwards == []  # refused before any feature


def test_too_few_samples_are_refused_before_their_features(tmp_path, net, forwards):
    """Fewer samples than a covariance or the k-NN balls need were refused only after the samples' (and
    the reference's) features were computed: minutes of GPU time for a large set."""
    stats = {"mu": np.zeros(2048), "sigma": np.eye(2048), "mu_s": np.zeros(SPATIAL), "sigma_s": np.eye(SPATIAL),
             "pool_features": np.random.default_rng(0).normal(size=(10, 2048)).astype(np.float32)}
    with pytest.raises(EvaluationError, match=r"samples: precision/recall with k=3 need more than 3 samples and "
                                              r"reference images, got 3 and 10"):
        compute_metrics(_images(0, 3), stats, net, batch_size=4, device="cpu")
    with pytest.raises(EvaluationError, match=r"samples: need at least 2 samples for a covariance, got 0"):
        compute_metrics(_images(0, 0), stats, net, batch_size=4, device="cpu")
    assert forwards == []
    np.savez(tmp_path / "one.npz", _images(0, 1))
    np.savez(tmp_path / "ref.npz", _images(1, 5))
    with pytest.raises(EvaluationError, match=rf"{tmp_path / 'one.npz'}: need at least 2 samples for a covariance"):
        evaluate_npz(tmp_path / "one.npz", tmp_path / "ref.npz", net, batch_size=5, device="cpu", use_cache=False,
                     progress=False)
    assert forwards == []  # not even the reference's images
    np.savez(tmp_path / "three.npz", _images(0, 3))
    with pytest.raises(EvaluationError, match=rf"{tmp_path / 'three.npz'}: precision/recall with k=3 need more than "
                                              r"3 samples, got 3"):
        evaluate_npz(tmp_path / "three.npz", tmp_path / "ref.npz", net, batch_size=5, device="cpu", use_cache=False,
                     progress=False)
    assert forwards == []


def test_reference_images_of_another_resolution_give_a_warning(tmp_path, net):
    """512x512 samples against the 256x256 reference batch gave numbers without a word: both are resized
    to the network's input, so the metrics compare resolutions as well as models."""
    np.savez(tmp_path / "ref.npz", _images(1, 6, size=16))
    np.savez(tmp_path / "samples32.npz", _images(0, 6, size=32))
    np.savez(tmp_path / "samples16.npz", _images(0, 6, size=16))
    kwargs = dict(batch_size=6, device="cpu", k=1, cache_dir=tmp_path / "cache", progress=False)
    for cache in ("miss", "hit"):  # the reference's image size is kept in its cache
        evaluate._REFERENCE_MEMO.clear()
        got = evaluate_npz(tmp_path / "samples32.npz", tmp_path / "ref.npz", net, **kwargs)
        assert got["reference_cache"] == cache
        assert len(got["warnings"]) == 1 and "the samples are 32x32 but the reference images of" in got["warnings"][0]
        assert "are 16x16" in got["warnings"][0]
    assert evaluate_npz(tmp_path / "samples16.npz", tmp_path / "ref.npz", net, **kwargs)["warnings"] == []
    in_training = compute_metrics(_images(0, 6, size=32), str(tmp_path / "ref.npz"), net, 6, "cpu", k=1,
                                  cache_dir=tmp_path / "cache")
    assert len(in_training["warnings"]) == 1 and "32x32" in in_training["warnings"][0]


def test_reference_cache_file_given_as_the_reference(tmp_path, net):
    """``train.eval_reference`` may name the cached statistics; they were read without their pool features
    (precision and recall null, 'the reference holds no images'), and a cache made by another feature
    network was used silently, comparing the features of two networks."""
    np.savez(tmp_path / "ref.npz", _images(1, 8))
    samples = _images(0, 8)
    direct = compute_metrics(samples, str(tmp_path / "ref.npz"), net, 4, "cpu")
    (cache,) = tmp_path.glob("ref.npz.ref-*.stats.npz")
    evaluate._REFERENCE_MEMO.clear()
    via_cache = compute_metrics(samples, str(cache), net, 4, "cpu")
    for key in ("fid", "sfid", "precision", "recall", "num_reference_images", "reference_sha256"):
        assert via_cache[key] == direct[key], key
    assert via_cache["reference_cache"] == "hit"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz", cache.name]  # no cache of the cache
    other = random_feature_net(seed=1, input_size=75)
    with pytest.raises(EvaluationError, match=rf"{cache}: reference statistics made with another feature network"):
        compute_metrics(samples, str(cache), other, 4, "cpu")
    # its metadata with an entry of the wrong type: named, no TypeError traceback
    with np.load(cache) as z:
        arrays = dict(z)
    meta = json.loads(str(arrays["meta"]))
    meta["num_images"] = None
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(cache, **arrays)
    evaluate._REFERENCE_MEMO.clear()
    with pytest.raises(EvaluationError, match=rf"{cache}: a reference cache whose metadata cannot be read \(TypeError"):
        compute_metrics(samples, str(cache), net, 4, "cpu")


def test_a_file_system_error_is_not_called_damage(tmp_path):
    """A samples file removed (or unreadable) under the reader was reported as "damaged or truncated
    npz file ... write or copy it again"; it is the file system's error, named as such."""
    path = tmp_path / "s.npz"
    np.savez(path, _images(0, 4))
    images = open_npz_images(path)
    path.unlink()
    with pytest.raises(EvaluationError, match=rf"{path}: cannot be read \(No such file or directory\)"):
        next(images.iter_batches(2))


def test_reference_rewritten_with_same_size_and_mtime_is_hashed_again(tmp_path):
    """The hash memo was keyed by (path, size, mtime): a reference replaced by another of the same size
    with its old mtime kept (``cp -p``, ``rsync -a``) kept its old hash, so the process went on with
    the old reference's statistics from memory."""
    path = tmp_path / "ref.npz"
    np.savez(path, _images(0, 4))
    before, st = file_sha256(path), path.stat()
    np.savez(path, _images(1, 4))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    assert file_sha256(path) != before


def _statistics_npz(path, **override):
    stats = {"mu": np.zeros(2048), "sigma": np.eye(2048), "mu_s": np.zeros(SPATIAL), "sigma_s": np.eye(SPATIAL)}
    stats.update(override)
    np.savez(path, **stats)
    return path


def test_statistics_file_with_a_damaged_header_is_called_damaged(tmp_path, net):
    """A byte flipped in the npy header of a statistics array (numpy's ValueError while parsing it)
    was reported as "mu, sigma, mu_s, sigma_s must be numeric arrays", sending the user to look at
    what wrote the file instead of copying it again. Arrays that are not numbers still say so."""
    np.savez(tmp_path / "samples.npz", _images(0, 6))
    kwargs = dict(batch_size=6, device="cpu", k=1, use_cache=False, progress=False)
    damaged = _statistics_npz(tmp_path / "damaged.npz")
    _flip_member_byte(damaged, "sigma.npy", 20)  # inside the header's dict
    with pytest.raises(EvaluationError, match=rf"{damaged}: damaged or truncated npz file"):
        evaluate_npz(tmp_path / "samples.npz", damaged, net, **kwargs)
    for name, value in [("objects", np.array([{"a": 1}], dtype=object)), ("strings", np.array(["zero"] * 2048))]:
        path = tmp_path / f"{name}.npz"
        _statistics_npz(path, mu=value) if name == "strings" else np.savez(
            path, mu=value, sigma=np.eye(2048), mu_s=np.zeros(SPATIAL), sigma_s=np.eye(SPATIAL))
        with pytest.raises(EvaluationError, match=rf"{path}: mu, sigma, mu_s, sigma_s must be numeric arrays"):
            evaluate_npz(tmp_path / "samples.npz", path, net, **kwargs)


def test_frechet_fallback_is_in_the_results_warnings_and_its_failure_is_an_evaluation_error(net, monkeypatch):
    """ADM's fix for a singular covariance product (eps added to the diagonals) showed only as a Python
    warning, which the JSON result of ``mpdit_dist.evaluate`` and the in-training log did not carry;
    a root with a large imaginary part was a bare ValueError (a traceback on the command line). The
    singular product is forced here by making the first square root non-finite; sFID takes the sqrtm
    route with 70 samples of its 63 features (FID, 2048 features, the exact low-rank one)."""
    from mpdit_dist.metrics import frechet

    real_sqrtm, calls = frechet._sqrtm, []

    def first_not_finite(matrix):
        calls.append(matrix.shape)
        return np.full(matrix.shape, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(frechet, "_sqrtm", first_not_finite)
    stats = {"mu": np.zeros(2048), "sigma": np.eye(2048), "mu_s": np.zeros(SPATIAL), "sigma_s": np.eye(SPATIAL)}
    got = compute_metrics(_images(0, 70), stats, net, batch_size=35, device="cpu", k=1, is_split_size=35)
    assert calls == [(SPATIAL, SPATIAL)] * 2 and got["sfid_route"] == "sqrtm" and np.isfinite(got["sfid"])
    assert got["warnings"] == ["sFID: Fréchet distance: singular product; adding 1e-06 to the covariance diagonals"]

    monkeypatch.setattr(frechet, "_sqrtm", lambda m: real_sqrtm(m) + 1j * np.eye(len(m)))
    with pytest.raises(EvaluationError, match=r"sFID: Fréchet distance: imaginary component 1\.0; the sample and "
                                              r"reference covariances give no real matrix square root"):
        compute_metrics(_images(0, 70), stats, net, batch_size=35, device="cpu", k=1, is_split_size=35)


def test_a_damaged_label_header_is_damage_not_missing_labels(tmp_path, net):
    """A damaged header of the samples' labels (arr_1; numpy parses it before zip checks the CRC of a
    large member) was taken for labels that are not there: the file was evaluated and the label-order
    check skipped without a word. An object array of labels is still only not used."""
    samples = tmp_path / "samples.npz"
    np.savez(samples, _images(0, 6), np.arange(50_000) % 1000)  # labels: a large member
    _flip_member_byte(samples, "arr_1.npy", 20)  # inside the header's dict
    with pytest.raises(EvaluationError, match=rf"{samples}: damaged or truncated npz file"):
        evaluate.read_labels(samples, 50_000)
    objects = tmp_path / "objects.npz"
    np.savez(objects, _images(0, 6), np.array([{"a": 1}] * 6, dtype=object))
    assert evaluate.read_labels(objects, 6) is None
