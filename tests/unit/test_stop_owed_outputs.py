"""A stopping run leaves nothing for later but what it must, and loses no checkpoint on the way.

1. A stop request (SLURM's warning signal) at a step that is a sample and an evaluation step: the
   run saves its checkpoint and leaves at once, without the sample grid and the evaluation (minutes,
   for an FID, of the time before SIGKILL that the requeue needs). Its checkpoint records them as
   owed, and the resumed run makes them first, for that step, from that step's weights and EMA:
   the same grid files and ``eval/*`` metrics at that step as an uninterrupted run. A checkpoint
   that owes nothing (a stop at another step, or a checkpoint of older code, without the record)
   makes nothing extra.
2. A second save of a step that has a checkpoint keeps the old one until the new one is in place: a
   crash between the two renames leaves a loadable checkpoint of that step.
"""
import json
import logging
import math
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.helpers.runs import REPO, TINY, digits_npz, env, losses, stop_during_step

STEPS = 4
PERIODIC = ["train.ckpt_every=0", "train.sample_every=2", "train.eval_every=2", "train.sample_steps=2",
            "train.sample_classes=[0,1]", "train.eval_num_samples=12", "train.eval_input_size=75"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The data, the evaluation's reference batch and a small random feature network."""
    from mpdit_dist.inception import random_feature_net

    root = tmp_path_factory.mktemp("owed")
    npz = digits_npz(root / "digits.npz", n=120)
    with np.load(npz) as z:  # real digits as ADM-format uint8 images
        ref = ((z["x"][:40].transpose(0, 2, 3, 1) + 1) * 127.5).round().astype(np.uint8)
    np.savez(root / "ref.npz", arr_0=ref)
    torch.save(random_feature_net(0, input_size=75).state_dict(), root / "inception.pth")
    return {"npz": npz, "ref": root / "ref.npz", "inception": root / "inception.pth"}


@pytest.fixture(scope="module")
def run(files):
    """``run(run_dir, stop=None, steps=STEPS)``: an in-process run of ``steps`` steps, with a stop
    request (as from SLURM's warning signal) during step ``stop``."""
    from mpdit_dist import config as C
    from mpdit_dist import preemption, trainer

    mp = pytest.MonkeyPatch()
    stop_at = stop_during_step(mp)

    def go(run_dir, stop=None, steps=STEPS):
        cfg = C.load_config(str(REPO / "configs/demo.yaml"), TINY + PERIODIC + [
            f"data.path={files['npz']}", f"train.steps={steps}", f"train.eval_reference={files['ref']}",
            f"train.eval_inception={files['inception']}"])
        preemption.clear()
        stop_at["step"] = stop
        try:
            return trainer.train(cfg, run_dir)
        finally:
            preemption.clear()

    try:
        yield go
    finally:
        mp.undo()


def _grids(run_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "samples").glob("step_*.png"))}


def _evals(run_dir) -> dict[int, float]:
    from mpdit_dist.tracking import read_metrics

    return {int(r["step"]): r["eval/fid"] for r in read_metrics(run_dir) if "eval/fid" in r}


def _trainer_json(run_dir, step) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step_{step:08d}" / "trainer.json").read_text())


@pytest.fixture(scope="module")
def reference(run, tmp_path_factory):
    """The uninterrupted run: grids and evaluations at steps 2 and 4."""
    ref = tmp_path_factory.mktemp("reference") / "run"
    assert run(ref)["status"] == "finished"
    assert sorted(_grids(ref)) == [f"step_{s:08d}_cfg{c}.png" for s in (2, 4) for c in (1, 2)]
    assert sorted(_evals(ref)) == [2, 4] and all(math.isfinite(v) for v in _evals(ref).values())
    return ref


