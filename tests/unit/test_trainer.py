"""The single-process trainer: determinism, accumulation, EMA, resume, tracking, sampling output."""
import json

import numpy as np
import pytest
import torch

from tests.helpers.runs import losses, train


def test_same_seed_same_losses_and_weights(tmp_path, npz):
    train(tmp_path / "a", npz, ["train.steps=4", "train.ckpt_every=0"])
    train(tmp_path / "b", npz, ["train.steps=4", "train.ckpt_every=0"])
    train(tmp_path / "c", npz, ["train.steps=4", "train.ckpt_every=0", "train.seed=1"])
    a, b, c = losses(tmp_path / "a"), losses(tmp_path / "b"), losses(tmp_path / "c")
    assert len(a) == 4 and a == b
    assert a != c


def test_gradient_accumulation_matches_full_batch(tmp_path, npz):
    from mpdit_dist.export import load_checkpoint_weights

    train(tmp_path / "full", npz, ["train.steps=3", "train.ckpt_every=3"])
    train(tmp_path / "accum", npz, ["train.steps=3", "train.ckpt_every=3", "data.micro_batch_size=6"])
    lf, la = losses(tmp_path / "full"), losses(tmp_path / "accum")
    for s in lf:
        assert la[s] == pytest.approx(lf[s], rel=1e-6)
    # the gradients agree too: after 3 AdamW steps the weights are the same to float tolerance
    wf, _, _ = load_checkpoint_weights(run_dir=str(tmp_path / "full"), use_ema=False)
    wa, _, _ = load_checkpoint_weights(run_dir=str(tmp_path / "accum"), use_ema=False)
    for (n, p), q in zip(wf.state_dict().items(), wa.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=n)


def test_global_batch_must_divide(tmp_path, npz):
    proc = train(tmp_path / "x", npz, ["train.steps=1", "data.micro_batch_size=5"], check=False)
    assert proc.returncode != 0 and "data.micro_batch_size=5" in proc.stderr


def test_ema_update_and_warmup():
    from mpdit_dist.ema import EMA

    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.99, warmup=True)
    assert ema.decay_at(1) == pytest.approx(2 / 11)
    assert ema.decay_at(10_000) == 0.99
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, step=1)
    d = ema.decay_at(1)
    for s, p0 in zip(ema.shadow, start):
        torch.testing.assert_close(s, d * p0 + (1 - d) * (p0 + 1))
    # swapped_into puts the EMA in and restores the live weights after
    live = [p.detach().clone() for p in model.parameters()]
    with ema.swapped_into(model):
        for p, s in zip(model.parameters(), ema.shadow):
            assert torch.equal(p, s)
    for p, q in zip(model.parameters(), live):
        assert torch.equal(p, q)
    no_warm = EMA(model, decay=0.99, warmup=False)
    assert no_warm.decay_at(1) == 0.99


def test_resume_continues_exactly(tmp_path, npz):
    train(tmp_path / "full", npz, ["train.steps=8", "train.ckpt_every=4"])
    train(tmp_path / "part", npz, ["train.steps=5", "train.ckpt_every=4"])  # checkpoints at 4 and 5
    # crash after step 6 (SIGKILL), then resume from the newest checkpoint (5)
    proc = train(tmp_path / "part", npz, ["train.steps=8", "train.ckpt_every=4"], fault="step:6", check=False)
    assert proc.returncode != 0
    train(tmp_path / "part", npz, ["train.steps=8", "train.ckpt_every=4"])
    assert losses(tmp_path / "part") == losses(tmp_path / "full")  # bitwise on CPU


def test_run_dir_contents_and_mlflow(tmp_path, npz):
    import mlflow

    results = tmp_path / "results"
    common = ["train.steps=4", "train.ckpt_every=2", "tracking.enabled=true", f"results_dir={results}",
              "train.sample_every=4", "train.sample_steps=3", "train.sample_classes=[0,1,2]"]
    run = tmp_path / "run"
    train(run, npz, common[:1] + ["train.steps=2"] + common[1:])
    train(run, npz, common)  # resumed: appends to the same MLflow run
    assert (run / "config.yaml").is_file() and (run / "samples").is_dir()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("step", "loss", "lr", "grad_norm", "img_per_s", "data_wait_frac"):
        assert key in rows[0]
    # the logged lr is the one each step applied: demo.yaml warms up 1e-3 over 100 steps, step s at s/100
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["lr"] for r in rows] == pytest.approx([1e-5, 2e-5, 3e-5, 4e-5], rel=1e-9)
    run_id = (run / "mlflow_run_id").read_text().strip()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{results}/mlflow.db")
    r = client.get_run(run_id)
    assert r.data.params["model.hidden_size"] == "32"
    hist = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in hist) == [1, 2, 3, 4]
    assert {"model", "world_size", "backend"} <= set(r.data.tags)
    arts = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert any(a.endswith(".png") for a in arts)


