"""parallel.cpu_offload=true under FSDP2 on CPU ranks (gloo): the weights are in host memory
already, so offloading must not ask for pinned (CUDA) memory; the losses are those of one process.
It failed at fully_shard with "Found no NVIDIA driver on your system" (CPUOffloadPolicy pins by
default), a message that names no key."""
import pytest

from tests.helpers.runs import losses, train

STEPS = ["train.steps=3", "train.ckpt_every=0"]


def test_fsdp2_cpu_offload_on_cpu_matches_one_process(tmp_path, npz):
    train(tmp_path / "ref", npz, STEPS)
    proc = train(tmp_path / "off", npz, STEPS + ["parallel.backend=fsdp2", "parallel.cpu_offload=true"], nproc=2,
                 check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, off = losses(tmp_path / "ref"), losses(tmp_path / "off")
    assert sorted(ref) == sorted(off) == [1, 2, 3]
    for s in ref:
        assert off[s] == pytest.approx(ref[s], rel=1e-6), (s, ref[s], off[s])
