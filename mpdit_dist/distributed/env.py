"""Process-group set-up from torchrun's or SLURM's environment.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; submitit's launcher
(:mod:`mpdit_dist.launch`) sets them too. For tasks of a plain ``srun`` step we derive them from
SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID / SLURM_STEP_TASKS_PER_NODE and the first host
of the step's node list; a process that is not an ``srun`` task (an sbatch script running
``python train.py`` itself) trains alone. NCCL on GPUs, gloo on CPU. The device is chosen from the
*local* rank (``cuda:{local_rank}``), never from the global rank.
"""
from __future__ import annotations

import datetime
import logging
import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("mpdit_dist.distributed")


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # process-group backend, None when not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list, as ``scontrol show hostnames`` would list it first:
    ``gpu[03-04]`` -> ``gpu03``, ``node[1,3],gpu7`` -> ``node1``, ``a-b[001-003,7]`` -> ``a-b001``,
    ``r[1-2]n[5-6]`` -> ``r1n5`` (zero padding kept). Written here because it is the fallback for
    when ``scontrol`` cannot be run or has no configuration; raises ValueError naming the list."""
    entry, depth = "", 0
    for ch in nodelist.strip():  # the first top-level comma ends the first entry
        if ch == "," and depth == 0:
            break
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise ValueError(f"SLURM node list {nodelist!r}: unbalanced brackets")
        entry += ch
    if depth != 0 or not entry:
        raise ValueError(f"SLURM node list {nodelist!r}: " + ("unbalanced brackets" if entry else "empty"))
    host = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0].strip(), entry)
    if not host or "[" in host or "]" in host:
        raise ValueError(f"SLURM node list {nodelist!r}: cannot read its first host")
    return host


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """This node's task count from SLURM's compressed list (``8(x2)``, ``4,2``, ``8(x2),4``);
    raises ValueError naming the list when it cannot be read or has no entry ``node_id``."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"SLURM tasks per node {tasks_per_node!r}: cannot read {part!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node_id < len(counts):
        raise ValueError(f"SLURM tasks per node {tasks_per_node!r} has no entry for node {node_id}")
    return counts[node_id]


def _slurm_hostnames_first(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return first_host(nodelist)


def slurm_step_task(environ: Mapping[str, str]) -> tuple[int, int] | None:
    """(rank, number of tasks) of a task of an ``srun`` step; None when this process is none.

    Only a task of a job *step* (SLURM_STEP_ID set, by ``srun``) is one of several processes: the
    batch script of an ``sbatch`` job also has SLURM_PROCID=0 and SLURM_NTASKS=<tasks requested>,
    but it is a single process, and taking SLURM_NTASKS for the world size there would wait forever
    for peers that nobody starts. The step's own counts win over the job's (an ``srun -n 2`` inside
    a larger allocation).
    """
    if "SLURM_PROCID" not in environ or ("SLURM_STEP_ID" not in environ and "SLURM_STEPID" not in environ):
        return None
    world = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or "1"
    return int(environ["SLURM_PROCID"]), int(world)


def slurm_step_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """torchrun-style variables for a task of an ``srun`` step (:func:`slurm_step_task`), from
    SLURM's; ``{}`` when there is nothing to derive: torchrun's are set already, or this is no
    ``srun`` task."""
    task = None if "RANK" in environ else slurm_step_task(environ)
    if task is None:
        return {}
    values = {"RANK": str(task[0]), "WORLD_SIZE": str(task[1]), **_slurm_local(environ)}
    if "MASTER_ADDR" not in environ:
        nodelist = (environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
                    or environ.get("SLURM_NODELIST", ""))
        values["MASTER_ADDR"] = _slurm_hostnames_first(nodelist) if nodelist else "127.0.0.1"
    if "MASTER_PORT" not in environ:
        # a port derived from the job id, so concurrent jobs on one node do not collide
        job = int(environ.get("SLURM_JOB_ID", "0") or 0)
        values["MASTER_PORT"] = str(20000 + job % 20000)
    return values


def _slurm_local(environ: Mapping[str, str]) -> dict[str, str]:
    """LOCAL_RANK and (where SLURM lists the tasks per node) LOCAL_WORLD_SIZE of an ``srun`` task."""
    values = {"LOCAL_RANK": environ.get("SLURM_LOCALID", "0")}
    node = int(environ.get("SLURM_NODEID", "0") or 0)
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if spec:
        values["LOCAL_WORLD_SIZE"] = str(tasks_on_node(spec, node))
    elif environ.get("SLURM_NTASKS_PER_NODE"):  # --ntasks-per-node: one count for every node, no list
        values["LOCAL_WORLD_SIZE"] = str(int(environ["SLURM_NTASKS_PER_NODE"]))
    return values


def slurm_local_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """For a task of an ``srun`` step whose launch set RANK but not LOCAL_RANK / LOCAL_WORLD_SIZE
    (a script that exports only ``RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS``): the missing ones,
    from SLURM's; ``{}`` otherwise (torchrun sets all of them). Without them every task of a node
    would take local rank 0, so all would choose the node's first GPU."""
    if "RANK" not in environ or slurm_step_task(environ) is None:
        return {}
    return {k: v for k, v in _slurm_local(environ).items() if k not in environ}


def env_from_slurm() -> None:
    """Fill torchrun-style variables from SLURM's, when running as srun tasks without torchrun
    (see :func:`slurm_step_environ`), or the local ones a partial launch left out
    (:func:`slurm_local_environ`)."""
    values = slurm_step_environ(os.environ) or slurm_local_environ(os.environ)
    os.environ.update(values)
    if not values and "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        log.warning("SLURM job %s has %s tasks, but this process was not started by srun (no SLURM_STEP_ID): "
                    "it trains alone; start it with srun to use every task", os.environ.get("SLURM_JOB_ID"),
                    os.environ.get("SLURM_NTASKS"))


def init_distributed(device: str = "auto", timeout_s: int = 1800, need_group: bool = False) -> DistInfo:
    """Initialise the default process group when launched by torchrun/SLURM with several ranks,
    or when ``need_group`` (FSDP2 and DeepSpeed need one even on a single rank)."""
    env_from_slurm()
    if need_group and "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if not 0 <= rank < world:
        # e.g. RANK without WORLD_SIZE: a lone process "rank 3 of 1" would take a slice past the batch
        raise RuntimeError(f"inconsistent launch environment: RANK={os.environ.get('RANK')} with "
                           f"WORLD_SIZE={os.environ.get('WORLD_SIZE', '(unset: 1)')}; need 0 <= RANK < WORLD_SIZE")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    backend = None
    if world > 1 or need_group:
        backend = "nccl" if use_cuda else "gloo"
        if not dist.is_initialized():
            kwargs = {"device_id": dev} if use_cuda else {}
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, local_world_size=local_world,
                    device=dev, backend=backend)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a rendezvous or a server on this machine)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown(failed: bool = False) -> None:
    """End the process group. After a success: a barrier, then destroy (without the barrier, multi-rank
    gloo FSDP2 runs were seen to abort at exit). After a failure (``failed``): destroy at once, with
    no collective. The other ranks may be waiting in another collective, which a barrier would never
    match: every rank would hang until the group's timeout, and the error would not even be printed.
    Once this process is gone, their own collectives fail (gloo: the connection closes; torchrun
    and srun --kill-on-bad-exit end the others)."""
    if dist.is_available() and dist.is_initialized():
        try:
            if not failed:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def broadcast_object(obj, src: int = 0):
    if dist.is_available() and dist.is_initialized():
        holder = [obj]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]
    return obj


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` without a process group)."""
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]
