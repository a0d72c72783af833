"""The MDS and WebDataset readers on shards written by data_prep (real files, simulated ranks)."""
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

import pytest
import torch

from data_prep.encode import encode_dataset
from data_prep.fixtures import save_tiny_vae, write_digits_image_folder, write_test_image_folder
from mpdit_dist.config import DataConfig
from tests.helpers.data import encoded_digits, global_batches
from mpdit_dist.data import build_loader, denormalize, read_manifest, sample_seed
from mpdit_dist.data import manifest as mf
from mpdit_dist.data.sources import ShardReadError, open_source


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Identity latents of 50 digits at 8x8, 7 per shard (the last shard short)."""
    return encoded_digits(tmp_path_factory.mktemp("digits"), size=8, limit=50, formats="mds,wds", per_shard=7)


@pytest.fixture(scope="module")
def vae_data(tmp_path_factory):
    """Tiny-VAE posterior moments with flips of 12 photos (3 bad files skipped)."""
    tmp = tmp_path_factory.mktemp("vae")
    root, _ = write_test_image_folder(tmp / "images")
    vae = save_tiny_vae(tmp / "vae")
    encode_dataset(root, tmp / "data", 16, str(vae), "mds,wds", 5, flip=True, batch_size=4, progress=False)
    return tmp / "data"


def _cfg(path, fmt, g, **kw):
    base = dict(format=fmt, path=str(path), global_batch_size=g, num_workers=0, pin_memory=False)
    base.update(kw)
    return DataConfig(**base)




def _same(a, b):
    assert len(a) == len(b)
    for (k1, x1, y1), (k2, x2, y2) in zip(a, b):
        assert k1 == k2
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


@pytest.mark.parametrize("fmt", ["mds", "wds"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_format_and_world_covers_every_sample_once_per_epoch(digits, fmt, world):
    n = read_manifest(digits)["num_samples"]
    assert n == 50
    batches, _ = global_batches(_cfg(digits, fmt, 12), world, steps=13)  # 156 positions: 3 epochs and a bit
    stream = [k for keys, _, _ in batches for k in keys]
    everything = Counter(f"{i:09d}" for i in range(50))
    for e in range(3):
        assert Counter(stream[e * n:(e + 1) * n]) == everything
    x = batches[0][1]
    assert x.shape == (12, 3, 8, 8) and x.dtype == torch.float32 and batches[0][2].dtype == torch.int64


def test_formats_and_world_sizes_agree_on_every_tensor(vae_data):
    ref, _ = global_batches(_cfg(vae_data, "mds", 6), 1, steps=5)
    _same(ref, global_batches(_cfg(vae_data, "wds", 6), 1, steps=5)[0])
    for world in (2, 3):
        _same(ref, global_batches(_cfg(vae_data, "wds", 6), world, steps=5)[0])
        _same(ref, global_batches(_cfg(vae_data, "mds", 6), world, steps=5)[0])


@pytest.mark.parametrize("fmt", ["mds", "wds"])
@pytest.mark.parametrize("new_world", [1, 3])
def test_state_saved_mid_epoch_with_2_ranks_resumes_with_1_and_3(vae_data, fmt, new_world):
    cfg = _cfg(vae_data, fmt, 6)
    full, _ = global_batches(cfg, 2, steps=7)
    _, loaders = global_batches(cfg, 2, steps=3)  # 18 positions: mid epoch 1 of 12 samples
    state = json.loads(json.dumps(loaders[1].state_dict()))
    rest, _ = global_batches(cfg, new_world, steps=4, state=state)
    _same(full[3:], rest)


def test_fresh_latent_and_flip_per_epoch(vae_data):
    """x = mean + std * eps with eps and the flip choice fixed by (seed, epoch, index)."""
    src = open_source("wds", str(vae_data))
    man = src.manifest
    ld = build_loader(_cfg(vae_data, "wds", 12, shuffle=False), rank=0, world_size=1, seed=0)
    epochs = [next(ld) for _ in range(4)]
    shape = tuple(man["latent_shape"])
    flips = 0
    for j in range(12):
        rec = src.read(j)
        assert epochs[0]["keys"][j] == rec["key"]
        assert not (rec["mean"] == rec["flip_mean"]).all()
        views = [denormalize(e["x"][j:j + 1], man)[0] for e in epochs]
        assert not torch.allclose(views[0], views[1])  # a fresh draw each epoch
        for epoch, v in enumerate(views):
            # the documented rule: a generator seeded by (seed, epoch, index) picks the flip, then eps
            g = torch.Generator().manual_seed(sample_seed(0, epoch, j, salt=1))
            prefix = "flip_" if bool(torch.rand((), generator=g) < 0.5) else ""
            eps = torch.randn(shape, generator=g)
            want = torch.tensor(rec[prefix + "mean"]).float() + torch.tensor(rec[prefix + "std"]).float() * eps
            assert torch.allclose(v, want, atol=1e-4)
            flips += prefix == "flip_"
    assert 0 < flips < 48  # both orientations occur
    again = build_loader(_cfg(vae_data, "wds", 12, shuffle=False), rank=0, world_size=1, seed=0)
    assert torch.equal(next(again)["x"], epochs[0]["x"])
    other_seed = build_loader(_cfg(vae_data, "wds", 12, shuffle=False), rank=0, world_size=1, seed=1)
    assert not torch.equal(next(other_seed)["x"], epochs[0]["x"])


def test_normalised_with_manifest_statistics(digits):
    man = read_manifest(digits)
    ld = build_loader(_cfg(digits, "mds", 50, shuffle=False), rank=0, world_size=1, seed=0)
    x = next(ld)["x"]
    # fp16 storage: the statistics were computed on the stored values, so they match closely
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-3)
    assert torch.allclose(x.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3)
    raw = denormalize(x, man)
    assert raw.min() >= -1.0 - 1e-3 and raw.max() <= 1.0 + 1e-3  # identity: pixels in [-1, 1]


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_remote_store_through_the_local_cache(digits, tmp_path, fmt):
    local, _ = global_batches(_cfg(digits, fmt, 12), 2, steps=5)
    cache = tmp_path / "cache"
    remote, _ = global_batches(_cfg("", fmt, 12, remote=str(digits), cache_dir=str(cache)), 2, steps=5)
    _same(local, remote)
    data_id = mf.dataset_id(read_manifest(digits))
    assert (cache / data_id / "manifest.json").is_file()  # the cache is keyed by the dataset
    sub = cache / data_id / fmt
    assert any(sub.rglob("*.mds" if fmt == "mds" else "*.tar"))
    assert not [p for p in cache.rglob("*.part")]  # downloads land atomically


def test_workers_and_prefetch_keep_the_order(digits):
    a, _ = global_batches(_cfg(digits, "wds", 12), 2, steps=6)
    b, loaders = global_batches(_cfg(digits, "wds", 12, num_workers=2, prefetch_factor=3), 2, steps=6)
    for ld in loaders:
        ld.close()
    _same(a, b)


def test_wrong_format_or_path_is_named(digits, tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path="):
        build_loader(_cfg(tmp_path, "mds", 4), rank=0, world_size=1, seed=0)
    encode_dataset(write_digits_image_folder(tmp_path / "img", 8, limit=20), tmp_path / "only_wds", 8,
                   "identity", "wds", 10, progress=False)
    with pytest.raises(ValueError, match="data.format='mds'.*formats \\['wds'\\]"):
        build_loader(_cfg(tmp_path / "only_wds", "mds", 4), rank=0, world_size=1, seed=0)


def _small(path, n=8, c=2, seed=0, formats=("mds", "wds")):
    from data_prep.encode import write_latents

    lat = np.random.default_rng(seed).normal(size=(n, c, 4, 4)).astype(np.float32)
    write_latents(path, {"latent": lat}, np.arange(n) % 2, ["a", "b"], 4, formats=formats)
    return path


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_a_reused_cache_dir_serves_the_new_dataset(digits, tmp_path, fmt):
    """One cache directory, two remotes (or a remote whose content changed): the second open reads
    the second dataset, never the first one's cached manifest or shards."""
    cache = str(tmp_path / "cache")
    a = open_source(fmt, "", remote=str(digits), cache_dir=cache)
    assert a.num_samples == 50
    a.read(49)
    other = _small(tmp_path / "other")
    b = open_source(fmt, "", remote=str(other), cache_dir=cache)
    assert b.num_samples == 8 and b.manifest["latent_shape"] == [2, 4, 4]
    want = open_source(fmt, str(other))
    for i in range(8):
        assert np.array_equal(b.read(i)["latent"], want.read(i)["latent"])
    # the remote is rewritten in place with other content: the manifest is fetched again
    shutil.rmtree(other)
    _small(other, n=6, seed=1)
    c = open_source(fmt, "", remote=str(other), cache_dir=cache)
    assert c.num_samples == 6
    assert np.array_equal(c.read(5)["latent"], open_source(fmt, str(other)).read(5)["latent"])


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_a_corrupt_remote_shard_is_not_cached(tmp_path, fmt):
    remote = _small(tmp_path / "remote")
    shard = remote / ("mds/part-000001/shard.00000.mds" if fmt == "mds" else "wds/shard-000001.tar")
    data = bytearray(shard.read_bytes())
    data[-300] ^= 0xFF  # same size: the sha256 check on download catches it
    shard.write_bytes(bytes(data))
    src = open_source(fmt, "", remote=str(remote), cache_dir=str(tmp_path / "cache"))
    src.read(0)
    with pytest.raises(ShardReadError, match="sha256 .* differs from the manifest's") as err:
        src.read(5)
    assert "delete it" not in str(err.value)  # nothing was cached: the file is to be repaired at the remote
    rel = shard.relative_to(remote).as_posix()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.as_posix().endswith(rel)]
    assert not list((tmp_path / "cache").rglob("*.part"))


