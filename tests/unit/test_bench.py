"""bench/throughput.py: the benchmark runs on CPU at toy size, its figures are consistent, its
instrumented step is the trainer's step, and the optimised paths compute the plain paths' losses."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import throughput as tp  # noqa: E402
from mpdit_dist.flops import train_flops_per_image  # noqa: E402
from mpdit_dist.models import count_parameters, create_model, model_args  # noqa: E402

TINY = dict(stages=[[4, 2], [2, 1]], hidden_size=64, num_heads=4, input_size=8, in_channels=4, num_classes=10,
            num_condition_tokens=4)
TINY_CLI = ["--input-size", "8", "--in-channels", "4", "--num-classes", "10",
            "--model-overrides", "stages=[[4,2],[2,1]],hidden_size=64,num_heads=4,num_condition_tokens=4"]
OFFICIAL_PY = Path(os.environ.get("MPDIT_OFFICIAL_PY", "/tmp/official/official_mpdit.py"))


@pytest.fixture(autouse=True)
def one_thread():
    # on a shared 2-core machine two OpenMP threads spin against other processes: a tiny step took
    # 0.5-1.3 s with 2 threads and 0.07 s with 1
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def rel_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


def test_cli_writes_consistent_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    batch = 4
    result = tp.main(["--models", "custom", "--device", "cpu", "--batch", str(batch), "--steps", "2", "--warmup", "1",
                      "--precision", "fp32", "--compile", "0", "--attention", "math,sdpa", "--profile",
                      "--profile-steps", "1", *TINY_CLI, "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["results"] == json.loads(json.dumps(result["results"], default=str))
    assert data["env"]["torch"] == torch.__version__ and data["env"]["device_name"]
    assert data["env"]["device_type"] == "cpu"
    rows = data["results"]
    assert [r["attention"] for r in rows] == ["math", "sdpa"]
    want_params = count_parameters(create_model("custom", **TINY))
    want_flops = train_flops_per_image(model_args("custom", **TINY))
    for r in rows:
        assert r["status"] == "ok", r
        assert r["params"] == want_params and r["flops_per_image"] == want_flops
        for key in ("img_per_s", "step_ms_median", "step_ms_mean", "phases_step_ms_mean", "phases_img_per_s",
                    "first_step_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
        # the headline: batch over the mean time of a fused step
        assert r["img_per_s"] == pytest.approx(batch * 1e3 / r["step_ms_mean"], rel=1e-12)
        assert r["phases_img_per_s"] == pytest.approx(batch * 1e3 / r["phases_step_ms_mean"], rel=1e-12)
        assert set(r["phases_ms"]) == set(tp.PHASES)
        assert all(math.isfinite(v) and v >= 0 for v in r["phases_ms"].values())
        for phase in ("forward", "backward", "optimizer", "ema"):
            assert r["phases_ms"][phase] > 0
        # the phases are the pieces of a step: they cannot add up to more than the step
        assert sum(r["phases_ms"].values()) <= r["phases_step_ms_mean"] * 1.0001
        assert r["mfu"] is None and r["peak_mem_gib"] is None  # CPU: no peak FLOPs, no CUDA memory
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        prof = r["profile"]
        assert prof["total_ms_per_step"] > 0 and prof["categories"]["matrix products"] > 0
        assert prof["categories"]["attention"] > 0
        assert sum(prof["categories"].values()) == pytest.approx(prof["total_ms_per_step"])
    # same weights, data and steps: the two attention kernels end at the same loss (fp32 rounding)
    assert rows[0]["loss_rel_diff"] == 0.0 and rows[1]["loss_rel_diff"] < 1e-5
    table = capsys.readouterr().out
    assert "loss agreement, custom: last losses of 2 variants" in table
    assert "custom [math, eager]" in table and "custom [sdpa, eager]" in table
    assert "matrix products" in table


def test_failed_variant_is_reported_and_others_run(tmp_path, capsys):
    """flash-attn kernels cannot run on the CPU: that variant fails at build, the next one still runs."""
    out = tmp_path / "bench.json"
    tp.main(["--models", "custom", "--device", "cpu", "--batch", "2", "--steps", "1", "--warmup", "1",
             "--precision", "fp32", "--compile", "0", "--attention", "flash_attn,math", *TINY_CLI,
             "--json", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert rows[0]["attention"] == "flash_attn" and rows[0]["status"] == "failed"
    assert "flash" in rows[0]["error"].lower()
    assert rows[1]["status"] == "ok" and rows[1]["img_per_s"] > 0
    assert "FAILED" in capsys.readouterr().out


def test_compile_scope_and_fsdp2_variants(tmp_path, capsys):
    """--compile model (the whole forward) and --backend fsdp2 (FSDP2 over the one device) are
    variants of the same step: same weights and data, so the same loss up to fp32 rounding, also
    when both are combined (FSDP2's hooks run eagerly between the compiled pieces)."""
    out = tmp_path / "bench.json"
    tp.main(["--models", "custom", "--device", "cpu", "--batch", "4", "--steps", "2", "--warmup", "1",
             "--phase-steps", "1", "--precision", "fp32", "--compile", "0,model", "--backend", "none,fsdp2",
             "--attention", "sdpa", *TINY_CLI, "--json", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [r["label"] for r in rows] == ["custom [sdpa, eager]", "custom [sdpa, eager, fsdp2]",
                                          "custom [sdpa, compiled model]", "custom [sdpa, compiled model, fsdp2]"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "ok"]
    assert rows[1]["backend"] == "fsdp2" and rows[2]["compile_scope"] == "model"
    assert rows[3]["backend"] == "fsdp2" and rows[3]["compile_scope"] == "model"
    assert rows[1]["loss_rel_diff"] < 1e-6 and rows[2]["loss_rel_diff"] < 1e-5 and rows[3]["loss_rel_diff"] < 1e-5
    assert all(r["phases_ms"]["backward"] > 0 for r in rows)
    # the one-rank group the fsdp2 variant started is gone, with the variables it set
    assert not torch.distributed.is_initialized() and "RANK" not in os.environ and "MASTER_PORT" not in os.environ
    with pytest.raises(SystemExit, match="--compile"):
        tp.main(["--models", "custom", "--device", "cpu", "--compile", "regional", *TINY_CLI])


def test_instrumented_step_is_the_trainer_step():
    """The phase pass cuts Trainer.train_step into pieces; it must compute exactly the same thing."""
    over = dict(TINY, attention="math")
    a = tp.build_setup("custom", over, batch=4, precision="fp32", device="cpu", seed=3, lr=1e-3)
    b = tp.build_setup("custom", over, batch=4, precision="fp32", device="cpu", seed=3, lr=1e-3)
    timer = tp.PhaseTimer(torch.device("cpu"))
    for _ in range(3):
        loss_a, _ = a.trainer.train_step(a.batch_device)
        loss_b = tp.instrumented_step(b.trainer, b.batch_cpu, timer)
        assert torch.equal(loss_a, loss_b)
    assert a.trainer.step == b.trainer.step == 3 and len(timer.step_ms) == 3
    for pa, pb in zip(a.trainer.raw_model.parameters(), b.trainer.raw_model.parameters()):
        assert torch.equal(pa, pb)
    for sa, sb in zip(a.trainer.ema.shadow, b.trainer.ema.shadow):
        assert torch.equal(sa, sb)
    assert a.trainer.current_lr() == b.trainer.current_lr()
    # and training moved the weights (a no-op step would also "agree")
    fresh = create_model("custom", **over)
    assert any(not torch.equal(p, q) for p, q in zip(fresh.parameters(), a.trainer.raw_model.parameters()))


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_optimizer_step_is_clip_grad_norm_then_adamw(clip):
    """Trainer.optimizer_step against the textbook sequence (clip_grad_norm_, AdamW, zero_grad,
    schedule): the same weights bit for bit, the same norm. With clipping off it must not touch the
    gradients at all (no multiply by 1.0: a full pass over them per step on a GPU)."""
    over = dict(TINY, attention="math")
    ours = tp.build_setup("custom", over, batch=4, precision="fp32", device="cpu", seed=5, lr=1e-3, grad_clip=clip)
    ref = tp.build_setup("custom", over, batch=4, precision="fp32", device="cpu", seed=5, lr=1e-3, grad_clip=clip)
    for step in range(3):
        norms = []
        for s in (ours, ref):
            tr = s.trainer
            batch = tp.synthetic_batch(4, s.args, 5, step)
            draw = tr.flow.draw(4, tr.sample_shape, tp.step_generator(5, step, tr.device), tr.device)
            (tr.flow.per_sample_loss(tr.model, batch["x"], batch["y"], draw).sum() / 4).backward()
        grads_before = [p.grad.clone() for p in ours.trainer.raw_model.parameters()]
        seen: list[torch.Tensor] = []
        if clip == 0:
            # record every gradient the step writes into: the norm reads them, AdamW reads them
            from torch.utils._python_dispatch import TorchDispatchMode

            grad_ptrs = {p.grad.data_ptr() for p in ours.trainer.raw_model.parameters()}

            class Writes(TorchDispatchMode):
                def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                    out = func(*args, **(kwargs or {}))
                    if func._schema.is_mutable:  # an in-place op: its first argument is written
                        first = args[0]
                        for t in first if isinstance(first, (list, tuple)) else [first]:
                            if isinstance(t, torch.Tensor) and t.data_ptr() in grad_ptrs:
                                seen.append(t)
                    return out

            with Writes():
                norms.append(ours.trainer.optimizer_step())
        else:
            norms.append(ours.trainer.optimizer_step())
        tr = ref.trainer
        norms.append(torch.nn.utils.clip_grad_norm_(tr.raw_model.parameters(), clip if clip > 0 else float("inf")))
        tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)
        tr.scheduler.step()
        assert torch.equal(norms[0], norms[1])
        expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads_before]))
        assert torch.allclose(norms[0], expected, rtol=1e-6)
        assert not seen, f"clipping is off, yet {len(seen)} gradient(s) were written to"
        assert all(p.grad is None for p in ours.trainer.raw_model.parameters())
        for pa, pb in zip(ours.trainer.raw_model.parameters(), tr.raw_model.parameters()):
            assert torch.equal(pa, pb)
        assert ours.trainer.current_lr() == tr.current_lr()
    if clip > 0:
        assert float(norms[0]) > clip  # the bound really clipped


