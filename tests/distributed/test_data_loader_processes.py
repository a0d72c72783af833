"""Two real processes in a gloo group read WebDataset shards with DataLoader workers: together
their parts are exactly the one-process global batches, every sample is seen once per epoch, the
states agree, and the audit logs record it. (MDS goes through the same sampler; its reader is
covered with simulated ranks in tests/unit/test_data_shards.py, kept out of here for speed.)"""
import json
import os
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mpdit_dist.config import DataConfig
from mpdit_dist.data import build_loader, read_audit
from mpdit_dist.distributed.env import free_port
from tests.helpers.data import encoded_digits

STEPS = 9  # 9 x 12 = 108 positions over 40 samples: epochs 0, 1 and part of 2


def _cfg(data, fmt, audit):
    return DataConfig(format=fmt, path=str(data), global_batch_size=12, num_workers=1, prefetch_factor=2,
                      pin_memory=True, audit=audit)


def _worker(rank, world, port, data, run_dir, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {}
        for fmt in ("wds",):
            loader = build_loader(_cfg(data, fmt, fmt == "wds"), rank=rank, world_size=world, seed=7,
                                  run_dir=run_dir)
            steps = []
            for _ in range(STEPS):
                b = next(loader)
                gathered = [None] * world
                dist.all_gather_object(gathered, (b["keys"], b["x"].sum().item()))
                steps.append(gathered)
            state = loader.state_dict()
            states = [None] * world
            dist.all_gather_object(states, state)
            loader.close()
            result[fmt] = {"steps": steps, "states": states}
        if rank == 0:
            with open(out, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return encoded_digits(tmp_path_factory.mktemp("digits"), size=8, limit=40, formats="wds", per_shard=9)


def test_two_processes_read_their_parts_of_the_one_process_batches(digits, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "result.json"
    mp.start_processes(_worker, args=(2, free_port(), str(digits), str(run_dir), str(out)), nprocs=2,
                       join=True, start_method="spawn")
    result = json.loads(out.read_text())
    for fmt in ("wds",):
        ref = build_loader(_cfg(digits, fmt, False), rank=0, world_size=1, seed=7)
        stream = []
        for k, gathered in enumerate(result[fmt]["steps"]):
            (keys0, sum0), (keys1, sum1) = gathered
            assert len(keys0) == len(keys1) == 6
            one = next(ref)
            assert keys0 + keys1 == one["keys"]
            assert abs(sum0 + sum1 - one["x"].sum().item()) < 1e-3
            stream += keys0 + keys1
        for e in range(2):
            assert Counter(stream[e * 40:(e + 1) * 40]) == Counter(f"{i:09d}" for i in range(40))
        s0, s1 = result[fmt]["states"]
        assert s0 == s1 and s0["step"] == STEPS == ref.state_dict()["step"]
        ref.close()
    audit = read_audit(str(run_dir))
    assert sorted(audit) == [0, 1]
    for k, gathered in enumerate(result["wds"]["steps"]):
        assert audit[0][k] == gathered[0][0] and audit[1][k] == gathered[1][0]


def test_pinned_memory_only_with_cuda(digits):
    ld = build_loader(_cfg(digits, "wds", False), rank=0, world_size=1, seed=0)
    b = next(ld)
    assert b["x"].is_pinned() == torch.cuda.is_available()
    ld.close()