def _corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[:-10]
    else:  # 0xff bytes: a float16 NaN pattern, inside the last sample's latent
        data[-60:-30] = b"\xff" * 30
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case", ["mds-truncate", "mds-garbage", "wds-truncate", "wds-garbage"])
def test_corrupt_shards_are_named(tmp_path, case):
    fmt, how = case.split("-")
    root = _small(tmp_path / "d")
    name = "mds/part-000001/shard.00000.mds" if fmt == "mds" else "wds/shard-000001.tar"
    if fmt == "wds" and how == "garbage":
        # the tar ends in padding: aim at the last sample's latent through the index
        idx = json.loads((root / "wds/shard-000001.idx.json").read_text())
        m = idx["members"].index("latent.npy")
        end = idx["offsets"][-1][m] + idx["sizes"][-1][m]
        data = bytearray((root / name).read_bytes())
        data[end - 30:end] = b"\xff" * 30
        (root / name).write_bytes(bytes(data))
    else:
        _corrupt(root / name, how)
    cfg = _cfg(root, fmt, 8, shuffle=False, normalize=False)
    if how == "truncate":
        with pytest.raises(ShardReadError, match=f"{name}: .* bytes, .* says"):
            next(build_loader(cfg, rank=0, world_size=1, seed=0))
    else:  # the sample's checksum names it as it is read (before the loader's non-finite check would)
        with pytest.raises(ShardReadError, match=f"{name}: sample 7 \\(key 000000007\\) fails its checksum"):
            next(build_loader(cfg, rank=0, world_size=1, seed=0))
    # cut short: the shard's intact index records its size, so --verify says truncated (no need to hash it)
    reason = "truncated: .* bytes, .*json records" if how == "truncate" else "sha256 differs"
    with pytest.raises(ValueError, match=f"{name}: {reason}"):
        mf.verify_checksums(root)


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_read_errors_say_what_to_do(tmp_path, monkeypatch, fmt):
    """A damaged, missing or unreadable shard file: the error names it and the sample, and says how
    to repair it (local: --verify and re-encode; remote: delete the cached copy); a file that stays
    missing is tried again first (fileio.RETRY_WAITS_S, shortened here)."""
    from mpdit_dist import fileio

    monkeypatch.setattr(fileio, "RETRY_WAITS_S", (0.01,))
    root = _small(tmp_path / "d")
    name = "mds/part-000001/shard.00000.mds" if fmt == "mds" else "wds/shard-000001.tar"
    verify = f"`python -m data_prep.encode --out {root} --verify` names every damaged file"
    good = (root / name).read_bytes()
    _corrupt(root / name, "truncate")
    with pytest.raises(ShardReadError, match=f"{name}: .* bytes, .* says") as err:
        open_source(fmt, str(root)).read(5)
    assert verify in str(err.value) and "continues from its newest checkpoint" in str(err.value)
    (root / name).unlink()
    with pytest.raises(ShardReadError, match=f"{name}: No such file or directory \\(sample 5; tried 2 times") as err:
        open_source(fmt, str(root)).read(5)
    assert verify in str(err.value)
    # a sample that fails its checksum says the same
    (root / name).write_bytes(good)
    if fmt == "mds":  # (0xff bytes inside the last sample's latent)
        _corrupt(root / name, "garbage")
        with pytest.raises(ShardReadError, match="sample 7 .* fails its checksum") as err:
            next(build_loader(_cfg(root, fmt, 8, shuffle=False, normalize=False), rank=0, world_size=1, seed=0))
        assert verify in str(err.value)
        (root / name).write_bytes(good)
    # remote: the damaged file is a cached copy; deleting it, as said, repairs it
    cache = tmp_path / "cache"
    assert open_source(fmt, "", remote=str(root), cache_dir=str(cache)).read(5)["key"] == "000000005"
    cached = next(cache.rglob(name))
    _corrupt(cached, "truncate")
    with pytest.raises(ShardReadError, match=f"{name}: .* bytes") as err:
        open_source(fmt, "", remote=str(root), cache_dir=str(cache)).read(5)
    assert f"a copy in the local cache ({cached.parents[len(Path(name).parts) - 1]}): delete it" in str(err.value)
    assert f"downloads it again from {root}" in str(err.value)
    cached.unlink()
    assert open_source(fmt, "", remote=str(root), cache_dir=str(cache)).read(5)["key"] == "000000005"


