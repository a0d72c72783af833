#!/usr/bin/env python
"""Submit a training run to SLURM (or run it locally) through submitit.

    python slurm/submit.py --config configs/X.yaml [--run-dir DIR] [--resume auto|never|PATH]
                           [--wait [--timeout S]] [key=value ...]

The ``launch`` section of the config says where and how (``launch.cluster`` slurm | local | debug,
nodes, gpus_per_node, tasks_per_node for CPU jobs, cpus_per_task, mem_gb per task, partition,
account, qos, time_min, constraint, extra_sbatch, signal_delay_s, max_requeues). Prints the job
id, where the logs are and the MLflow run; with ``--wait`` it also waits for the job (exit status
1 and the log tail when it fails). ``launch.cluster=debug`` always runs the training in this
process before returning, ``--wait`` or not (submitit's debug job runs only when waited for).
See docs/slurm.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, import this checkout

from mpdit_dist import config as C  # noqa: E402
from mpdit_dist import launch  # noqa: E402
from mpdit_dist.checkpoint import CheckpointError  # noqa: E402
from submitit.core.utils import FailedJobError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Submit an MPDiT training run through submitit (SLURM, local, debug).",
                                 epilog="Overrides: key.sub=value, e.g. launch.nodes=4 launch.partition=gpu")
    C.add_run_arguments(ap)
    ap.add_argument("--wait", action="store_true",
                    help="wait for the job; exit 1 with its log tail if it fails (always on with "
                         "launch.cluster=debug, which trains in this process)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="with --wait: give up waiting after this many s (not for launch.cluster=debug)")
    args = ap.parse_intermixed_args(argv)  # overrides also after an option
    try:
        cfg = C.load_config(args.config, args.overrides)
    except C.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.run_dir:
        run_dir = Path(args.run_dir)
    else:
        from mpdit_dist.trainer import default_run_dir

        run_dir = default_run_dir(cfg)
    try:
        job = launch.submit(cfg, run_dir, resume=args.resume)
    except (C.ConfigError, CheckpointError) as exc:  # refused before anything was submitted
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FailedJobError as exc:  # sbatch refused the job (its own message follows)
        print(f"error: the job was not submitted: {exc}", file=sys.stderr)
        return 1
    sys.stdout.flush()
    # submitit's debug job trains only when its result is asked for: not waiting would train nothing.
    if not args.wait and cfg.launch.cluster != "debug":
        return 0
    try:
        results = launch.wait(job, timeout_s=args.timeout)
    except launch.JobFailedError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    except TimeoutError as exc:
        print(f"still running: {exc}", file=sys.stderr)
        return 3
    rank0 = results[0] if results else {}
    print(f"job {job.job_id} {rank0.get('status', 'done')} at step {rank0.get('step')} "
          f"(requeued {rank0.get('restart', 0)} time(s))")
    id_file = Path(run_dir) / "mlflow_run_id"
    if id_file.exists():
        print(f"  mlflow run: {id_file.read_text().strip()}")
    print(json.dumps(rank0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
