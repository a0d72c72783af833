"""The checks that need a GPU, as one prepared run for a short lease of a device machine.

Each check is its own process (clean memory and compile caches) with its own timeout, and the
whole run keeps to ``--budget-s``: a check that would not fit in what is left is skipped and
listed as such. Output: a summary table on stdout, and every check's log and JSON under ``--out``; the large
files (latents, run directories, checkpoints) stay under ``--work``.

Checks (``--only`` picks some), run in this order, issue 8's speed first:

- ``speed``: ``bench/throughput.py`` on MPDiT-XL/4x, batch 128, bf16, no gradient clipping (as
  the paper recipes): the whole-forward compile with a kernel profile by category, then FSDP2
  over the one GPU (bf16 parameters kept from each block's forward to its backward), with the
  whole forward compiled, then per block.
- ``autotune``: ``max-autotune-no-cudagraphs`` (long compile) on the fastest compiled setting the
  ``speed`` runs before it measured (one process or FSDP2; whole forward or per block).
- ``speed`` again: DiT-XL/2 for the ratio, if time is left.
- ``backends``: ``train.py`` with ``configs/gpu_smoke.yaml`` (MPDiT-B/4x, batch 128, synthetic
  latents, NCCL) under DeepSpeed ZeRO-2, ZeRO-3 and FSDP2: the last logged loss, img/s and
  peak memory from each run's ``metrics.jsonl``; the FSDP2 run also profiles two steps
  (``train.profile_at``) and the summary shows their time by category.

On the lent machine (torch there, our other dependencies carried as wheels)::

    bash scripts/device_env.sh install && export PYTHONPATH=/tmp/site:$(pwd)
    python3 bench/device_checks.py --out $OUT --budget-s 500

On a CPU, ``--tiny`` runs the same checks at toy size, to check this script itself.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["model.name=custom", "model.stages=[[4,2],[2,1]]", "model.hidden_size=64", "model.num_heads=4",
              "model.num_condition_tokens=4", "model.input_size=8", "model.num_classes=10",
              "data.global_batch_size=8", "data.num_workers=0", "train.device=cpu",
              "train.precision=bf16"]  # bf16 as on a GPU: DeepSpeed then takes its CUDA path
TINY_BENCH = ["--device", "cpu", "--batch", "4", "--steps", "2", "--warmup", "1", "--phase-steps", "1",
              "--input-size", "8", "--num-classes", "10", "--precision", "fp32", "--threads", "1",
              "--model-overrides", "stages=[[4,2],[2,1]],hidden_size=64,num_heads=4,num_condition_tokens=4"]


class Runner:
    def __init__(self, out: Path, work: Path, budget_s: float):
        self.out = out  # logs, JSON, metrics: small files that come back from a lent machine
        self.work = work  # latents, run directories and checkpoints: gigabytes at full size
        self.deadline = time.monotonic() + budget_s
        self.summary: list[str] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, cmd: list[str], timeout_s: float, min_s: float) -> int | None:
        """Run ``cmd`` with its output in ``out/name.log``; its return code, or None when skipped
        (less than ``min_s`` left of the budget)."""
        left = self.left()
        if left < min_s:
            self.summary.append(f"{name}: SKIPPED ({left:.0f} s left of the budget, needs about {min_s:.0f} s)")
            return None
        timeout = min(timeout_s, left)
        print(f"# {name}: {' '.join(cmd)}  (timeout {timeout:.0f} s)", flush=True)
        t0 = time.monotonic()
        log = self.out / f"{name}.log"
        with log.open("w") as fh:
            try:
                rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = -9
        took = time.monotonic() - t0
        print(f"#   {name}: rc={rc} in {took:.0f} s", flush=True)
        if rc != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            self.summary.append(f"{name}: FAILED rc={rc} after {took:.0f} s; log tail:\n{tail}")
        return rc


def last_metrics(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    rows = [r for r in rows if "img_per_s" in r]
    return rows[-1] if rows else {}


def check_backends(r: Runner, tiny: bool) -> None:
    data = r.work / "latents.npz"
    subprocess.run([sys.executable, "scripts/make_synthetic_latents.py", str(data), "4096"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    if tiny:
        import numpy as np

        rng = np.random.default_rng(0)
        np.savez(data, x=rng.standard_normal((64, 4, 8, 8), dtype=np.float32), y=rng.integers(0, 10, 64),
                 num_classes=np.int64(10))
    rows, profiles = [], []
    for name, extra in (("deepspeed_zero2", ["parallel.backend=deepspeed", "parallel.zero_stage=2"]),
                        ("deepspeed_zero3", ["parallel.backend=deepspeed", "parallel.zero_stage=3"]),
                        # the trainer's own profiler window too: CUDA kernel time, NCCL's collectives
                        ("fsdp2", ["parallel.backend=fsdp2", "train.profile_at=21", "train.profile_steps=2"])):
        run_dir = r.work / name
        shutil.rmtree(run_dir, ignore_errors=True)  # a run left by an earlier call would resume, not train
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "train.py",
               "--config", "configs/gpu_smoke.yaml", "--run-dir", str(run_dir), f"data.path={data}",
               "train.steps=30", "train.ckpt_every=30", *extra] + (TINY_MODEL if tiny else [])
        rc = r.run(name, cmd, timeout_s=150, min_s=60)
        m = last_metrics(run_dir / "metrics.jsonl")
        if (run_dir / "metrics.jsonl").is_file():
            shutil.copy(run_dir / "metrics.jsonl", r.out / f"{name}.metrics.jsonl")
        saved = sorted(p.name for p in run_dir.glob("checkpoints/step_*")) if run_dir.is_dir() else []
        rows.append((name, rc, m, saved))
        for prof in sorted(run_dir.glob("profile/step_*/rank0.txt")):
            shutil.copy(prof, r.out / f"{name}.profile.txt")
            profiles.append(prof.read_text().splitlines()[:14])
    r.summary.append("backends (" + ("a toy model on the CPU" if tiny else "MPDiT-B/4x, batch 128, 1 GPU") + ", 30 steps):")
    r.summary.append(f"  {'backend':<18} {'rc':>4} {'step':>5} {'loss':>8} {'img/s':>8} {'peak GiB':>9}  checkpoints")
    for name, rc, m, saved in rows:
        peak = m.get("peak_mem_gib")
        r.summary.append(f"  {name:<18} {str(rc):>4} {m.get('step', '-'):>5} {m.get('loss', float('nan')):>8.4f} "
                         f"{m.get('img_per_s', float('nan')):>8.1f} {'-' if peak is None else f'{peak:.2f}':>9}  "
                         f"{','.join(saved) or '-'}")
    for lines in profiles:
        r.summary += ["  train.profile_at's window of the fsdp2 run, rank 0:"] + ["  " + line for line in lines]


def fastest_setting(out: Path, names: tuple[str, ...]) -> tuple[list[str], str]:
    """The bench arguments (compile scope, backend) of the fastest compiled row in the JSON of the
    checks ``names``, and a line saying which; the whole-forward compile on one process when none
    of them left a result. Autotuning is then tried where it can bring the step furthest."""
    best = None
    for name in names:
        js = out / f"{name}.json"
        rows = json.loads(js.read_text())["results"] if js.is_file() else []
        for row in rows:
            if row.get("status") == "ok" and row.get("compile") and (best is None or row["img_per_s"] > best["img_per_s"]):
                best = row
    if best is None:
        return ["--compile", "model"], "the whole forward (no earlier result)"
    args = ["--compile", best["compile_scope"]]
    if best.get("backend") == "fsdp2":
        args += ["--backend", "fsdp2", "--reshard-after-forward", "1" if best.get("reshard_after_forward", True) else "0"]
    return args, f"{best['label']} ({best['img_per_s']:.1f} img/s before)"


def check_speed(r: Runner, tiny: bool, which: set[str], models: str) -> None:
    bench = [sys.executable, "bench/throughput.py"] + (TINY_BENCH if tiny else ["--batch", "128", "--precision", "bf16"])
    mpdit, dit = ("custom", "custom") if tiny else (models, "DiT-XL/2")
    plan = []  # (name, models, arguments, timeout, least time worth starting it with)
    if "speed" in which:
        plan += [("speed_model_profile", mpdit, ["--compile", "model", "--profile"], 240, 90),
                 ("speed_fsdp2", mpdit, ["--compile", "model,blocks", "--backend", "fsdp2",
                                         "--reshard-after-forward", "0"], 300, 90)]
    if "autotune" in which:
        # the arguments are settled when its turn comes: the fastest setting measured before it
        plan.append(("speed_autotune", mpdit, None, 420, 200))
    if "speed" in which:
        plan.append(("speed_dit", dit, ["--compile", "model"], 200, 90))
    for name, model_list, extra, timeout_s, min_s in plan:
        js = r.out / f"{name}.json"
        if extra is None:
            extra, basis = fastest_setting(r.out, ("speed_model_profile", "speed_fsdp2"))
            r.summary.append(f"{name}: max-autotune-no-cudagraphs on {basis}")
            extra = extra + ["--compile-mode", "max-autotune-no-cudagraphs"]
        args = ["--models", model_list] + extra
        rc = r.run(name, bench + args + ["--json", str(js)], timeout_s=timeout_s, min_s=min_s)
        if rc == 0 and js.is_file():
            for row in json.loads(js.read_text())["results"]:
                ph = row.get("phases_ms", {})
                peak = row.get("peak_mem_gib")
                mfu = row.get("mfu")
                r.summary.append(
                    f"{row['label']:<50} {row.get('status'):>7} {row.get('img_per_s', float('nan')):>8.1f} img/s  "
                    f"fwd {ph.get('forward', float('nan')):.1f} bwd {ph.get('backward', float('nan')):.1f} "
                    f"optim {ph.get('optimizer', float('nan')):.1f} ema {ph.get('ema', float('nan')):.1f} ms  "
                    f"MFU {'-' if mfu is None else f'{100 * mfu:.1f}%'}  peak {'-' if peak is None else f'{peak:.1f}'} GiB"
                    + (f"  first step {row['first_step_s']:.0f} s" if "first_step_s" in row else ""))
                if "profile" in row:
                    cats = row["profile"]["categories"]
                    r.summary.append("    profile ms/step: " + ", ".join(f"{k} {v:.1f}" for k, v in cats.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "results/device_checks"),
                    help="logs, JSON and the summary (small files)")
    ap.add_argument("--work", default="/tmp/mpdit_device_checks",
                    help="synthetic latents and run directories with their checkpoints (large at full size)")
    ap.add_argument("--budget-s", type=float, default=500, help="stop starting checks past this many seconds")
    ap.add_argument("--only", default="speed,autotune,backends", help="comma list of speed, autotune, backends "
                    "(they run in that order)")
    ap.add_argument("--models", default="MPDiT-XL/4x", help="models of the speed check")
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU: a check of this script")
    args = ap.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - {"backends", "speed", "autotune"}
    if unknown:
        raise SystemExit(f"--only {sorted(unknown)}: choose from backends, speed, autotune")
    # DeepSpeed's op builders compare the CUDA toolkit with torch's; none of its ops is built here
    os.environ.setdefault("DS_SKIP_CUDA_CHECK", "1")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    r = Runner(out, work, args.budget_s)
    env = subprocess.run([sys.executable, "-c", "import torch, importlib.util as u; print('torch', torch.__version__, "
                          "torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', "
                          "'| deepspeed', u.find_spec('deepspeed') is not None, '| flash_attn', "
                          "u.find_spec('flash_attn') is not None)"], capture_output=True, text=True)
    r.summary.append(env.stdout.strip() or env.stderr.strip()[-500:])
    if only & {"speed", "autotune"}:
        check_speed(r, args.tiny, only, args.models)
    if "backends" in only:
        check_backends(r, args.tiny)
    text = "\n".join(r.summary)
    (out / "summary.txt").write_text(text + "\n")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
