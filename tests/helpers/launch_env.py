"""Launch environments for tests of the torchrun-style variables derived from SLURM's."""
from __future__ import annotations


def srun_task(**extra: str) -> dict[str, str]:
    """What ``srun`` gives task 9 of 16 (2 nodes x 8) of job 77; MASTER_ADDR given so that no
    ``scontrol`` is asked. ``extra`` adds or replaces variables."""
    env = dict(SLURM_JOB_ID="77", SLURM_STEP_ID="0", SLURM_PROCID="9", SLURM_LOCALID="1", SLURM_NODEID="1",
               SLURM_NTASKS="16", SLURM_STEP_NUM_TASKS="16", SLURM_STEP_TASKS_PER_NODE="8(x2)",
               SLURM_TASKS_PER_NODE="8(x2)", SLURM_JOB_NODELIST="gpu[03-04]", MASTER_ADDR="gpu03")
    env.update(extra)
    return env
