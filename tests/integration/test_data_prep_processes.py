"""data_prep.encode across real processes: two ranks == one process; SIGKILL + rerun == one run."""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.encode import encode_dataset
from data_prep.fixtures import save_tiny_vae, write_test_image_folder
from mpdit_dist.data import read_manifest

REPO = Path(__file__).resolve().parents[2]


def _run_cli(args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
        env.pop(k, None)
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "data_prep.encode", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@contextlib.contextmanager
def _one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _data_files(out: Path) -> dict[str, bytes]:
    """Every data file and the manifest, by relative path (temp names must not exist)."""
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            rel = p.relative_to(out).as_posix()
            assert not p.name.startswith("."), f"left-over temp file {rel}"
            files[rel] = p.read_bytes()
    return files


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_test_image_folder(tmp_path_factory.mktemp("imgs") / "folder")


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny_vae")


def test_two_processes_give_the_same_data_as_one(images, vae, tmp_path):
    root, _ = images
    common = ["--images", root, "--resolution", 16, "--vae", vae, "--formats", "mds,wds",
              "--samples-per-shard", 3, "--flip", "--batch-size", 2]
    two = [_run_cli([*common, "--out", tmp_path / "two"], {"RANK": str(r), "WORLD_SIZE": "2"}) for r in range(2)]
    with _one_thread():  # the subprocesses run with OMP_NUM_THREADS=1: same float reductions
        encode_dataset(root, tmp_path / "one", 16, str(vae), "mds,wds", 3, flip=True, batch_size=2, progress=False)
    for p in two:
        _, stderr = p.communicate(timeout=180)
        assert p.returncode == 0, stderr
    a, b = _data_files(tmp_path / "one"), _data_files(tmp_path / "two")
    assert sorted(a) == sorted(b)
    for rel in a:
        assert a[rel] == b[rel], f"{rel} differs between 1 and 2 processes"
    assert read_manifest(tmp_path / "two")["num_samples"] == 12


def test_kill_and_rerun_equals_uninterrupted(images, tmp_path):
    root, _ = images
    common = ["--images", root, "--resolution", 16, "--vae", "identity", "--formats", "mds,wds",
              "--samples-per-shard", 2, "--workers", 1]
    killed = _run_cli([*common, "--out", tmp_path / "run"], {"MPDIT_ENCODE_KILL_AFTER_SHARDS": "3"})
    encode_dataset(root, tmp_path / "ref", 16, "identity", "mds,wds", 2, progress=False)
    killed.communicate(timeout=180)
    assert killed.returncode == -9  # SIGKILL while writing the 4th shard
    run = tmp_path / "run"
    assert not (run / "manifest.json").exists()
    assert sorted(p.name for p in (run / "parts").iterdir()) == [f"part-00000{i}.json" for i in range(3)]
    # the half-written 4th shard exists only under temp names, never under its final name
    assert not (run / "wds" / "shard-000003.tar").exists() and not (run / "mds" / "part-000003").exists()
    assert any(p.name.startswith(".") for p in (run / "wds").iterdir())
    before = {p: p.stat().st_mtime_ns for p in (run / "wds").glob("shard-00000[0-2].tar")}
    summary = encode_dataset(root, run, 16, "identity", "mds,wds", 2, progress=False)  # the same command again
    assert summary["shards_skipped"] == 3 and summary["shards_written"] == 5
    assert {p: p.stat().st_mtime_ns for p in before} == before  # finished shards not rewritten
    assert not list(run.rglob(".*"))  # the killed shard's temp files were redone and renamed
    a, b = _data_files(tmp_path / "ref"), _data_files(run)
    assert sorted(a) == sorted(b)
    for rel in a:
        assert a[rel] == b[rel], f"{rel} differs after kill + rerun"