def test_a_stop_at_a_sample_and_eval_step_leaves_them_to_the_resumed_run(run, reference, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mpdit_dist.trainer")
    stopped = tmp_path / "stopped"
    out = run(stopped, stop=2)
    assert out["status"] == "preempted" and out["step"] == 2
    # stopped with its checkpoint, without the grid or the evaluation of the step
    assert _grids(stopped) == {} and _evals(stopped) == {}
    assert _trainer_json(stopped, 2)["owed"] == {"step": 2, "outputs": ["samples", "eval"]}
    assert "skipped the sample grid and evaluation due at step 2, recorded as owed" in caplog.text

    caplog.clear()
    assert run(stopped)["status"] == "finished"
    assert "making the sample grid and evaluation of step 2 first" in caplog.text
    assert "made the postponed sample grid and evaluation of step 2" in caplog.text
    # made for step 2 from the checkpoint's weights and EMA: what the uninterrupted run made
    assert _grids(stopped) == _grids(reference)
    assert _evals(stopped) == pytest.approx(_evals(reference), rel=1e-6)
    assert losses(stopped) == losses(reference)
    assert _trainer_json(stopped, 4)["owed"] is None


def test_owed_outputs_of_the_last_step_are_made_once_and_recorded_as_final(run, reference, tmp_path, caplog):
    """Resumed with ``train.steps`` lowered to the step it stopped at, the run is at its last step:
    the owed grid and evaluation are also its end-of-run outputs, made once and recorded as such."""
    caplog.set_level(logging.INFO, logger="mpdit_dist.trainer")
    stopped = tmp_path / "stopped"
    assert run(stopped, stop=2)["status"] == "preempted"
    caplog.clear()
    assert run(stopped, steps=2) == {"status": "finished", "step": 2, "run_dir": str(stopped)}
    assert caplog.text.count("making the sample grid and evaluation of step 2 first") == 1
    assert "making them now" not in caplog.text  # not made a second time as missing final outputs
    assert json.loads((stopped / "final_outputs.json").read_text()) == {"step": 2, "outputs": ["samples", "eval"]}
    assert _grids(stopped) == {k: v for k, v in _grids(reference).items() if k.startswith("step_00000002")}
    assert _evals(stopped) == pytest.approx({2: _evals(reference)[2]}, rel=1e-6)


@pytest.mark.parametrize("older_code", [False, True])
def test_a_checkpoint_that_owes_nothing_makes_nothing_extra(run, reference, tmp_path, caplog, older_code):
    """A stop at a step that is no sample or evaluation step owes nothing; a checkpoint written by
    older code has no ``owed`` record at all: nothing owed either."""
    from mpdit_dist.checkpoint import write_manifest

    caplog.set_level(logging.INFO, logger="mpdit_dist.trainer")
    stopped = tmp_path / "stopped"
    assert run(stopped, stop=3)["status"] == "preempted"
    ckpt = stopped / "checkpoints" / "step_00000003"
    state = _trainer_json(stopped, 3)
    assert state["owed"] is None
    if older_code:
        del state["owed"]
        (ckpt / "trainer.json").write_text(json.dumps(state, indent=1))
        write_manifest(ckpt)  # checksums of the edited file: an intact checkpoint without the record
    assert sorted(_grids(stopped)) == ["step_00000002_cfg1.png", "step_00000002_cfg2.png"]
    assert sorted(_evals(stopped)) == [2]

    caplog.clear()
    assert run(stopped)["status"] == "finished"
    assert "resumed from" in caplog.text and "making the" not in caplog.text and "postponed" not in caplog.text
    assert _grids(stopped) == _grids(reference)  # nothing for step 3
    assert sorted(_evals(stopped)) == [2, 4]
    assert losses(stopped) == losses(reference)


# ------------------------------------------------------------------------------------------------
# Replacing a checkpoint of the same step
# ------------------------------------------------------------------------------------------------

SAVE = """
import sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[1])
from mpdit_dist.checkpoint import CheckpointManager
CheckpointManager(Path(sys.argv[2])).save(3, {"w": torch.full((4,), float(sys.argv[3]))},
                                          {"step": 3, "world_size": 1, "version": int(sys.argv[3])})
"""


def _save(run_dir, version: int) -> None:
    """Save step 3, its tensor and trainer.json marked ``version``."""
    from mpdit_dist.checkpoint import CheckpointManager

    CheckpointManager(run_dir).save(3, {"w": torch.full((4,), float(version))},
                                    {"step": 3, "world_size": 1, "version": version})


def _save_killed(run_dir, version: int, fault: str) -> subprocess.CompletedProcess:
    """:func:`_save` in a process that ``MPDIT_FAULT=fault`` kills."""
    return subprocess.run([sys.executable, "-c", SAVE, str(REPO), str(run_dir), str(version)], cwd=REPO,
                          env=env({"MPDIT_FAULT": fault}), capture_output=True, text=True, timeout=120)


def _load(run_dir) -> tuple[str, float, int]:
    """(checkpoint name, its tensor's value, its trainer.json version), as a new run finds it."""
    from mpdit_dist.checkpoint import CheckpointManager

    manager = CheckpointManager(run_dir)
    manager.clean_partial()
    path = manager.find_latest()
    tensors = {"w": torch.zeros(4)}
    state = manager.load(path, tensors)
    assert torch.equal(tensors["w"], torch.full((4,), tensors["w"][0].item()))
    return path.name, tensors["w"][0].item(), state["version"]


def test_a_crash_while_a_step_is_saved_again_leaves_a_loadable_checkpoint_of_it(tmp_path, caplog):
    from mpdit_dist.checkpoint import verify

    root = tmp_path / "run" / "checkpoints"
    _save(tmp_path / "run", 1)
    # killed (SIGKILL) between the renames of a second save of step 3: the old checkpoint moved
    # aside, the new one complete but not in place. Before, the old one was deleted first.
    proc = _save_killed(tmp_path / "run", 2, fault="replace:3")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert sorted(p.name for p in root.iterdir()) == ["replaced-step_00000003", "tmp-step_00000003"]

    caplog.set_level(logging.WARNING, logger="mpdit_dist.checkpoint")
    assert _load(tmp_path / "run") == ("step_00000003", 1.0, 1)  # the old one, put back
    assert "restored checkpoint step_00000003 from replaced-step_00000003" in caplog.text
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003"]
    assert verify(root / "step_00000003") is None

    # a second save that completes replaces it, leaving nothing aside
    _save(tmp_path / "run", 2)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003"]
    assert _load(tmp_path / "run") == ("step_00000003", 2.0, 2)


def test_a_replaced_checkpoint_left_aside_next_to_its_replacement_is_deleted(tmp_path, caplog):
    """A crash after the new checkpoint is in place, before the old one was deleted (or a deletion
    that failed): the next start deletes the old one and resumes from the new."""
    import shutil

    root = tmp_path / "run" / "checkpoints"
    _save(tmp_path / "run", 1)
    shutil.copytree(root / "step_00000003", tmp_path / "version1")
    shutil.copytree(tmp_path / "version1", root / "replaced-step_00000003")
    _save(tmp_path / "run", 2)  # a leftover aside does not block a replacement
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003"]
    shutil.copytree(tmp_path / "version1", root / "replaced-step_00000003")
    caplog.set_level(logging.WARNING, logger="mpdit_dist.checkpoint")
    assert _load(tmp_path / "run") == ("step_00000003", 2.0, 2)
    assert "removing" in caplog.text and "replaced-step_00000003" in caplog.text
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003"]
