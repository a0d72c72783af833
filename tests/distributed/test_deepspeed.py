"""DeepSpeed ZeRO 1/2/3 on gloo: real torchrun processes training the demo model on real digits.

Each stage trains 6 steps on 2 ranks with gradient accumulation (micro-batch 3, per-rank batch 6),
sampling with the EMA and saving a checkpoint at step 3. That one run is compared with the plain
one-process run (backend none), resumed from its step-3 checkpoint on 2 ranks (same world:
bitwise), on 1 rank and on 3 ranks (another world: DeepSpeed's universal checkpoint, converted for
the user), and exported. ZeRO-3 runs with a user JSON that leaves some parameters persistent
(gathered between steps) and partitions the others, as in a large model.

Tolerances (fp32 on CPU): losses relative 1e-6, gradient norms 1e-5. The ranks reduce in another
order and ZeRO sums flat buffers, so sums differ in the last bits (seen: up to 2e-7 relative on
the loss, 4e-7 on the norm); the bounds are 5-25 times that and far below any real change (one
skipped or doubled step moves the loss by 1e-2). Weights after 6 AdamW steps at lr 1e-3: absolute
1e-5 (seen: 2e-6), where one step moves a weight by up to 1e-3. bf16 against fp32: relative 1e-3
on the loss (seen: 2e-4).

Slow: every DeepSpeed process spends 10-20 s importing DeepSpeed and building the engine on 2 busy
cores; the file takes about 5 minutes there.
"""
import json
import shutil
import subprocess

import pytest
import torch

from tests.helpers.runs import PY, REPO, TORCHRUN, env, losses, train

pytestmark = pytest.mark.slow

STEPS = ["train.steps=6", "train.ckpt_every=3", "optim.warmup_steps=0"]  # lr 1e-3 from the start: weights move
DS = ["parallel.backend=deepspeed", "data.micro_batch_size=3"]  # global 12 = 2 ranks x 2 micro-batches x 3
STAGES = [1, 2, 3]


@pytest.fixture(scope="module")
def plain(tmp_path_factory, npz):
    run = tmp_path_factory.mktemp("plain") / "run"
    train(run, npz, STEPS + ["train.sample_every=3", "train.sample_steps=2"])
    return run


@pytest.fixture(scope="module")
def persist_json(tmp_path_factory):
    """A user DeepSpeed JSON (merged over the generated config): ZeRO-3 keeps parameters under 100
    elements gathered between steps (biases, norms) and partitions the rest, so the tiny model
    has both kinds, as a large one has."""
    path = tmp_path_factory.mktemp("dsjson") / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 100}}))
    return path


@pytest.fixture(scope="module")
def ds_args(persist_json):
    def args(stage: int) -> list[str]:
        extra = [f"parallel.deepspeed_config={persist_json}"] if stage == 3 else []
        return STEPS + DS + [f"parallel.zero_stage={stage}"] + extra

    return args


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory, npz, ds_args):
    """stage -> run dir of 6 steps on 2 ranks, sampling with the EMA at step 3 (the losses after
    it show that the live weights came back)."""
    runs = {}
    root = tmp_path_factory.mktemp("ds2")
    for stage in STAGES:
        run = root / f"zero{stage}"
        train(run, npz, ds_args(stage) + ["train.sample_every=3", "train.sample_steps=2"], nproc=2)
        runs[stage] = run
    return runs


def grad_norms(run) -> dict[int, float]:
    from mpdit_dist.tracking import read_metrics

    return {int(m["step"]): float(m["grad_norm"]) for m in read_metrics(run)}


def ckpt(run, step):
    return run / "checkpoints" / f"step_{step:08d}"


def assert_losses_close(got: dict, want: dict, rel: float, steps):
    assert sorted(got) == list(steps), f"logged steps {sorted(got)}"
    for s in steps:
        assert got[s] == pytest.approx(want[s], rel=rel), f"step {s}: {got[s]!r} vs {want[s]!r}"


def exported(run, tmp_path, ema: bool, via_cli: bool = False) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = tmp_path / f"{run.parent.name}-{run.name}-{'ema' if ema else 'raw'}.safetensors"
    args = [str(run), "--out", str(out)] + (["--ema"] if ema else [])
    if via_cli:
        subprocess.run([PY, "-m", "mpdit_dist.export", *args], cwd=REPO, env=env(), check=True,
                       capture_output=True, timeout=300)
    else:
        from mpdit_dist.export import main

        main(args)
    return load_file(str(out))


