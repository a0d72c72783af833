"""Per-sample checksums: a latent whose stored bytes change after it was written (a bit flipped on
disk or in a copy) is named as it is read, also when its values stay finite and the file keeps its
size (which every earlier check passes: sizes at open, the loader's non-finite check).

Real shard files written by ``data_prep.encode`` (digits through the identity encoder, and
``write_latents`` with moments and flips); the damaged byte is found from the formats' own layout
(the MDS part's ``index.json`` and offset table, the WebDataset ``.idx.json`` and ``.npy`` header),
not from the reader under test. Datasets written before the checksums (the encoder's
``SAMPLE_CHECKSUM = None`` writes that layout byte for byte) still load as before, unchecked; an
output started without them is finished without them.
"""
import io
import json
import logging
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import data_prep.encode as encode
from mpdit_dist.config import DataConfig
from mpdit_dist.data import build_loader
from mpdit_dist.data import manifest as mf
from mpdit_dist.data.sources import ShardReadError, open_source
from tests.helpers.data import encoded_digits

N, PER_SHARD = 20, 6  # shards of 6, 6, 6, 2


def _digits(tmp, checksums: bool) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        if not checksums:
            mp.setattr(encode, "SAMPLE_CHECKSUM", None)
        return encoded_digits(tmp, size=8, limit=N, formats="mds,wds", per_shard=PER_SHARD)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return _digits(tmp_path_factory.mktemp("digits"), checksums=True)


@pytest.fixture(scope="module")
def old_digits(tmp_path_factory):
    """The same dataset in the layout written before per-sample checksums."""
    return _digits(tmp_path_factory.mktemp("old_digits"), checksums=False)


def _copy(root: Path, tmp_path: Path) -> Path:
    shutil.copytree(root, tmp_path / "data")
    return tmp_path / "data"


def _cfg(root: Path, fmt: str, batch: int, workers: int = 0) -> DataConfig:
    return DataConfig(format=fmt, path=str(root), global_batch_size=batch, num_workers=workers, pin_memory=False,
                      shuffle=False)


# ------------------------------------------------------------------ where a sample's bytes lie


def _mds_field(root: Path, shard_id: int, j: int, field: str) -> tuple[Path, int, int]:
    """(file, first byte, size) of ``field``'s payload in sample ``j`` of MDS shard ``shard_id``: from
    the part's ``index.json`` (columns) and the offset table at the head of its ``.mds`` file."""
    part = root / mf.MDS_DIR / mf.part_name(shard_id)
    info = json.loads((part / "index.json").read_text())["shards"][0]
    path = part / info["raw_data"]["basename"]
    data = path.read_bytes()
    count = int.from_bytes(data[:4], "little")
    offsets = np.frombuffer(data, np.uint32, count=count + 1, offset=4)
    pos = int(offsets[j])
    names, sizes = info["column_names"], info["column_sizes"]
    # a sample: a uint32 size for each variable-size column, then every column's payload in order
    variable = [n for n, s in zip(names, sizes) if s is None]
    var_sizes = dict(zip(variable, np.frombuffer(data, np.uint32, count=len(variable), offset=pos).tolist()))
    pos += 4 * len(variable)
    for name, size in zip(names, sizes):
        size = var_sizes[name] if size is None else size
        if name == field:
            return path, pos, size
        pos += size
    raise KeyError(field)


def _wds_member(root: Path, shard_id: int, j: int, member: str) -> tuple[Path, int, int]:
    """(file, first byte, size) of a member of sample ``j`` of a tar, from its ``.idx.json``; for an
    ``.npy`` member, of the array data after the ``.npy`` header."""
    idx = json.loads((root / mf.WDS_DIR / mf.wds_index_name(shard_id)).read_text())
    m = idx["members"].index(member)
    path = root / mf.WDS_DIR / mf.wds_name(shard_id)
    start, size = idx["offsets"][j][m], idx["sizes"][j][m]
    if member.endswith(".npy"):
        from numpy.lib import format as npf

        with open(path, "rb") as f:
            f.seek(start)
            head = io.BytesIO(f.read(size))
        version = npf.read_magic(head)
        (npf.read_array_header_1_0 if version == (1, 0) else npf.read_array_header_2_0)(head)
        start, size = start + head.tell(), size - head.tell()
    return path, start, size


