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
    for k in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN",
              "SLURM_PROCID", "SLURM_NTASKS"):
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
    assert sorted(p.name for p in (run / "parts").glob("part-*")) == [f"part-00000{i}.json" for i in range(3)]
    assert (run / "parts" / ".part-000003.lock").exists()  # its claim died with it (flock), the file stays
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


def test_a_claimed_shard_is_left_to_its_holder(images, tmp_path):
    """Two processes on one output: a shard claimed by one (here: this test process, with the
    encoder's own claim) is neither encoded nor committed by the other, whose temp files could
    otherwise collide with the holder's; released, it is encoded by the next run."""
    from data_prep.encode import _claim_shard, _release_shard

    root, _ = images
    out = tmp_path / "run"
    common = ["--images", root, "--resolution", 8, "--vae", "identity", "--formats", "mds,wds",
              "--samples-per-shard", 4, "--out", out]
    # the first run records the configuration and writes shards 0, 2, 3 while we hold shard 1
    (out / "parts").mkdir(parents=True)
    claim = _claim_shard(out, 1)
    assert claim is not None and _claim_shard(out, 1) is None  # exclusive, even within one process
    # a dead process's half-written files of shard 1 (another host's temp names)
    (out / "wds").mkdir()
    stale = out / "wds" / ".shard-000001.tar.otherhost-99.tmp"
    stale.write_bytes(b"half")
    first = _run_cli(common)
    stdout, stderr = first.communicate(timeout=180)
    assert first.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["shards_busy"] == 1 and summary["shards_written"] == 3 and summary["manifest"] is None
    assert not (out / "parts" / "part-000001.json").exists() and stale.exists()
    _release_shard(out, 1, claim)
    second = _run_cli(common)
    stdout, stderr = second.communicate(timeout=180)
    assert second.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["shards_written"] == 1 and summary["shards_skipped"] == 3 and summary["manifest"]
    encode_dataset(root, tmp_path / "ref", 8, "identity", "mds,wds", 4, progress=False)
    a, b = _data_files(tmp_path / "ref"), _data_files(out)  # no temp or lock file left either
    assert sorted(a) == sorted(b)
    for rel in a:
        assert a[rel] == b[rel], rel


def test_two_identical_runs_at_once_agree(images, tmp_path):
    """The same command started twice on one output (a duplicate launch): both succeed, every
    shard is written once, the result equals one run."""
    root, _ = images
    common = ["--images", root, "--resolution", 8, "--vae", "identity", "--formats", "mds,wds",
              "--samples-per-shard", 1, "--workers", 1, "--out", tmp_path / "run"]
    runs = [_run_cli(common) for _ in range(2)]
    summaries = []
    for p in runs:
        stdout, stderr = p.communicate(timeout=180)
        assert p.returncode == 0, stderr
        summaries.append(json.loads(stdout))
    assert sum(s["shards_written"] for s in summaries) == 15
    encode_dataset(root, tmp_path / "ref", 8, "identity", "mds,wds", 1, progress=False)
    a, b = _data_files(tmp_path / "ref"), _data_files(tmp_path / "run")
    assert sorted(a) == sorted(b)
    for rel in a:
        assert a[rel] == b[rel], rel


def _strace_usable() -> bool:
    import shutil

    if not shutil.which("strace"):
        return False
    return subprocess.run(["strace", "-f", "-e", "trace=fsync", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _strace_usable(), reason="needs strace (ptrace allowed)")
def test_shard_data_is_fsynced_before_its_record(images, tmp_path):
    """Traced system calls of a real run: every file of a shard (MDS included) and the directories
    it is renamed into are fsynced before the rename that commits the shard's record."""
    import re

    root, _ = images
    out = tmp_path / "run"
    log = tmp_path / "strace.log"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
        env.pop(k, None)
    subprocess.run(["strace", "-f", "-y", "-qq", "-e", "trace=fsync,fdatasync,rename,renameat,renameat2",
                    "-o", str(log), sys.executable, "-m", "data_prep.encode", "--images", str(root),
                    "--out", str(out), "--resolution", "8", "--formats", "mds,wds", "--samples-per-shard", "6",
                    "--workers", "1"], cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    synced, renamed = set(), {}  # renamed: temp path -> final path
    checked = 0
    for line in log.read_text().splitlines():
        m = re.search(r"f(?:data)?sync\(\d+<([^>]+)>", line)
        if m:
            synced.add(m.group(1))
            continue
        names = re.findall(r'"([^"]+)"', line)
        if "rename" not in line or len(names) < 2:
            continue
        src, dst = (os.path.realpath(n) for n in names[-2:])
        renamed[src] = dst
        rec = re.fullmatch(r".*/parts/(part-\d+)\.json", dst)
        if not rec:
            continue
        pname = rec.group(1)
        sid = int(pname[5:])
        # the shard's final files, as they were named when written
        files = [src]
        for tmp, final in renamed.items():
            if final in (str(out / "mds" / pname), str(out / "wds" / f"shard-{sid:06d}.tar"),
                         str(out / "wds" / f"shard-{sid:06d}.idx.json")):
                files += [os.path.join(tmp, n) for n in os.listdir(final)] if final.endswith(pname) else [tmp]
                files.append(os.path.dirname(final))
        mds_files = [f for f in files if f.endswith((".mds", "index.json")) and "/mds/" in f]
        assert len(mds_files) == 2, files
        missing = [f for f in files if os.path.realpath(f) not in synced]
        assert not missing, f"{pname}: not fsynced before its record: {missing}"
        checked += 1
    assert checked == 3
