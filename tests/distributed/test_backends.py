"""DDP and FSDP2 over real gloo process groups agree with one process; HSDP, AC, compile, two agents."""
import subprocess

import pytest

from mpdit_dist.distributed.env import free_port
from tests.helpers.runs import REPO, TORCHRUN, env, losses, train

STEPS = ["train.steps=5", "train.ckpt_every=0"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, npz):
    run = tmp_path_factory.mktemp("ref")
    train(run, npz, STEPS)
    return losses(run)


def _close(a, b, rel):
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=rel), (s, a[s], b[s])


# fp32 on CPU: the ranks' gradients are averaged by an all-reduce whose summation order differs
# from one process's single sum, so agreement is to float32 rounding (~1e-7), not bitwise
@pytest.mark.parametrize("backend", ["ddp", "fsdp2"])
def test_two_ranks_match_one(tmp_path, npz, reference, backend):
    train(tmp_path / "run", npz, STEPS + [f"parallel.backend={backend}"], nproc=2)
    _close(reference, losses(tmp_path / "run"), rel=1e-6)


def test_sampling_between_steps_changes_no_training_step(tmp_path, npz, reference):
    """FSDP2 samples from the EMA weights every 2 steps (no module resharded after forward): the
    training steps after each sample must use the trained weights, not unsharded EMA leftovers."""
    train(tmp_path / "run", npz, STEPS + ["parallel.backend=fsdp2", "parallel.reshard_after_forward=false",
                                          "train.sample_every=2", "train.sample_steps=2"], nproc=2)
    assert len(list((tmp_path / "run" / "samples").glob("*.png"))) >= 2
    _close(reference, losses(tmp_path / "run"), rel=1e-6)


def test_fsdp2_single_rank_and_accumulation(tmp_path, npz, reference):
    train(tmp_path / "run", npz, STEPS + ["parallel.backend=fsdp2", "data.micro_batch_size=3"], nproc=2)
    _close(reference, losses(tmp_path / "run"), rel=1e-6)


def test_hsdp_2x2(tmp_path, npz, reference):
    train(tmp_path / "run", npz, STEPS + ["parallel.backend=fsdp2", "parallel.hsdp_replicas=2"], nproc=4)
    _close(reference, losses(tmp_path / "run"), rel=1e-6)


def test_activation_checkpointing_and_compile_change_nothing(tmp_path, npz, reference):
    train(tmp_path / "ac", npz, STEPS + ["parallel.backend=fsdp2", "parallel.activation_checkpointing=full"], nproc=2)
    _close(reference, losses(tmp_path / "ac"), rel=1e-6)
    train(tmp_path / "every", npz, STEPS + ["parallel.activation_checkpointing=every_n", "parallel.ac_every=2",
                                            "parallel.compile=true"])
    # compiled kernels fuse and reorder float ops: equal to float32 rounding, not bitwise
    _close(reference, losses(tmp_path / "every"), rel=1e-5)


def test_fsdp2_with_the_whole_forward_compiled(tmp_path, npz, reference):
    """parallel.compile_scope=model under FSDP2 on 2 ranks: dynamo runs FSDP2's hooks (gathers,
    reshards, gradient reduce-scatters) eagerly between the compiled pieces; the losses are those
    of one eager process up to the rounding of fused kernels."""
    proc = train(tmp_path / "run", npz, STEPS + ["parallel.backend=fsdp2", "parallel.compile=true",
                                                 "parallel.compile_scope=model"], nproc=2)
    assert "compiled: the whole forward" in proc.stdout + proc.stderr
    _close(reference, losses(tmp_path / "run"), rel=1e-5)


def test_bf16_params_close_to_fp32(tmp_path, npz, reference):
    train(tmp_path / "run", npz, STEPS + ["parallel.backend=fsdp2", "train.precision=bf16"], nproc=2)
    # bf16 autocast + bf16 FSDP params (fp32 reduce): 8-bit mantissas, loss within ~1e-3 relative
    _close(reference, losses(tmp_path / "run"), rel=2e-3)


def test_global_batch_not_divisible_is_a_clear_error(tmp_path, npz):
    proc = train(tmp_path / "run", npz, STEPS + ["data.global_batch_size=13"], nproc=2, check=False)
    assert proc.returncode != 0
    assert "data.global_batch_size=13 is not divisible by the world size 2" in proc.stdout + proc.stderr


def test_two_agents_nnodes_2(tmp_path, npz, reference):
    """torchrun --nnodes=2 with two agents on one machine: the same code path as two real nodes."""
    port = free_port()
    args = ["--config", str(REPO / "configs/demo.yaml"), "--run-dir", str(tmp_path / "run"), f"data.path={npz}"]
    from tests.helpers.runs import TINY

    args += TINY + STEPS + ["parallel.backend=fsdp2"]
    procs = [
        subprocess.Popen([TORCHRUN, "--nnodes=2", "--nproc_per_node=1", f"--node_rank={r}",
                          "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=mpdit-test",
                          str(REPO / "train.py"), *args], cwd=REPO, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    _close(reference, losses(tmp_path / "run"), rel=1e-6)


def test_divergence_stops_every_fsdp2_rank_before_a_save(tmp_path, npz):
    """A real divergence (AdamW at lr 1e6) under FSDP2 on 2 ranks: both ranks stop at the same step
    (the vote is a collective; the gradient norm is a DTensor), and no diverged state is saved."""
    run = tmp_path / "run"
    proc = train(run, npz, ["train.steps=10", "train.ckpt_every=1", "train.log_every=4", "optim.lr=1e6",
                            "optim.warmup_steps=0", "parallel.backend=fsdp2"], nproc=2, check=False, timeout=240)
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"[rank{rank}]: mpdit_dist.trainer.TrainingDiverged: training diverged" in proc.stderr, proc.stderr[-3000:]
    newest = max(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*"))
    assert f"Newest checkpoint: step_{newest:08d}" in proc.stderr
    assert f"not finite at step {newest + 1} " in proc.stderr
