"""``python -m data_prep.encode --out DIR --verify`` after a storage incident: several shard files
damaged in different ways (deleted, truncated, bytes flipped, unreadable), in real shard files.
--verify names every one with its reason, counts them, and its hint names every shard to re-encode
and the command; following the hint repairs the dataset, bit for bit."""
import errno
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.encode import encode_dataset, main
from mpdit_dist.data import manifest as mf
from tests.helpers.data import encoded_digits

REPO = Path(__file__).resolve().parents[2]


def _chmod_blocks_reads() -> bool:
    """Whether a chmod 000 file is unreadable to this process: not for root (os.geteuid() == 0),
    unless it runs without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (``setpriv --inh-caps=-dac_override,
    -dac_read_search --bounding-set=...`` runs this file so), hence tried rather than deduced."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        probe = Path(d) / "probe"
        probe.write_bytes(b"x")
        probe.chmod(0)
        try:
            probe.read_bytes()
        except PermissionError:
            return True
        return False


CHMOD_BLOCKS_READS = _chmod_blocks_reads()
# 30 digits, 4 per shard: 8 shards of 4 files each (wds tar + index, MDS part index + data), and
# the merged MDS index
SHARD_FILES, FILES = 32, 33


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """A finished dataset (never modified: each test damages a copy) and its ImageFolder."""
    tmp = tmp_path_factory.mktemp("verify_all")
    return encoded_digits(tmp, size=8, limit=30, formats="mds,wds", per_shard=4), tmp / "images"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _damage(out: Path) -> dict[str, str]:
    """Damage files of shards 1 to 5 (and 6 where chmod can make a file unreadable) in different
    ways; shards 0 and 7 stay intact. Returns {damaged file (relative): regex of its reason}."""
    expect = {}
    (out / "wds/shard-000001.tar").unlink()
    expect["wds/shard-000001.tar"] = r"missing"
    mds = out / "mds/part-000002/shard.00000.mds"
    size = mds.stat().st_size
    mds.write_bytes(mds.read_bytes()[:size // 2])
    expect["mds/part-000002/shard.00000.mds"] = (
        rf"truncated: {size // 2:,} bytes, mds/part-000002/index.json records {size:,}")
    tar = out / "wds/shard-000003.tar"
    size = tar.stat().st_size
    tar.write_bytes(tar.read_bytes()[:1000])
    expect["wds/shard-000003.tar"] = rf"truncated: 1,000 bytes, wds/shard-000003.idx.json records {size:,}"
    tar = out / "wds/shard-000004.tar"
    data = bytearray(tar.read_bytes())
    data[-1100] ^= 0xFF  # same size: only the checksum can tell
    tar.write_bytes(bytes(data))
    expect["wds/shard-000004.tar"] = r"sha256 differs from the manifest's [0-9a-f]{16}\.\.\."
    (out / "mds/part-000004/index.json").unlink()  # a second file of the same shard
    expect["mds/part-000004/index.json"] = r"missing"
    # unreadable even for root: a symlink loop where the file was (stat fails with ELOOP)
    idx = out / "wds/shard-000005.idx.json"
    idx.unlink()
    idx.symlink_to(idx.name)
    expect["wds/shard-000005.idx.json"] = r"unreadable: Too many levels of symbolic links \(ELOOP\)"
    if CHMOD_BLOCKS_READS:  # (as root: covered by the symlink loop above and the EIO below)
        (out / "mds/part-000006/shard.00000.mds").chmod(0)
        expect["mds/part-000006/shard.00000.mds"] = r"unreadable: Permission denied \(EACCES\)"
    return expect


def _shard_of(rel: str) -> int:
    return int(re.search(r"(?:shard-|part-)(\d{6})", rel).group(1))


def _check_report(text: str, out: Path, expect: dict[str, str], hint: bool = True) -> None:
    """Every damaged file named once with its reason, nothing else named, the count, and (the
    command's report) a hint whose records are exactly those of the damaged shards."""
    shards = sorted({_shard_of(rel) for rel in expect})
    assert f"{out}: {len(expect)} of {SHARD_FILES} shard files damaged ({FILES} files checked against the " \
           f"manifest):" in text, text
    named = re.findall(rf"^  {re.escape(str(out))}/(\S+): (.*)$", text, re.M)
    assert sorted(rel for rel, _ in named) == sorted(expect), text
    for rel, reason in named:
        assert re.fullmatch(expect[rel], reason), (rel, reason)
    if not hint:
        return
    records = " ".join(str(out / "parts" / f"part-{s:06d}.json") for s in shards)
    assert f"to re-encode the {len(shards)} damaged shards, delete their records ({records}) and run the encode " \
           f"command again (`python -m data_prep.encode --images IMAGES --out {out} --resolution 8 --vae identity " \
           f"--formats mds,wds --samples-per-shard 4 --store sample`, where IMAGES is the ImageFolder it was " \
           f"encoded from), then --verify" in text, text


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_PROCID", "LOCAL_RANK"):
        env.pop(k, None)
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_verify_command_lists_every_damaged_file_and_its_hint_repairs_them(encoded, tmp_path):
    """As a user runs it: the command's exit code, its report on stderr, and the hint followed to
    the letter (the named records deleted, the printed command run with IMAGES filled in)."""
    ref, images = encoded
    out = _copy(ref, tmp_path / "data")
    expect = _damage(out)
    r = _cli("-m", "data_prep.encode", "--out", out, "--verify")
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stdout == ""
    _check_report(r.stderr, out, expect)

    hint = r.stderr.strip().splitlines()[-1]
    records = re.search(r"delete their records \(([^)]*)\)", hint).group(1).split()
    for rec in records:
        Path(rec).unlink()
    command = shlex.split(re.search(r"`([^`]*)`", hint).group(1))
    assert command[:3] == ["python", "-m", "data_prep.encode"]
    command = [images if a == "IMAGES" else a for a in command[1:]] + ["--workers", "1"]
    r = _cli(*command)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["shards_written"] == len(records)
    r = _cli("-m", "data_prep.encode", "--out", out, "--verify")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout) == {"verified_files": FILES, "dataset": str(out)}
    assert _files(out) == _files(ref)  # the re-encoded shards are the original bytes


