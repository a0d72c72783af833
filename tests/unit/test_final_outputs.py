"""A run stopped after its final checkpoint but before its end-of-run sample grid or evaluation
(a crash, an out-of-memory error in a long evaluation, a kill) makes them when started again.

Before, the restarted run found itself at its last step and returned "finished" at once, so the
final grid and evaluation of the trained model were never made."""
import json

from tests.helpers.runs import train

COMMON = ["train.steps=4", "train.ckpt_every=2", "train.sample_every=4", "train.sample_steps=2",
          "train.sample_classes=[0,1]"]


def _grids(run, step):
    return sorted(p.name for p in (run / "samples").glob(f"step_{step:08d}_*.png"))


def test_a_run_killed_before_its_final_grid_makes_it_when_started_again(tmp_path, npz):
    run = tmp_path / "run"
    proc = train(run, npz, COMMON, fault="after_save:4", check=False)  # SIGKILL after the final checkpoint
    assert proc.returncode != 0
    assert (run / "checkpoints" / "step_00000004").is_dir() and _grids(run, 4) == []
    assert not (run / "final_outputs.json").exists()

    proc = train(run, npz, COMMON)
    assert "without its end-of-run samples: making them now" in proc.stderr, proc.stderr[-3000:]
    assert _grids(run, 4) == ["step_00000004_cfg1.png", "step_00000004_cfg2.png"]
    assert json.loads((run / "final_outputs.json").read_text()) == {"step": 4, "outputs": ["samples"]}

    # once made, a further start makes nothing again
    stamp = (run / "samples" / "step_00000004_cfg1.png").stat().st_mtime_ns
    proc = train(run, npz, COMMON)
    assert "making them now" not in proc.stderr
    assert (run / "samples" / "step_00000004_cfg1.png").stat().st_mtime_ns == stamp


def test_an_uninterrupted_run_records_its_final_outputs(tmp_path, npz):
    run = tmp_path / "run"
    train(run, npz, COMMON[:-3] + ["train.sample_every=0"])
    assert json.loads((run / "final_outputs.json").read_text()) == {"step": 4, "outputs": []}
