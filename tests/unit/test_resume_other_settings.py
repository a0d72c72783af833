"""Resuming under settings other than the checkpoint's: every case either continues the run
correctly or stops before anything is loaded (or written into the run directory), with an error
that names the checkpoint and the setting with both values.

- ``--resume PATH`` that is no published checkpoint (missing, a file, a run directory, its
  ``checkpoints/``, a half-written ``tmp-`` directory, any other directory): refused before the run
  directory is touched, naming what the path is and what to pass instead;
- another ``train.seed``, dataset (``data.path``) or ``data.normalize``: refused before the tensors
  are read; other ``flow.*`` settings apply from the resume on and are logged with both values;
- none, DDP and FSDP2 (HSDP too), with or without activation checkpointing (which wraps the
  parameter names), resume each other's checkpoints and continue the same run.
"""
import shutil

import pytest

from tests.helpers.runs import digits_npz, losses, train

BASE = ["train.ckpt_every=2", "optim.warmup_steps=0"]  # lr 1e-3 from the start: a wrong resume shows


@pytest.fixture(scope="module")
def base(tmp_path_factory, npz):
    """A plain run of 2 steps (checkpoint at step 2) and its uninterrupted continuation to step 4."""
    root = tmp_path_factory.mktemp("resume_settings")
    train(root / "part", npz, BASE + ["train.steps=2"])
    train(root / "full", npz, BASE + ["train.steps=4"])
    return root


def _copy(base, tmp_path, name="run"):
    run = tmp_path / name
    shutil.copytree(base / "part", run)
    return run


def test_resume_path_that_is_no_checkpoint_is_refused_naming_it(tmp_path, base):
    from mpdit_dist.checkpoint import CheckpointError, CheckpointManager

    src = base / "part"
    half = tmp_path / "half" / "checkpoints" / "tmp-step_00000002"
    shutil.copytree(src / "checkpoints" / "step_00000002", half)
    (half / "COMPLETE.json").unlink()
    incomplete = tmp_path / "incomplete"
    shutil.copytree(src / "checkpoints" / "step_00000002", incomplete)
    (incomplete / "COMPLETE.json").unlink()
    (tmp_path / "empty").mkdir()
    newest = src / "checkpoints" / "step_00000002"
    cases = {
        src / "checkpoints" / "step_00000009": "no such checkpoint directory",
        src / "config.yaml": "not a directory",
        src: f"a run directory, not a checkpoint: pass one of its checkpoints (newest: {newest}), "
             f"or continue that run with --run-dir {src} --resume auto",
        src / "checkpoints": f"a checkpoints directory, not a checkpoint: pass one of its checkpoints (newest: {newest})",
        half: "a half-written checkpoint",
        incomplete: "an incomplete checkpoint (COMPLETE.json missing",
        tmp_path / "empty": "not a checkpoint directory",
    }
    manager = CheckpointManager(tmp_path / "new")
    for path, why in cases.items():
        with pytest.raises(CheckpointError) as err:
            manager.check_resume_path(str(path))
        assert str(err.value).startswith(f"--resume {path}: {why}"), str(err.value)
    manager.check_resume_path(str(newest))  # a published checkpoint passes
    for resume in ("auto", "never"):
        manager.check_resume_path(resume)


def test_resume_path_that_is_no_checkpoint_stops_before_the_run_dir_is_touched(tmp_path, base, npz):
    """train.py with --resume <a run directory>: the error, and no config.yaml (nor anything else)
    written into the new run directory. (It used to build the model, write the run directory and
    fail at the load with "checkpoint <path> is damaged: COMPLETE.json missing".)"""
    new = tmp_path / "new"
    proc = train(new, npz, BASE + ["train.steps=3"], resume=str(base / "part"), check=False)
    assert proc.returncode != 0
    assert f"--resume {base / 'part'}: a run directory, not a checkpoint" in proc.stderr, proc.stderr[-2000:]
    assert not new.exists()