def test_a_bad_wds_index_is_named(tmp_path):
    root = _small(tmp_path / "d", formats=("wds",))
    idx_path = root / "wds/shard-000001.idx.json"
    text = idx_path.read_text()
    idx_path.write_text(text.replace('"members":["cls",', '"members":["xcls",'))
    with pytest.raises(ShardReadError, match=r"shard-000001.idx.json: invalid WebDataset index .*lack \['cls'\]"):
        open_source("wds", str(root)).read(5)
    idx = json.loads(text)
    idx["offsets"][2][0] = idx["tar_size"] + 10
    idx_path.write_text(json.dumps(idx))
    with pytest.raises(ShardReadError, match="shard-000001.idx.json: .*reach past the tar"):
        open_source("wds", str(root)).read(5)
    # an index naming another shard's tar (or none) would read that tar's bytes as this shard's
    idx = json.loads(text)
    idx["tar"] = "shard-000000.tar"
    idx_path.write_text(json.dumps(idx))
    with pytest.raises(ShardReadError, match="shard-000001.idx.json: .*names the tar 'shard-000000.tar', "
                                             "not 'shard-000001.tar'"):
        open_source("wds", str(root)).read(5)
    del idx["tar"]
    idx_path.write_text(json.dumps(idx))
    with pytest.raises(ShardReadError, match=r"shard-000001.idx.json: invalid WebDataset index \(KeyError: 'tar'\)"):
        open_source("wds", str(root)).read(5)


