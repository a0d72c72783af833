"""Class labels read from MDS and WebDataset shards are checked against the manifest's classes.

A label outside ``[0, num_classes)`` (a flipped byte in a shard, a shard of another dataset) must
fail naming the file, the sample and the value: passed through, ``num_classes`` would silently
train as the classifier-free-guidance null class, and a larger value crash the model's embedding
lookup on some rank without naming any file.
"""
import json

import numpy as np
import pytest

from data_prep.encode import write_latents
from mpdit_dist.config import DataConfig
from mpdit_dist.data import build_loader
from mpdit_dist.data.sources import ShardReadError, open_source


def _data(path):
    lat = np.random.default_rng(0).normal(size=(8, 2, 4, 4)).astype(np.float32)
    write_latents(path, {"latent": lat}, np.arange(8) % 2, ["a", "b"], 4)  # labels 0, 1; shards of 4
    return path


def _set_label(root, fmt, label):
    """Overwrite sample 5's stored label in place (same byte count, so every size check passes)."""
    if fmt == "wds":
        idx = json.loads((root / "wds/shard-000001.idx.json").read_text())
        m = idx["members"].index("cls")
        off, size = idx["offsets"][1][m], idx["sizes"][1][m]  # sample 5 = sample 1 of shard 1
        text = str(label).encode()
        assert len(text) == size, "the label text must keep its byte count"
        path, at, raw = root / "wds/shard-000001.tar", off, text
    else:
        src = open_source("mds", str(root))
        reader, _, offsets, _ = src._reader(1)
        assert reader.column_names == ["crc32", "key", "label", "latent", "path"]
        # an MDS sample: a uint32 size for each variable column (key, path), then the payloads
        # (crc32: 8 bytes, key: 9)
        path, at, raw = (root / "mds/part-000001/shard.00000.mds", int(offsets[1]) + 8 + 8 + 9,
                         np.int64(label).tobytes())
    data = bytearray(path.read_bytes())
    data[at:at + len(raw)] = raw
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("fmt", ["mds", "wds"])
@pytest.mark.parametrize("label", [2, 7])
def test_a_label_outside_the_classes_is_named(tmp_path, fmt, label):
    root = _data(tmp_path / "d")
    assert open_source(fmt, str(root)).read(5)["label"] == 1
    shard = _set_label(root, fmt, label)
    src = open_source(fmt, str(root))
    assert src.read(4)["label"] == 0  # the other samples of the shard read as before
    with pytest.raises(ShardReadError, match=rf"{shard.relative_to(root)}: sample 5 \(key 000000005\) has label "
                                             rf"{label}, outside \[0, 2\)"):
        src.read(5)
    cfg = DataConfig(format=fmt, path=str(root), global_batch_size=8, num_workers=0, pin_memory=False,
                     shuffle=False)
    with pytest.raises(ShardReadError, match=r"key 000000005\) has label"):
        next(build_loader(cfg, rank=0, world_size=1, seed=0))
