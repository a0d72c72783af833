"""mpdit_dist.fileio: files written whole or not at all, and calls tried again after a failure."""
import errno
import json
import os
import signal
import subprocess
import sys

import pytest

from mpdit_dist import fileio
from tests.helpers.runs import REPO


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(fileio, "RETRY_WAITS_S", (0.01, 0.01, 0.01))


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "a.json"
    fileio.write_json_atomic(path, {"v": 1})
    with pytest.raises(RuntimeError, match="mid-write"):
        with fileio.atomic_write(path, "w") as f:
            f.write('{"v": 2')
            raise RuntimeError("mid-write")
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_full_disk_names_the_error_and_removes_the_temporary_file(tmp_path):
    path = tmp_path / "b.bin"

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as err:
        with fileio.atomic_write(path) as f:
            Full(f).write(b"x" * 10)
    assert err.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_a_killed_writer_leaves_only_a_temporary_file_that_temp_files_of_finds(tmp_path):
    path = tmp_path / "c [1].npz"  # glob characters in the name are matched literally
    path.write_bytes(b"old")
    script = ("import os, signal, sys\nfrom mpdit_dist import fileio\n"
              "with fileio.atomic_write(sys.argv[1]) as f:\n"
              "    f.write(b'half'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(path)], cwd=REPO, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == b"old"
    left = fileio.temp_files_of(path)
    assert len(left) == 1 and left[0].read_bytes() == b"half"
    assert left[0].name.startswith(".c [1].npz.") and left[0].name.endswith(".tmp")
    assert fileio.temp_files_of(tmp_path / "c") == []  # another file's temporaries are not its own


def test_atomic_path_for_writers_that_take_a_name(tmp_path):
    path = tmp_path / "w.txt"
    with fileio.atomic_path(path, durable=True) as tmp:
        assert tmp.parent == path.parent and tmp != path
        tmp.write_text("done")
        assert not path.exists()  # not visible before the block ends
    assert path.read_text() == "done" and not tmp.exists()


def test_write_json_exclusive_creates_once(tmp_path):
    path = tmp_path / "claim.json"
    assert fileio.write_json_exclusive(path, {"holder": 1})
    assert not fileio.write_json_exclusive(path, {"holder": 2})
    assert json.loads(path.read_text()) == {"holder": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["claim.json"]


def test_atomic_write_refuses_other_modes(tmp_path):
    with pytest.raises(ValueError, match="'a'"):
        with fileio.atomic_write(tmp_path / "x", "a"):
            pass


def test_with_retries_tries_again_then_succeeds(fast_retries):
    tries, told = [], []

    def flaky():
        tries.append(1)
        if len(tries) < 3:
            raise FileNotFoundError(errno.ENOENT, "missing for a moment")
        return "ok"

    assert fileio.with_retries(flaky, on_retry=lambda exc, wait: told.append((type(exc), wait))) == "ok"
    assert len(tries) == 3 and told == [(FileNotFoundError, 0.01)] * 2


def test_with_retries_raises_the_last_error_after_every_wait(fast_retries):
    tries = []

    def broken():
        tries.append(1)
        raise OSError(errno.EIO, f"I/O error {len(tries)}")

    with pytest.raises(OSError, match="I/O error 4"):
        fileio.with_retries(broken)
    assert len(tries) == 4  # the first try and one after each of the three waits


def test_with_retries_does_not_retry_what_retry_if_refuses(fast_retries):
    tries = []

    def refused():
        tries.append(1)
        raise ValueError("a permanent error")

    with pytest.raises(ValueError, match="permanent"):
        fileio.with_retries(refused)  # only OSError is retried by default
    assert len(tries) == 1
    with pytest.raises(ValueError):
        fileio.with_retries(lambda: 1, first_error=ValueError("the caller's first try"))


def test_with_retries_continues_from_the_callers_first_try(fast_retries):
    tries = []
    out = fileio.with_retries(lambda: tries.append(1) or "second", first_error=OSError(errno.ESTALE, "stale"))
    assert out == "second" and len(tries) == 1


def test_lock_file_exclusive_shared_and_a_removed_lock_file(tmp_path):
    path = tmp_path / "x.lock"
    held = fileio.lock_file(path, blocking=False)
    assert held is not None
    assert fileio.lock_file(path, blocking=False) is None  # a second holder is refused
    assert fileio.lock_file(path, blocking=False, shared=True) is None
    path.unlink()  # the holder removes the file while holding it: the next claimant gets a new one
    again = fileio.lock_file(path, blocking=False)
    assert again is not None and path.exists()
    os.close(held)
    os.close(again)
    a = fileio.lock_file(path, blocking=False, shared=True)
    b = fileio.lock_file(path, blocking=False, shared=True)  # shared holders do not exclude each other
    assert a is not None and b is not None
    assert fileio.lock_file(path, blocking=False) is None
    os.close(a)
    os.close(b)
