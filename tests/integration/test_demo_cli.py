"""``python -m mpdit_dist.demo`` (small overrides): what it prints is where things are."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.helpers.runs import REPO, env

SMALL = ["train.steps=2", "train.log_every=1", "train.ckpt_every=0", "train.sample_every=0", "train.progress_bar=false",
         "model.hidden_size=32", "model.num_heads=2", "model.stages=[[4,1],[2,1]]"]


def test_demo_prints_the_store_the_run_went_to(tmp_path):
    out, store = tmp_path / "demo", tmp_path / "elsewhere"
    proc = subprocess.run([sys.executable, "-m", "mpdit_dist.demo", "--out", str(out), *SMALL, f"results_dir={store}"],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (out / "samples.png").is_file() and (out / "run" / "metrics.jsonl").is_file()
    uri = re.search(r"MLflow store: (\S+)", proc.stdout).group(1)
    assert uri == f"sqlite:///{store.resolve() / 'mlflow.db'}"
    assert Path(uri[len("sqlite:///"):]).is_file()
