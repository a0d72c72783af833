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


def test_world_from_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(k, raising=False)
    assert world_from_env() == (0, 1)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert world_from_env() == (2, 4)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    assert world_from_env() == (1, 3)  # torchrun wins over the array
    assert world_from_env(0, 2) == (0, 2)  # flags win over both
    with pytest.raises(ValueError, match="rank 3 / world size 2"):
        world_from_env(3, 2)


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
