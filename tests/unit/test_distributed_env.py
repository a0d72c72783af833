"""init_distributed under partial launch environments: torchrun-style variables that a script set
only in part for the tasks of an ``srun`` step, SLURM's one-count ``--ntasks-per-node``, and a RANK
without a WORLD_SIZE. Real processes (and a real two-rank gloo group), real environments."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from mpdit_dist.distributed.env import free_port, slurm_local_environ, slurm_step_environ
from tests.helpers.launch_env import srun_task
from tests.helpers.runs import REPO

PROBE = ("import json; from mpdit_dist.distributed.env import init_distributed, shutdown; "
         "d = init_distributed('cpu'); print(json.dumps([d.rank, d.world_size, d.local_rank, d.local_world_size, "
         "d.num_nodes, d.backend])); shutdown()")


def _clean_env(**extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in
            ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
             "TORCHELASTIC_RUN_ID")}
    keep.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}, **extra)
    return keep


def test_partial_launch_takes_the_local_rank_from_slurm():
    """A script exporting only RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS for each srun task: the local
    rank (the GPU) is SLURM's, not 0 for every task of the node."""
    assert slurm_local_environ(srun_task(RANK="9", WORLD_SIZE="16")) == {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8"}
    # what is set stays; torchrun sets them all; no srun task: nothing to derive
    assert slurm_local_environ(srun_task(RANK="9", WORLD_SIZE="16", LOCAL_RANK="5")) == {"LOCAL_WORLD_SIZE": "8"}
    assert slurm_local_environ(srun_task(RANK="9", WORLD_SIZE="16", LOCAL_RANK="1", LOCAL_WORLD_SIZE="8")) == {}
    assert slurm_local_environ({"RANK": "1", "WORLD_SIZE": "2"}) == {}
    assert slurm_local_environ(srun_task()) == {}  # no RANK: slurm_step_environ derives everything


def test_ntasks_per_node_is_one_count_for_every_node():
    """SLURM_NTASKS_PER_NODE (``--ntasks-per-node=8``) is a single number, not a per-node list: node 1
    has 8 tasks too (it was read as a list of one entry: "has no entry for node 1", a crash)."""
    env = srun_task()
    del env["SLURM_STEP_TASKS_PER_NODE"], env["SLURM_TASKS_PER_NODE"]
    env["SLURM_NTASKS_PER_NODE"] = "8"
    assert slurm_step_environ(env)["LOCAL_WORLD_SIZE"] == "8"


def test_two_srun_tasks_with_only_rank_and_world_size_exported(tmp_path):
    """Two tasks of one node (SLURM_LOCALID 0 and 1) whose script exported RANK, WORLD_SIZE and
    MASTER_*: a real gloo group of 2 in which each rank has its own local rank (its own GPU)."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = _clean_env(SLURM_JOB_ID="77", SLURM_STEP_ID="0", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                         SLURM_NODEID="0", SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="2",
                         RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-c", PROBE], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    got = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert got == [[0, 2, 0, 2, 1, "gloo"], [1, 2, 1, 2, 1, "gloo"]]


def test_rank_without_world_size_is_refused():
    """RANK=3 with no WORLD_SIZE was "rank 3 of 1": no group, no logs (not rank 0), and a batch slice
    past the global batch; now an error that names the variables."""
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=_clean_env(RANK="3"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "RANK=3 with WORLD_SIZE=(unset: 1)" in proc.stderr, proc.stderr[-2000:]
