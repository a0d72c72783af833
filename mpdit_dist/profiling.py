"""torch.profiler around training steps: time by category, and the trainer's trace window.

Two users: ``bench/throughput.py --profile`` (a few steps of one variant) and the trainer's
``train.profile_at`` / ``train.profile_steps`` (a window of a real run, every rank, a trace file
each). Both group the profile the same way: on CUDA the kernels' device time, on CPU each operator's
self CPU time, by the categories of :data:`CATEGORIES` (``/work/shared/MEASUREMENTS.md`` groups the
official profile so).
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger("mpdit_dist.profiling")

MARK = "train_step "  # TraceWindow's mark of each step in the trace: "train_step 1200"

# first match wins; order matters (collectives before reductions, attention before matrix
# products, EMA's lerp before the optimizer)
CATEGORIES: list[tuple[str, re.Pattern]] = [
    ("communication", re.compile(r"nccl|gloo|c10d|all_?reduce|reduce_?scatter|all_?gather|record_param_comms", re.I)),
    ("attention", re.compile(r"attention|flash|fmha|sdpa|softmax|mha", re.I)),
    ("EMA", re.compile(r"lerp", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor_apply|_foreach_|optimizer|clip_grad|lpnorm", re.I)),
    ("layernorm", re.compile(r"layer_?norm", re.I)),
    ("matrix products", re.compile(r"gemm|matmul|aten::(mm|addmm|bmm|baddbmm|linear|conv|_convolution|mkldnn)|"
                                   r"nvjet|xmma|cutlass|cublas|ampere_|hopper_|sm\d\d_|convol|conv[12]d", re.I)),
    ("FFT", re.compile(r"fft", re.I)),
    ("casts/copies", re.compile(r"copy|cast|convert|aten::to\b|_to_copy|clone|contiguous|aten::cat|catarray|memcpy|memset|"
                                r"fill|zero_|index|gather|scatter|embedding|permute|reshape|view|transpose|"
                                r"expand|slice|unbind|split|stack|select", re.I)),
    ("reductions", re.compile(r"reduce|aten::(sum|mean|norm|max|min|amax|linalg_vector_norm)|triton_(red|per)_", re.I)),
    ("elementwise", re.compile(r"elementwise|triton_poi_|cpp_fused|aten::(mul|add|sub|div|gelu|silu|tanh|exp|"
                               r"sigmoid|addcmul|neg|pow|rsub|where|sqrt|rsqrt|lt|gt|eq|ne|randn|rand|normal|"
                               r"uniform|clamp|abs|ones_like|zeros_like|full|empty|threshold)|gelu|silu|functor", re.I)),
]


def categorize(name: str) -> str:
    for cat, pattern in CATEGORIES:
        if pattern.search(name):
            return cat
    return "other"


def _device_time(ev) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):  # renamed in torch 2.4+
        if hasattr(ev, attr):
            return float(getattr(ev, attr))
    return 0.0


def activities(device: torch.device) -> list:
    from torch.profiler import ProfilerActivity

    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def summarize(prof, steps: int, cuda: bool, top: int = 15) -> dict[str, Any]:
    """A finished profiler's time per step by category.

    Returns {"unit", "total_ms_per_step", "events_per_step", "categories": {cat: ms/step},
    "top": [{name, category, ms_per_step, calls_per_step}]}."""
    from torch.autograd import DeviceType

    steps = max(steps, 1)
    rows = []
    for ev in prof.key_averages():
        if ev.key.startswith(MARK):  # our step marks (also on the GPU timeline as annotations)
            continue
        if cuda:
            if ev.device_type != DeviceType.CUDA:
                continue
            us = _device_time(ev)
        else:
            # annotations (ProfilerStep, "## ...", Optimizer.step#...) hold python time, not operators
            if ev.key.startswith(("ProfilerStep", "## ")) or "#" in ev.key:
                continue
            us = float(ev.self_cpu_time_total)
        if us <= 0:
            continue
        rows.append((ev.key, us / 1e3 / steps, ev.count / steps))
    rows.sort(key=lambda r: -r[1])
    cats: dict[str, float] = {}
    for name, ms, _ in rows:
        c = categorize(name)
        cats[c] = cats.get(c, 0.0) + ms
    return {
        "unit": "CUDA kernel time" if cuda else "operator self CPU time",
        "total_ms_per_step": sum(r[1] for r in rows),
        "events_per_step": sum(r[2] for r in rows),
        "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
        "top": [{"name": n, "category": categorize(n), "ms_per_step": ms, "calls_per_step": c}
                for n, ms, c in rows[:top]],
    }


def format_summary(label: str, summary: dict[str, Any]) -> str:
    total = summary["total_ms_per_step"] or 1.0
    lines = [f"profile of {label} ({summary['unit']}, per step; {summary['events_per_step']:.0f} kernels/ops per step)",
             f"  {'category':<18} {'ms/step':>9} {'share':>6}"]
    for cat, ms in summary["categories"].items():
        lines.append(f"  {cat:<18} {ms:>9.3f} {100 * ms / total:>5.1f}%")
    lines.append(f"  {'total':<18} {summary['total_ms_per_step']:>9.3f}")
    lines.append(f"  top {len(summary['top'])}:")
    for row in summary["top"]:
        name = row["name"] if len(row["name"]) <= 90 else row["name"][:87] + "..."
        lines.append(f"  {row['ms_per_step']:>9.3f} ms  x{row['calls_per_step']:<6.0f} [{row['category']}] {name}")
    return "\n".join(lines)


class TraceWindow:
    """torch.profiler over the training steps ``first .. first + count - 1`` (numbered as logged,
    from 1) on this rank.

    Every rank profiles the same steps and writes, under ``<root>/step_<S>`` (S: the first step it
    recorded): ``rank<R>.trace.json.gz``, the trace for Perfetto or ``chrome://tracing`` (each step
    marked ``train_step <N>``, the data wait inside it), and ``rank<R>.txt``, its time by category
    and top operators (:func:`format_summary`; ``rank<R>.json``: what :func:`summarize` returns).
    A run that stops inside the window (preemption, an error) writes what it recorded
    (:meth:`close`); resumed inside the window, it records the rest under the step it resumed at."""

    def __init__(self, first: int, count: int, root: Path, rank: int, device: torch.device):
        self.first, self.last = first, first + count - 1
        self.root = Path(root)
        self.rank = rank
        self.device = device
        self.started_at: Optional[int] = None  # the first step recorded
        self.steps_recorded = 0
        self.summary: Optional[dict[str, Any]] = None
        self._prof = None
        self._mark = None

    def covers(self, step: int) -> bool:
        return self.first <= step <= self.last

    def begin_step(self, step: int) -> None:
        """Before the data of ``step`` is fetched: starts the profiler at the window's first step (or
        at the first step of a run resumed inside the window)."""
        if not self.covers(step):
            return
        if self._prof is None:
            from torch.profiler import profile

            if self.device.type != "cuda":
                # a CUDA build of torch on a machine without GPUs: kineto would print an "ERROR"
                # that its GPU count failed, on every rank (a user's own level is kept)
                os.environ.setdefault("KINETO_LOG_LEVEL", "5")
            self._sync()
            self.started_at, self.steps_recorded = step, 0
            self._prof = profile(activities=activities(self.device))
            self._prof.start()
        self._mark = torch.profiler.record_function(f"{MARK}{step}")
        self._mark.__enter__()

    def end_step(self, step: int) -> Optional[Path]:
        """After ``step``: at the window's last step, stops and writes. Returns the summary's path
        when it wrote one."""
        if self._prof is None or not self.covers(step):
            return None
        self._sync()  # the step's kernels belong to the step
        self._mark.__exit__(None, None, None)
        self._mark = None
        self.steps_recorded += 1
        return self.close() if step == self.last else None

    def close(self) -> Optional[Path]:
        """Stops a running profiler and writes its files (a window cut short keeps what it has)."""
        if self._prof is None:
            return None
        if self._mark is not None:  # stopped inside a step (an exception)
            self._mark.__exit__(None, None, None)
            self._mark = None
        prof, self._prof = self._prof, None
        prof.stop()
        t0 = time.perf_counter()
        out = self.out_dir
        out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(out / f"rank{self.rank}.trace.json.gz"))  # gzip by the suffix
        self.summary = summarize(prof, self.steps_recorded, cuda=self.device.type == "cuda")
        label = f"{self.steps_label()}, rank {self.rank}"
        text = out / f"rank{self.rank}.txt"
        text.write_text(format_summary(label, self.summary) + "\n")
        (out / f"rank{self.rank}.json").write_text(json.dumps({"steps": self.steps_label(), **self.summary}, indent=1))
        log.info("profile of %s written to %s in %.1f s", label, out, time.perf_counter() - t0)
        return text

    @property
    def out_dir(self) -> Path:
        return self.root / f"step_{self.started_at or self.first:08d}"

    def steps_label(self) -> str:
        start = self.started_at or self.first
        end = start + max(self.steps_recorded, 1) - 1
        return f"step {start}" if end == start else f"steps {start}-{end}"

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
