#!/usr/bin/env python
"""Scaling study: one short benchmark job per (backend, GPU count), submitted through the launcher.

    python slurm/scaling_study.py --config configs/X.yaml --gpus 8,16,32,64 [--backends fsdp2,deepspeed]
        [--per-gpu-batch B | --strong [--global-batch G]] [--steps N] [--warmup K] [--name NAME]
        [--study-dir DIR] [--peak-tflops T] [--wait] [--report] [key=value ...]

Each point is an ordinary training run (``mpdit_dist.launch.submit``) of ``K + N`` steps with
``train.log_every=1``, no sampling and no periodic checkpoints, in ``<study-dir>/<backend>-g<gpus>``;
its MLflow run is named ``<study>/<point>`` and tagged ``study``, ``study_point``, ``study_backend``,
``study_gpus``, ``study_mode``. The first ``K`` steps are warm-up (process start-up, allocator,
compilation) and are left out of every figure. Weak scaling (the default) keeps the per-GPU batch
fixed, so the global batch is ``per_gpu * gpus``; ``--strong`` keeps the global batch fixed.

Resubmitting the same study skips the points that are done (``result.json`` in the point's folder)
and the points whose job is still queued or running (``job.json``); a point whose job died is moved
aside to ``<point>.attempt-<n>`` and submitted again.

``--report`` gathers the finished points (after submitting, with ``--wait``, or alone) into
``scaling.csv``, ``scaling.md`` (img/s, img/s per GPU, step time, data wait, MFU, peak memory,
scaling efficiency against the smallest point of the same backend) and ``scaling.png``
(throughput and efficiency against GPU count, ideal lines drawn), and logs each point's summary to
its MLflow run (``study_*`` metrics). On CPU (``launch.gpus_per_node=0``) a "GPU" is a task (gloo);
MFU needs ``--peak-tflops`` there (the trainer only knows GPU peaks).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, import this checkout

from mpdit_dist import config as C  # noqa: E402

RESULT_FILE = "result.json"  # the "point is done" marker, with its summary
JOB_FILE = "job.json"  # the point's submitted job (id, cluster, time)
COLUMNS = ["backend", "gpus", "nodes", "global_batch", "per_gpu_batch", "steps", "warmup_steps", "img_per_s",
           "img_per_s_per_gpu", "step_time_ms", "step_time_p50_ms", "data_wait_ms", "mfu", "peak_mem_gib",
           "speedup", "ideal_speedup", "scaling_efficiency"]


@dataclasses.dataclass(frozen=True)
class Point:
    backend: str
    gpus: int

    @property
    def name(self) -> str:
        return f"{self.backend}-g{self.gpus}"


# ------------------------------------------------------------------------------------------------
# Pure parts: the plan, each point's config, the figures
# ------------------------------------------------------------------------------------------------

def parse_int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise SystemExit(f"{what}: expected positive integers, got {text!r}")
    return sorted(set(values))


def plan_points(backends: list[str], gpus: list[int]) -> list[Point]:
    return [Point(b, g) for b in backends for g in sorted(set(gpus))]


def point_layout(gpus: int, slots_per_node: int) -> tuple[int, int]:
    """(nodes, tasks per node) for ``gpus`` ranks on nodes of ``slots_per_node`` GPUs (or CPU tasks):
    one node while it fits, else whole nodes."""
    if slots_per_node < 1:
        raise ValueError(f"slots per node must be >= 1, got {slots_per_node}")
    if gpus <= slots_per_node:
        return 1, gpus
    if gpus % slots_per_node:
        raise ValueError(f"{gpus} GPUs do not fill whole nodes of {slots_per_node}: choose a multiple of "
                         f"{slots_per_node} (launch.gpus_per_node / launch.tasks_per_node)")
    return gpus // slots_per_node, slots_per_node


def global_batch_for(point: Point, strong: bool, per_gpu_batch: Optional[int], global_batch: Optional[int]) -> int:
    """Weak scaling: ``per_gpu_batch * gpus``; strong: the fixed ``global_batch`` (divisible by every point)."""
    if strong:
        if global_batch is None:
            raise ValueError("strong scaling needs a global batch")
        if global_batch % point.gpus:
            raise ValueError(f"strong scaling: global batch {global_batch} is not divisible by {point.gpus} GPUs "
                             f"(point {point.name})")
        return global_batch
    if per_gpu_batch is None or per_gpu_batch < 1:
        raise ValueError(f"weak scaling needs a per-GPU batch >= 1, got {per_gpu_batch}")
    return per_gpu_batch * point.gpus


def point_overrides(point: Point, *, study: str, strong: bool, global_batch: int, steps: int, warmup: int,
                    slots_per_node: int, on_gpus: bool) -> list[str]:
    """``key=value`` overrides that turn the study's base config into this point's benchmark run."""
    nodes, per_node = point_layout(point.gpus, slots_per_node)
    over = [
        f"parallel.backend={point.backend}",
        f"data.global_batch_size={global_batch}",
        f"train.steps={warmup + steps}",
        "train.log_every=1",  # one record per step: warm-up steps can be dropped exactly
        "train.ckpt_every=0",  # the trainer still saves once at the last step, after the measured window
        "train.sample_every=0",
        "train.eval_every=0",
        "train.progress_bar=false",
        f"launch.nodes={nodes}",
        f"tracking.run_name={study}/{point.name}",
        f"launch.tags.study={study}",
        f"launch.tags.study_point={point.name}",
        f"launch.tags.study_backend={point.backend}",
        f"launch.tags.study_gpus={point.gpus}",
        f"launch.tags.study_mode={'strong' if strong else 'weak'}",
    ]
    if on_gpus:
        over += [f"launch.gpus_per_node={per_node}", "launch.tasks_per_node=null"]
    else:
        over += [f"launch.tasks_per_node={per_node}"]
    return over


def summarize_point(records: list[dict[str, Any]], *, warmup: int, total_steps: int, global_batch: int, gpus: int,
                    flops_per_image: Optional[float] = None, peak_flops_per_gpu: Optional[float] = None) -> dict:
    """A point's figures from its per-step metrics records, the first ``warmup`` steps left out.

    Throughput is the global batch over the *mean* step time of the measured steps (total images
    over total time, not the mean of per-step rates). MFU is the trainer's per-step MFU weighted by
    step time (GPU; the same images-over-time rate), or, given a peak,
    ``img/s * train FLOPs per image / (peak * gpus)``.
    """
    by_step = {int(r["step"]): r for r in records}
    missing = [s for s in range(1, total_steps + 1) if s not in by_step]
    if missing:
        raise ValueError(f"metrics lack {len(missing)} of {total_steps} steps (first {missing[:5]}): "
                         "the run did not finish, or was not logged every step")
    # a step under train.profile_at's profiler logs no rate (the profiler slows it): left out
    measured = [by_step[s] for s in range(warmup + 1, total_steps + 1) if "step_time_s" in by_step[s]]
    if not measured:
        raise ValueError(f"no timed steps after the {warmup} warm-up steps (total {total_steps}; "
                         "profiled steps have no rate)")
    times = [float(r["step_time_s"]) for r in measured]
    mean_t = sum(times) / len(times)
    img_s = global_batch / mean_t
    timed_mfus = [(float(r["mfu"]), float(r["step_time_s"])) for r in measured if r.get("mfu") is not None]
    if timed_mfus:
        # The trainer's MFU is per step (that step's img/s). Weighted by step time it matches the
        # img/s above (images over time); a plain mean would overstate it as a mean of rates does.
        mfu: Optional[float] = sum(m * t for m, t in timed_mfus) / sum(t for _, t in timed_mfus)
    elif flops_per_image and peak_flops_per_gpu:
        mfu = img_s * flops_per_image / (peak_flops_per_gpu * gpus)
    else:
        mfu = None
    mems = [float(r["peak_mem_gib"]) for r in measured if r.get("peak_mem_gib") is not None]
    waits = [float(r.get("data_wait_frac") or 0.0) * float(r["step_time_s"]) for r in measured]
    return {
        "gpus": gpus,
        "global_batch": global_batch,
        "per_gpu_batch": global_batch / gpus,
        "steps": len(measured),
        "warmup_steps": warmup,
        "img_per_s": img_s,
        "img_per_s_per_gpu": img_s / gpus,
        "step_time_ms": 1000 * mean_t,
        "step_time_p50_ms": 1000 * statistics.median(times),
        "data_wait_ms": 1000 * sum(waits) / len(waits),
        "mfu": mfu,
        "peak_mem_gib": max(mems) if mems else None,
    }


def add_efficiency(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Speed-up and scaling efficiency of each row against the smallest point of its backend.

    efficiency = (img/s per GPU) / (img/s per GPU at the smallest point): 1.0 is perfect scaling in
    both modes (weak: each GPU keeps its throughput; strong: the speed-up equals the GPU ratio)."""
    out = []
    for backend in sorted({r["backend"] for r in rows}):
        group = sorted((r for r in rows if r["backend"] == backend), key=lambda r: r["gpus"])
        base = group[0]
        for r in group:
            r = dict(r)
            r["speedup"] = r["img_per_s"] / base["img_per_s"]
            r["ideal_speedup"] = r["gpus"] / base["gpus"]
            r["scaling_efficiency"] = r["img_per_s_per_gpu"] / base["img_per_s_per_gpu"]
            out.append(r)
    return out


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], missing: list[dict[str, str]], title: str) -> str:
    head = ["backend", "GPUs", "nodes", "global batch", "img/s", "img/s/GPU", "step ms", "data wait ms", "MFU",
            "peak mem GiB", "speed-up (ideal)", "efficiency"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        lines.append("| " + " | ".join([
            r["backend"], str(r["gpus"]), str(r.get("nodes", "")), str(r["global_batch"]), _fmt(r["img_per_s"]),
            _fmt(r["img_per_s_per_gpu"]), _fmt(r["step_time_ms"]), _fmt(r["data_wait_ms"]), mfu,
            _fmt(r.get("peak_mem_gib")), f"{r['speedup']:.2f} ({r['ideal_speedup']:.3g})",
            f"{100 * r['scaling_efficiency']:.1f}%"]) + " |")
    if rows:
        r0 = rows[0]
        lines += ["", f"Measured over {r0['steps']} steps per point after {r0['warmup_steps']} warm-up steps; "
                  "efficiency = img/s per GPU relative to the smallest point of the same backend."]
    if missing:
        lines += ["", "Points without results:", ""]
        lines += [f"- {m['point']}: {m['state']}" for m in missing]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Throughput and scaling efficiency against GPU count, per backend, with the ideal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(11, 4.2))
    for backend in sorted({r["backend"] for r in rows}):
        group = sorted((r for r in rows if r["backend"] == backend), key=lambda r: r["gpus"])
        g = [r["gpus"] for r in group]
        line, = ax_t.plot(g, [r["img_per_s"] for r in group], "o-", label=backend)
        base = group[0]
        ax_t.plot(g, [base["img_per_s"] * x / base["gpus"] for x in g], "--", color=line.get_color(), alpha=0.6,
                  label=f"{backend} ideal")
        ax_e.plot(g, [100 * r["scaling_efficiency"] for r in group], "o-", color=line.get_color(), label=backend)
    gpus = sorted({r["gpus"] for r in rows})
    ax_e.axhline(100, ls="--", color="gray", label="ideal")
    for ax in (ax_t, ax_e):
        ax.set_xscale("log", base=2)
        ax.set_xticks(gpus)
        ax.set_xticklabels([str(x) for x in gpus])
        ax.set_xlabel("GPUs (ranks)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_t.set_ylabel("throughput (img/s)")
    ax_e.set_ylabel("scaling efficiency (%)")
    ax_e.set_ylim(0, max(110, max(100 * r["scaling_efficiency"] for r in rows) + 10))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# The study on disk: submit, gather, report
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Study:
    config: str
    overrides: list[str]
    points: list[Point]
    name: str
    study_dir: Path
    strong: bool
    per_gpu_batch: Optional[int]
    global_batch: Optional[int]
    steps: int
    warmup: int
    peak_tflops: Optional[float] = None

    def point_dir(self, p: Point) -> Path:
        return self.study_dir / p.name

    def point_config(self, p: Point) -> C.Config:
        base = C.load_config(self.config, self.overrides)
        on_gpus = base.launch.gpus_per_node > 0
        slots = base.launch.gpus_per_node if on_gpus else (base.launch.tasks_per_node or 1)
        gb = global_batch_for(p, self.strong, self.per_gpu_batch, self.global_batch)
        over = point_overrides(p, study=self.name, strong=self.strong, global_batch=gb, steps=self.steps,
                               warmup=self.warmup, slots_per_node=slots, on_gpus=on_gpus)
        return C.load_config(self.config, [*self.overrides, *over])


def _job_alive(record: dict[str, Any]) -> bool:
    """Whether the point's job is still queued or running (squeue on SLURM; the controller pid locally)."""
    if record.get("cluster") == "slurm":
        try:
            out = subprocess.run(["squeue", "-h", "-j", str(record["job_id"]), "-o", "%T"], capture_output=True,
                                 text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return True  # cannot tell: do not submit the point twice
        return bool(out.stdout.strip())
    if record.get("cluster") == "local":
        try:
            os.kill(int(record["job_id"]), 0)
            return True
        except (OSError, ValueError):
            return False
    return False


OTHER_SETTINGS = "made with other settings"  # the state of a point this study's plan does not match


def _other_settings(study: Study, p: Point, *, total_steps: int, global_batch: int,
                    warmup: Optional[int] = None) -> Optional[str]:
    """What differs between a point's run (or its result) and this study's plan; None if nothing.

    A point folder of the same name made with another batch, step count or warm-up would otherwise
    be reported (or skipped as done) as if it had been measured with the settings asked for now."""
    want_batch = global_batch_for(p, study.strong, study.per_gpu_batch, study.global_batch)
    diffs = []
    if global_batch != want_batch:
        diffs.append(f"global batch {global_batch}, not {want_batch}")
    if total_steps != study.warmup + study.steps:
        diffs.append(f"{total_steps} steps in all, not {study.warmup} warm-up + {study.steps}")
    elif warmup is not None and warmup != study.warmup:
        diffs.append(f"{warmup} warm-up steps, not {study.warmup}")
    if not diffs:
        return None
    return (f"{OTHER_SETTINGS} ({'; '.join(diffs)}): run the study with the settings it was submitted with "
            "(--per-gpu-batch/--global-batch, --steps, --warmup), or give another --name or --study-dir")


def gather_point(study: Study, p: Point) -> tuple[Optional[dict[str, Any]], str]:
    """(summary, state) of a point: its ``result.json`` when done, written now if its run has finished."""
    d = study.point_dir(p)
    result = d / RESULT_FILE
    if result.exists():
        summary = json.loads(result.read_text())
        other = _other_settings(study, p, total_steps=summary["steps"] + summary["warmup_steps"],
                                global_batch=summary["global_batch"], warmup=summary["warmup_steps"])
        return (None, other) if other else (summary, "done")
    if not (d / "metrics.jsonl").exists():
        if (d / JOB_FILE).exists():
            rec = json.loads((d / JOB_FILE).read_text())
            return None, f"job {rec['job_id']} " + ("queued or running" if _job_alive(rec) else "ended without metrics")
        return None, "not submitted"
    from mpdit_dist.tracking import read_metrics

    cfg = C.load_config(d / "config.yaml")  # the point's resolved config, as submitted
    other = _other_settings(study, p, total_steps=cfg.train.steps, global_batch=cfg.data.global_batch_size)
    if other:
        return None, other
    records = read_metrics(d)
    if not records or int(records[-1]["step"]) < cfg.train.steps:
        rec = json.loads((d / JOB_FILE).read_text()) if (d / JOB_FILE).exists() else {}
        alive = _job_alive(rec) if rec else False
        last = records[-1]["step"] if records else 0
        return None, (f"job {rec.get('job_id')} running (step {last} of {cfg.train.steps})" if alive
                      else f"incomplete: step {last} of {cfg.train.steps}, job {rec.get('job_id')} not running")
    flops = peak = None
    if study.peak_tflops:
        from mpdit_dist.flops import train_flops_per_image

        flops, peak = train_flops_per_image(C.model_args_from(cfg.model)), study.peak_tflops * 1e12
    summary = summarize_point(records, warmup=study.warmup, total_steps=cfg.train.steps,
                              global_batch=cfg.data.global_batch_size, gpus=p.gpus, flops_per_image=flops,
                              peak_flops_per_gpu=peak)
    summary.update(backend=p.backend, point=p.name, nodes=cfg.launch.nodes, study=study.name,
                   mode="strong" if study.strong else "weak", run_dir=str(d))
    id_file = d / "mlflow_run_id"
    if id_file.exists():
        summary["mlflow_run_id"] = id_file.read_text().strip()
    result.write_text(json.dumps(summary, indent=1) + "\n")
    return summary, "done"


def prepare_tracking_store(cfg: C.Config, echo=print) -> None:
    """Create the points' SQLite MLflow store now, before their jobs can start together.

    The trainer already serializes store creation with a lock file next to the database, but a
    file system without ``flock`` across nodes (some Lustre mounts) would let the points race
    to create a fresh store. Other URIs, or a failure here (a warning), change nothing."""
    if not cfg.tracking.enabled:
        return
    from mpdit_dist.tracking import default_tracking_uri, open_client, sqlite_path

    uri = cfg.tracking.uri or default_tracking_uri(cfg.results_dir)
    if sqlite_path(uri) is None:
        return
    try:
        open_client(uri)
    except Exception as exc:  # noqa: BLE001 - tracking never stops a study; each run warns too
        echo(f"warning: could not open the MLflow store {uri}: {type(exc).__name__}: {str(exc)[:300]}")


def submit_study(study: Study, echo=print) -> list:
    """Submit every point that is neither done nor queued/running; returns the new jobs."""
    from mpdit_dist import launch

    for p in study.points:  # a point folder of other settings is neither reused nor moved aside
        _, state = gather_point(study, p)
        if state.startswith(OTHER_SETTINGS):
            raise SystemExit(f"error: {study.point_dir(p)}: {state}")
    jobs = []
    for p in study.points:
        cfg = study.point_config(p)  # config errors (batch, layout) before anything is submitted
        summary, state = gather_point(study, p)
        if summary is not None:
            echo(f"{p.name}: done, skipped ({summary['img_per_s']:.1f} img/s)")
            continue
        if "queued or running" in state or " running (" in state:
            echo(f"{p.name}: {state}, skipped")
            continue
        d = study.point_dir(p)
        if d.exists():  # an attempt that died: keep it for inspection, start the point afresh
            n = 1
            while d.with_name(f"{d.name}.attempt-{n}").exists():
                n += 1
            d.rename(d.with_name(f"{d.name}.attempt-{n}"))
            echo(f"{p.name}: earlier attempt ({state}) moved to {d.name}.attempt-{n}")
        if not jobs:
            prepare_tracking_store(cfg, echo)
        job = launch.submit(cfg, d, resume="auto", echo=None)
        d.mkdir(parents=True, exist_ok=True)
        (d / JOB_FILE).write_text(json.dumps({"job_id": str(job.job_id), "cluster": cfg.launch.cluster,
                                              "submitted": time.time()}) + "\n")
        echo(f"{p.name}: submitted job {job.job_id} ({cfg.launch.nodes} node(s), "
             f"{cfg.data.global_batch_size} global batch) -> {d}")
        jobs.append((p, job))
    return jobs


def log_to_mlflow(study: Study, rows: list[dict[str, Any]]) -> int:
    """Each point's summary on its MLflow run (``study_*`` metrics, study tags); returns runs updated."""
    from mpdit_dist.launch import set_mlflow_tags

    done = 0
    for r in rows:
        d = Path(r["run_dir"])
        if not (d / "mlflow_run_id").exists():
            continue
        cfg = C.load_config(d / "config.yaml")
        if not cfg.tracking.enabled:
            continue
        try:
            from mlflow.entities import Metric

            from mpdit_dist.tracking import bounded_http, default_tracking_uri, open_client, probe_http

            uri = cfg.tracking.uri or default_tracking_uri(cfg.results_dir)
            if uri.startswith(("http://", "https://")):
                probe_http(uri, 5.0)  # a server that does not answer costs seconds, not MLflow's minutes
            run_id = (d / "mlflow_run_id").read_text().strip()
            now = int(time.time() * 1000)
            metrics = [Metric(f"study_{key}", float(r[key]), now, 0) for key in (
                "img_per_s", "img_per_s_per_gpu", "step_time_ms", "data_wait_ms", "mfu", "peak_mem_gib", "speedup",
                "scaling_efficiency") if r.get(key) is not None]
            with bounded_http(5.0):
                open_client(uri).log_batch(run_id, metrics=metrics)
            if not set_mlflow_tags(cfg, d, {"study": study.name, "study_point": r["point"],
                                            "study_backend": r["backend"], "study_gpus": str(r["gpus"]),
                                            "study_mode": r["mode"]}):
                continue
            done += 1
        except Exception as exc:  # noqa: BLE001 - the report on disk matters more than the mirror
            print(f"warning: could not log {r['point']} to MLflow: {exc}", file=sys.stderr)
    return done


def report(study: Study, echo=print) -> dict[str, Any]:
    """Gather the finished points into scaling.csv / scaling.md / scaling.png in the study dir."""
    rows, missing = [], []
    for p in study.points:
        summary, state = gather_point(study, p)
        if summary is None:
            missing.append({"point": p.name, "state": state})
        else:
            rows.append(summary)
    rows = add_efficiency(rows)
    rows.sort(key=lambda r: (r["backend"], r["gpus"]))
    study.study_dir.mkdir(parents=True, exist_ok=True)
    title = f"Scaling study '{study.name}' ({'strong' if study.strong else 'weak'} scaling)"
    paths = {"csv": study.study_dir / "scaling.csv", "md": study.study_dir / "scaling.md",
             "png": study.study_dir / "scaling.png"}
    write_csv(rows, paths["csv"])
    paths["md"].write_text(markdown_table(rows, missing, title))
    if rows:
        plot(rows, paths["png"], title)
    else:
        paths.pop("png")
    logged = log_to_mlflow(study, rows)
    echo(paths["md"].read_text())
    echo(f"report: {', '.join(str(p) for p in paths.values())} ({len(rows)} point(s), {len(missing)} missing; "
         f"{logged} MLflow run(s) updated)")
    return {"rows": rows, "missing": missing, "paths": paths}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Submit (and report) a throughput scaling study.")
    ap.add_argument("--config", required=True, help="base YAML config (its launch section says where)")
    ap.add_argument("--gpus", required=True, help="comma-separated GPU counts (CPU: task counts), e.g. 8,16,32")
    ap.add_argument("--backends", default=None, help="comma-separated parallel backends (default: the config's)")
    ap.add_argument("--per-gpu-batch", type=int, default=None,
                    help="weak scaling: batch per GPU (default: the config's global batch / smallest GPU count)")
    ap.add_argument("--strong", action="store_true", help="strong scaling: fixed global batch")
    ap.add_argument("--global-batch", type=int, default=None,
                    help="strong scaling: the global batch (default: data.global_batch_size)")
    ap.add_argument("--steps", type=int, default=20, help="measured steps per point (default 20)")
    ap.add_argument("--warmup", type=int, default=5, help="warm-up steps per point, left out of the figures")
    ap.add_argument("--name", default=None, help="study name (default: <config stem>-<weak|strong>)")
    ap.add_argument("--study-dir", default=None, help="default: <results_dir>/scaling/<name>")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s per GPU for MFU (CPU runs)")
    ap.add_argument("--wait", action="store_true",
                    help="wait for the submitted points (then --report); always on with launch.cluster=debug")
    ap.add_argument("--timeout", type=float, default=None, help="with --wait: seconds per point at most")
    ap.add_argument("--report", action="store_true", help="gather finished points into CSV, markdown and PNG")
    ap.add_argument("--no-submit", action="store_true", help="with --report: only report, submit nothing")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the base config")
    args = ap.parse_args(argv)

    gpus = parse_int_list(args.gpus, "--gpus")
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    try:
        base = C.load_config(args.config, args.overrides)
    except C.ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    backends = [b.strip() for b in (args.backends or base.parallel.backend).split(",") if b.strip()]
    name = args.name or f"{Path(args.config).stem}-{'strong' if args.strong else 'weak'}"
    per_gpu = args.per_gpu_batch
    global_batch = args.global_batch or base.data.global_batch_size
    if not args.strong and per_gpu is None:
        per_gpu = max(1, base.data.global_batch_size // min(gpus))
    study_dir = Path(args.study_dir) if args.study_dir else Path(base.results_dir) / "scaling" / name
    study = Study(config=args.config, overrides=list(args.overrides), points=plan_points(backends, gpus), name=name,
                  study_dir=study_dir.absolute(), strong=args.strong, per_gpu_batch=per_gpu,
                  global_batch=global_batch if args.strong else None, steps=args.steps, warmup=args.warmup,
                  peak_tflops=args.peak_tflops)
    try:
        for p in study.points:  # every point's config is valid before anything is submitted
            study.point_config(p)
    except (ValueError, C.ConfigError) as exc:
        raise SystemExit(f"error: {exc}") from None
    study.study_dir.mkdir(parents=True, exist_ok=True)
    (study.study_dir / "study.json").write_text(json.dumps(
        {**dataclasses.asdict(study), "study_dir": str(study.study_dir),
         "points": [p.name for p in study.points]}, indent=1, default=str) + "\n")
    failed = 0
    if not args.no_submit:
        jobs = submit_study(study)
        # submitit's debug job trains only when waited for: with launch.cluster=debug, always wait.
        if args.wait or base.launch.cluster == "debug":
            from mpdit_dist import launch

            for p, job in jobs:
                try:
                    launch.wait(job, timeout_s=args.timeout)
                    print(f"{p.name}: job {job.job_id} finished")
                except (launch.JobFailedError, TimeoutError) as exc:
                    failed += 1
                    print(f"{p.name}: {exc}", file=sys.stderr)
    if args.report:
        report(study)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