def _field_range(root: Path, fmt: str, shard_id: int, j: int, field: str) -> tuple[Path, int, int]:
    return _mds_field(root, shard_id, j, field) if fmt == "mds" else _wds_member(root, shard_id, j, field + ".npy")


def _flip_low_mantissa_bit(path: Path, start: int, size: int) -> tuple[float, float]:
    """Flip the lowest mantissa bit of the float16 in the middle of ``[start, start + size)``: the
    value stays finite (the exponent is untouched) and the file keeps its size. Returns (old, new)."""
    data = bytearray(path.read_bytes())
    at = start + (size // 4) * 2  # an element boundary: the payload holds whole float16s
    old = float(np.frombuffer(bytes(data[at:at + 2]), np.float16)[0])
    data[at] ^= 0x01  # little-endian: the low byte first
    new = float(np.frombuffer(bytes(data[at:at + 2]), np.float16)[0])
    before = path.stat().st_size
    path.write_bytes(bytes(data))
    assert path.stat().st_size == before and np.isfinite(new) and new != old
    return old, new


def _assert_named(err: BaseException, path: Path, index: int, key: str) -> None:
    msg = str(err)
    assert re.search(rf"^{re.escape(str(path))}: sample {index} \(key {key}\) fails its checksum: the crc32 of its "
                     rf"key, label and .* is [0-9a-f]{{8}}, the one written with it [0-9a-f]{{8}}", msg), msg
    # what to do: find every damaged file, re-encode those shards, start the run again
    assert "--verify` names every damaged file" in msg and "run the dataset's encode command again" in msg, msg
    assert "continues from its newest checkpoint" in msg, msg


# ------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_a_flipped_bit_inside_a_latent_is_named(digits, tmp_path, fmt):
    root = _copy(digits, tmp_path)
    m = mf.read_manifest(root)
    assert m["sample_checksum"] == {"field": "crc32", "algorithm": "zlib.crc32", "covers": ["key", "label", "latent"]}
    want = [open_source(fmt, str(root)).read(i) for i in range(N)]
    index, shard_id, j = 9, 1, 3  # sample 3 of shard 1
    path, start, size = _field_range(root, fmt, shard_id, j, "latent")
    assert size == 2 * int(np.prod(m["latent_shape"]))
    _flip_low_mantissa_bit(path, start, size)

    src = open_source(fmt, str(root))
    with pytest.raises(ShardReadError) as err:
        src.read(index)
    _assert_named(err.value, path, index, "000000009")
    # every other sample, of that shard and of the others, reads as written
    for i in range(N):
        if i != index:
            got = src.read(i)
            assert got["key"] == want[i]["key"] and got["label"] == want[i]["label"]
            assert np.array_equal(got["latent"], want[i]["latent"])
    # through the loader (in this process, and in a DataLoader worker): the batch holding it fails, named
    for workers in (0, 1):
        with pytest.raises(ShardReadError) as err:
            next(build_loader(_cfg(root, fmt, N, workers), rank=0, world_size=1, seed=0))
        assert f"{path}: sample {index} (key 000000009) fails its checksum" in str(err.value)
        assert "--verify` names every damaged file" in str(err.value)
    # and --verify names the file (whole-file sha256) as the hint says
    with pytest.raises(mf.DamagedDataset, match=re.escape(f"{path}: sha256 differs")):
        mf.verify_checksums(root)


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_a_label_changed_to_another_class_is_named(digits, tmp_path, fmt):
    """A label changed to another valid class passes the range check; the checksum covers it."""
    root = _copy(digits, tmp_path)
    index, shard_id, j = 4, 0, 4
    label = open_source(fmt, str(root)).read(index)["label"]
    other = (label + 1) % 10
    if fmt == "mds":
        path, start, size = _mds_field(root, shard_id, j, "label")
        raw = np.int64(other).tobytes()
    else:
        path, start, size = _wds_member(root, shard_id, j, "cls")
        raw = str(other).encode()
    assert len(raw) == size
    data = bytearray(path.read_bytes())
    data[start:start + size] = raw
    path.write_bytes(bytes(data))
    with pytest.raises(ShardReadError) as err:
        open_source(fmt, str(root)).read(index)
    _assert_named(err.value, path, index, "000000004")


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_write_latents_moments_and_flips_are_covered(tmp_path, fmt):
    """Precomputed latents (``write_latents``), store=moments with flips: every field is covered, in
    the manifest's order; damage in the last field of a sample is named."""
    rng = np.random.default_rng(0)
    n = 10
    lat = {f: rng.normal(size=(n, 2, 4, 4)).astype(np.float32) for f in ("mean", "flip_mean")}
    lat.update({f: np.abs(rng.normal(size=(n, 2, 4, 4))).astype(np.float32) + 0.1 for f in ("std", "flip_std")})
    root = tmp_path / "d"
    m = encode.write_latents(root, lat, np.arange(n) % 3, ["a", "b", "c"], 4)
    fields = ["mean", "std", "flip_mean", "flip_std"]
    assert m["sample_checksum"]["covers"] == ["key", "label", *fields]
    src = open_source(fmt, str(root))
    for i in range(n):  # the stored checksum is the one of the stored (fp16) arrays, the same in both formats
        rec = src.read(i)
        assert mf.sample_crc32(rec["key"], rec["label"], [rec[f] for f in fields]) == mf.sample_crc32(
            mf.sample_key(i), i % 3, [lat[f][i].astype(np.float16) for f in fields])
    path, start, size = _field_range(root, fmt, 1, 3, "flip_std")  # sample 7
    _flip_low_mantissa_bit(path, start, size)
    src = open_source(fmt, str(root))
    with pytest.raises(ShardReadError) as err:
        src.read(7)
    _assert_named(err.value, path, 7, "000000007")
    assert "label and mean, std, flip_mean, flip_std is" in str(err.value)
    assert [src.read(i)["key"] for i in (4, 5, 6)] == ["000000004", "000000005", "000000006"]


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_a_dataset_without_checksums_loads_as_before(digits, old_digits, tmp_path, fmt, caplog):
    """The layout from before per-sample checksums: read unchecked (an info line says so), the same
    batches as the same dataset with them; a flipped bit that leaves a latent finite goes through
    (as it always did there), one that makes it non-finite is still caught by the loader."""
    m = mf.read_manifest(old_digits)
    assert "sample_checksum" not in m and "sample_checksum" not in json.loads(
        (old_digits / mf.ENCODE_CONFIG).read_text())
    if fmt == "mds":
        assert "crc32" not in json.loads((old_digits / "mds/part-000000/index.json").read_text())["shards"][0][
            "column_names"]
    else:
        assert json.loads((old_digits / "wds/shard-000000.idx.json").read_text())["members"] == [
            "cls", "json", "latent.npy"]
    with caplog.at_level(logging.INFO, logger="mpdit_dist.data.sources"):
        old = next(build_loader(_cfg(old_digits, fmt, N), rank=0, world_size=1, seed=0))
    assert f"{old_digits}: written before per-sample checksums: samples are read unchecked" in caplog.text
    new = next(build_loader(_cfg(digits, fmt, N), rank=0, world_size=1, seed=0))
    assert old["keys"] == new["keys"] and torch.equal(old["y"], new["y"]) and torch.equal(old["x"], new["x"])

    root = _copy(old_digits, tmp_path)
    path, start, size = _field_range(root, fmt, 1, 3, "latent")
    _flip_low_mantissa_bit(path, start, size)
    batch = next(build_loader(_cfg(root, fmt, N), rank=0, world_size=1, seed=0))
    assert not torch.equal(batch["x"], old["x"])  # unchecked: trained on, as before checksums
    data = bytearray(path.read_bytes())
    data[start:start + 2] = b"\xff\xff"  # a float16 NaN
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"sample 9 \(key 000000009\) gives a non-finite latent"):
        next(build_loader(_cfg(root, fmt, N), rank=0, world_size=1, seed=0))


