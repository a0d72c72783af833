"""data_prep.encode interrupted where a lab's runs get interrupted: real processes killed (or failing
on a full disk) at chosen points, then the same command again; the result must be the bytes of an
uninterrupted run, or a refusal that names the file and the setting."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.encode import encode_dataset, main
from data_prep.fixtures import save_tiny_vae, write_digits_image_folder

REPO = Path(__file__).resolve().parents[2]

# Runs `python -m data_prep.encode ARGS` with faults injected from the environment:
#   FAULT_KILL=before_replace:NAME | after_replace:NAME  SIGKILL around the rename to a file named NAME
#   FAULT_TAG=TAG       every temp name uses TAG as its <host>-<pid> (a container restarted: same host, same pid)
#   FAULT_ENOSPC=PART:N  writes to files whose name contains PART fail with ENOSPC after N bytes
DRIVER = r'''
import builtins, errno, os, signal, sys
sys.path.insert(0, sys.argv[1])
from data_prep import encode
from mpdit_dist import fileio

kill = os.environ.get("FAULT_KILL")
if kill:
    when, name = kill.split(":", 1)
    real_replace = os.replace

    def replace(src, dst):
        if when == "before_replace" and os.path.basename(dst) == name:
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
        if when == "after_replace" and os.path.basename(dst) == name:
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace
if os.environ.get("FAULT_TAG"):
    fileio.temp_tag = lambda: os.environ["FAULT_TAG"]
if os.environ.get("FAULT_ENOSPC"):
    part, limit = os.environ["FAULT_ENOSPC"].rsplit(":", 1)
    real_open, written = builtins.open, [0]

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            written[0] += len(b)
            if written[0] > int(limit):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def __getattr__(self, k):
            return getattr(self.f, k)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    def fault_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return Full(f) if "w" in mode and part in os.path.basename(str(file)) else f

    builtins.open = fault_open
sys.exit(encode.main(sys.argv[2:]))
'''


def _encode(tmp_path, args, **faults):
    driver = tmp_path / "driver.py"
    if not driver.exists():
        driver.write_text(DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", **{f"FAULT_{k.upper()}": str(v) for k, v in faults.items()})
    for k in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_PROCID", "SLURM_NTASKS",
              "SLURM_STEP_ID", "LOCAL_RANK"):
        env.pop(k, None)
    return subprocess.run([sys.executable, str(driver), str(REPO), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)


def _files(out: Path) -> dict[str, bytes]:
    """Every file below ``out``, hidden ones included (a temp or lock file left behind counts)."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _assert_same(ref: Path, out: Path):
    a, b = _files(ref), _files(out)
    assert sorted(b) == sorted(a), f"extra {sorted(set(b) - set(a))}, missing {sorted(set(a) - set(b))}"
    for rel in a:
        assert a[rel] == b[rel], f"{rel} differs from the uninterrupted run"
    assert not [p for p in out.rglob(".*")], "hidden leftovers"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits_image_folder(tmp_path_factory.mktemp("digits") / "folder", size=8, limit=30)


def _cli(root, out, spp=4, formats="mds,wds"):
    return ["--images", root, "--out", out, "--resolution", 8, "--formats", formats, "--samples-per-shard", spp,
            "--workers", 1]


def test_killed_commits_and_finalizers_leave_nothing_behind(digits, tmp_path):
    """SIGKILL after a shard's record (before its claim's lock file is removed), then inside the
    finalize step before the merged MDS index is renamed and before manifest.json is renamed, all
    with one host-and-pid (a restarted container); each time the same command again. The last run
    completes, and the output holds the bytes of an uninterrupted run and nothing else."""
    out = tmp_path / "run"
    args = _cli(digits, out)
    for kill in ("after_replace:part-000002.json", "before_replace:index.json", "before_replace:manifest.json"):
        r = _encode(tmp_path, args, kill=kill, tag="node7-1")
        assert r.returncode == -9, (kill, r.stderr[-2000:])
    assert not (out / "manifest.json").exists()
    r = _encode(tmp_path, args, tag="node7-1")  # its merge directory name is the killed finalizer's
    assert r.returncode == 0, r.stderr[-2000:]
    encode_dataset(digits, tmp_path / "ref", 8, "identity", "mds,wds", 4, workers=1, progress=False)
    _assert_same(tmp_path / "ref", out)
    assert main(["--out", str(out), "--verify"]) == 0


