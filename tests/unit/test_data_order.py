"""The global order and the loader's state, on the in-memory format (real DataLoader, no mocks)."""
import json
import warnings
from collections import Counter

import numpy as np
import pytest
import torch

from mpdit_dist.config import DataConfig
from tests.helpers.data import global_batches
from mpdit_dist.data import GlobalOrder, build_loader, denormalize, normalize, read_audit, sample_seed
from mpdit_dist.data.order import ORDER_SCHEME, _splitmix64, stable_permutation


def test_order_is_a_permutation_per_epoch_and_depends_on_seed_and_epoch():
    order = GlobalOrder(10, seed=3)
    p0, p1 = order.permutation(0), order.permutation(1)
    assert sorted(p0) == list(range(10)) and sorted(p1) == list(range(10))
    assert not np.array_equal(p0, p1)
    assert np.array_equal(GlobalOrder(10, seed=3).permutation(1), p1)
    assert not np.array_equal(GlobalOrder(10, seed=4).permutation(0), p0)
    assert np.array_equal(GlobalOrder(10, seed=3, shuffle=False).permutation(5), np.arange(10))
    # a window straddling the epoch boundary: the tail of epoch 0 then the head of epoch 1
    idx, ep = order.lookup(7, 13)
    assert list(idx) == list(p0[7:]) + list(p1[:3]) and list(ep) == [0, 0, 0, 1, 1, 1]


PINNED_N12_SEED0 = [10, 3, 11, 5, 7, 4, 1, 2, 8, 9, 6, 0]
PINNED_N10_SEED3_EPOCH1 = [0, 3, 2, 6, 5, 4, 7, 8, 1, 9]
PINNED_BIG_HEAD = [85491, 38204, 8044, 21692, 20289]


def test_the_order_is_pinned():
    """The order is ours (splitmix64 keys), not a library's: these values must never change without
    a new ORDER_SCHEME, or resumed runs would silently see another order than the one they began."""
    assert ORDER_SCHEME == "splitmix64-keys-v1"
    assert stable_permutation(12, 0).tolist() == PINNED_N12_SEED0
    # the vectorised keys agree with the scalar splitmix64 (plain Python integers)
    seed = sample_seed(3, 1, 0, salt=0x5EED)
    assert sorted(range(10), key=lambda i: _splitmix64(i ^ seed)) == PINNED_N10_SEED3_EPOCH1
    assert GlobalOrder(10, seed=3).permutation(1).tolist() == PINNED_N10_SEED3_EPOCH1
    big = stable_permutation(100_003, (1 << 63) + 17)  # a 64-bit seed; every index exactly once
    assert np.array_equal(np.sort(big), np.arange(100_003))
    assert big[:5].tolist() == PINNED_BIG_HEAD


def test_loader_state_names_the_order_and_refuses_another(tmp_path):
    path, _, _ = _npz(tmp_path)
    ld = build_loader(_cfg(path, 6), rank=0, world_size=1, seed=0)
    next(ld)
    state = ld.state_dict()
    assert state["order"] == ORDER_SCHEME
    old = {k: v for k, v in state.items() if k != "order"} | {"version": 1}  # written before the scheme existed
    with pytest.raises(ValueError, match="numpy-permutation.*splitmix64-keys-v1"):
        build_loader(_cfg(path, 6), rank=0, world_size=1, seed=0).load_state_dict(old)


def test_sample_seed_is_pure_and_distinct():
    assert sample_seed(1, 2, 3) == sample_seed(1, 2, 3)
    seeds = {sample_seed(0, e, i) for e in range(5) for i in range(200)}
    assert len(seeds) == 1000


def _npz(tmp_path, n=23, c=2, hw=4, classes=5):
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(n, c, hw, hw)).astype(np.float32)
    y = np.arange(n) % classes
    keys = np.array([f"k{i:03d}" for i in range(n)])
    path = tmp_path / "toy.npz"
    np.savez(path, x=x, y=y, keys=keys)
    return path, x, y


def _cfg(path, g, **kw):
    base = dict(format="memory", path=str(path), global_batch_size=g, num_workers=0, pin_memory=False)
    base.update(kw)
    return DataConfig(**base)




@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_sample_exactly_once_per_epoch(tmp_path, world):
    path, x, _ = _npz(tmp_path, n=23)
    g = 6
    batches, loaders = global_batches(_cfg(path, g), world, steps=12)  # 72 positions: 3 epochs + 3
    stream = [k for keys, _, _ in batches for k in keys]
    for e in range(3):
        assert Counter(stream[e * 23:(e + 1) * 23]) == Counter(f"k{i:03d}" for i in range(23))
    assert loaders[0].epoch == 72 // 23 and loaders[0].steps_per_epoch == 4
    for keys, xb, _ in batches:
        assert len(keys) == g and xb.shape == (g, 2, 4, 4) and xb.dtype == torch.float32


def test_world_sizes_give_identical_global_batches(tmp_path):
    path, _, _ = _npz(tmp_path)
    ref, _ = global_batches(_cfg(path, 6), 1, steps=6)
    for world in (2, 3):
        got, _ = global_batches(_cfg(path, 6), world, steps=6)
        for (k1, x1, y1), (k2, x2, y2) in zip(ref, got):
            assert k1 == k2 and torch.equal(x1, x2) and torch.equal(y1, y2)


