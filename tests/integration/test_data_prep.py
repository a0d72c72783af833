"""data_prep.encode on real image files (sklearn's photos in assorted modes, bad files), with a
tiny random AutoencoderKL and with identity (process-level tests: test_data_prep_processes.py)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.encode import ConfigMismatch, encode_dataset, main, world_from_env
from data_prep.fixtures import save_tiny_vae, write_test_image_folder
from data_prep.images import BadImage, center_crop_arr, list_image_folder, to_rgb
from mpdit_dist import fileio
from mpdit_dist.data import manifest as mf
from mpdit_dist.data import read_manifest


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root, bad = write_test_image_folder(tmp_path_factory.mktemp("imgs") / "folder")
    return root, bad


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny_vae")


def test_vae_dataset_manifest_failures_and_contents(images, vae, tmp_path):
    root, bad = images
    out = tmp_path / "out"
    summary = encode_dataset(root, out, 16, str(vae), "mds,wds", 4, flip=True, batch_size=3, progress=False)
    assert summary["images_failed"] == 3 and summary["images_encoded"] == 12 and summary["manifest"]
    m = read_manifest(out)
    assert m["num_samples"] == 12 and m["num_images"] == 15 and m["num_failed"] == 3
    assert {f["path"] for f in m["failures"]} == set(bad)
    reasons = {f["path"]: f["reason"] for f in m["failures"]}
    for path, kind in bad.items():
        assert kind in reasons[path]
    assert m["latent_shape"] == [4, 8, 8] and m["class_names"] == ["china", "flower"] and m["num_classes"] == 2
    assert m["class_counts"] == [6, 6] and m["store"] == "moments" and m["flip"] is True
    assert m["encoder"]["scaling_factor"] == 0.18215 and m["encoder"]["type"] == "AutoencoderKL"
    # shards: counts and checksums as written
    assert sum(s["num_samples"] for s in m["shards"]) == 12
    for s in m["shards"]:
        for rel, digest in s["checksums"].items():
            assert mf.file_sha256(out / rel) == digest
    # the stored moments are the VAE's posterior of the cropped image (fp16)
    import torch
    from diffusers import AutoencoderKL
    from webdataset import WebDataset

    model = AutoencoderKL.from_pretrained(vae).eval()
    rows = list(WebDataset(str(out / "wds" / "shard-{000000..000003}.tar"), shardshuffle=False))
    assert len(rows) == 12  # plain webdataset reads our tars sequentially
    row = next(r for r in rows if r["__key__"] == "000000003")  # china/img_03_cmyk.jpg
    meta = json.loads(row["json"])
    assert meta["path"] == "china/img_03_cmyk.jpg" and int(row["cls"]) == 0
    with Image.open(root / meta["path"]) as im:
        arr = center_crop_arr(to_rgb(im), 16)
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        dist = model.encode(x).latent_dist
        flip = model.encode(x.flip(-1)).latent_dist
    import io

    def npy(b):
        return np.load(io.BytesIO(b))

    np.testing.assert_allclose(npy(row["mean.npy"]), dist.mean[0].numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(npy(row["std.npy"]), dist.std[0].numpy(), rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(npy(row["flip_mean.npy"]), flip.mean[0].numpy(), rtol=2e-3, atol=2e-3)
    assert npy(row["mean.npy"]).dtype == np.float16


@pytest.mark.parametrize("normalized", [True, False])
def test_decode_inverts_the_training_normalisation(vae, normalized):
    """Model-space latents (the stored VAE latents as the loader normalises them) decode to what the
    VAE decodes from the stored latents themselves: no second scaling anywhere."""
    import torch

    from data_prep.encoders import VAEEncoder
    from mpdit_dist.sample import decode_to_uint8

    enc = VAEEncoder(str(vae), 16, device="cpu")
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    center, _ = enc.encode(images)
    manifest = {"encoder": enc.describe(), "latent_mean": center.mean(axis=(0, 2, 3)).tolist(),
                "latent_std": (center.std(axis=(0, 2, 3)) + 0.1).tolist()}
    stored = torch.from_numpy(center)
    z = mf.normalize(stored, manifest, normalized)
    assert not torch.allclose(z, stored)  # the model space differs from the stored latents either way
    got = decode_to_uint8(z, manifest, torch.device("cpu"), normalized).astype(int)
    with torch.no_grad():
        ref = enc.vae.decode(stored).sample
    ref = ((ref.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(int)
    assert got.shape == (3, 16, 16, 3) and np.abs(got - ref).max() <= 1


def test_image_modes_become_rgb_and_adm_crop():
    for mode in ("L", "P", "CMYK", "RGBA", "LA", "I;16"):
        img = Image.new("RGB", (40, 30), (10, 200, 30)).convert(mode)
        assert to_rgb(img).mode == "RGB"
    # a 300x130 image to 32: halved once (150x65, short side 65 >= 64), then bicubic to 74x32, centre crop
    grad = np.tile(np.arange(300, dtype=np.uint8)[None, :, None], (130, 1, 3))
    out = center_crop_arr(Image.fromarray(grad), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert abs(int(out[16, 16, 0]) - 150) <= 3  # the centre column survives


def test_identity_latents_are_the_cropped_image(images, tmp_path):
    root, _ = images
    out = tmp_path / "id"
    encode_dataset(root, out, 16, "identity", "wds", 5, progress=False)
    m = read_manifest(out)
    assert m["latent_shape"] == [3, 16, 16] and m["store"] == "sample" and m["encoder"]["scaling_factor"] == 1.0
    from mpdit_dist.data.sources import open_source

    src = open_source("wds", str(out))
    rec = src.read(1)  # china/img_01_l.jpg
    with Image.open(root / "china" / "img_01_l.jpg") as im:
        want = center_crop_arr(to_rgb(im), 16).transpose(2, 0, 1) / 127.5 - 1
    np.testing.assert_allclose(rec["latent"].astype(np.float32), want, atol=1e-3)
    assert rec["key"] == "000000001" and rec["label"] == 0


def test_strict_and_input_errors(images, tmp_path):
    root, _ = images
    with pytest.raises(BadImage, match="zz_truncated.jpg"):
        encode_dataset(root, tmp_path / "strict", 16, "identity", "wds", 4, strict=True, progress=False)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        encode_dataset(tmp_path / "nowhere", tmp_path / "o", 16, "identity", "wds", 4, progress=False)
    empty = tmp_path / "folder_with_empty_class"
    (empty / "a").mkdir(parents=True)
    (empty / "b").mkdir()
    Image.new("RGB", (8, 8)).save(empty / "a" / "x.png")
    with pytest.raises(ValueError, match=r"class folder .*b: holds no images"):
        encode_dataset(empty, tmp_path / "o", 16, "identity", "wds", 4, progress=False)
    with pytest.raises(FileNotFoundError, match="no AutoencoderKL found locally"):
        encode_dataset(root, tmp_path / "o2", 16, str(tmp_path / "no_vae"), "wds", 4, progress=False)
    out = tmp_path / "cfg"
    encode_dataset(root, out, 16, "identity", "wds", 4, progress=False)
    with pytest.raises(ConfigMismatch, match=r"encode_config.json records them; 4 of 4 shards done\): "
                                             r"--samples-per-shard 4 -> 5\. Nothing was written"):
        encode_dataset(root, out, 16, "identity", "wds", 5, progress=False)
    with pytest.raises(ConfigMismatch, match=r"\): --resolution 16 -> 8\. "):  # latent_shape follows from it
        encode_dataset(root, out, 8, "identity", "wds", 4, progress=False)
    with pytest.raises(ConfigMismatch, match=r"\): --flip off -> on; --formats wds -> mds,wds\. "):
        encode_dataset(root, out, 16, "identity", "wds,mds", 4, flip=True, progress=False)
    # the same configuration again: nothing rewritten
    again = encode_dataset(root, out, 16, "identity", "wds", 4, progress=False)
    assert again["shards_written"] == 0 and again["shards_skipped"] == 4


ENV_VARS = ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN",
            "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_STEP", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID",
            "SLURM_STEPID", "SLURM_STEP_NUM_TASKS", "LOCAL_RANK", "SLURM_LOCALID")


def test_world_from_env(monkeypatch):
    for k in ENV_VARS:
        monkeypatch.delenv(k, raising=False)
    assert world_from_env() == (0, 1)
    assert world_from_env(2, 4) == (2, 4)  # no launcher: the flags
    with pytest.raises(ValueError, match="--world-size 4 without --rank"):
        world_from_env(None, 4)  # four processes started this way would all be rank 0
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert world_from_env() == (2, 4)
    monkeypatch.setenv("SLURM_NTASKS", "3")
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert world_from_env() == (2, 4)  # the batch script itself (no srun step): one process per array task
    monkeypatch.setenv("SLURM_STEP_ID", "0")  # srun -n 3 in each array task: 12 workers
    assert world_from_env() == (7, 12)
    for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(k)
    assert world_from_env() == (1, 3)  # srun -n 3
    monkeypatch.delenv("SLURM_STEP_ID")
    assert world_from_env(2, 4) == (2, 4)  # an sbatch -n 3 script running one encode: its flags
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert world_from_env() == (2, 4)  # torchrun wins over SLURM
    # a lone flag takes the rest from the environment (the bug: (0, 4) on every rank)
    assert world_from_env(None, 4) == (2, 4)
    assert world_from_env(2, None) == (2, 4)
    assert world_from_env(2, 4) == (2, 4)
    with pytest.raises(ValueError, match="--world-size 2 contradicts WORLD_SIZE=4"):
        world_from_env(None, 2)
    with pytest.raises(ValueError, match="--rank 0 contradicts RANK=2"):
        world_from_env(0, 4)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    with pytest.raises(ValueError, match="--rank 0 contradicts SLURM_PROCID=1"):
        world_from_env(0, None)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "2")
    with pytest.raises(ValueError, match="rank 2 / world size 2"):
        world_from_env()


def test_cli_lone_world_size_flag_reads_rank_from_env(images, tmp_path, monkeypatch, capsys):
    root, _ = images
    for k in ENV_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "o"
    assert main(["--images", str(root), "--out", str(out), "--resolution", "8", "--formats", "wds",
                 "--samples-per-shard", "4", "--world-size", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rank"] == 1 and summary["world_size"] == 2
    assert sorted(p.name for p in (out / "parts").glob("*.json")) == ["part-000001.json", "part-000003.json"]
    assert main(["--images", str(root), "--out", str(out), "--resolution", "8", "--formats", "wds",
                 "--samples-per-shard", "4", "--rank", "0"]) == 2
    assert "--rank 0 contradicts RANK=1" in capsys.readouterr().err


def test_config_is_created_exclusively(tmp_path):
    """Runs that start at once with different configurations: exactly one may record its own."""
    import threading

    from data_prep.encode import _check_config

    for attempt in range(5):
        out = tmp_path / f"race{attempt}"
        out.mkdir()
        n = 8
        barrier = threading.Barrier(n)
        outcome = [None] * n

        def run(i):
            barrier.wait()
            try:
                _check_config(out, {"version": 1, "samples_per_shard": i})
                outcome[i] = "ok"
            except ConfigMismatch:
                outcome[i] = "mismatch"

        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outcome.count("ok") == 1 and outcome.count("mismatch") == n - 1, outcome
        winner = outcome.index("ok")
        assert json.loads((out / mf.ENCODE_CONFIG).read_text())["samples_per_shard"] == winner
        assert [p.name for p in out.iterdir()] == [mf.ENCODE_CONFIG]  # no temp file left


def test_finalize_rejects_records_that_do_not_tile_the_images(tmp_path):
    from data_prep.encode import finalize, write_latents

    out = tmp_path / "d"
    lat = np.random.default_rng(0).normal(size=(10, 2, 4, 4)).astype(np.float32)
    write_latents(out, {"latent": lat}, np.arange(10) % 2, ["a", "b"], 4, formats=["wds"])
    part = out / "parts" / "part-000001.json"
    rec = json.loads(part.read_text())
    rec["first_image"] = 3  # a record of another partition: images 3..6 overlap shard 0's
    fileio.write_json_atomic(part, rec)
    with pytest.raises(ValueError, match=r"part-000001.json: shard 1's record says .*'first_image': 3"):
        finalize(out)
    rec["first_image"], rec["num_images"] = 4, 3
    fileio.write_json_atomic(part, rec)
    with pytest.raises(ValueError, match=r"part-000001.json: shard 1's record says .*'num_images': 3"):
        finalize(out)
    rec["num_images"] = 4
    fileio.write_json_atomic(part, rec)
    assert finalize(out)["num_samples"] == 10


def test_write_latents_checks_shapes_labels_and_finiteness(tmp_path):
    from data_prep.encode import write_latents

    lat = np.random.default_rng(0).normal(size=(8, 2, 4, 4)).astype(np.float32)
    y = np.zeros(8, dtype=int)
    with pytest.raises(ValueError, match=r"latents\['flip_latent'\] has shape \(8, 1, 4, 4\), expected \(8, 2, 4, 4\)"):
        write_latents(tmp_path / "a", {"latent": lat, "flip_latent": lat[:, :1]}, y, ["c"], 4)
    with pytest.raises(ValueError, match=r"latents\['latent'\] has shape \(8, 2, 4, 4\), expected \(7, 2, 4, 4\)"):
        write_latents(tmp_path / "b", {"latent": lat}, y[:7], ["c"], 4)
    with pytest.raises(ValueError, match=r"labels\[5\] = -1 is outside \[0, 2\)"):
        write_latents(tmp_path / "c", {"latent": lat}, np.array([0, 1, 0, 1, 0, -1, 0, 1]), ["a", "b"], 4)
    with pytest.raises(ValueError, match=r"labels\[0\] = 2 is outside \[0, 2\)"):
        write_latents(tmp_path / "d", {"latent": lat}, np.full(8, 2), ["a", "b"], 4)
    bad = lat.copy()
    bad[6, 1, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"latents\['latent'\]\[6\] is not finite"):
        write_latents(tmp_path / "e", {"latent": bad}, y, ["c"], 4)
    big = lat.copy()
    big[2, 0, 1, 1] = 1e6  # finite in float32, inf in the stored float16
    with pytest.raises(ValueError, match=r"latents\['latent'\]\[2\] is not finite"):
        write_latents(tmp_path / "f", {"latent": big}, y, ["c"], 4)


def test_read_manifest_rejects_missing_keys_and_non_finite_statistics(tmp_path):
    from data_prep.encode import write_latents

    out = tmp_path / "d"
    lat = np.random.default_rng(0).normal(size=(6, 2, 4, 4)).astype(np.float32)
    good = write_latents(out, {"latent": lat}, np.zeros(6, dtype=int), ["c"], 4, formats=["wds"])
    for key in ("latent_mean", "latent_std"):
        m = dict(good)
        m[key] = [0.5, float("nan")]
        (out / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(ValueError, match=f"{key} must be finite"):
            read_manifest(out)
        m[key] = [0.5, float("inf")]
        (out / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(ValueError, match=f"{key} must be finite"):
            read_manifest(out)
    for key in ("formats", "shards", "store", "flip"):
        m = {k: v for k, v in good.items() if k != key}
        (out / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(ValueError, match=f"manifest lacks '{key}'"):
            read_manifest(out)


def _overflowing_vae(vae_dir, root, out_dir):
    """The tiny VAE with its posterior mean scaled so that the latents of about half of the images
    leave float16's range (inf when stored): a real encoder that fails on some images only."""
    import torch
    from diffusers import AutoencoderKL

    from data_prep.images import list_image_folder, load_image

    model = AutoencoderKL.from_pretrained(vae_dir).eval()
    c = model.config.latent_channels
    with torch.no_grad():
        model.quant_conv.bias[:c] = 0  # the mean is then linear in the weight's scale
    _, entries = list_image_folder(root)
    peaks = {}
    for e in entries:
        try:
            arr = load_image(root, e, 16)
        except BadImage:
            continue
        x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            peaks[e.relpath] = float(model.encode(x).latent_dist.mean.abs().max())
    ranked = sorted(peaks.values())
    gaps = [(ranked[i + 1] - ranked[i], i) for i in range(len(ranked) // 3, 2 * len(ranked) // 3)]
    _, i = max(gaps)
    scale = 65520.0 / ((ranked[i] + ranked[i + 1]) / 2)  # values >= 65520 round to inf in float16
    with torch.no_grad():
        model.quant_conv.weight[:c] *= scale
    model.save_pretrained(out_dir)
    return out_dir, {p for p, v in peaks.items() if v > ranked[i]}


def test_non_finite_latents_are_counted_as_failures(images, vae, tmp_path):
    root, bad = images
    big_vae, overflowing = _overflowing_vae(vae, root, tmp_path / "big_vae")
    assert 0 < len(overflowing) < 12
    out = tmp_path / "out"
    summary = encode_dataset(root, out, 16, str(big_vae), "mds,wds", 4, batch_size=3, progress=False)
    assert summary["images_failed"] == 3 + len(overflowing)
    m = read_manifest(out)
    assert m["num_samples"] == 12 - len(overflowing)
    reasons = {f["path"]: f["reason"] for f in m["failures"]}
    assert {p for p, r in reasons.items() if r == "non-finite latent"} == overflowing
    assert all(np.isfinite(m["latent_mean"])) and all(np.isfinite(m["latent_std"]))
    from mpdit_dist.data.sources import open_source

    src = open_source("mds", str(out))
    for i in range(src.num_samples):
        rec = src.read(i)
        assert np.isfinite(rec["mean"]).all() and np.isfinite(rec["std"]).all()
    # --strict: the first non-finite latent is fatal (on a copy without the unreadable files)
    import shutil

    clean = tmp_path / "clean"
    shutil.copytree(root, clean)
    for rel in bad:
        (clean / rel).unlink()
    with pytest.raises(BadImage, match="non-finite latent"):
        encode_dataset(clean, tmp_path / "strict", 16, str(big_vae), "wds", 4, strict=True, progress=False,
                       batch_size=3)


def test_broken_symlinks_and_stray_files_are_counted(tmp_path):
    root = tmp_path / "imgs"
    for cname in ("a", "b"):
        (root / cname).mkdir(parents=True)
        for j in range(3):
            Image.new("RGB", (12, 12), (40 * j, 90, 10)).save(root / cname / f"{j}.png")
    (root / "a" / "zz_dangling.png").symlink_to(root / "a" / "gone.png")
    (root / "README.txt").write_text("a stray file at the root\n")
    (root / "b" / ".DS_Store").write_bytes(b"x")
    os.mkfifo(root / "b" / "pipe.png")  # opening it would wait for a writer for ever
    out = tmp_path / "out"
    summary = encode_dataset(root, out, 8, "identity", "wds", 4, progress=False)
    assert summary["images_encoded"] == 6 and summary["images_failed"] == 1 and summary["files_skipped"] == 3
    m = read_manifest(out)
    assert m["num_images"] == 7 and m["num_failed"] == 1
    assert m["failures"][0]["path"] == "a/zz_dangling.png" and "broken symlink" in m["failures"][0]["reason"]
    assert m["num_skipped_files"] == 3
    assert {f["path"]: f["reason"] for f in m["skipped_files"]} == {
        "README.txt": "not in a class folder", "b/.DS_Store": "hidden",
        "b/pipe.png": "not a regular file (FIFO, socket or device)"}
    # a stray file that comes or goes between reruns does not change the configuration
    (root / "b" / ".DS_Store").unlink()
    again = encode_dataset(root, out, 8, "identity", "wds", 4, progress=False)
    assert again["shards_written"] == 0 and again["files_skipped"] == 2


def test_verify_flag_checks_the_manifest_checksums(tmp_path, capsys):
    from data_prep.encode import write_latents

    out = tmp_path / "d"
    lat = np.random.default_rng(0).normal(size=(9, 2, 4, 4)).astype(np.float32)
    write_latents(out, {"latent": lat}, np.zeros(9, dtype=int), ["c"], 4)
    assert main(["--out", str(out), "--verify"]) == 0
    # per shard: tar, idx, MDS part index + data; and the merged MDS index
    assert json.loads(capsys.readouterr().out)["verified_files"] == 3 * 4 + 1
    tar = out / "wds" / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    data[-1100] ^= 0xFF  # same size: only the checksum can tell
    tar.write_bytes(bytes(data))
    assert main(["--out", str(out), "--verify"]) == 2
    err = capsys.readouterr().err
    assert "1 of 12 shard files damaged (13 files checked" in err and "shard-000001.tar: sha256 differs" in err


def _swap_mds_index_entries(out, i, j):
    path = out / "mds" / "index.json"
    index = json.loads(path.read_text())
    index["shards"][i], index["shards"][j] = index["shards"][j], index["shards"][i]
    path.write_text(json.dumps(index))


def test_verify_checks_the_merged_mds_index(tmp_path, capsys):
    """Two entries of mds/index.json swapped: every shard file and its checksum is fine and the
    dataset id is the same, but the loader would read the samples in another order."""
    from data_prep.encode import write_latents

    out = tmp_path / "d"
    lat = np.random.default_rng(0).normal(size=(12, 2, 4, 4)).astype(np.float32)
    write_latents(out, {"latent": lat}, np.zeros(12, dtype=int), ["c"], 4, formats=["mds"])
    m = read_manifest(out)
    assert m["mds_index_sha256"] == mf.file_sha256(out / "mds" / "index.json")
    assert main(["--out", str(out), "--verify"]) == 0
    capsys.readouterr()
    _swap_mds_index_entries(out, 0, 2)  # shards of equal size: the sample count cannot tell
    assert main(["--out", str(out), "--verify"]) == 2
    err = capsys.readouterr().err
    assert "mds/index.json: sha256 differs from the manifest's mds_index_sha256" in err
    assert "mds/index.json: shards[0] is part-000002/shard.00000.mds with 4 samples, manifest.json's " \
           "shards[0] is part-000000/shard.00000.mds with 4 samples" in err
    # a manifest written before mds_index_sha256 existed: the order is still checked
    old = {k: v for k, v in m.items() if k != "mds_index_sha256"}
    (out / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"all 6 shard files intact, 2 problems with the merged MDS index "
                                         r"\(7 files checked.*\n.*shards\[0\] is part-000002"):
        mf.verify_checksums(out)
    # --finalize rewrites the index from the shard records
    assert main(["--out", str(out), "--finalize"]) == 0
    assert main(["--out", str(out), "--verify"]) == 0
    (out / "mds" / "index.json").unlink()
    assert main(["--out", str(out), "--verify"]) == 2
    assert "mds/index.json: missing (the merged MDS index" in capsys.readouterr().err


def test_finalize_flag(images, tmp_path, capsys):
    root, _ = images
    out = tmp_path / "fin"
    encode_dataset(root, out, 16, "identity", "mds", 4, rank=0, world_size=2, progress=False)
    assert not (out / "manifest.json").exists()  # rank 1's shards are missing
    assert main(["--out", str(out), "--finalize"]) == 1
    assert "shard 1 not done yet" in capsys.readouterr().err
    s = encode_dataset(root, out, 16, "identity", "mds", 4, rank=1, world_size=2, progress=False)
    assert s["manifest"]  # the last rank to finish writes it
    first = (out / "manifest.json").read_bytes()
    (out / "manifest.json").unlink()
    assert main(["--out", str(out), "--finalize"]) == 0
    assert (out / "manifest.json").read_bytes() == first
    assert read_manifest(out)["num_samples"] == 12
    # the merged MDS index is readable by Streaming itself
    from streaming.base.format import reader_from_json

    index = json.loads((out / "mds" / "index.json").read_text())
    readers = [reader_from_json(str(out / "mds"), None, sh) for sh in index["shards"]]
    assert sum(len(r) for r in readers) == 12
    assert readers[1].get_item(0)["key"] == "000000004"  # the 5th image, first of shard 1


def test_each_process_of_a_node_takes_its_own_gpu():
    from data_prep.encoders import pick_device

    assert pick_device(None, {}, False, 0) == "cpu"
    assert pick_device(None, {"LOCAL_RANK": "3"}, False, 0) == "cpu"
    assert pick_device(None, {}, True, 8) == "cuda:0"
    # torchrun --nproc_per_node 8: one GPU per process (the bug: every process on plain "cuda", GPU 0)
    assert [pick_device(None, {"LOCAL_RANK": str(r)}, True, 8) for r in range(8)] == [f"cuda:{r}" for r in range(8)]
    assert pick_device(None, {"LOCAL_RANK": "5"}, True, 4) == "cuda:1"  # more processes than GPUs: shared
    assert pick_device("cuda", {"LOCAL_RANK": "2"}, True, 8) == "cuda:2"  # no index given: the local one
    assert pick_device("cuda:5", {"LOCAL_RANK": "2"}, True, 8) == "cuda:5"  # an explicit index wins
    assert pick_device("cpu", {"LOCAL_RANK": "2"}, True, 8) == "cpu"
    # srun -n 8 tasks: SLURM_LOCALID; not for a batch script's own process (no step)
    srun = {"SLURM_PROCID": "9", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}
    assert pick_device(None, srun, True, 8) == "cuda:1"
    assert pick_device(None, {**srun, "LOCAL_RANK": "6"}, True, 8) == "cuda:6"
    assert pick_device(None, {"SLURM_PROCID": "0", "SLURM_LOCALID": "3"}, True, 8) == "cuda:0"
    with pytest.raises(ValueError, match="LOCAL_RANK='x' is not an integer"):
        pick_device(None, {"LOCAL_RANK": "x"}, True, 8)
    with pytest.raises(ValueError, match="--device cuda: no CUDA device"):
        pick_device("cuda", {}, False, 0)


def test_torchrun_variables_come_together(monkeypatch, images, tmp_path, capsys):
    for k in ENV_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    # the bug: rank 0 on every process, and "--rank 1 contradicts RANK=0" about a variable not set
    with pytest.raises(ValueError, match="WORLD_SIZE='4' is set but RANK is not"):
        world_from_env()
    root, _ = images
    assert main(["--images", str(root), "--out", str(tmp_path / "o"), "--resolution", "8", "--formats", "wds",
                 "--rank", "1"]) == 2
    assert "WORLD_SIZE='4' is set but RANK is not" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match="RANK='1' is set but WORLD_SIZE is not"):
        world_from_env()


def _slurm_array(monkeypatch, task_id: int, first: int, last: int, step: int, count: int) -> None:
    """The variables SLURM sets for one task of a job array."""
    for name, value in (("ID", task_id), ("MIN", first), ("MAX", last), ("STEP", step), ("COUNT", count)):
        monkeypatch.setenv(f"SLURM_ARRAY_TASK_{name}", str(value))


def test_a_slurm_array_must_be_contiguous(monkeypatch):
    for k in ENV_VARS:
        monkeypatch.delenv(k, raising=False)
    # --array=0-9:2: tasks 0, 2, ..., 8 would be ranks 0, 2, ..., 8 of 5; shards of ranks 1 and 3 never written
    _slurm_array(monkeypatch, task_id=4, first=0, last=8, step=2, count=5)
    with pytest.raises(ValueError, match=r"ids 0..8 in steps of 2 for 5 tasks .*not contiguous.*--array=0-4"):
        world_from_env()
    # --array=1,3,5 (a list: the step variable says 1)
    _slurm_array(monkeypatch, task_id=3, first=1, last=5, step=1, count=3)
    with pytest.raises(ValueError, match=r"ids 1..5 in steps of 1 for 3 tasks .*--array=0-2"):
        world_from_env()
    # --array=5-7: contiguous, from any first id
    _slurm_array(monkeypatch, task_id=6, first=5, last=7, step=1, count=3)
    assert world_from_env() == (1, 3)


def test_when_every_image_fails_the_cli_says_so_cleanly(tmp_path, capsys):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_text("not an image\n")
    (root / "a" / "y.png").write_bytes(b"")
    out = tmp_path / "out"
    assert main(["--images", str(root), "--out", str(out), "--resolution", "8", "--formats", "mds,wds"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "every image failed (2 of 2; the first: a/x.png: not an image (unidentified format))" in err
    assert "parts/*.json" in err and not (out / "manifest.json").exists()


def _adm_center_crop(img, resolution):
    """ADM's center_crop_arr (guided-diffusion image_datasets.py), the reference for ordinary images."""
    while min(*img.size) >= 2 * resolution:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = resolution / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.array(img)
    crop_y = (arr.shape[0] - resolution) // 2
    crop_x = (arr.shape[1] - resolution) // 2
    return arr[crop_y: crop_y + resolution, crop_x: crop_x + resolution]


def test_a_thin_strip_is_cropped_before_its_resize(monkeypatch):
    from sklearn.datasets import load_sample_images

    photo = load_sample_images().images[0]
    rng = np.random.default_rng(0)
    # ordinary aspect ratios, up to the bound of 16 (after the BOX halving): ADM's pixels exactly
    checked = 0
    while checked < 40:
        res = int(rng.choice([8, 16, 32, 64]))
        short = int(rng.integers(res // 2, 2 * res))  # no BOX halving: the ratio is the resize's
        long = min(int(short * rng.uniform(1, 16.5)), 640)
        if round(long * res / short) > 16 * res:
            continue
        img = Image.fromarray(np.ascontiguousarray(photo[:short, :long] if checked % 2 else photo[:long, :short]))
        assert np.array_equal(center_crop_arr(img, res), _adm_center_crop(img, res)), (img.size, res)
        checked += 1
    # a 1 x 4000 strip at 256 px: the full resize would be 256 x 1,024,000 (786 MB)
    resize = Image.Image.resize
    sizes = []

    def bounded_resize(self, size, *args, **kwargs):
        sizes.append(tuple(size))
        assert size[0] * size[1] <= 16 * 256 * 256, f"resize to {size}"
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", bounded_resize)
    strip = Image.fromarray(np.tile(photo[:1, :1], (4000, 1, 1)))  # one colour: the crop is that colour
    out = center_crop_arr(strip, 256)
    assert out.shape == (256, 256, 3) and (out == photo[0, 0]).all() and sizes == [(256, 256)]
    monkeypatch.setattr(Image.Image, "resize", resize)
    # beyond the bound the centre square is resampled from the same window with the same filter: it
    # differs from the full resize by PIL's rounding only
    for size, res in (((20, 420), 16), ((600, 7), 8), ((3, 400), 32)):
        img = Image.fromarray(np.ascontiguousarray(photo[:size[1], :size[0]]))
        diff = np.abs(center_crop_arr(img, res).astype(int) - _adm_center_crop(img, res).astype(int))
        assert diff.max() <= 12 and diff.mean() < 1.0, (size, res, diff.max(), diff.mean())


def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path):
    from data_prep.images import ImageEntry, load_image

    def load(name):
        return load_image(tmp_path, ImageEntry(0, name, 0, (tmp_path / name).stat().st_size), 8)

    grey = np.full((16, 16), 32768, np.uint16)  # 50% grey; the bug: 255 (every value above 255 clipped)
    Image.fromarray(grey).save(tmp_path / "mid16.png")
    with Image.open(tmp_path / "mid16.png") as im:
        assert im.mode == "I;16"
    assert (load("mid16.png") == 128).all()
    ramp = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.tif")
    with Image.open(tmp_path / "ramp16.tif") as im:
        assert np.array_equal(np.asarray(to_rgb(im))[..., 0], (ramp >> 8).astype(np.uint8))
    big_endian = Image.frombytes("I;16B", (16, 16), grey.astype(">u2").tobytes())
    assert (np.asarray(to_rgb(big_endian)) == 128).all()
    # 'I' (32-bit integers) holds 16-bit samples; beyond them it is refused, naming the mode
    Image.fromarray(np.full((16, 16), 65535, np.int32)).save(tmp_path / "i32.tif")
    assert (load("i32.tif") == 255).all()
    Image.fromarray(np.full((16, 16), 70000, np.int32)).save(tmp_path / "i32_big.tif")
    with pytest.raises(BadImage, match=r"i32_big.tif: mode 'I' .* range over \[70000, 70000\]"):
        load("i32_big.tif")
    # 'F' (float): [0, 1] -> round(255 v); anything else is refused
    Image.fromarray(np.full((16, 16), 0.5, np.float32)).save(tmp_path / "half.tif")
    assert (load("half.tif") == 128).all()
    Image.fromarray(np.linspace(0, 2, 256, dtype=np.float32).reshape(16, 16)).save(tmp_path / "f_big.tif")
    with pytest.raises(BadImage, match=r"f_big.tif: mode 'F' .* range over \[0, 2\]; only \[0, 1\]"):
        load("f_big.tif")
    # through the encoder: the refused image is a counted failure with the reason, the others encode
    root = tmp_path / "folder"
    (root / "a").mkdir(parents=True)
    for name in ("mid16.png", "f_big.tif", "half.tif"):
        (root / "a" / name).write_bytes((tmp_path / name).read_bytes())
    summary = encode_dataset(root, tmp_path / "out", 8, "identity", "wds", 4, progress=False)
    assert summary["images_encoded"] == 2 and summary["images_failed"] == 1
    [failure] = read_manifest(tmp_path / "out")["failures"]
    assert failure["path"] == "a/f_big.tif" and "mode 'F'" in failure["reason"]


def test_symlinked_subfolders_are_followed_like_image_folder(tmp_path):
    """Images under a symlinked subfolder of a class are found (the bug: skipped without a word);
    a symlink back up the tree is reported once instead of followed for ever."""
    from torchvision.datasets import ImageFolder

    store = tmp_path / "store"
    root = tmp_path / "imgs"
    for d in (store / "extra", root / "a" / "real", root / "b"):
        d.mkdir(parents=True)
    for i, path in enumerate((root / "a" / "real" / "1.png", store / "extra" / "2.png", store / "extra" / "3.png",
                              root / "b" / "4.png")):
        Image.new("RGB", (10, 10), (20 * i, 50, 90)).save(path)
    (root / "a" / "linked").symlink_to(store / "extra")
    (root / "b" / "same").symlink_to(root / "a" / "real")  # not a loop: one more path to 1.png
    want = sorted((Path(p).relative_to(root).as_posix(), y) for p, y in ImageFolder(str(root)).samples)
    _, entries = list_image_folder(root)
    assert [(e.relpath, e.label) for e in entries] == want == [
        ("a/linked/2.png", 0), ("a/linked/3.png", 0), ("a/real/1.png", 0), ("b/4.png", 1), ("b/same/1.png", 1)]
    # loops: to the class folder, to the linked folder itself, to the root
    (root / "b" / "same").unlink()
    (root / "a" / "real" / "up").symlink_to(root / "a")
    (store / "extra" / "again").symlink_to(store / "extra")
    (root / "b" / "top").symlink_to(root)
    skipped = []
    _, again = list_image_folder(root, skipped)
    assert again == entries[:4]
    loop = "folder loop (symlink to {}, a folder above it): not followed"
    assert skipped == [{"path": "a/linked/again", "reason": loop.format(store / "extra")},
                       {"path": "a/real/up", "reason": loop.format(root / "a")},
                       {"path": "b/top", "reason": loop.format(root)}]
    out = tmp_path / "out"
    summary = encode_dataset(root, out, 8, "identity", "wds", 4, progress=False)
    assert summary["images_encoded"] == 4 and summary["files_skipped"] == 3
    assert read_manifest(out)["skipped_files"] == skipped


def test_a_file_name_that_is_not_utf8_is_skipped_and_listed(tmp_path, capsys):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (10, 10), (200, 50, 90)).save(root / "a" / "ok.png")
    bad = os.path.join(os.fsencode(root / "a"), b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    with open(bad, "wb") as f:
        f.write((root / "a" / "ok.png").read_bytes())
    os.mkdir(os.path.join(os.fsencode(root / "a"), b"dir\xff"))
    out = tmp_path / "out"
    # the bug: "'utf-8' codec can't encode character '\udce9'" for the whole run, naming no file
    assert main(["--images", str(root), "--out", str(out), "--resolution", "8", "--formats", "mds,wds"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images_encoded"] == 1 and summary["files_skipped"] == 2
    m = read_manifest(out)
    assert m["skipped_files"] == [
        {"path": "a/caf\\xe9.png", "reason": "file name is not valid UTF-8"},
        {"path": "a/dir\\xff", "reason": "folder name is not valid UTF-8 (its files are not listed)"}]
    os.rename(os.path.join(os.fsencode(root), b"a"), os.path.join(os.fsencode(root), b"\xe9t\xe9"))
    with pytest.raises(ValueError, match=r"class folder '\\\\xe9t\\\\xe9' has a name that is not valid UTF-8"):
        encode_dataset(root, tmp_path / "out2", 8, "identity", "wds", 4, progress=False)


def test_the_vae_runs_in_fp32_unless_asked_and_a_restart_in_another_precision_is_refused(images, vae, tmp_path):
    """--vae-dtype: fp32 by default, as the official feature extraction (GPUs encoded in bf16 before);
    recorded with the encoder, and a rerun in another precision names the flag."""
    root, _ = images
    out = tmp_path / "bf16"
    encode_dataset(root, out, 16, str(vae), "wds", 4, batch_size=3, progress=False, vae_dtype="bf16")
    assert read_manifest(out)["encoder"]["dtype"] == "bfloat16"
    with pytest.raises(ConfigMismatch, match=r"--vae-dtype bf16 -> fp32"):
        encode_dataset(root, out, 16, str(vae), "wds", 4, batch_size=3, progress=False)
    fp32 = tmp_path / "fp32"
    encode_dataset(root, fp32, 16, str(vae), "wds", 4, batch_size=3, progress=False)
    assert read_manifest(fp32)["encoder"]["dtype"] == "float32"
    # the repair hint's command reproduces the precision
    from data_prep.encode import _rerun_command

    assert "--vae-dtype bf16" in _rerun_command(out)[0] and "--vae-dtype" not in _rerun_command(fp32)[0]