def assert_weights_close(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")


# ------------------------------------------------------------------------------------------------

def test_generated_config_and_user_override(tmp_path):
    from mpdit_dist import config as C
    from mpdit_dist.distributed.deepspeed_backend import deepspeed_config

    cfg = C.load_config(str(REPO / "configs/demo.yaml"), ["parallel.zero_stage=3", "optim.grad_clip=0.5"])
    ds = deepspeed_config(cfg, world_size=4, micro=4, accum=4, bf16=True)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 3} and ds["bf16"] == {"enabled": True}
    assert ds["communication_data_type"] == "fp32" and "data_types" not in ds  # reduced in parallel.reduce_dtype

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "bf16": {"enabled": False}}))
    cfg = C.load_config(str(REPO / "configs/demo.yaml"), ["parallel.zero_stage=2", f"parallel.deepspeed_config={user}"])
    ds = deepspeed_config(cfg, world_size=4, micro=4, accum=4, bf16=True)
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}  # merged key by key
    assert ds["bf16"] == {"enabled": False}

    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    with pytest.raises(C.ConfigError, match="train_micro_batch_size_per_gpu=8"):
        deepspeed_config(cfg, world_size=4, micro=4, accum=4, bf16=False)
    cfg = C.load_config(str(REPO / "configs/demo.yaml"), ["parallel.zero_stage=4"])
    with pytest.raises(C.ConfigError, match="parallel.zero_stage=4"):
        deepspeed_config(cfg, world_size=1, micro=1, accum=1, bf16=False)


@pytest.mark.parametrize("stage", STAGES)
def test_two_ranks_match_plain_run(stage, two_rank_runs, plain):
    assert_losses_close(losses(two_rank_runs[stage]), losses(plain), 1e-6, range(1, 7))
    # AdamW is blind to a uniform gradient scale (a wrong 1/accumulation factor would leave the
    # losses nearly unchanged): the norms before clipping must agree too (seen: 4e-7 relative)
    assert_losses_close(grad_norms(two_rank_runs[stage]), grad_norms(plain), 1e-5, range(1, 7))
    assert list((two_rank_runs[stage] / "samples").glob("step_00000003_*.png"))


def test_ema_swap_zero3(tmp_path, npz, persist_json):
    """Inside the trainer: sampling with the sharded EMA swapped in computes what a plain model
    with the EMA weights computes, partitioned and persistent parameters alike; the live weights
    come back exactly."""
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", str(REPO / "tests/distributed/ds_ema_swap_check.py"),
                           str(tmp_path / "run"), str(npz), "3", str(persist_json)],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "EMA-SWAP-OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.parametrize("stage", STAGES)
def test_resume_same_world_is_exact(stage, tmp_path, npz, two_rank_runs, ds_args):
    full = two_rank_runs[stage]
    run = tmp_path / "resumed"
    train(run, npz, ds_args(stage) + ["--resume", str(ckpt(full, 3))], nproc=2)
    want = losses(full)
    assert losses(run) == {s: want[s] for s in (4, 5, 6)}  # bitwise on CPU
    for ema in (False, True):
        a, b = exported(full, tmp_path, ema), exported(run, tmp_path, ema)
        for k in a:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("stage", STAGES)
def test_world_size_2_to_1_through_universal_checkpoint(stage, tmp_path, npz, two_rank_runs, plain, ds_args):
    full = two_rank_runs[stage]
    source = tmp_path / "source"
    shutil.copytree(ckpt(full, 3), source)  # the conversion cache is written next to the shards
    run = tmp_path / "one_rank"
    # one rank: the per-rank batch is 12, still in micro-batches of 3 (accumulation 4)
    train(run, npz, ds_args(stage) + ["--resume", str(source)])
    assert (source / "deepspeed_universal" / "ds" / "zero").is_dir()
    assert_losses_close(losses(run), losses(full), 1e-6, (4, 5, 6))
    assert_losses_close(losses(run), losses(plain), 1e-6, (4, 5, 6))
    assert_weights_close(exported(run, tmp_path, ema=True), exported(full, tmp_path, ema=True), atol=1e-5)