def test_half_written_checkpoint_of_this_run_dir_names_its_published_form(tmp_path, base, npz):
    """--resume <run>/checkpoints/tmp-step_N of a save that had finished writing: the start makes it
    visible as step_N (clean_partial), and the error points there instead of calling it damaged."""
    run = _copy(base, tmp_path)
    ckpt = run / "checkpoints" / "step_00000002"
    tmp = ckpt.with_name("tmp-step_00000002")
    ckpt.rename(tmp)
    (tmp / "COMPLETE.json").unlink()
    proc = train(run, npz, BASE + ["train.steps=3"], resume=str(tmp), check=False)
    assert proc.returncode != 0
    assert f"--resume {tmp}: a half-written checkpoint" in proc.stderr, proc.stderr[-2000:]
    assert f"made visible (checksummed and renamed) as {ckpt}: resume from that" in proc.stderr
    assert (ckpt / "COMPLETE.json").is_file() and losses(run).keys() == {1, 2}


def test_another_seed_or_dataset_is_refused_naming_the_checkpoint(tmp_path, base, npz):
    run = _copy(base, tmp_path)
    ckpt = run / "checkpoints" / "step_00000002"
    proc = train(run, npz, BASE + ["train.steps=3", "train.seed=5"], check=False)
    assert proc.returncode != 0
    assert f"checkpoint {ckpt} cannot continue its data stream in this run" in proc.stderr, proc.stderr[-2000:]
    assert "seed=0" in proc.stderr and "train.seed=5" in proc.stderr
    other = digits_npz(tmp_path / "other.npz", n=200)
    proc = train(run, other, BASE + ["train.steps=3"], check=False)
    assert proc.returncode != 0
    assert (f"checkpoint {ckpt} cannot continue its data stream in this run (data.path={npz} there, "
            f"{other} here)") in proc.stderr, proc.stderr[-2000:]
    assert "(240 samples) -> " in proc.stderr and "(200 samples)" in proc.stderr
    # refused before any tensor was read (the trainer's ConfigError: train.py's one "error:" line), not
    # through the loader after the weights were loaded (its ValueError's traceback names load_state_dict)
    assert f"error: checkpoint {ckpt} cannot continue its data stream" in proc.stderr
    assert "Traceback" not in proc.stderr and "load_state_dict" not in proc.stderr
    assert losses(run).keys() == {1, 2}


def test_other_input_normalisation_is_refused_and_flow_changes_are_logged(tmp_path, base, npz):
    """data.normalize changes the scale of the model's inputs and of the latents its samples are
    decoded from: refused. The objective's settings (flow.*) apply from the resume on, like the
    optimizer's, and are logged with both values."""
    run = _copy(base, tmp_path)
    ckpt = run / "checkpoints" / "step_00000002"
    proc = train(run, npz, BASE + ["train.steps=3", "data.normalize=false"], check=False)
    assert proc.returncode != 0
    assert (f"checkpoint {ckpt} was trained with data.normalize=True, this run has data.normalize=False"
            in proc.stderr), proc.stderr[-2000:]
    assert losses(run).keys() == {1, 2}
    proc = train(run, npz, BASE + ["train.steps=3", "flow.class_dropout=0.2"])
    assert "flow.class_dropout 0.1 -> 0.2" in proc.stderr and max(losses(run)) == 3


@pytest.mark.slow
@pytest.mark.parametrize("where", [
    pytest.param((["parallel.backend=ddp", "parallel.activation_checkpointing=full"], 2), id="ddp-ac"),
    pytest.param((["parallel.backend=fsdp2", "parallel.hsdp_replicas=2"], 2), id="hsdp"),
])
def test_plain_checkpoint_continues_under_ddp_fsdp2_and_activation_checkpointing(tmp_path, base, npz, where):
    """none -> DDP with activation checkpointing (wrapped parameter names), none -> HSDP, then back
    to one plain process: the same losses as the uninterrupted plain run (to float32 rounding:
    other reduction orders), optimizer state included (steps 3 and 4 come after the resume)."""
    overrides, nproc = where
    run = _copy(base, tmp_path)
    train(run, npz, BASE + ["train.steps=3"] + overrides, nproc=nproc)
    train(run, npz, BASE + ["train.steps=4"])
    got, ref = losses(run), losses(base / "full")
    assert sorted(got) == [1, 2, 3, 4]
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-5), s
