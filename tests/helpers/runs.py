"""Shared helpers: a small real dataset (scikit-learn digits) and training runs in subprocesses."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))

# a tiny model on the demo's 16x16x3 digits; fast on 2 cores
TINY = [
    "model.hidden_size=32", "model.num_heads=2", "model.stages=[[4,2],[2,1]]",
    "data.format=memory", "data.global_batch_size=12", "data.num_workers=0",
    "train.log_every=1", "train.sample_every=0", "train.progress_bar=false", "tracking.enabled=false",
]


def stop_during_step(mp) -> dict:
    """Patch ``Trainer.train_step`` (with ``mp``, a ``pytest.MonkeyPatch``) so that a stop request, as
    from SLURM's warning signal, comes during step ``at["step"]`` of the returned ``at`` (None: no stop)."""
    from mpdit_dist import preemption, trainer

    at: dict = {"step": None}
    step = trainer.Trainer.train_step

    def train_step(self, batch):
        out = step(self, batch)
        if self.step == at["step"]:
            preemption.request_stop("SIGUSR2")
        return out

    mp.setattr(trainer.Trainer, "train_step", train_step)
    return at


def digits_npz(path: Path, n: int | None = None) -> Path:
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:n], dtype=torch.float32)[:, None] / 16.0 * 2 - 1
    x = torch.nn.functional.interpolate(x, size=16, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    np.savez(path, x=x.numpy(), y=d.target[:n].astype(np.int64))
    return path


def env(extra: dict | None = None) -> dict:
    e = dict(os.environ)
    e.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    e.pop("MPDIT_FAULT", None)
    if extra:
        e.update(extra)
    return e


def train(run_dir: Path, npz: Path, overrides: list[str], nproc: int = 0, nnodes: int = 1, fault: str | None = None,
          check: bool = True, timeout: int = 300, resume: str | None = None) -> subprocess.CompletedProcess:
    """``python train.py`` (nproc=0) or ``torchrun --nproc_per_node nproc`` on the demo config;
    ``resume``: the ``--resume`` argument (default: train.py's, auto)."""
    args = ["--config", str(REPO / "configs/demo.yaml"), "--run-dir", str(run_dir),
            *(["--resume", str(resume)] if resume is not None else []), f"data.path={npz}", *TINY, *overrides]
    if nproc:
        cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", str(REPO / "train.py"), *args]
    else:
        cmd = [PY, str(REPO / "train.py"), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env({"MPDIT_FAULT": fault} if fault else None), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def torchrun_script(tmp_path: Path, source: str, done: str, nproc: int = 2, timeout: int = 300) -> None:
    """Run the script ``source`` on ``nproc`` torchrun ranks (its first argument: the repository);
    fail unless every rank exits 0 and rank 0 printed ``done``."""
    script = tmp_path / "ranks_script.py"
    script.write_text(source)
    proc = subprocess.run([TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", str(script), str(REPO)],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 and done in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


def losses(run_dir: Path) -> dict[int, float]:
    from mpdit_dist.tracking import read_metrics

    return {int(m["step"]): float(m["loss"]) for m in read_metrics(run_dir)}


def spawn_ranks(worker, args: tuple, nprocs: int, deadline_s: float) -> None:
    """``worker(rank, port, *args)`` in ``nprocs`` spawned processes (each rank on a fresh port's
    gloo group); they are killed and the test fails when they have not finished after ``deadline_s``."""
    import pytest
    import torch.multiprocessing as mp

    from mpdit_dist.distributed.env import free_port

    ctx = mp.start_processes(worker, args=(free_port(), *args), nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"the {nprocs} ranks did not finish within {deadline_s} s")


def attempt(results: dict, name: str, fn) -> None:
    """In a gloo rank of a test: start ``fn()`` together with the other ranks (a barrier), record
    ``[outcome, message, seconds]`` under ``name``: "returned" and ``str`` of the result, or the
    exception's type name and message."""
    import torch.distributed as dist

    dist.barrier()
    t0 = time.monotonic()
    try:
        results[name] = ["returned", str(fn()), 0.0]
    except Exception as exc:  # noqa: BLE001 - recorded, asserted by the test
        results[name] = [type(exc).__name__, str(exc), 0.0]
    results[name][2] = time.monotonic() - t0
