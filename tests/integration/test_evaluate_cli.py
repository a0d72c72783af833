"""The whole evaluation path on tiny ADM-format npz files with a small random feature network.

Plumbing and formats: npz in, reference cache (miss then hit), metrics JSON out, metrics in a real
MLflow SQLite store, ADM reference batches with precomputed statistics, and clear errors.
The feature network runs at 75x75 (its smallest input) for speed; the numbers mean nothing.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from mpdit_dist import evaluate
from mpdit_dist.evaluate import EvaluationError, compute_metrics, extract_features, main
from mpdit_dist.inception import FID_WEIGHTS_FILE, FeatureNetError, random_feature_net
from mpdit_dist.metrics import gaussian_stats

REPO = Path(__file__).resolve().parents[2]
INPUT_SIZE = 75


def _images(rng, n, size=16, smooth=False):
    if not smooth:
        return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    # colour ramps: a different image distribution from noise
    ramp = np.linspace(0, 1, size)[None, :, None, None] * rng.uniform(60, 255, (n, 1, 1, 3))
    return np.broadcast_to(ramp, (n, size, size, 3)).astype(np.uint8).copy()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    net = random_feature_net(seed=0, input_size=INPUT_SIZE)
    weights = root / FID_WEIGHTS_FILE
    torch.save(net.state_dict(), weights)
    samples = np.concatenate([_images(rng, 6), _images(rng, 6, smooth=True)])
    reference = _images(rng, 14)
    np.savez(root / "samples.npz", samples, np.arange(len(samples)))  # arr_1: labels, as ADM writes them
    np.savez(root / "reference.npz", reference)
    return {"root": root, "net": net, "weights": weights, "samples": samples, "reference": reference}


def _check_metrics(m, num_samples):
    for key in ("inception_score", "fid", "sfid", "precision", "recall"):
        assert isinstance(m[key], float) and math.isfinite(m[key]), key
    assert 0.0 <= m["precision"] <= 1.0 and 0.0 <= m["recall"] <= 1.0
    assert m["inception_score"] >= 1.0 - 1e-9
    assert m["num_samples"] == num_samples


def test_cli_end_to_end_with_cache_and_mlflow(files):
    root = files["root"]
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("eval", artifact_location=str(root / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    args = [
        str(root / "samples.npz"), str(root / "reference.npz"),
        "--inception", str(files["weights"]), "--input-size", str(INPUT_SIZE),
        "--batch-size", "5", "--device", "cpu",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "mpdit_dist.evaluate", *args, "--out", str(root / "first.json"),
         "--mlflow-run-id", run_id, "--tracking-uri", uri, "--mlflow-step", "7"],
        capture_output=True, text=True, env=env, cwd=root, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads((root / "first.json").read_text())
    assert json.loads(proc.stdout) == first  # the JSON printed is the JSON written
    _check_metrics(first, num_samples=12)
    assert first["reference_cache"] == "miss" and first["reference_stats_source"] == "computed"
    assert first["num_reference_images"] == 14
    assert first["fid_route"] == "low_rank"  # 12 samples < 2048 dims
    cache = Path(evaluate.reference_cache_path(
        root / "reference.npz", first["reference_sha256"], first["feature_net_checksum"]
    ))
    assert cache.is_file() and cache.parent == root  # beside the reference file
    assert first["feature_net_checksum"] == files["net"].checksum()

    # MLflow: the five metrics at the explicit step, in the real SQLite store
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        history = client.get_metric_history(run_id, f"eval/{key}")
        assert [(h.step, h.value) for h in history] == [(7, pytest.approx(first[key]))]
    assert client.get_run(run_id).data.tags["eval/num_samples"] == "12"

    # second call, in this process: the reference statistics come from the cache file
    cached = os.stat(cache).st_mtime_ns
    second = main(args + ["--out", str(root / "second.json")])
    assert second["reference_cache"] == "hit"
    assert os.stat(cache).st_mtime_ns == cached  # read, not rewritten
    for key in ("inception_score", "fid", "sfid", "precision", "recall"):
        assert second[key] == pytest.approx(first[key], rel=1e-5, abs=1e-9), key
    assert json.loads((root / "second.json").read_text())["reference_cache"] == "hit"


def test_python_api_with_adm_reference_statistics(files, tmp_path):
    """An ADM reference batch carries mu/sigma/mu_s/sigma_s of the whole dataset: they, not its
    images, set FID and sFID, while its images set precision and recall."""
    net, samples = files["net"], files["samples"]
    feats = extract_features([samples], net, "cpu")
    pool, spatial = gaussian_stats(feats.pool), gaussian_stats(feats.spatial)
    ref_path = tmp_path / "VIRTUAL_ref.npz"
    # statistics of the samples themselves, images of something else: FID must be ~0
    np.savez(ref_path, arr_0=files["reference"], mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma)
    m = compute_metrics(samples, str(ref_path), net, batch_size=8, device="cpu", cache_dir=tmp_path / "cache")
    _check_metrics(m, num_samples=12)
    assert m["reference_stats_source"] == "npz" and m["num_reference_images"] == 14
    assert abs(m["fid"]) < 1e-6 and abs(m["sfid"]) < 1e-6
    computed = compute_metrics(samples, str(tmp_path.parent / files["root"].name / "reference.npz"), net, 8, "cpu")
    assert computed["fid"] > 1e-3  # the same images with their own statistics are far from 0
    assert (m["precision"], m["recall"]) == (computed["precision"], computed["recall"])
    assert list((tmp_path / "cache").glob("VIRTUAL_ref.npz.ref-*.stats.npz"))

    # a dict of statistics (no images): FID as before, precision and recall reported as None
    d = compute_metrics(samples, {"mu": pool.mu, "sigma": pool.sigma, "mu_s": spatial.mu, "sigma_s": spatial.sigma}, net)
    assert abs(d["fid"]) < 1e-6 and d["precision"] is None and d["recall"] is None


def test_bad_inputs_give_clear_errors(files, tmp_path):
    net = files["net"]
    bad = tmp_path / "float.npz"
    np.savez(bad, np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(EvaluationError, match=r"float.npz: 'arr_0' must be uint8"):
        evaluate.open_npz_images(bad)
    nokey = tmp_path / "nokey.npz"
    np.savez(nokey, images=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(EvaluationError, match=r"nokey.npz: no array 'arr_0'"):
        evaluate.open_npz_images(nokey)
    partial = tmp_path / "partial.npz"
    np.savez(partial, arr_0=files["reference"], mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(EvaluationError, match=r"lacks \['mu_s', 'sigma_s'\]"):
        compute_metrics(files["samples"], str(partial), net, use_cache=False)
    with pytest.raises(EvaluationError, match="must be uint8"):
        compute_metrics(files["samples"].astype(np.float32), str(files["root"] / "reference.npz"), net)
    with pytest.raises(FeatureNetError, match=FID_WEIGHTS_FILE):
        main([str(files["root"] / "samples.npz"), str(files["root"] / "reference.npz"), "--device", "cpu"])


def test_streamed_batches_equal_the_array(files):
    images = evaluate.open_npz_images(files["root"] / "samples.npz")
    assert images.shape == (12, 16, 16, 3)
    batches = list(images.iter_batches(5))
    assert [len(b) for b in batches] == [5, 5, 2]
    np.testing.assert_array_equal(np.concatenate(batches), files["samples"])
    compressed = files["root"] / "compressed.npz"
    np.savez_compressed(compressed, files["samples"])
    np.testing.assert_array_equal(
        np.concatenate(list(evaluate.open_npz_images(compressed).iter_batches(7))), files["samples"]
    )


@pytest.mark.parametrize("argv,message", [
    (["--k", "0"], "--k must be at least 1 (ADM: 3), got 0"),
    (["--k", "-1"], "--k must be at least 1 (ADM: 3), got -1"),
    (["--is-split-size", "0"], "--is-split-size must be at least 1 (ADM: 5000), got 0"),
    (["--input-size", "32"], "--input-size must be at least 75"),
])
def test_cli_rejects_bad_settings_before_any_work(tmp_path, capsys, argv, message):
    # neither file exists: the settings must be refused before anything is read or computed
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "samples.npz"), str(tmp_path / "reference.npz"), "--inception", "x.pth", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_api_rejects_bad_settings_before_features(files, tmp_path):
    net = files["net"]
    with pytest.raises(EvaluationError, match="k .* must be at least 1, got 0"):
        compute_metrics(files["samples"], str(files["root"] / "reference.npz"), net, device="cpu", k=0)
    with pytest.raises(EvaluationError, match="is_split_size .* must be at least 1, got 0"):
        evaluate.evaluate_npz(tmp_path / "absent.npz", tmp_path / "absent_ref.npz", net, is_split_size=0)


def test_labels_sorted_by_class_give_a_warning(files, tmp_path, caplog):
    """An npz whose arr_1 is sorted by class: the Inception Score's consecutive splits each see one
    class, so the evaluation warns (logged, and in the JSON's ``warnings``); shuffled, it does not."""
    rng = np.random.default_rng(1)
    images = _images(rng, 16)
    labels = np.repeat(np.arange(4), 4)
    args = [str(files["root"] / "reference.npz"), "--inception", str(files["weights"]),
            "--input-size", str(INPUT_SIZE), "--batch-size", "8", "--device", "cpu", "--is-split-size", "4"]
    np.savez(tmp_path / "sorted.npz", arr_0=images, arr_1=labels)
    got = main([str(tmp_path / "sorted.npz"), *args, "--out", str(tmp_path / "sorted.json")])
    written = json.loads((tmp_path / "sorted.json").read_text())
    assert len(got["warnings"]) == 1 and written["warnings"] == got["warnings"]
    assert "sorted by class" in got["warnings"][0] and "holds 1 class " in got["warnings"][0]
    assert "sorted by class" in caplog.text
    order = rng.permutation(16)
    np.savez(tmp_path / "shuffled.npz", arr_0=images[order], arr_1=labels[order])
    assert main([str(tmp_path / "shuffled.npz"), *args])["warnings"] == []
    np.savez(tmp_path / "nolabels.npz", arr_0=images)
    assert main([str(tmp_path / "nolabels.npz"), *args])["warnings"] == []