def test_sample_cli_output_format(tmp_path, npz):
    from mpdit_dist.sample import main as sample_main

    train(tmp_path / "run", npz, ["train.steps=2", "train.ckpt_every=2"])
    out = tmp_path / "s.npz"
    sample_main(["--run-dir", str(tmp_path / "run"), "--num-per-class", "2", "--steps", "2", "--classes", "0,3",
                 "--cfg-scale", "2", "--out", str(out), "--device", "cpu"])
    with np.load(out) as z:
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (4, 16, 16, 3)
        assert sorted(z["arr_1"].tolist()) == [0, 0, 3, 3]  # shuffled: IS splits see every class
    assert out.with_suffix(".png").is_file()
    settings = json.loads(out.with_suffix(".json").read_text())
    assert settings["cfg_scale"] == 2.0 and settings["steps"] == 2


def test_config_errors_name_the_key(tmp_path, npz):
    proc = train(tmp_path / "x", npz, ["train.stepz=3"], check=False)
    assert proc.returncode != 0 and "stepz" in proc.stderr
    proc = train(tmp_path / "x", npz, ["model.input_size=12"], check=False)
    assert proc.returncode != 0 and "model.input_size" in proc.stderr


def test_init_from_export_warm_starts(tmp_path, npz):
    """train.init_from: weights only, from an exported safetensors file."""
    from safetensors.torch import load_file

    from mpdit_dist.export import load_checkpoint_weights
    from mpdit_dist.export import main as export_main

    train(tmp_path / "a", npz, ["train.steps=2", "train.ckpt_every=2"])
    export_main([str(tmp_path / "a"), "--out", str(tmp_path / "a.safetensors")])
    # lr 0: the new run's weights stay exactly the imported ones
    train(tmp_path / "b", npz, ["train.steps=1", "train.ckpt_every=1", "optim.lr=0",
                                f"train.init_from={tmp_path / 'a.safetensors'}"])
    want = load_file(str(tmp_path / "a.safetensors"))
    got, _, info = load_checkpoint_weights(run_dir=str(tmp_path / "b"), use_ema=False)
    assert info["step"] == 1
    for k, v in got.state_dict().items():
        assert torch.equal(v, want[k]), k


def _steps(run):
    return sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*"))


def test_second_run_in_a_used_run_dir_is_refused(tmp_path, npz):
    """--resume never, or a checkpoint of another run dir, into a run dir that holds checkpoints:
    an error naming the run dir and its newest checkpoint, and nothing in the run dir changes."""
    run, other = tmp_path / "run", tmp_path / "other"
    train(run, npz, ["train.steps=4", "train.ckpt_every=1", "checkpoint.keep_last=2"])
    train(other, npz, ["train.steps=2", "train.ckpt_every=2"])
    config = (run / "config.yaml").read_text()
    before = losses(run)
    for resume in ("never", str(other / "checkpoints" / "step_00000002")):
        proc = train(run, npz, ["train.steps=2", "train.ckpt_every=1", "checkpoint.keep_last=2"], resume=resume,
                     check=False)
        assert proc.returncode != 0
        assert f"run directory {run} already holds" in proc.stderr, proc.stderr[-2000:]
        assert str(run / "checkpoints" / "step_00000004") in proc.stderr and "--run-dir" in proc.stderr
        assert _steps(run) == [3, 4]
        assert (run / "config.yaml").read_text() == config and losses(run) == before


