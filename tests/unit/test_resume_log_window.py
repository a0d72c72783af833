"""A resume between two log steps logs the same loss as an uninterrupted run.

The loss logged every ``train.log_every`` steps is the mean over the steps since the last log. A
checkpoint that falls between two log steps (a preemption's, or ``ckpt_every`` not a multiple of
``log_every``) must carry the steps of that window already taken, or the resumed run logs the mean
of a shorter window at its next log step."""
import pytest

from tests.helpers.runs import losses, train

COMMON = ["train.steps=8", "train.log_every=4", "train.ckpt_every=3"]


def test_resume_between_log_steps_logs_the_same_losses(tmp_path, npz):
    train(tmp_path / "full", npz, COMMON)
    # killed after step 5: resumed from the checkpoint of step 3, a step into the window of step 4
    assert train(tmp_path / "part", npz, COMMON, fault="step:5", check=False).returncode != 0
    train(tmp_path / "part", npz, COMMON)
    ref = losses(tmp_path / "full")
    assert sorted(ref) == [4, 8]
    assert losses(tmp_path / "part") == ref  # bitwise on CPU


def test_resume_between_log_steps_on_another_world_size(tmp_path, npz):
    """2 ranks -> 1 rank: the window's sums of the old ranks become the new rank's (to rounding)."""
    common = COMMON + ["parallel.backend=ddp"]
    train(tmp_path / "full", npz, common, nproc=2)
    assert train(tmp_path / "part", npz, common, nproc=2, fault="step:5", check=False).returncode != 0
    train(tmp_path / "part", npz, common)
    ref, got = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(got) == sorted(ref) == [4, 8]
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-5), s
