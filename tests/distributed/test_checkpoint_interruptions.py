"""Stop signals and I/O failures at awkward moments of real runs (1 and 2 ranks): the run stops with a
usable checkpoint, or fails on every rank naming the cause; the checkpoints before stay intact; a
resume continues exactly. The moments are chosen with ``MPDIT_FAULT`` (see checkpoint.fault_point)."""
import json
import re
import signal

import pytest

from tests.helpers.runs import losses, train

STEPS = ["train.steps=12", "train.ckpt_every=4"]


def _result(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _steps(run) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, npz):
    run = tmp_path_factory.mktemp("ref") / "run"
    train(run, npz, STEPS, nproc=2)
    return losses(run)


@pytest.mark.parametrize("fault, extra, reasons", [
    # the warning signal in the middle of a checkpoint's write, then SIGTERM on top of it (async save)
    ("save_write:4:SIGUSR2,save_write:4:SIGTERM", ["checkpoint.async_save=true"], ["SIGTERM", "SIGUSR2"]),
    # the warning signal during an in-training sample grid
    ("sample:4:SIGUSR2", ["train.sample_every=4", "train.sample_steps=2"], ["SIGUSR2"]),
])
def test_a_signal_at_an_awkward_moment_stops_with_a_checkpoint_and_resumes_exactly(tmp_path, npz, reference,
                                                                                  fault, extra, reasons):
    run = tmp_path / "run"
    proc = train(run, npz, STEPS + extra, fault=fault, check=False)
    assert _result(proc) == {"status": "preempted", "step": 5, "run_dir": str(run), "stop_reasons": reasons}
    assert proc.returncode == 128 + signal.Signals[reasons[0]], proc.stderr[-3000:]  # SIGTERM's when among them
    assert _steps(run) == [4, 5] and not list((run / "checkpoints").glob("tmp-*"))
    assert _result(train(run, npz, STEPS + extra))["status"] == "finished"
    assert losses(run) == pytest.approx(reference, rel=1e-6)


def test_signals_on_different_ranks_at_different_steps_stop_both_at_one_step(tmp_path, npz, reference):
    """Rank 0 gets the warning signal at step 3, rank 1 SIGTERM at step 7: both stop together at the
    next vote (step 10) with one checkpoint, agreeing on the signals seen (which decide the
    launcher's requeue on every rank alike); the resume continues exactly."""
    run = tmp_path / "run"
    proc = train(run, npz, STEPS, nproc=2, fault="step:3:SIGUSR2@0,step:7:SIGTERM@1", check=False)
    # stopped before its last step: not the status of a finished run (each rank exits 143, torchrun 1)
    assert proc.returncode != 0 and "exitcode  : 143" in proc.stderr, proc.stderr[-3000:]
    assert _result(proc) == {"status": "preempted", "step": 10, "run_dir": str(run),
                             "stop_reasons": ["SIGTERM", "SIGUSR2"]}
    assert _steps(run) == [4, 8, 10]
    train(run, npz, STEPS, nproc=2)
    assert losses(run) == pytest.approx(reference, rel=1e-6)


def test_a_failed_write_on_one_rank_fails_every_rank_naming_the_file(tmp_path, npz, reference):
    """A write that fails on rank 1 only (a full disk at its RNG file) while saving step 8: every rank
    raises the same CheckpointError naming rank 1 and the file (before: rank 0 went on into DCP's
    collectives and died of "connection closed by peer", or under NCCL waited for the timeout);
    the checkpoint of step 4 stays intact (retention ran for nothing) and the resume is exact."""
    from mpdit_dist.checkpoint import verify

    run = tmp_path / "run"
    proc = train(run, npz, STEPS + ["checkpoint.keep_last=1"], nproc=2, fault="save_write:8:ENOSPC@1",
                 check=False, timeout=120)
    assert proc.returncode != 0
    bad = str(run / "checkpoints" / "tmp-step_00000008" / "rng" / "rank1.pt")
    for rank in (0, 1):
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"[rank{rank}]: ")
                 and "CheckpointError:" in ln]
        assert lines, proc.stderr[-4000:]
        assert re.search(r"cannot write checkpoint .*tmp-step_00000008: rank 1: OSError: \[Errno 28\]", lines[-1])
        assert bad in lines[-1]
    assert _steps(run) == [4] and verify(run / "checkpoints" / "step_00000004") is None
    assert _result(train(run, npz, STEPS, nproc=2))["status"] == "finished"
    assert not list((run / "checkpoints").glob("tmp-*"))
    assert losses(run) == pytest.approx(reference, rel=1e-6)
