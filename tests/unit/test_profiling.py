"""torch.profiler: kernel/operator categories (bench and trainer) and the trainer's trace window."""
import gzip
import json
import signal

import pytest

from mpdit_dist import profiling
from mpdit_dist.tracking import read_metrics
from tests.helpers.runs import losses, train


@pytest.mark.parametrize("name,category", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "matrix products"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "matrix products"),
    ("aten::addmm", "matrix products"),
    ("aten::convolution_backward", "matrix products"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0", "attention"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<72>>", "attention"),
    ("aten::_softmax", "attention"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>", "optimizer"),
    ("void at::native::multi_tensor_apply_kernel<TensorListMetadata<3>, LerpFunctor<float>>", "EMA"),
    ("aten::lerp_", "EMA"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::bfloat16_copy_kernel_cuda>", "casts/copies"),
    ("Memcpy HtoD (Pinned -> Device)", "casts/copies"),
    ("void at::native::unrolled_elementwise_kernel<convert_float_to_bfloat16>", "casts/copies"),
    ("aten::gather", "casts/copies"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>", "layernorm"),
    ("triton_per_fused_native_layer_norm_3", "layernorm"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t>>", "reductions"),
    ("triton_red_fused_sum_2", "reductions"),
    ("triton_poi_fused_add_mul_0", "elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "elementwise"),
    ("void vector_fft<32u, 1u, 4u>", "FFT"),
    ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    ("gloo:all_reduce", "communication"),
    ("c10d::allreduce_", "communication"),
    ("FSDP::all_gather", "communication"),
    ("something_else_entirely", "other"),
])
def test_kernel_categories(name, category):
    assert profiling.categorize(name) == category


def _trace_marks(path):
    with gzip.open(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    return {e["name"] for e in events if str(e.get("name", "")).startswith(profiling.MARK)}, events


def test_two_ranks_write_a_trace_each_and_rates_leave_profiled_steps_out(tmp_path, npz):
    run = tmp_path / "run"
    train(run, npz, ["train.steps=6", "train.ckpt_every=0", "train.log_every=2", "train.profile_at=3",
                     "train.profile_steps=2"], nproc=2)
    out = run / "profile" / "step_00000003"
    assert sorted(p.name for p in out.iterdir()) == ["rank0.json", "rank0.trace.json.gz", "rank0.txt", "rank1.json",
                                                     "rank1.trace.json.gz", "rank1.txt"]
    for rank in (0, 1):
        marks, events = _trace_marks(out / f"rank{rank}.trace.json.gz")
        assert marks == {"train_step 3", "train_step 4"}  # exactly the window's steps
        assert any(e.get("name") == "aten::mm" for e in events)  # the model's work is inside
        text = (out / f"rank{rank}.txt").read_text()
        assert text.startswith(f"profile of steps 3-4, rank {rank} (operator self CPU time")
        # DDP's gradient all-reduce over gloo is found and named
        assert "communication" in text and "matrix products" in text
        summary = json.loads((out / f"rank{rank}.json").read_text())
        assert summary["steps"] == "steps 3-4" and summary["categories"]["communication"] > 0
    by_step = {m["step"]: m for m in read_metrics(run)}
    # steps 3 and 4 were profiled: the window logged at step 4 has no steady-state rate to report
    assert by_step[4]["profiled_steps"] == 2 and "img_per_s" not in by_step[4] and "step_time_s" not in by_step[4]
    for s in (2, 6):
        assert by_step[s]["img_per_s"] > 0 and "profiled_steps" not in by_step[s]
    assert all(m["loss"] > 0 for m in by_step.values())


def test_a_stop_inside_the_window_keeps_its_trace_and_the_resume_records_the_rest(tmp_path, npz):
    common = ["train.steps=6", "train.ckpt_every=0", "train.log_every=1"]
    train(tmp_path / "plain", npz, common)
    run = tmp_path / "run"
    window = ["train.profile_at=2", "train.profile_steps=3"]
    proc = train(run, npz, common + window, fault="step:2:SIGUSR2", check=False)
    assert proc.returncode == 128 + signal.SIGUSR2, proc.stderr[-3000:]  # stopped, not finished
    assert json.loads(proc.stdout.strip().splitlines()[-1])["status"] == "preempted"
    cut = run / "profile" / "step_00000002"
    assert _trace_marks(cut / "rank0.trace.json.gz")[0] == {"train_step 2"}
    assert (cut / "rank0.txt").read_text().startswith("profile of step 2, rank 0")
    train(run, npz, common + window)  # resumes at step 3, inside the window: records steps 3-4
    rest = run / "profile" / "step_00000003"
    assert _trace_marks(rest / "rank0.trace.json.gz")[0] == {"train_step 3", "train_step 4"}
    assert _trace_marks(cut / "rank0.trace.json.gz")[0] == {"train_step 2"}  # the first part is kept
    # the profiler changes no number of the run
    assert losses(run) == losses(tmp_path / "plain")


def test_profile_window_config_checks(tmp_path, npz):
    from mpdit_dist import config as C

    with pytest.raises(C.ConfigError, match=r"train.profile_at=9 is beyond train.steps=8"):
        C.load_config(None, ["train.steps=8", "train.profile_at=9"])
    with pytest.raises(C.ConfigError, match=r"train.profile_steps=0 must be >= 1"):
        C.load_config(None, ["train.steps=8", "train.profile_at=2", "train.profile_steps=0"])
    with pytest.raises(C.ConfigError, match=r"train.profile_at=-1 must be >= 0"):
        C.load_config(None, ["train.profile_at=-1"])