def test_verify_function_goes_on_past_io_errors(encoded, tmp_path, monkeypatch, capsys):
    """The same as functions, plus a read that fails with EIO (a disk error, injected: it cannot be
    made for real here): every file after it is still checked, and the result says which shards to
    re-encode; deleting their records and encoding again repairs the dataset."""
    ref, images = encoded
    out = _copy(ref, tmp_path / "data")
    expect = _damage(out)
    eio = out / "wds/shard-000007.tar"
    real_sha256 = mf.file_sha256

    def failing_sha256(path):
        if Path(path) == eio:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real_sha256(path)

    monkeypatch.setattr(mf, "file_sha256", failing_sha256)
    expect["wds/shard-000007.tar"] = r"unreadable: Input/output error \(EIO\)"
    with pytest.raises(mf.DamagedDataset) as err:
        mf.verify_checksums(out)
    damage = err.value
    assert isinstance(damage, ValueError)  # what callers catch
    assert (damage.checked, damage.shard_files) == (FILES, SHARD_FILES)
    assert damage.damaged_shards == sorted({_shard_of(rel) for rel in expect})
    assert {p.relative_to(out).as_posix(): sid for p, _, sid in damage.problems} == \
           {rel: _shard_of(rel) for rel in expect}
    _check_report(str(damage), out, expect, hint=False)

    assert main(["--out", str(out), "--verify"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    _check_report(captured.err, out, expect)

    monkeypatch.setattr(mf, "file_sha256", real_sha256)  # the disk works again
    for s in damage.damaged_shards:
        (out / "parts" / f"{mf.part_name(s)}.json").unlink()
    summary = encode_dataset(images, out, 8, "identity", "mds,wds", 4, workers=1, progress=False)
    assert summary["shards_written"] == len(damage.damaged_shards)
    assert mf.verify_checksums(out) == FILES
    assert main(["--out", str(out), "--verify"]) == 0
    assert json.loads(capsys.readouterr().out) == {"verified_files": FILES, "dataset": str(out)}
    assert _files(out) == _files(ref)


def test_verify_with_only_the_merged_index_damaged_says_finalize(encoded, tmp_path, capsys):
    """No shard to re-encode: the count says so and the hint is --finalize, which repairs it."""
    ref, _ = encoded
    out = _copy(ref, tmp_path / "data")
    index = out / "mds/index.json"
    index.write_bytes(index.read_bytes()[:-20])
    assert main(["--out", str(out), "--verify"]) == 2
    err = capsys.readouterr().err
    assert f"{out}: all {SHARD_FILES} shard files intact, 2 problems with the merged MDS index " \
           f"({FILES} files checked against the manifest):" in err
    assert f"{index}: sha256 differs from the manifest's mds_index_sha256" in err
    assert f"{index}: not valid JSON" in err
    assert "re-encode" not in err
    assert err.strip().endswith(f"`python -m data_prep.encode --out {out} --finalize` writes the merged MDS "
                                f"index again")
    assert main(["--out", str(out), "--finalize"]) == 0
    assert main(["--out", str(out), "--verify"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["verified_files"] == FILES
