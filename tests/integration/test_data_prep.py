"""data_prep.encode on real image files (sklearn's photos in assorted modes, bad files), with a
tiny random AutoencoderKL and with identity (process-level tests: test_data_prep_processes.py)."""
import json

import numpy as np
import pytest
from PIL import Image

from data_prep.encode import ConfigMismatch, encode_dataset, main, world_from_env
from data_prep.fixtures import save_tiny_vae, write_test_image_folder
from data_prep.images import BadImage, center_crop_arr, to_rgb
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
    with pytest.raises(ConfigMismatch, match="samples_per_shard: 4 -> 5"):
        encode_dataset(root, out, 16, "identity", "wds", 5, progress=False)
    with pytest.raises(ConfigMismatch, match="resolution: 16 -> 8"):
        encode_dataset(root, out, 8, "identity", "wds", 4, progress=False)
    # the same configuration again: nothing rewritten
    again = encode_dataset(root, out, 16, "identity", "wds", 4, progress=False)
    assert again["shards_written"] == 0 and again["shards_skipped"] == 4


ENV_VARS = ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN",
            "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID", "SLURM_STEPID", "SLURM_STEP_NUM_TASKS")


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
    mf.write_json_atomic(part, rec)
    with pytest.raises(ValueError, match=r"part-000001.json: shard 1's record says .*'first_image': 3"):
        finalize(out)
    rec["first_image"], rec["num_images"] = 4, 3
    mf.write_json_atomic(part, rec)
    with pytest.raises(ValueError, match=r"part-000001.json: shard 1's record says .*'num_images': 3"):
        finalize(out)
    rec["num_images"] = 4
    mf.write_json_atomic(part, rec)
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
    out = tmp_path / "out"
    summary = encode_dataset(root, out, 8, "identity", "wds", 4, progress=False)
    assert summary["images_encoded"] == 6 and summary["images_failed"] == 1 and summary["files_skipped"] == 2
    m = read_manifest(out)
    assert m["num_images"] == 7 and m["num_failed"] == 1
    assert m["failures"][0]["path"] == "a/zz_dangling.png" and "broken symlink" in m["failures"][0]["reason"]
    assert m["num_skipped_files"] == 2
    assert {f["path"]: f["reason"] for f in m["skipped_files"]} == {
        "README.txt": "not in a class folder", "b/.DS_Store": "hidden"}
    # a stray file that comes or goes between reruns does not change the configuration
    (root / "b" / ".DS_Store").unlink()
    again = encode_dataset(root, out, 8, "identity", "wds", 4, progress=False)
    assert again["shards_written"] == 0 and again["files_skipped"] == 1


def test_verify_flag_checks_the_manifest_checksums(tmp_path, capsys):
    from data_prep.encode import write_latents

    out = tmp_path / "d"
    lat = np.random.default_rng(0).normal(size=(9, 2, 4, 4)).astype(np.float32)
    write_latents(out, {"latent": lat}, np.zeros(9, dtype=int), ["c"], 4)
    assert main(["--out", str(out), "--verify"]) == 0
    assert json.loads(capsys.readouterr().out)["verified_files"] == 3 * 4  # per shard: tar, idx, MDS index + data
    tar = out / "wds" / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    data[-1100] ^= 0xFF  # same size: only the checksum can tell
    tar.write_bytes(bytes(data))
    assert main(["--out", str(out), "--verify"]) == 2
    err = capsys.readouterr().err
    assert "1 of 12 shard files fail" in err and "shard-000001.tar: sha256 differs" in err


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