def test_resume_from_an_older_checkpoint_moves_the_later_ones_aside(tmp_path, npz):
    """--resume PATH of an older checkpoint of the same run dir goes back in time: the later
    checkpoints go to checkpoints/superseded-*/, so that neither retention nor --resume auto mixes
    them with the new ones."""
    run = tmp_path / "run"
    common = ["train.ckpt_every=1", "checkpoint.keep_last=3"]
    train(run, npz, ["train.steps=5", *common])
    ref = losses(run)
    proc = train(run, npz, ["train.steps=4", *common], resume=str(run / "checkpoints" / "step_00000003"))
    assert "at step 3" in proc.stderr and "superseded-" in proc.stderr
    assert _steps(run) == [3, 4]
    aside = list((run / "checkpoints").glob("superseded-*"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["step_00000004", "step_00000005"]
    # auto continues the new history (step 4), not the old one (step 5); exact resume throughout
    proc = train(run, npz, ["train.steps=6", *common])
    assert str(run / "checkpoints" / "step_00000004") in proc.stderr and "at step 4" in proc.stderr
    assert _steps(run) == [4, 5, 6]
    assert [losses(run)[s] for s in range(1, 6)] == [ref[s] for s in range(1, 6)]


def test_every_checkpoint_damaged_stops_and_deletes_nothing(tmp_path, npz):
    run = tmp_path / "run"
    train(run, npz, ["train.steps=3", "train.ckpt_every=1", "checkpoint.keep_last=2"])
    before = losses(run)
    for step in (2, 3):
        (run / "checkpoints" / f"step_0000000{step}" / "trainer.json").write_text("{}")
    proc = train(run, npz, ["train.steps=5", "train.ckpt_every=1", "checkpoint.keep_last=2"], check=False)
    assert proc.returncode != 0
    assert "every checkpoint" in proc.stderr, proc.stderr[-2000:]
    for step in (2, 3):
        assert f"step_0000000{step} (trainer.json " in proc.stderr
    assert _steps(run) == [2, 3] and losses(run) == before


def test_other_backend_or_model_is_refused_before_loading(tmp_path, npz):
    """DeepSpeed <-> the DCP backends cannot load each other, nor can another architecture: an error
    naming the checkpoint and both values. none -> FSDP2 (the same DCP state) resumes."""
    run = tmp_path / "run"
    train(run, npz, ["train.steps=2", "train.ckpt_every=2"])
    ckpt = run / "checkpoints" / "step_00000002"
    proc = train(run, npz, ["train.steps=4", "parallel.backend=deepspeed"], check=False)
    assert proc.returncode != 0
    assert f"checkpoint {ckpt} was written with parallel.backend=none" in proc.stderr, proc.stderr[-2000:]
    assert "parallel.backend=deepspeed" in proc.stderr
    proc = train(run, npz, ["train.steps=4", "model.hidden_size=64"], check=False)
    assert proc.returncode != 0
    assert f"checkpoint {ckpt} holds another model architecture" in proc.stderr, proc.stderr[-2000:]
    assert "model.hidden_size=32 there, 64 here" in proc.stderr
    assert losses(run).keys() == {1, 2}
    proc = train(run, npz, ["train.steps=3", "parallel.backend=fsdp2"])
    assert "at step 2" in proc.stderr and max(losses(run)) == 3


def test_divergence_stops_before_saving_and_an_earlier_checkpoint_recovers(tmp_path, npz):
    import re

    run = tmp_path / "run"
    common = ["train.ckpt_every=1", "train.log_every=4", "optim.warmup_steps=0"]
    train(run, npz, common + ["train.steps=2"])  # healthy steps 1-2
    # then AdamW at lr 1e6 overflows the activations within a few steps: a real divergence
    proc = train(run, npz, common + ["train.steps=10", "optim.lr=1e6"], check=False)
    assert proc.returncode != 0 and "TrainingDiverged" in proc.stderr, proc.stderr[-2000:]
    m = re.search(r"not finite at step (\d+) \(the first such step on any rank\); stopped at step (\d+) without "
                  r"saving this state\. Newest checkpoint: step_(\d+)", proc.stderr)
    assert m, proc.stderr[-2000:]
    bad, stopped, newest = map(int, m.groups())
    assert 2 < bad <= stopped < 10 and newest == bad - 1  # checked before each save (every step here)
    saved = sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*"))
    assert saved[-1] == newest  # nothing of the diverged state was saved
    # the way out the error names: back to a healthy checkpoint with a sane learning rate
    train(run, npz, common + ["train.steps=4"], resume=str(run / "checkpoints" / "step_00000002"))
    assert sorted(losses(run))[-1] == 4


def test_a_non_finite_weight_stops_before_a_save(tmp_path):
    """An update can overflow the weights after a step whose loss and gradient norm were finite: the
    check before a save looks at the weights too."""
    from types import SimpleNamespace

    from mpdit_dist.checkpoint import CheckpointManager
    from mpdit_dist.trainer import Trainer, TrainingDiverged

    model = torch.nn.Linear(3, 2)
    t = SimpleNamespace(raw_model=model, dist=SimpleNamespace(distributed=False), step=7,
                        ckpt=CheckpointManager(tmp_path / "run"))
    none_seen = torch.tensor(-1)
    Trainer._stop_if_diverged(t, none_seen, weights=True)  # all finite: returns
    with torch.no_grad():
        model.weight[0, 1] = float("inf")
    Trainer._stop_if_diverged(t, none_seen, weights=False)  # the weights are looked at only before saves
    with pytest.raises(TrainingDiverged, match="not finite at step 7 .*Newest checkpoint: none"):
        Trainer._stop_if_diverged(t, none_seen, weights=True)
    with pytest.raises(TrainingDiverged, match="not finite at step 5 "):  # an earlier bad step is named first
        Trainer._stop_if_diverged(t, torch.tensor(5), weights=True)


def test_resume_applies_the_configs_optimizer_settings(tmp_path, npz):
    """The optimizer state carries the lr, betas and weight decay it was saved with; the config's
    must win on resume (and be logged), or a resume with a lower lr after a divergence changes nothing."""
    from mpdit_dist.tracking import read_metrics

    run = tmp_path / "run"
    common = ["train.ckpt_every=2", "optim.warmup_steps=0"]
    train(run, npz, common + ["train.steps=2", "optim.lr=1e-3"])
    proc = train(run, npz, common + ["train.steps=4", "optim.lr=2.5e-4", "optim.weight_decay=0.05"])
    assert "optim.lr 0.001 -> 0.00025" in proc.stderr and "optim.weight_decay 0.0 -> 0.05" in proc.stderr, \
        proc.stderr[-2000:]
    lr = {int(m["step"]): m["lr"] for m in read_metrics(run) if "lr" in m}
    assert lr[2] == pytest.approx(1e-3) and lr[3] == pytest.approx(2.5e-4) and lr[4] == pytest.approx(2.5e-4)


def test_an_error_on_one_rank_ends_every_rank_and_keeps_the_steps_checkpoint(tmp_path, npz):
    """Rank 0 fails writing the sample grid of step 2 (its ``samples`` is a file), while rank 1 goes
    on into the next step's collectives: both processes end promptly with rank 0's error printed
    (they used to wait for each other in different collectives until the group's timeout, 30 min,
    with nothing printed), and the checkpoint of step 2, due at the same step, was saved first."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "samples").write_text("not a directory")
    proc = train(run, npz, ["train.steps=6", "train.ckpt_every=2", "train.sample_every=2", "train.sample_steps=2",
                            "train.sample_classes=[0,1]", "parallel.backend=ddp"], nproc=2, check=False, timeout=120)
    assert proc.returncode != 0
    assert "[rank0]: NotADirectoryError" in proc.stderr or "[rank0]: FileExistsError" in proc.stderr, proc.stderr[-3000:]
    assert (run / "checkpoints" / "step_00000002" / "COMPLETE.json").is_file()


def test_a_stop_request_during_the_last_step_finishes_the_run(tmp_path, npz, monkeypatch):
    """A stop request (SLURM's warning signal) that lands during the last step changes nothing: the
    run finishes with its final sample grid, so that a launcher does not requeue a finished job. One
    that lands earlier stops the run with a checkpoint (the grid due at that step is left to the
    resumed run, tests/unit/test_stop_owed_outputs.py)."""
    from mpdit_dist import config as C
    from mpdit_dist import preemption, trainer
    from tests.helpers.runs import REPO, TINY, stop_during_step

    stop_at = stop_during_step(monkeypatch)
    cfg = C.load_config(str(REPO / "configs/demo.yaml"), TINY + [
        f"data.path={npz}", "train.steps=3", "train.ckpt_every=0", "train.sample_every=2", "train.sample_steps=2",
        "train.sample_classes=[0,1]"])
    try:
        for when, want in ((3, "finished"), (2, "preempted")):
            preemption.clear()
            stop_at["step"] = when
            result = trainer.train(cfg, tmp_path / f"stop{when}")
            assert result["status"] == want and result["step"] == when
            grids = sorted(p.name for p in (tmp_path / f"stop{when}" / "samples").glob("*_cfg1.png"))
            # stopped at step 2, a sample step: its grid is owed to the resumed run, not made in the grace time
            assert grids == (["step_00000002_cfg1.png", "step_00000003_cfg1.png"] if when == 3 else [])
            assert (tmp_path / f"stop{when}" / "checkpoints" / f"step_{when:08d}").is_dir()
    finally:
        preemption.clear()
