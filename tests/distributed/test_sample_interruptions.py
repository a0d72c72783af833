"""The sampling job (``python -m mpdit_dist.sample``, also under torchrun) killed, failing, restarted
or run twice, with real processes and files: the npz equals an uninterrupted run's, bit for bit, or
the job is refused with a message naming the file. Faults are injected by a driver script that
wraps ``numpy.savez`` / ``os.replace`` in the sampling process (tiny exported model, CPU)."""
import json
import os
import shutil
import subprocess
import time

import numpy as np
import pytest
import torch

from tests.helpers.runs import PY, REPO, TORCHRUN, env

ARGS = ["--num-samples", "12", "--batch-size", "2", "--steps", "3", "--sampler", "euler_maruyama", "--cfg-scale", "2",
        "--seed", "1", "--device", "cpu", "--keep-parts"]  # kept: the tests damage or remove some

DRIVER = r'''
import errno, json, os, signal, sys, time
import numpy as np
import mpdit_dist.sample as sample

fault = json.loads(os.environ.get("SAMPLE_FAULT", "{}"))
rank = int(os.environ.get("RANK", "0"))
real_savez, real_replace = np.savez, os.replace

def savez(file, **arrays):
    name = os.path.basename(getattr(file, "name", str(file))).lstrip(".")  # temp names: .<name>.<tag>.tmp
    f = fault.get("savez")
    if f and name.startswith(f["match"]) and rank == f.get("rank", 0):
        if f["action"] == "pause":  # hold this write until the test says go
            open(f["marker"], "w").close()
            while not os.path.exists(f["go"]):
                time.sleep(0.05)
        else:  # half of the file written, then the process dies or the disk is full
            real_savez(file, **arrays)
            file.flush()
            file.truncate(file.tell() // 2)
            file.flush()
            if f["action"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_savez(file, **arrays)

def replace(src, dst):
    real_replace(src, dst)
    if os.path.basename(str(dst)) == fault.get("kill_after_replace"):
        os.kill(os.getpid(), signal.SIGKILL)

np.savez, os.replace = savez, replace
sample.main(sys.argv[1:])
'''


def _export(path, seed):
    from mpdit_dist.export import save_exported
    from mpdit_dist.models import MPDiT
    from mpdit_dist.models.mpdit import ModelArgs

    torch.manual_seed(seed)
    args = ModelArgs(stages=((4, 1), (2, 1)), hidden_size=32, num_heads=2, input_size=8, in_channels=3,
                     num_classes=6, num_condition_tokens=4)
    model = MPDiT(args)
    with torch.no_grad():  # away from the zero initialisation, so that weights, CFG and steps show in the images
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    manifest = {"num_classes": 6, "encoder": {"id": "identity"}, "latent_mean": [0.0] * 3, "latent_std": [1.0] * 3}
    return save_exported(model, path, {"manifest": manifest, "step": 1, "config": {"data": {"normalize": True}}})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("interruptions")
    (root / "driver.py").write_text(DRIVER)
    w0, w1 = _export(root / "w0.safetensors", 0), _export(root / "w1.safetensors", 1)
    ref = {}
    for w in (w0, w1):  # uninterrupted runs
        proc = _run(root, w, root / f"ref_{w.stem}.npz")
        assert proc.returncode == 0, proc.stderr[-3000:]
        ref[w] = _load(root / f"ref_{w.stem}.npz")
    assert not np.array_equal(ref[w0][0], ref[w1][0])
    return root, w0, w1, ref


def _run(root, weights, out, *extra, nproc=0, fault=None, wait=True):
    args = [str(root / "driver.py"), "--checkpoint", str(weights), *ARGS, "--out", str(out), *extra]
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *args] if nproc else [PY, *args]
    e = env({"SAMPLE_FAULT": json.dumps(fault)} if fault else None)
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=300)


def _load(out):
    with np.load(out) as z:
        return z["arr_0"], z["arr_1"]


def _same(out, reference):
    img, lab = _load(out)
    return np.array_equal(img, reference[0]) and np.array_equal(lab, reference[1])


def _leftovers(out):
    parts = out.with_name(out.name + ".parts")
    return sorted(p.name for p in [*out.parent.glob(f".{out.name}.*.tmp"), *out.parent.glob(out.name + ".tmp*"),
                                   *parts.glob("*tmp*")])


def test_a_second_job_on_the_same_out_is_refused_while_the_first_runs(tmp_path, setup):
    """Two jobs writing one --out at once: the second (other steps, two ranks) used to discard the
    first's parts, and each merged the other's parts as its own (an npz that says steps 3 holding
    steps-5 samples). Now the second is refused, naming the holder; the first ends as if alone."""
    root, w0, _, ref = setup
    out = tmp_path / "s.npz"
    marker, go = tmp_path / "paused", tmp_path / "go"
    first = _run(root, w0, out, wait=False,
                 fault={"savez": {"match": "part_000002", "action": "pause", "marker": str(marker), "go": str(go)}})
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.1)
        second = _run(root, w0, out, "--steps", "5", nproc=2)
        assert second.returncode != 0
        assert f"another sampling job (pid {first.pid} on " in second.stderr
        assert f"is writing {out}.parts: wait for it to end, or give this job another --out" in second.stderr
        go.touch()
        _, err = first.communicate(timeout=120)
    finally:
        go.touch()
        first.kill() if first.poll() is None else None
    assert first.returncode == 0, err[-3000:]
    assert _same(out, ref[w0]) and json.loads(out.with_suffix(".json").read_text())["steps"] == 3
    # once the first has ended, the same command runs (the lock ends with its process)
    assert _run(root, w0, out, "--steps", "5").returncode == 0


