"""Training runs whose shard files go bad under them: real ``train.py`` / ``torchrun`` processes on
real MDS and WebDataset shards (identity latents of digits, written by ``data_prep.encode``).

* A shard truncated while the run has it open (mid-epoch, after the dataset was verified): every
  rank stops within seconds with an error naming the file and what to do (not a bus error that
  kills the process without a word), nothing read past the cut is trained on, the newest
  checkpoint is kept, and once the shard is repaired the run resumes to the same losses as an
  undisturbed run. Both formats, with and without DataLoader workers, on 1 process and 2 gloo ranks.
* A shard that is missing for a moment when the run opens it (a parallel file system's hiccup):
  the run says so, tries again, and goes on to the undisturbed run's losses.
* A read that hangs (DataLoader workers stopped): the loader says which rank waits for which step
  and where it reads, instead of nothing until the other ranks' collective timeout, and the
  batches are the undisturbed ones once it comes. One that never comes ends the process after
  ``data.read_timeout_s``, with and without workers, naming the step and the data.
"""
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.helpers.data import encoded_digits
from tests.helpers.runs import PY, REPO, TINY, TORCHRUN, env, losses

STEPS, CKPT_EVERY, DAMAGE_AT = 16, 4, 6  # 60 samples, global batch 12: 5 steps an epoch
SHARD = {"mds": "mds/part-000001/shard.00000.mds", "wds": "wds/shard-000001.tar"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return encoded_digits(tmp_path_factory.mktemp("digits"), size=16, limit=60, formats="mds,wds", per_shard=6)


def _cmd(run_dir: Path, data: Path, fmt: str, workers: int, nproc: int) -> list[str]:
    args = ["--config", str(REPO / "configs/demo.yaml"), "--run-dir", str(run_dir), f"data.path={data}", *TINY,
            f"data.format={fmt}", f"data.num_workers={workers}", f"train.steps={STEPS}",
            f"train.ckpt_every={CKPT_EVERY}"]
    launcher = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}"] if nproc else [PY]
    return [*launcher, str(REPO / "train.py"), *args]


_REFERENCE: dict = {}