def test_world_size_2_to_3_zero3(tmp_path, npz, two_rank_runs, ds_args):
    full = two_rank_runs[3]
    source = tmp_path / "source"
    shutil.copytree(ckpt(full, 3), source)
    run = tmp_path / "three_ranks"
    # three ranks: per-rank batch 4 in micro-batches of 2; the EMA is resharded by DCP (2 -> 3 pieces)
    train(run, npz, ds_args(3) + ["data.micro_batch_size=2", "--resume", str(source)], nproc=3)
    assert_losses_close(losses(run), losses(full), 1e-6, (4, 5, 6))
    for ema in (False, True):
        assert_weights_close(exported(run, tmp_path, ema), exported(full, tmp_path, ema), atol=1e-5)


def test_export_gives_the_trained_weights(tmp_path, two_rank_runs, plain):
    """Raw and EMA weights of a ZeRO-3 checkpoint, through the CLI, equal the plain run's; the
    EMA is not the raw weights (it really is the average)."""
    run = two_rank_runs[3]
    raw = exported(run, tmp_path, ema=False, via_cli=True)
    ema = exported(run, tmp_path, ema=True, via_cli=True)
    assert_weights_close(raw, exported(plain, tmp_path, ema=False), atol=1e-5)
    assert_weights_close(ema, exported(plain, tmp_path, ema=True), atol=1e-5)
    assert any(not torch.allclose(raw[k], ema[k], atol=1e-4) for k in raw)


@pytest.mark.parametrize("stage, compile_", [(2, True), (3, False)])
def test_activation_checkpointing_and_compile(tmp_path, npz, plain, persist_json, stage, compile_):
    """parallel.activation_checkpointing and parallel.compile apply under DeepSpeed as under the
    other backends (wrapped before the engine is built): same losses as the plain run. ZeRO-3 takes
    activation checkpointing; compile there is refused by the config (its hooks do not compile)."""
    run = tmp_path / "ac"
    extra = [f"parallel.deepspeed_config={persist_json}"] if stage == 3 else []
    proc = train(run, npz, ["train.steps=3", "train.ckpt_every=0", "optim.warmup_steps=0",
                            f"parallel.zero_stage={stage}", "parallel.activation_checkpointing=full",
                            f"parallel.compile={str(compile_).lower()}"] + DS + extra, nproc=2)
    compiled = "3 of 3 blocks" if compile_ else "0 of 3 blocks"
    assert f"backend deepspeed: activation checkpointing on 3 of 3 blocks; compiled: {compiled}" in proc.stderr
    assert_losses_close(losses(run), {s: v for s, v in losses(plain).items() if s <= 3}, 1e-5, (1, 2, 3))
    if stage == 3:
        refused = train(tmp_path / "c", npz, ["train.steps=1", "parallel.zero_stage=3", "parallel.compile=true"] + DS,
                        check=False)
        assert refused.returncode != 0 and "parallel.compile=true with parallel.backend=deepspeed" in refused.stderr


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_close_to_fp32(tmp_path, npz, plain, stage):
    """DeepSpeed's bf16 mode: bf16 parameters, fp32 buffers, and no autocast (the trainer adds
    none under DeepSpeed, as the engine switches CUDA's off): the CPU run takes the CUDA path."""
    run = tmp_path / "bf16"
    train(run, npz, ["train.steps=3", "train.ckpt_every=0", "optim.warmup_steps=0", "train.precision=bf16",
                     f"parallel.zero_stage={stage}", "train.sample_every=3", "train.sample_steps=2"] + DS, nproc=2)
    assert len(list((run / "samples").glob("step_00000003_cfg*.png"))) == 2  # EMA sampling on bf16 weights
    assert_losses_close(losses(run), {s: v for s, v in losses(plain).items() if s <= 3}, 1e-3, (1, 2, 3))


def test_deepspeed_files_load_without_running_pickled_code(tmp_path):
    """A DeepSpeed file that asks the unpickler for anything beyond DeepSpeed's few plain classes
    is refused (here ``argparse.Namespace``, harmless, standing for any callable a pickle names)."""
    import argparse

    from mpdit_dist.distributed.deepspeed_backend import load_consolidated

    tag = tmp_path / "step_00000001" / "deepspeed" / "ds"
    tag.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}, "args": argparse.Namespace(a=1)}, tag / "mp_rank_00_model_states.pt")
    with pytest.raises(Exception, match="Namespace"):
        load_consolidated(tmp_path / "step_00000001", "model")
    torch.save({"module": {"w": torch.ones(2)}}, tag / "mp_rank_00_model_states.pt")
    assert torch.equal(load_consolidated(tmp_path / "step_00000001", "model")["w"], torch.ones(2))