def test_other_weights_at_the_same_path_are_not_resumed_the_same_weights_elsewhere_are(tmp_path, setup):
    """Parts are matched on a digest of the weights, not on the file's path: an export replaced at the
    same path used to resume the old weights' parts silently (a mix of two models); the same file
    copied elsewhere (or named by another path) used to discard every part."""
    root, w0, w1, ref = setup
    weights, out = tmp_path / "w.safetensors", tmp_path / "s.npz"
    parts = out.with_name(out.name + ".parts")
    shutil.copy(w0, weights)
    assert _run(root, weights, out).returncode == 0
    shutil.copy(w1, weights)  # re-exported to the same path
    (parts / "part_000004.npz").unlink()
    proc = _run(root, weights, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "holds 5 parts sampled with other settings (weights: " in proc.stderr
    assert _same(out, ref[w1])
    # the same weights at another path, named relatively: the parts are kept
    moved = tmp_path / "elsewhere" / "copy.safetensors"
    moved.parent.mkdir()
    shutil.copy(weights, moved)
    kept = {p.name: p.stat().st_mtime_ns for p in parts.glob("part_*.npz")}
    (parts / "part_000001.npz").unlink()
    proc = _run(root, os.path.relpath(moved, REPO), out)
    assert proc.returncode == 0 and "other settings" not in proc.stderr, proc.stderr[-3000:]
    assert all(parts.joinpath(n).stat().st_mtime_ns == t for n, t in kept.items() if n != "part_000001.npz")
    assert _same(out, ref[w1])


def test_damaged_parts_are_sampled_again(tmp_path, setup):
    """A truncated, an empty and a bit-flipped part, and one holding other samples: each is named,
    sampled again (on another number of ranks), and the npz is the uninterrupted one. They used to be
    taken as finished and the merge failed with a bare zipfile error."""
    root, w0, _, ref = setup
    out = tmp_path / "s.npz"
    parts = out.with_name(out.name + ".parts")
    assert _run(root, w0, out).returncode == 0
    out.unlink()
    data = (parts / "part_000001.npz").read_bytes()
    (parts / "part_000001.npz").write_bytes(data[: len(data) // 2])
    (parts / "part_000002.npz").write_bytes(b"")
    flipped = bytearray((parts / "part_000003.npz").read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    (parts / "part_000003.npz").write_bytes(bytes(flipped))
    shutil.copy(parts / "part_000000.npz", parts / "part_000005.npz")
    kept = (parts / "part_000004.npz").stat().st_mtime_ns
    proc = _run(root, w0, out, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for p in (1, 2, 3):
        assert f"{parts / f'part_{p:06d}.npz'}: unreadable" in proc.stderr
    assert f"{parts / 'part_000005.npz'}: does not hold the planned samples" in proc.stderr
    assert (parts / "part_000004.npz").stat().st_mtime_ns == kept
    assert _same(out, ref[w0])


def test_kill_mid_write_then_resume_on_another_number_of_ranks(tmp_path, setup):
    """SIGKILL of one rank halfway through writing a part ends the torchrun job; one process then
    finishes it: the same npz, and no temporary file is left behind."""
    root, w0, _, ref = setup
    out = tmp_path / "s.npz"
    proc = _run(root, w0, out, nproc=2, fault={"savez": {"match": "part_000003", "rank": 1, "action": "kill"}})
    assert proc.returncode != 0 and not out.exists()
    assert any(n.startswith(".part_000003.npz.") and n.endswith(".tmp") for n in _leftovers(out))
    proc = _run(root, w0, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _same(out, ref[w0]) and _leftovers(out) == []


@pytest.mark.parametrize("target", ["part_000002", "s.npz"])
def test_disk_full_names_the_file_and_leaves_no_partial_file(tmp_path, setup, target):
    """A full disk while writing a part, or the final npz (50,000 samples at 512 px are 39 GB): the
    message names the file, the partial temporary file is removed (it used to stay, holding the space),
    and the same command then gives the uninterrupted npz."""
    root, w0, _, ref = setup
    out = tmp_path / "s.npz"
    proc = _run(root, w0, out, fault={"savez": {"match": target, "action": "enospc"}})
    assert proc.returncode != 0 and not out.exists()
    written = out if target == "s.npz" else out.with_name(out.name + ".parts") / f"{target}.npz"
    assert f"could not write {written}: [Errno 28] No space left on device" in proc.stderr
    assert "Traceback" not in proc.stderr and _leftovers(out) == []
    assert _run(root, w0, out).returncode == 0 and _same(out, ref[w0])


def test_merge_killed_after_the_npz_leaves_no_settings_of_another_job(tmp_path, setup):
    """A job with other settings into an existing --out, killed between writing the npz and its
    settings file: the old settings file used to stay beside the new samples (an npz of CFG 2 that
    says CFG 4). Now none is there until the rerun writes it."""
    root, w0, _, ref = setup
    out = tmp_path / "s.npz"
    assert _run(root, w0, out, "--cfg-scale", "4").returncode == 0
    proc = _run(root, w0, out, fault={"kill_after_replace": "s.npz"})
    assert proc.returncode != 0 and _same(out, ref[w0])
    assert f"{out} exists, sampled with other settings (cfg_scale: 4.0 -> 2.0); this job replaces it" in proc.stderr
    assert not out.with_suffix(".json").exists()
    assert _run(root, w0, out).returncode == 0 and _same(out, ref[w0])
    assert json.loads(out.with_suffix(".json").read_text())["cfg_scale"] == 2.0