@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_wds_records_must_have_the_manifest_shape_and_dtype(tmp_path, bad):
    """A tar whose flipped latents have another shape (or dtype) than the manifest says: the read
    fails naming the tar and the key, instead of numpy broadcasting them into the batch."""
    from data_prep.encode import _commit_shard, finalize

    n = 8
    lat = np.random.default_rng(0).normal(size=(n, 2, 4, 4)).astype(np.float16)
    root = tmp_path / "d"
    from data_prep.encode import write_latents

    write_latents(root, {"latent": lat, "flip_latent": lat}, np.zeros(n, dtype=int), ["a"], 4, formats=["wds"])
    # rewrite shard 1 with the encoder's own writer, one sample's flip_latent off
    samples = []
    for i in range(4, 8):
        flip = lat[i]
        if i == 6:
            flip = lat[i, :1] if bad == "shape" else lat[i].astype(np.float32)
        samples.append({"key": mf.sample_key(i), "label": 0, "path": "", "latent": lat[i], "flip_latent": flip})
    stats = json.loads((root / "parts/part-000001.json").read_text())["stats"]
    _commit_shard(root, 1, {"samples": samples, "failures": [], "stats": stats}, ["wds"],
                  ["latent", "flip_latent"], [2, 4, 4], 4, 4, kill_now=False)
    finalize(root)
    src = open_source("wds", str(root))
    src.read(5)
    want = "float16\\[1, 4, 4\\]" if bad == "shape" else "float32\\[2, 4, 4\\]"
    with pytest.raises(ShardReadError, match=f"shard-000001.tar: sample 6 \\(key 000000006\\) field 'flip_latent' "
                                             f"is {want}, the manifest says float16\\[2, 4, 4\\]"):
        src.read(6)
    with pytest.raises(ShardReadError, match="key 000000006"):
        ld = build_loader(_cfg(root, "wds", 8, shuffle=False), rank=0, world_size=1, seed=0)
        next(ld)