@pytest.mark.slow
def test_compiled_sdpa_path_matches_plain_path_fp32():
    """Issue 8: the optimised path (per-block torch.compile + SDPA) and the plain one (eager, explicit
    softmax) give the same losses over 100 training steps.

    fp32, so the only differences are rounding from reordered sums (inductor's fused kernels, SDPA's
    softmax). They start at ~1e-7 and Adam's sign-like early updates let them grow: 1.3e-5 to 2.8e-5
    relative after 100 steps at lr 1e-3 in our runs. 1e-4 leaves room for other CPUs' kernels while a
    real change is far above it: raising the learning rate by 1% alone moves the losses by 1.3e-2.
    Cold torch.compile on 2 shared cores takes ~60 s here (C++ kernels); ~10 s with inductor's cache warm.
    """
    plain = tp.run_losses("custom", TINY, steps=100, compile=False, attention="math", precision="fp32", lr=1e-3)
    fast = tp.run_losses("custom", TINY, steps=100, compile=True, attention="sdpa", precision="fp32", lr=1e-3)
    assert all(math.isfinite(v) for v in plain + fast)
    assert rel_diff(plain, fast) < 1e-4
    # the whole forward compiled as one graph (parallel.compile_scope=model; observed 1.2e-5)
    whole = tp.run_losses("custom", TINY, steps=100, compile=True, compile_scope="model", attention="sdpa",
                          precision="fp32", lr=1e-3)
    assert rel_diff(plain, whole) < 1e-4
    # the run trains (Gaussian toy latents leave little to learn: ~5% lower after 100 steps), so the
    # agreement is not that of two frozen models
    assert sum(plain[-10:]) < sum(plain[:10])
    # and the tolerance has teeth: a 1% larger learning rate is detected
    nudged = tp.run_losses("custom", TINY, steps=100, compile=False, attention="math", precision="fp32", lr=1.01e-3)
    assert rel_diff(plain, nudged) > 1e-3