def test_an_output_started_without_checksums_is_finished_without_them(tmp_path, capsys):
    """Half the shards written by the code from before per-sample checksums (rank 0 of 2), the rest
    by this code: one layout for the whole dataset (the recorded one, with a warning), byte for byte
    the dataset the old code alone would have written; never a mix."""
    from data_prep.fixtures import write_digits_image_folder

    images = write_digits_image_folder(tmp_path / "images", size=8, limit=N)
    args = dict(resolution=8, vae="identity", formats="mds,wds", samples_per_shard=PER_SHARD, progress=False,
                workers=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(encode, "SAMPLE_CHECKSUM", None)
        encode.encode_dataset(images, tmp_path / "ref", **args)
        encode.encode_dataset(images, tmp_path / "out", rank=0, world_size=2, **args)
    capsys.readouterr()
    s = encode.encode_dataset(images, tmp_path / "out", rank=1, world_size=2, **args)
    assert s["shards_written"] == 2 and s["dataset_samples"] == N
    err = capsys.readouterr().err
    assert (f"warning: --out {tmp_path / 'out'} was started by a version of data_prep.encode that stores no "
            f"per-sample checksums") in err and "2 of 4 shards done" in err and "encode into a new --out" in err
    ref = {p.relative_to(tmp_path / "ref"): p.read_bytes() for p in sorted((tmp_path / "ref").rglob("*"))
           if p.is_file() and not p.name.startswith(".")}
    out = {p.relative_to(tmp_path / "out"): p.read_bytes() for p in sorted((tmp_path / "out").rglob("*"))
           if p.is_file() and not p.name.startswith(".")}
    assert out == ref
    for fmt in ("mds", "wds"):
        src = open_source(fmt, str(tmp_path / "out"))
        assert src.checksum_field is None and src.read(N - 1)["key"] == f"{N - 1:09d}"


def test_an_output_started_with_checksums_is_not_resumed_without_them(tmp_path, capsys):
    """The reverse (a version without checksums resuming this code's output) is refused before anything
    is written; and records of both layouts mixed in one output stop the finalize, naming the record."""
    from data_prep.fixtures import write_digits_image_folder

    images = write_digits_image_folder(tmp_path / "images", size=8, limit=N)
    out = tmp_path / "out"
    args = dict(resolution=8, vae="identity", formats="wds", samples_per_shard=PER_SHARD, progress=False, workers=1)
    encode.encode_dataset(images, out, rank=0, world_size=2, **args)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(encode, "SAMPLE_CHECKSUM", None)
        with pytest.raises(encode.ConfigMismatch, match=r"2 of 4 shards done\): per-sample checksums crc32 -> none "
                                                        r"\(another version of data_prep.encode started it\)"):
            encode.encode_dataset(images, out, rank=1, world_size=2, **args)
    assert sorted(p.name for p in (out / "parts").glob("part-*.json")) == ["part-000000.json", "part-000002.json"]
    encode.encode_dataset(images, out, rank=1, world_size=2, **args)
    record = out / "parts" / "part-000001.json"
    rec = json.loads(record.read_text())
    assert rec["sample_checksum"] == "crc32"
    del rec["sample_checksum"]  # as if an older version had written this one shard
    record.write_text(json.dumps(rec))
    with pytest.raises(ValueError, match=rf"{re.escape(str(record))}: shard 1 was written with per-sample checksums "
                                         rf"none, .*encode_config.json says crc32"):
        encode.finalize(out)


def test_a_manifest_naming_other_sample_checksums_is_refused(digits, tmp_path):
    root = _copy(digits, tmp_path)
    m = json.loads((root / mf.MANIFEST).read_text())
    for bad in ({**m["sample_checksum"], "algorithm": "xxh64"}, {**m["sample_checksum"], "covers": ["latent"]}):
        (root / mf.MANIFEST).write_text(json.dumps({**m, "sample_checksum": bad}))
        with pytest.raises(ValueError, match=r"manifest.json: sample_checksum .*: this code checks only"):
            open_source("wds", str(root))


def test_a_damaged_memory_npz_is_named(tmp_path):
    """data.format=memory: read whole at open, where zip's CRC-32 of each array catches a flipped bit
    (the .npz that scripts/make_synthetic_latents.py writes)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_synthetic_latents",
                                                  Path(__file__).parents[2] / "scripts/make_synthetic_latents.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    path = tmp_path / "lat.npz"
    script.main([str(path), "16"])
    assert open_source("memory", str(path)).num_samples == 16
    with np.load(path) as z:
        x = z["x"]
    data = bytearray(path.read_bytes())
    at = data.find(x[5].tobytes()[:64]) + 8
    data[at] ^= 0x01  # a low mantissa bit of a float32: finite, same size
    path.write_bytes(bytes(data))
    with pytest.raises(ShardReadError, match=rf"{re.escape(str(path))}: damaged .npz \(BadZipFile: Bad CRC-32 for "
                                             rf"file 'x.npy'\).*write it again"):
        open_source("memory", str(path))


def _header_flips(path: Path, start: int, length: int):
    """Each byte of ``[start, start + length)`` flipped in turn (xor 0x5A), the file put back after."""
    clean = path.read_bytes()
    try:
        for at in range(start, start + length):
            data = bytearray(clean)
            data[at] ^= 0x5A
            path.write_bytes(bytes(data))
            yield at
    finally:
        path.write_bytes(clean)


def test_a_damaged_npy_header_is_named(digits, tmp_path):
    """A byte changed in the ``.npy`` header of a WebDataset member or of a memory ``.npz`` array made
    numpy raise what the readers did not expect: for a damaged quote a ``tokenize.TokenError`` that
    escapes numpy's own fallback parser, a bare traceback naming neither file nor sample (and, for a
    memory .npz, a ValueError without the file's name). Every header byte is tried: the read gives the
    sample as written (a change the parser forgives, e.g. in the padding) or a ShardReadError naming
    the file."""
    root = _copy(digits, tmp_path)
    want = open_source("wds", str(root)).read(9)["latent"]
    path, data_start, _ = _wds_member(root, 1, 3, "latent.npy")  # sample 3 of shard 1: sample 9
    idx = json.loads((root / mf.WDS_DIR / mf.wds_index_name(1)).read_text())
    member_start = idx["offsets"][3][idx["members"].index("latent.npy")]
    errors = []
    for _ in _header_flips(path, member_start, data_start - member_start):  # magic, version, length, dict
        try:
            got = open_source("wds", str(root)).read(9)["latent"]
        except ShardReadError as err:
            assert str(err).startswith(f"{path}: sample 9 (key 000000009)"), str(err)
            errors.append(str(err))
        else:
            assert np.array_equal(got, want)
    assert any("TokenError" in e for e in errors), errors  # the case that escaped before

    path = tmp_path / "lat.npz"
    # large enough (256 KB) that zipfile does not read the whole member, and check its CRC, before numpy
    # parses the header
    np.savez(path, x=np.random.default_rng(0).normal(size=(64, 4, 16, 16)).astype(np.float32), y=np.arange(64) % 2)
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("x.npy")
    head = bytearray(path.read_bytes())[info.header_offset:info.header_offset + 30]
    start = info.header_offset + 30 + int.from_bytes(head[26:28], "little") + int.from_bytes(head[28:30], "little")
    kinds = set()
    for _ in _header_flips(path, start, 64):
        with pytest.raises(ShardReadError, match=rf"^{re.escape(str(path))}: damaged .npz \((\w+)") as err:
            open_source("memory", str(path))  # the member's CRC fails if its parse did not
        kinds.add(re.match(r".*damaged .npz \((\w+)", str(err.value)).group(1))
    assert "TokenError" in kinds, kinds
    # an object array is no damage: named as a file of another kind
    objects = tmp_path / "objects.npz"
    np.savez(objects, x=np.array([{"a": 1}], dtype=object), y=np.arange(1))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(objects))}: holds object arrays") as err:
        open_source("memory", str(objects))
    assert not isinstance(err.value, ShardReadError)
    # and a file that is no npz at all is not called damaged
    text = tmp_path / "text.npz"
    text.write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(text))}: not an .npz \(zip\) file") as err:
        open_source("memory", str(text))
    assert not isinstance(err.value, ShardReadError)
