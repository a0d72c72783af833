"""Config checks that name the key and value, and the torchrun-style environment of a plain ``srun``
step (node lists, tasks per node, the sbatch script that is no task)."""
from __future__ import annotations

import sys

import pytest

from mpdit_dist import config as C
from mpdit_dist.distributed import parallelize
from mpdit_dist.distributed.env import first_host, slurm_step_environ, tasks_on_node
from tests.helpers.launch_env import srun_task

# ----- config -----


@pytest.mark.parametrize("override, words", [
    ("train.log_every=0", "train.log_every=0 must be >= 1"),
    ("train.log_every=-5", "train.log_every=-5 must be >= 1"),
    ("parallel.param_dtype=fp17", "parallel.param_dtype='fp17': choose one of ['bf16', 'fp16', 'fp32']"),
    ("parallel.reduce_dtype=float32", "parallel.reduce_dtype='float32': choose one of"),
    ("train.sample_sampler=rk4", "train.sample_sampler='rk4': choose one of"),
    ("train.sample_steps=0", "train.sample_steps=0 must be >= 1"),
    ("parallel.ac_every=0", "parallel.ac_every=0 must be >= 1"),
    ("parallel.hsdp_replicas=0", "parallel.hsdp_replicas=0 must be >= 1"),
    ("parallel.compile_mode=fastest", "parallel.compile_mode='fastest': choose one of"),
    ("data.micro_batch_size=0", "data.micro_batch_size=0 must be >= 1"),
    ("data.num_workers=-1", "data.num_workers=-1 must be >= 0"),
    ("data.prefetch_factor=0", "data.prefetch_factor=0 must be >= 1"),
    ("optim.warmup_steps=-1", "optim.warmup_steps=-1 must be >= 0"),
    ("optim.betas=[0.9]", "optim.betas=[0.9] must be two values in [0, 1)"),
    ("optim.betas=[0.9,1.5]", "optim.betas=[0.9, 1.5] must be two values"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio=2.0 must be in [0, 1]"),
    # nan passes every comparison: clipping would be off, the loss nan from the first step
    ("optim.grad_clip=nan", "optim.grad_clip=nan must be a finite number"),
    ("flow.p_mean=nan", "flow.p_mean=nan must be a finite number"),
    ("flow.p_std=inf", "flow.p_std=inf must be a finite number"),
    ("optim.betas=[0.9,nan]", "optim.betas[1]=nan must be a finite number"),
    ("flow.p_std=0", "flow.p_std=0.0 must be > 0"),
    ("optim.lr=-1", "optim.lr=-1.0 must be >= 0"),
    ("optim.eps=0", "optim.eps=0.0 must be > 0"),
    ("train.sample_classes=[]", "train.sample_classes=[] with train.sample_every=10000"),
    # num_heads=0 escaped load_config itself as a bare ZeroDivisionError; the others failed only when
    # the model was built (ZeroDivisionError, "negative dimension", a conv kernel larger than the input)
    ("model.num_heads=0", "model.num_heads=0 must be >= 1"),
    ("model.hidden_size=0", "model.hidden_size=0 must be >= 1"),
    ("model.hidden_size=-4", "model.hidden_size=-4 must be >= 1"),
    ("model.input_size=0", "model.input_size=0 must be >= 1"),
    ("model.in_channels=0", "model.in_channels=0 must be >= 1"),
    ("model.num_classes=0", "model.num_classes=0 must be >= 1"),
    # mlp_ratio=0 built blocks whose MLP has no hidden unit: a model without its MLPs, silently
    ("model.mlp_ratio=0", "model.mlp_ratio=0.0 must be > 0"),
    ("model.mlp_ratio=-1", "model.mlp_ratio=-1.0 must be > 0"),
    # was "not enough values to unpack (expected 2, got 1)"
    ("model.stages=[[4,2],[2]]", "model.stages=[[4, 2], [2]]: each stage is a [patch_size, depth] pair"),
    ("model.stages=[[4,2,1]]", "model.stages=[[4, 2, 1]]: each stage"),
    # trained, then failed at the first in-training evaluation (numpy: "expected non-negative integer")
    ("train.seed=-1", "train.seed=-1 must be >= 0"),
])
def test_bad_values_are_refused_naming_key_and_value(override, words):
    with pytest.raises(C.ConfigError) as info:
        C.load_config(None, [override])
    assert words in str(info.value)


@pytest.mark.parametrize("backend", ["auto", "none", "ddp", "deepspeed"])
@pytest.mark.parametrize("override", ["parallel.cpu_offload=true", "parallel.hsdp_replicas=2"])
def test_fsdp2_options_need_fsdp2(backend, override):
    """DDP and one process ignored them: a run planned to fit by offloading or by HSDP ran without."""
    key, value = override.split("=")
    with pytest.raises(C.ConfigError) as info:
        C.load_config(None, [override, f"parallel.backend={backend}"])
    assert f"{key}=" in str(info.value) and f"parallel.backend={backend}" in str(info.value)
    C.load_config(None, [override, "parallel.backend=fsdp2"])


def test_config_file_that_is_no_mapping_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("- model\n- data\n")  # was a bare TypeError: "Cannot merge incompatible container types"
    with pytest.raises(C.ConfigError, match=f"config file {path}: must hold a mapping"):
        C.load_config(path)


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_compile_modes_with_cuda_graphs_are_refused(mode):
    """Were accepted and untested: CUDA graphs overwrite their outputs at the next replay, which the
    samplers of in-training sample grids and evaluation rely on keeping."""
    with pytest.raises(C.ConfigError, match=f"parallel.compile_mode='{mode}' records CUDA graphs"):
        C.load_config(None, ["parallel.compile=true", f"parallel.compile_mode={mode}"])
    C.load_config(None, [f"parallel.compile_mode={mode}"])  # not compiled: the mode is not used
    C.load_config(None, ["parallel.compile=true", "parallel.compile_mode=max-autotune-no-cudagraphs"])


def test_good_model_overrides_pass():
    C.load_config(None, ["model.name=custom", "model.stages=[[4,2],[2,1]]", "model.hidden_size=32",
                         "model.num_heads=2", "model.mlp_ratio=0.5", "model.num_classes=1"])


@pytest.mark.parametrize("override", ["train.log_every=1", "parallel.param_dtype=fp16", "parallel.reduce_dtype=bf16",
                                      "parallel.compile_mode=max-autotune", "train.sample_sampler=heun",
                                      "data.num_workers=0", "data.micro_batch_size=4",
                                      "optim.lr=0"])
def test_good_values_pass(override):
    C.load_config(None, [override])


def test_adaptive_sampler_refused_for_evaluation_with_sharded_forwards():
    eval_on = ["train.eval_every=10", "train.eval_reference=r.npz", "train.eval_inception=i.pth",
               "train.sample_sampler=dopri5"]
    for backend in (["parallel.backend=fsdp2"], ["parallel.backend=deepspeed", "parallel.zero_stage=3"]):
        with pytest.raises(C.ConfigError, match="train.sample_sampler=dopri5"):
            C.load_config(None, eval_on + backend)
    for backend in (["parallel.backend=ddp"], ["parallel.backend=deepspeed", "parallel.zero_stage=2"]):
        C.load_config(None, eval_on + backend)  # every rank holds the whole model: any step count works


def test_dtype_names_are_those_fsdp2_maps():
    """The names config accepts are the keys parallelize turns into torch dtypes."""
    assert set(parallelize.DTYPE_NAMES) == set(parallelize._DTYPES) == {"bf16", "fp16", "fp32"}
    for name in parallelize.DTYPE_NAMES:
        C.load_config(None, [f"parallel.param_dtype={name}", f"parallel.reduce_dtype={name}"])


# ----- the environment of a plain srun step -----

@pytest.mark.parametrize("nodelist, host", [
    ("gpu[03-04]", "gpu03"),
    ("node[1,3],gpu7", "node1"),
    ("a-b[001-003,7]", "a-b001"),
    ("gpu7,node[1,3]", "gpu7"),
    ("node1", "node1"),
    ("rack[2-3]-n[08-09]", "rack2-n08"),
    ("gpu[12,03-04]", "gpu12"),
])
def test_first_host_of_a_node_list(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.parametrize("nodelist", ["", "gpu[03-04", "gpu]03[", "a[[1]]"])
def test_first_host_refuses_what_it_cannot_read(nodelist):
    with pytest.raises(ValueError, match="SLURM node list"):
        first_host(nodelist)


@pytest.mark.parametrize("spec, node, count", [
    ("8", 0, 8), ("8(x2)", 0, 8), ("8(x2)", 1, 8), ("4,2", 0, 4), ("4,2", 1, 2), ("8(x2),4", 2, 4),
    ("2(x3),1(x2)", 4, 1),
])
def test_tasks_on_node(spec, node, count):
    assert tasks_on_node(spec, node) == count


@pytest.mark.parametrize("spec, node", [("8(x2)", 2), ("eight", 0), ("4,,2", 1)])
def test_tasks_on_node_refuses_what_it_cannot_read(spec, node):
    with pytest.raises(ValueError, match="SLURM tasks per node"):
        tasks_on_node(spec, node)


def test_srun_task_environment():
    assert slurm_step_environ(srun_task()) == dict(RANK="9", WORLD_SIZE="16", LOCAL_RANK="1", LOCAL_WORLD_SIZE="8",
                                                    MASTER_PORT="20077")


def test_local_world_size_from_slurm_tasks_per_node():
    """Without --ntasks-per-node SLURM sets only the compressed list, e.g. "4,2" for 6 tasks."""
    env = srun_task(SLURM_PROCID="5", SLURM_NODEID="1", SLURM_NTASKS="6", SLURM_STEP_NUM_TASKS="6")
    del env["SLURM_STEP_TASKS_PER_NODE"]
    env["SLURM_TASKS_PER_NODE"] = "4,2"
    values = slurm_step_environ(env)
    assert (values["WORLD_SIZE"], values["LOCAL_WORLD_SIZE"]) == ("6", "2")


def test_step_counts_win_over_the_job_counts():
    """``srun -n 2`` inside an allocation of 16 tasks: a world of 2."""
    env = srun_task(SLURM_PROCID="1", SLURM_NODEID="0", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="2")
    values = slurm_step_environ(env)
    assert (values["RANK"], values["WORLD_SIZE"], values["LOCAL_WORLD_SIZE"]) == ("1", "2", "2")


def test_master_addr_from_the_node_list():
    env = srun_task(SLURM_STEP_NODELIST="node[1,3],gpu7")
    del env["MASTER_ADDR"]
    # scontrol, where it runs, says the same as the parser (here it has no configuration)
    assert slurm_step_environ(env)["MASTER_ADDR"] == "node1"


def test_sbatch_script_itself_is_nosrun_task():
    """``python train.py`` run by the batch script of ``sbatch --ntasks-per-node=8``: SLURM_PROCID=0
    and SLURM_NTASKS=8 are set, but no SLURM_STEP_ID: a single process, not rank 0 of 8."""
    batch = dict(SLURM_JOB_ID="77", SLURM_PROCID="0", SLURM_NTASKS="8", SLURM_NTASKS_PER_NODE="8",
                 SLURM_TASKS_PER_NODE="8", SLURM_JOB_NODELIST="gpu03", SLURM_LOCALID="0", SLURM_NODEID="0")
    assert slurm_step_environ(batch) == {}
    assert slurm_step_environ(dict(batch, SLURM_STEPID="0"))["WORLD_SIZE"] == "8"  # the old spelling counts


def test_torchrun_variables_win():
    assert slurm_step_environ(srun_task(RANK="3")) == {}
    assert slurm_step_environ({"SLURM_STEP_ID": "0"}) == {}  # no SLURM_PROCID: nothing to derive


def test_deepspeed_backend_without_deepspeed_says_what_to_install(monkeypatch):
    from mpdit_dist.distributed.deepspeed_backend import build_engine

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    with pytest.raises(ImportError, match=r"parallel.backend=deepspeed needs the DeepSpeed package.*\[deepspeed\]"):
        build_engine(None, None, None, 1, 1, lambda s: 1.0, False)


def test_sample_classes_are_needed_by_the_grids_only():
    """In-training evaluation samples every class: without grids, no grid classes are needed."""
    C.load_config(None, ["train.sample_every=0", "train.sample_classes=[]", "train.eval_every=5",
                         "train.eval_reference=ref.npz", "train.eval_inception=inception.pth"])