def test_bf16_paths_agree_within_bf16_noise():
    """In bf16 autocast the SDPA path and the explicit-softmax path differ by less than bf16 itself
    differs from fp32 (observed: 6e-3 against 2e-2 max relative over 100 steps). FSDP2 over one
    device (bf16 parameters, bf16 activations between blocks) stays within that noise too: observed
    1.4e-2 from the autocast path and 2.0e-2 from fp32."""
    fp32 = tp.run_losses("custom", TINY, steps=100, attention="math", precision="fp32", lr=1e-3)
    math_bf16 = tp.run_losses("custom", TINY, steps=100, attention="math", precision="bf16", lr=1e-3)
    sdpa_bf16 = tp.run_losses("custom", TINY, steps=100, attention="sdpa", precision="bf16", lr=1e-3)
    noise = rel_diff(fp32, math_bf16)
    assert 0 < noise < 0.1  # bf16 does change the numbers, but only a little
    assert rel_diff(math_bf16, sdpa_bf16) < noise
    with tp.own_process_group():
        fsdp2_bf16 = tp.run_losses("custom", TINY, steps=100, attention="math", precision="bf16", lr=1e-3,
                                   backend="fsdp2")
    assert rel_diff(math_bf16, fsdp2_bf16) < 1.5 * noise and rel_diff(fp32, fsdp2_bf16) < 1.5 * noise