def test_a_reordered_mds_index_is_refused(tmp_path):
    """The merged MDS index with two equal-sized parts swapped: every shard file is intact and the
    dataset id unchanged, but read by position the samples would come in another order. The
    reader refuses it, naming the index; WebDataset (ordered by the manifest) is unaffected."""
    root = _small(tmp_path / "d", n=12)
    want = [open_source("mds", str(root)).read(i)["key"] for i in range(12)]
    assert want == [mf.sample_key(i) for i in range(12)]
    dataset_id = mf.dataset_id(read_manifest(root))
    path = root / "mds" / "index.json"
    index = json.loads(path.read_text())
    index["shards"][0], index["shards"][1] = index["shards"][1], index["shards"][0]
    path.write_text(json.dumps(index))
    assert mf.dataset_id(read_manifest(root)) == dataset_id
    with pytest.raises(ShardReadError, match=r"mds/index.json: the merged MDS index does not match .*manifest.json"
                                             r"(.|\n)*shards\[0\] is part-000001/shard.00000.mds with 4 samples, "
                                             r"manifest.json's shards\[0\] is part-000000/shard.00000.mds"):
        open_source("mds", str(root))
    assert open_source("wds", str(root)).read(4)["key"] == "000000004"
    # a stale index of another dataset: a part missing, the counts differ
    del index["shards"][2]
    path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"mds/index.json: 8 samples, manifest.json says 12"):
        open_source("mds", str(root))


def test_a_changed_remote_mds_index_is_not_cached(tmp_path):
    remote = _small(tmp_path / "remote")
    path = remote / "mds" / "index.json"
    index = json.loads(path.read_text())
    index["shards"][0], index["shards"][1] = index["shards"][1], index["shards"][0]
    path.write_text(json.dumps(index))
    with pytest.raises(ShardReadError, match="index.json: downloaded file's sha256 .* differs from the manifest's"):
        open_source("mds", "", remote=str(remote), cache_dir=str(tmp_path / "cache"))
    assert not list((tmp_path / "cache").rglob("index.json"))


@pytest.mark.parametrize("change, words", [
    (lambda m: m.update(num_classes="10"), "num_classes must be a positive integer, got '10'"),
    (lambda m: m.update(num_classes=0), "num_classes must be a positive integer, got 0"),
    (lambda m: m.update(latent_dtype="bfloat16"), "latent_dtype 'bfloat16': expected 'float16' or 'float32'"),
    (lambda m: m["shards"][1].update(num_samples=4.0), r"shards\[1\].num_samples must be a non-negative integer"),
    (lambda m: m["shards"][1].update(num_samples=3), "the shards hold 7 samples, num_samples says 8"),
])
def test_manifest_fields_are_checked_when_read(tmp_path, change, words):
    """Values the writer never produces (a hand edit, another tool): named at read, not a raw numpy
    or int error deep in a reader, nor a label check against a string."""
    root = _small(tmp_path / "d", formats=("wds",))
    manifest = json.loads((root / "manifest.json").read_text())
    assert read_manifest(root)["num_samples"] == 8 == sum(s["num_samples"] for s in manifest["shards"])
    change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=words):
        read_manifest(root)


def test_a_failed_json_write_leaves_no_temp_file(tmp_path):
    from mpdit_dist import fileio

    target = tmp_path / "encode_config.json"
    for write in (fileio.write_json_atomic, fileio.write_json_exclusive):
        with pytest.raises(TypeError):
            write(target, {"ok": 1, "bad": object()})  # fails in the middle of serialising
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_open_shard_files_are_capped(tmp_path, monkeypatch, fmt):
    """A process keeps at most max_open_shards() shard files open (the soft limit of open files
    is often 1,024, fewer than ImageNet's shards): beyond it the oldest is closed, and reopened
    when a sample of it comes again, with the same values."""
    from mpdit_dist.data import sources

    root = _small(tmp_path / "d", n=20)  # 5 shards of 4
    want = open_source(fmt, str(root))
    monkeypatch.setattr(sources, "_OPEN_CAP", [2])
    src = open_source(fmt, str(root))
    for i in [0, 19, 5, 0, 11, 16, 2, 19, 9, 6, 13]:
        assert np.array_equal(src.read(i)["latent"], want.read(i)["latent"]), i
        cache = src.__dict__.get("_readers") or src.__dict__.get("_files")
        assert len(cache) <= 2


def test_the_open_files_limit_is_raised_to_the_hard_one():
    import resource

    from mpdit_dist.data.sources import max_open_shards

    cap = max_open_shards()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == hard and (soft == resource.RLIM_INFINITY or cap == max(16, soft - 256))