def _reference(tmp_path_factory, dataset, nproc: int) -> dict[int, float]:
    """The losses of an undisturbed run (the same for both formats and any worker count)."""
    if nproc not in _REFERENCE:
        run_dir = tmp_path_factory.mktemp("reference") / "run"
        proc = subprocess.run(_cmd(run_dir, dataset, "wds", 0, nproc), cwd=REPO, env=env(), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _REFERENCE[nproc] = losses(run_dir)
        assert sorted(_REFERENCE[nproc]) == list(range(1, STEPS + 1))
    return _REFERENCE[nproc]


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def _stopped_descendant(root: int) -> int | None:
    """The process under ``root`` (itself included) stopped by a signal, if any."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parents[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    family, frontier = [root], {root}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier}
        family += sorted(frontier)
    return next((p for p in family if _state(p) == "T"), None)


def _copy(dataset: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    return data


@pytest.mark.parametrize("fmt, workers, nproc", [("mds", 0, 0), ("wds", 2, 0), ("mds", 2, 2), ("wds", 0, 2)])
def test_a_shard_truncated_under_the_run_stops_every_rank_and_resumes_exactly(tmp_path, tmp_path_factory, dataset,
                                                                             fmt, workers, nproc):
    want = _reference(tmp_path_factory, dataset, nproc)
    data, run_dir = _copy(dataset, tmp_path), tmp_path / "run"
    shard = data / SHARD[fmt]
    good = shard.read_bytes()
    # rank 0 stops itself after step DAMAGE_AT (every shard is open by then); cut the shard, let it go on
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(_cmd(run_dir, data, fmt, workers, nproc), cwd=REPO,
                                env=env({"MPDIT_FAULT": f"step:{DAMAGE_AT}:SIGSTOP@0"}), stdout=subprocess.DEVNULL,
                                stderr=stderr, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while (stopped := _stopped_descendant(proc.pid)) is None:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        os.truncate(shard, len(good) // 2)
        t0 = time.monotonic()
        os.kill(stopped, signal.SIGCONT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    took = time.monotonic() - t0
    err = log.read_text()
    assert proc.returncode != 0, err[-3000:]
    assert took < 60, f"the ranks took {took:.0f} s to stop"
    last = err.strip().splitlines()[-40:]
    assert "Bus error" not in err and "SIGBUS" not in err, "\n".join(last)
    assert "ShardReadError" in err and f"{shard}: " in err, "\n".join(last)
    assert "truncated after the run opened it" in err, "\n".join(last)
    assert f"python -m data_prep.encode --out {data} --verify" in err, "\n".join(last)
    seen = losses(run_dir)
    assert sorted(seen) == list(range(1, max(seen) + 1)) and max(seen) < STEPS
    assert all(seen[s] == want[s] for s in seen)  # nothing read past the cut was trained on
    newest = max(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert newest >= CKPT_EVERY and newest <= max(seen)

    shard.unlink()
    shard.write_bytes(good)  # repaired (the encode command rewrites the same bytes)
    proc = subprocess.run(_cmd(run_dir, data, fmt, workers, nproc), cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(run_dir) == want


@pytest.mark.parametrize("fmt, workers, nproc", [("wds", 2, 0), ("mds", 0, 2)])
def test_a_shard_missing_for_a_moment_is_waited_for(tmp_path, tmp_path_factory, dataset, fmt, workers, nproc):
    want = _reference(tmp_path_factory, dataset, nproc)
    data, run_dir = _copy(dataset, tmp_path), tmp_path / "run"
    shard = data / SHARD[fmt]
    away = shard.with_name(shard.name + ".away")
    shard.rename(away)
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(_cmd(run_dir, data, fmt, workers, nproc), cwd=REPO, env=env(),
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "trying again" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        away.rename(shard)  # back before the next try
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    warning = next(line for line in text.splitlines() if "trying again" in line)
    assert f"{shard}: " in warning and "No such file" in warning
    assert losses(run_dir) == want


def test_a_stalled_read_is_reported_and_its_batches_come_unchanged(dataset, monkeypatch, caplog):
    from mpdit_dist.config import DataConfig
    from mpdit_dist.data import build_loader
    from mpdit_dist.data import loader as loader_module

    monkeypatch.setattr(loader_module, "STALL_WARN_S", 0.5, raising=False)
    cfg = dict(format="mds", path=str(dataset), global_batch_size=12, prefetch_factor=2, pin_memory=False)
    ref = build_loader(DataConfig(num_workers=0, **cfg), rank=0, world_size=1, seed=0)
    want = [next(ref)["keys"] for _ in range(8)]
    loader = build_loader(DataConfig(num_workers=2, **cfg), rank=0, world_size=1, seed=0)
    got = [next(loader)["keys"]]
    workers = [w.pid for w in loader._it._workers]
    for pid in workers:  # the reads hang: the batches read ahead come, then the next one does not
        os.kill(pid, signal.SIGSTOP)
    resume = threading.Timer(2.5, lambda: [os.kill(pid, signal.SIGCONT) for pid in workers])
    resume.start()
    try:
        with caplog.at_level(logging.INFO, logger="mpdit_dist.data.loader"):
            t0 = time.monotonic()
            got += [next(loader)["keys"] for _ in range(7)]
            waited = time.monotonic() - t0
    finally:
        resume.join()
        loader.close()
    assert waited > 2 and got == want
    said = [r.getMessage() for r in caplog.records if r.name == "mpdit_dist.data.loader"]
    stalled = [m for m in said if "has not come after" in m]
    assert stalled and "rank 0: the batch of step" in stalled[0] and str(dataset) in stalled[0], said
    assert any("came after" in m and "has not" not in m for m in said), said


HANG = r"""
import sys, time
from mpdit_dist.config import DataConfig
from mpdit_dist.data import build_loader, sources

sources._pread = lambda *a, **k: time.sleep(3600)  # a file system that stopped answering
cfg = DataConfig(format="mds", path=sys.argv[1], global_batch_size=12, num_workers=int(sys.argv[2]),
                 pin_memory=False, read_timeout_s=2)
next(build_loader(cfg, rank=0, world_size=1, seed=0))
print("a batch came")
"""


@pytest.mark.parametrize("workers", [0, 2])
def test_a_read_that_never_comes_ends_the_process_after_the_read_timeout(dataset, workers):
    """A hung read used to hold the process (and every GPU of the job: the other ranks wait up to the
    process group's 30 min timeout) forever: after data.read_timeout_s it ends with an error naming
    the rank, the step, the data and the setting. Without workers nothing can interrupt the read
    itself, so the loader's watcher ends the process."""
    t0 = time.monotonic()
    proc = subprocess.run([PY, "-c", HANG, str(dataset), str(workers)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0 and "a batch came" not in proc.stdout, proc.stderr[-3000:]
    assert re.search(r"rank 0: the batch of step 1 has not come after [234] s \(", proc.stderr), proc.stderr[-3000:]
    assert f" {dataset}), data.read_timeout_s=2: ending this rank" in proc.stderr
    if workers:
        assert "DataStallError" in proc.stderr  # raised in the training thread: the run ends as failed
    assert elapsed < 60
