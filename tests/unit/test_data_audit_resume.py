"""The audit log (data.audit) after a resume: it tells the history that led to the resumed state.

A run killed after its last checkpoint delivered steps that the resumed run delivers again; when
the resumed run has fewer ranks, the old records of the ranks it no longer has must not stay
beside the new ones (``read_audit`` would show a step trained on more samples than its global
batch, some of them twice).
"""
import numpy as np

from mpdit_dist.config import DataConfig
from mpdit_dist.data import build_loader, read_audit
from tests.helpers.data import global_batches


def _cfg(path, g, audit=True):
    return DataConfig(format="memory", path=str(path), global_batch_size=g, num_workers=0, pin_memory=False,
                      audit=audit)


def _npz(tmp_path, n=23):
    x = np.random.default_rng(0).normal(size=(n, 1, 2, 2)).astype(np.float32)
    path = tmp_path / "toy.npz"
    np.savez(path, x=x, y=np.arange(n) % 3, keys=np.array([f"k{i:03d}" for i in range(n)]))
    return path


def _session(path, run, world, steps, state=None, g=12):
    """``world`` ranks of one run (simulated in this process) deliver ``steps`` steps; returns
    ``{step: state}`` after each step (what a checkpoint taken there would hold)."""
    loaders = [build_loader(_cfg(path, g), rank=r, world_size=world, seed=0, run_dir=str(run)) for r in range(world)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    saved = {}
    for _ in range(steps):
        for ld in loaders:
            next(ld)
        saved[loaders[0].step] = loaders[0].state_dict()
    for ld in loaders:
        ld.close()  # the processes end (killed: no checkpoint after the last one taken)
    return saved


def _per_step(run):
    out = {}
    for steps in read_audit(str(run)).values():
        for step, keys in steps.items():
            out.setdefault(step, []).extend(keys)
    return out


def test_a_resume_on_fewer_ranks_supersedes_the_dead_ranks_records(tmp_path):
    path, run = _npz(tmp_path), tmp_path / "run"
    ref = [sorted(keys) for keys, _, _ in global_batches(_cfg(path, 12, audit=False), 1, steps=6)[0]]
    # 3 ranks deliver steps 0..4, the last checkpoint holds the state after step 2, then a crash
    states = _session(path, run, world=3, steps=5)
    # resumed on 2 ranks from that checkpoint: steps 2..5
    _session(path, run, world=2, steps=4, state=states[2])
    got = _per_step(run)
    assert sorted(got) == list(range(6))
    for step in range(6):
        assert len(got[step]) == 12, (step, len(got[step]))
        assert sorted(got[step]) == ref[step], step
    audit = read_audit(str(run))
    assert sorted(audit[2]) == [0, 1]  # rank 2 trained steps 0 and 1 (3 ranks), nothing after
    assert [len(audit[r][2]) for r in (0, 1)] == [6, 6]


def test_steps_after_the_resumed_one_are_not_left_from_the_dead_run(tmp_path):
    """A run resumed from step 2 that stops again after step 2: the dead run's steps 3 and 4 were
    never trained in the history that leads to the state the run directory holds."""
    path, run = _npz(tmp_path), tmp_path / "run"
    states = _session(path, run, world=2, steps=5)
    _session(path, run, world=2, steps=1, state=states[2])
    audit = read_audit(str(run))
    assert [sorted(audit[r]) for r in (0, 1)] == [[0, 1, 2], [0, 1, 2]]
    # and a fresh session appends as before
    _session(path, run, world=2, steps=2, state=states[3])
    audit = read_audit(str(run))
    assert [sorted(audit[r]) for r in (0, 1)] == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]


def test_a_line_cut_short_by_a_kill_is_dropped_at_the_resume(tmp_path):
    path, run = _npz(tmp_path), tmp_path / "run"
    states = _session(path, run, world=2, steps=3)
    with open(run / "audit" / "rank0.jsonl", "a") as f:
        f.write('{"step": 3, "keys": ["k0')  # killed in the middle of the write
    _session(path, run, world=2, steps=2, state=states[3])
    audit = read_audit(str(run))
    assert [sorted(audit[r]) for r in (0, 1)] == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