@pytest.mark.parametrize("new_world", [1, 3])
def test_resume_mid_epoch_from_2_ranks(tmp_path, new_world):
    path, _, _ = _npz(tmp_path)
    cfg = _cfg(path, 6)
    full, _ = global_batches(cfg, 2, steps=9)
    _, loaders = global_batches(cfg, 2, steps=5)  # step 5 = position 30, mid epoch 1
    state = json.loads(json.dumps(loaders[0].state_dict()))  # JSON round trip, as a checkpoint does
    assert state == loaders[1].state_dict()  # the same on every rank
    rest, _ = global_batches(cfg, new_world, steps=4, state=state)
    for (k1, x1, y1), (k2, x2, y2) in zip(full[5:], rest):
        assert k1 == k2 and torch.equal(x1, x2) and torch.equal(y1, y2)


def test_workers_do_not_change_the_order(tmp_path):
    path, _, _ = _npz(tmp_path)
    a, _ = global_batches(_cfg(path, 6), 2, steps=5)
    b, loaders = global_batches(_cfg(path, 6, num_workers=2, prefetch_factor=2), 2, steps=5)
    for ld in loaders:
        ld.close()
    for (k1, x1, _), (k2, x2, _) in zip(a, b):
        assert k1 == k2 and torch.equal(x1, x2)


def test_normalisation_uses_data_statistics_and_inverts(tmp_path):
    path, x, _ = _npz(tmp_path)
    ld = build_loader(_cfg(path, 23, shuffle=False), rank=0, world_size=1, seed=0)
    b = next(ld)
    assert torch.allclose(b["x"].mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(b["x"].std(dim=(0, 2, 3), unbiased=False), torch.ones(2), atol=1e-4)
    assert torch.allclose(denormalize(b["x"], ld.manifest), torch.from_numpy(x), atol=1e-5)
    raw = build_loader(_cfg(path, 23, shuffle=False, normalize=False), rank=0, world_size=1, seed=0)
    assert torch.equal(next(raw)["x"], torch.from_numpy(x))  # scaling factor 1 for memory data
    assert torch.allclose(normalize(denormalize(b["x"], ld.manifest), ld.manifest), b["x"], atol=1e-5)


def test_errors_name_the_key(tmp_path):
    path, _, _ = _npz(tmp_path)
    with pytest.raises(ValueError, match="data.global_batch_size=7"):
        build_loader(_cfg(path, 7), rank=0, world_size=2, seed=0)
    with pytest.raises(ValueError, match="data.global_batch_size=7"):  # checked before the path
        build_loader(_cfg(tmp_path / "missing.npz", 7), rank=0, world_size=2, seed=0)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        build_loader(_cfg(tmp_path / "missing.npz", 6), rank=0, world_size=2, seed=0)
    with pytest.raises(ValueError, match="run directory"):
        build_loader(_cfg(path, 6, audit=True), rank=0, world_size=1, seed=0)
    ld = build_loader(_cfg(path, 6), rank=0, world_size=1, seed=0)
    next(ld)
    state = ld.state_dict()
    other = build_loader(_cfg(path, 12), rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match="global_batch_size 6 -> 12"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="seed=0"):
        build_loader(_cfg(path, 6), rank=0, world_size=1, seed=1).load_state_dict(state)


def test_allowed_batch_change_continues_at_the_same_position(tmp_path):
    path, _, _ = _npz(tmp_path)
    ld = build_loader(_cfg(path, 6), rank=0, world_size=1, seed=0)
    seen = [k for _ in range(2) for k in next(ld)["keys"]]
    other = build_loader(_cfg(path, 5), rank=0, world_size=1, seed=0)
    with pytest.warns(UserWarning, match="global_batch_size 6 -> 5"):
        other.load_state_dict(ld.state_dict(), allow_batch_change=True)
    rest = [k for _ in range(3) for k in next(other)["keys"]]  # positions 12..26: epoch 0 ends at 23
    assert Counter(seen + rest[:11]) == Counter(f"k{i:03d}" for i in range(23))
    assert other.step == 5 and other.samples_seen == 27
    s = other.state_dict()  # and that state resumes exactly in turn
    again = build_loader(_cfg(path, 5), rank=0, world_size=1, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again.load_state_dict(s)
    assert next(again)["keys"] == next(other)["keys"]


def test_audit_log_has_each_ranks_keys_per_step(tmp_path):
    path, _, _ = _npz(tmp_path)
    run = tmp_path / "run"
    loaders = [build_loader(_cfg(path, 6, audit=True), rank=r, world_size=2, seed=0, run_dir=str(run))
               for r in range(2)]
    got = [[next(ld)["keys"] for _ in range(3)] for ld in loaders]
    for ld in loaders:
        ld.close()
    audit = read_audit(str(run))
    assert sorted(audit) == [0, 1]
    for r in range(2):
        assert [audit[r][s] for s in range(3)] == got[r]
    line = json.loads((run / "audit" / "rank1.jsonl").read_text().splitlines()[0])
    assert line == {"step": 0, "keys": got[1][0]}


def test_memory_labels_are_range_checked(tmp_path):
    from mpdit_dist.data import MemorySource

    x = np.zeros((4, 1, 2, 2), dtype=np.float32)
    for y, extra, match in (([0, 1, -1, 0], {}, r"y\[2\] = -1 is outside \[0, num_classes=2\)"),
                            ([0, 1, 2, 0], {"num_classes": 2}, r"y\[2\] = 2 is outside \[0, num_classes=2\)"),
                            ([0.0, 1.5, 0.0, 1.0], {}, "y must hold integer class indices")):
        path = tmp_path / "bad.npz"
        np.savez(path, x=x, y=np.array(y), **extra)
        with pytest.raises(ValueError, match=match):
            MemorySource(str(path))
    nan = x.copy()
    nan[3, 0, 1, 1] = np.nan
    np.savez(tmp_path / "nan.npz", x=nan, y=np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match=r"nan.npz: x\[3\] is not finite"):
        MemorySource(str(tmp_path / "nan.npz"))