def test_parse_overrides():
    got = tp.parse_overrides("stages=[[4,2],[2,1]], hidden_size=64,mlp_ratio=2.5,time_embed=mlp")
    assert got == {"stages": [[4, 2], [2, 1]], "hidden_size": 64, "mlp_ratio": 2.5, "time_embed": "mlp"}
    with pytest.raises(SystemExit, match="not key=value"):
        tp.parse_overrides("hidden_size")


def _official_importable() -> bool:
    return OFFICIAL_PY.is_file() and importlib.util.find_spec("timm") is not None


@pytest.mark.skipif(not _official_importable(), reason=f"official MPDiT file {OFFICIAL_PY} or timm not available")
def test_official_model_in_the_same_harness(tmp_path):
    module = tp.load_official_module(OFFICIAL_PY)
    over = {"input_size": 8, "in_channels": 4, "num_classes": 10}
    row = tp.run_variant(tp.Variant("MPDiT-B/4x", compile=False, official=True), batch=2, precision="fp32",
                         steps=1, warmup=1, device=torch.device("cpu"), overrides=over, official_module=module)
    assert row["status"] == "ok", row
    assert row["impl"] == "official" and row["img_per_s"] > 0 and math.isfinite(row["loss"])
    # the same architecture as ours: same trainable parameters, so the FLOP count applies as is
    with torch.device("meta"):
        ours = create_model("MPDiT-B/4x", **over)
    assert row["params"] == count_parameters(ours)
    assert row["flops_per_image"] == train_flops_per_image(ours.args)
    # a model the official table lacks is listed as skipped, not dropped
    out = tmp_path / "b.json"
    tp.main(["--models", "custom", "--device", "cpu", "--batch", "2", "--steps", "1", "--warmup", "1",
             "--precision", "fp32", "--compile", "0", *TINY_CLI, "--official", str(OFFICIAL_PY), "--json", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [r["status"] for r in rows] == ["ok", "skipped"] and "custom" in rows[1]["error"]