def test_other_vae_weights_under_the_same_path_are_refused(digits, tmp_path, capsys):
    """Half the shards (rank 0 of 2, e.g. one SLURM array task) encoded with one VAE; the directory
    then holds other weights (same config, same name): the other half must not be encoded with them
    and mixed in. With the original weights back, the rest completes."""
    vae, out = tmp_path / "vae", tmp_path / "run"
    save_tiny_vae(vae, seed=0)
    encode_dataset(digits, out, 8, str(vae), "mds", 4, rank=0, world_size=2, workers=1, progress=False)
    records = sorted(p.name for p in (out / "parts").glob("part-*.json"))
    assert len(records) == 4
    shutil.rmtree(vae)
    save_tiny_vae(vae, seed=1)
    r = _encode(tmp_path, [*_cli(digits, out, formats="mds"), "--vae", vae, "--rank", 1, "--world-size", 2])
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"{out / 'encode_config.json'} records them; 4 of 8 shards done" in r.stderr
    assert f"--vae {vae}: other weights under the same name" in r.stderr
    assert sorted(p.name for p in (out / "parts").glob("part-*.json")) == records  # nothing written
    shutil.rmtree(vae)
    save_tiny_vae(vae, seed=0)
    s = encode_dataset(digits, out, 8, str(vae), "mds", 4, rank=1, world_size=2, workers=1, progress=False)
    assert s["shards_written"] == 4 and s["dataset_samples"] == 30


def test_verify_names_the_records_to_delete_and_the_rerun_repairs(digits, tmp_path, capsys):
    """Shard files damaged after the encode (a bad copy, a disk error): --verify names them and the
    records to delete; deleted, the same command re-encodes those shards only, bit for bit."""
    out = tmp_path / "run"
    args = [str(a) for a in _cli(digits, out)]
    assert main(args) == 0
    shutil.copytree(out, tmp_path / "ref")
    tar = out / "wds" / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[:1000])  # truncated
    mds = out / "mds" / "part-000005" / "shard.00000.mds"
    mds.write_bytes(mds.read_bytes()[:-1] + b"\0")  # one byte changed
    capsys.readouterr()
    assert main(["--out", str(out), "--verify"]) == 2
    err = capsys.readouterr().err
    rec1, rec5 = out / "parts" / "part-000001.json", out / "parts" / "part-000005.json"
    assert f"delete their records ({rec1} {rec5}) and run the encode command again" in err
    rec1.unlink()
    rec5.unlink()
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["shards_written"] == 2
    _assert_same(tmp_path / "ref", out)
    assert main(["--out", str(out), "--verify"]) == 0


def test_a_full_disk_names_the_shard_and_the_rerun_completes(digits, tmp_path):
    """ENOSPC while shard 3's tar is written: the error names the shard and --out and says what to do;
    with space again, the same command gives the bytes of an uninterrupted run."""
    out = tmp_path / "run"
    args = _cli(digits, out)
    r = _encode(tmp_path, args, enospc="shard-000003.tar:2000")
    assert r.returncode == 2
    assert f"error: [Errno {errno.ENOSPC}] No space left on device: writing shard 3 under {out}" in r.stderr
    assert "free space and run the same command again" in r.stderr
    r = _encode(tmp_path, args)
    assert r.returncode == 0, r.stderr[-2000:]
    encode_dataset(digits, tmp_path / "ref", 8, "identity", "mds,wds", 4, workers=1, progress=False)
    _assert_same(tmp_path / "ref", out)
