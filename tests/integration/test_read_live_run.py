"""The tools that read a run's checkpoints while that run still trains and saves: ``python -m
mpdit_dist.export RUN``, ``mpdit_dist.sample --run-dir RUN`` (:func:`load_for_sampling`) and a warm
start ``train.init_from=RUN`` (CPU, real checkpoints of a tiny run, real files).

The run publishes a checkpoint by renaming ``tmp-step_*``, deletes old ones by renaming them to
``deleting-step_*`` (retention), and replaces a checkpoint saved twice through ``replaced-step_*``.
The awkward moments are provoked deterministically: a hook on the reader's own calls (listing,
checksumming, DCP's metadata and shard reads) does what the trainer would do at that moment, with
the trainer's own code (:meth:`CheckpointManager._retain`, :func:`_move_into_place`).

What a user expects: the weights of one complete, verified checkpoint (the newest one when the one
the tool started on vanishes under it, with a warning that says so), or an error that names the
checkpoint and what happened; never a half-read model, and nothing in the live run's directory
changed. (It used to fail with DCP's ``CheckpointException`` or an ``AssertionError`` about
``.metadata``, or report every checkpoint "damaged: COMPLETE.json missing" after a publish.)"""
from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from mpdit_dist import checkpoint as ck
from mpdit_dist import fileio
from mpdit_dist.export import load_checkpoint_weights, load_exported, load_weights_into
from mpdit_dist.export import main as export_main
from mpdit_dist.sample import load_for_sampling
from tests.helpers.runs import spawn_ranks, train

PG_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, npz):
    """A finished run with a checkpoint at each of steps 1 to 4 (the source of every test's live run)."""
    run = tmp_path_factory.mktemp("pristine") / "run"
    train(run, npz, ["train.steps=4", "train.ckpt_every=1", "checkpoint.keep_last=4"])
    assert [s for s, _ in ck.list_checkpoints(run / "checkpoints")] == [4, 3, 2, 1]
    return run


@pytest.fixture
def live(tmp_path, pristine, monkeypatch):
    """(run dir with steps 1-3 published, step 4's checkpoint kept aside: the trainer's next save).
    Retries wait nothing (the tool's waits are the shared :data:`fileio.RETRY_WAITS_S`)."""
    monkeypatch.setattr(fileio, "RETRY_WAITS_S", (0.0, 0.0, 0.0))
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    aside = tmp_path / "next_save"
    os.replace(run / "checkpoints" / "step_00000004", aside)
    return run, aside


def _publish(run: Path, written: Path) -> Path:
    """The trainer's publication of a finished save: written into tmp-step_*, renamed in one go."""
    name = ck.step_dir_name(json.loads((written / "trainer.json").read_text())["step"])
    tmp = run / "checkpoints" / ("tmp-" + name)
    shutil.copytree(written, tmp)
    os.replace(tmp, run / "checkpoints" / name)
    return run / "checkpoints" / name


def _save_and_retain(run: Path, written: Path, keep_last: int = 1) -> None:
    """A save of the run at this moment: publish, then the run's own retention (keep_last=1: every
    older checkpoint goes, through deleting-step_*)."""
    newest = _publish(run, written)
    ck.CheckpointManager(run, keep_last=keep_last)._retain(int(newest.name[len("step_"):]))


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    model, _, _ = load_checkpoint_weights(checkpoint=str(checkpoint))
    return model.state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _once(fn):
    """``fn`` on the first call of the hooked function only."""
    fired = []

    def hook():
        if not fired:
            fired.append(True)
            fn()
    return hook


def _hook(monkeypatch, where: str, action) -> None:
    """Run ``action()`` the first time the reader reaches ``where``, then go on as the reader would."""
    action = _once(action)
    if where == "listing":  # right after the tool listed the checkpoints
        real_list = ck.list_checkpoints

        def listing(root):
            found = real_list(root)
            action()
            return found
        monkeypatch.setattr(ck, "list_checkpoints", listing)
    elif where == "checksums":  # while the tool verifies the newest
        real_checksum = ck._checksum_file

        def checksum(path, sync=False):
            action()
            return real_checksum(path, sync)
        monkeypatch.setattr(ck, "_checksum_file", checksum)
    else:  # "metadata", "shards": inside DCP's load, after the verification
        method = {"metadata": "read_metadata", "shards": "read_data"}[where]
        real = getattr(FileSystemReader, method)

        def reading(self, *args, **kwargs):
            action()
            return real(self, *args, **kwargs)
        monkeypatch.setattr(FileSystemReader, method, reading)


def _snapshot(run: Path) -> dict[str, tuple]:
    return {str(p.relative_to(run)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in sorted(run.rglob("*"))}


def _read_with(tool: str, run: Path, tmp_path: Path) -> tuple[dict[str, torch.Tensor], int]:
    """(EMA weights, step) that ``tool`` read from the newest checkpoint of ``run``."""
    if tool == "export":
        out = tmp_path / "ema.safetensors"
        export_main([str(run), "--out", str(out), "--ema"])
        model, meta = load_exported(out)
        return model.state_dict(), meta["step"]
    model, _, info = load_for_sampling(run_dir=str(run))
    return model.state_dict(), info["step"]


@pytest.mark.parametrize("tool", ["export", "sample"])
@pytest.mark.parametrize("where", ["listing", "checksums", "metadata", "shards"])
def test_the_newest_deleted_under_the_tool_reads_the_next_newest(tmp_path, live, monkeypatch, caplog, where, tool):
    """The run saves step 4 and retention (keep_last=1) deletes steps 1-3 while the tool is on step 3:
    the tool reads step 4, whole, with a warning naming step 3."""
    run, step4 = live
    want = _weights(step4)
    _hook(monkeypatch, where, lambda: _save_and_retain(run, step4))
    got, step = _read_with(tool, run, tmp_path)
    assert step == 4 and _same(got, want)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "again" in r.getMessage()]
    assert len(warned) == 1 and "step_00000003 was removed" in warned[0], warned
    assert "reading the newest checkpoint" in warned[0]
    # DCP's own warnings (with a traceback each) about a vanished .metadata are muted: the one line says it
    assert not [r for r in caplog.records if "metadata is not found" in r.getMessage()]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000004"]


def test_deleted_without_a_newer_one_falls_back_to_the_previous(tmp_path, live, monkeypatch, caplog):
    """The newest is deleted mid-load with no newer one in place (a user, or a run cleaned by hand):
    the previous checkpoint is read, and the warning says why."""
    run, _ = live
    newest = run / "checkpoints" / "step_00000003"
    _hook(monkeypatch, "shards", lambda: ck._remove(newest))
    got, step = _read_with("sample", run, tmp_path)
    assert step == 2 and _same(got, _weights(run / "checkpoints" / "step_00000002"))
    assert "step_00000003 was removed while it was being read" in caplog.text


def test_a_checkpoint_replaced_under_the_tool_is_read_again_whole(tmp_path, live, monkeypatch, caplog):
    """A second save of step 3 (a resumed run saving its step again) renames the old one aside and
    the new one into place while the tool reads step 3's shards. Without the check the tool would
    mix the old directory's metadata with the new one's shards; it reads the new one again, whole."""
    run, _ = live
    root = run / "checkpoints"
    new_content = tmp_path / "resaved"
    shutil.copytree(root / "step_00000002", new_content)  # another step-3 checkpoint (other weights)
    want = _weights(new_content)
    assert not _same(want, _weights(root / "step_00000003"))

    def resave():
        tmp = root / "tmp-step_00000003"
        shutil.copytree(new_content, tmp)
        ck._move_into_place(tmp, root / "step_00000003", 3)

    _hook(monkeypatch, "shards", resave)
    model, _, info = load_for_sampling(run_dir=str(run))
    assert info["source"] == str((root / "step_00000003").resolve())
    assert _same(model.state_dict(), want)
    assert "step_00000003 was replaced (a new save of its step)" in caplog.text


def test_a_run_that_deletes_faster_than_the_tool_reads_stops_it_with_a_message(tmp_path, live, monkeypatch, caplog):
    """keep_last=1 and a save at every step, faster than a read: every try loses its checkpoint. The
    export stops naming the run, what happened and what to do; no file is written."""
    run, _ = live
    root = run / "checkpoints"
    real = FileSystemReader.read_data

    def outpaced(self, *args, **kwargs):  # a newer save replaces the newest as soon as it is read
        step, newest = ck.list_checkpoints(root)[0]
        os.replace(newest, root / ck.step_dir_name(step + 1))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FileSystemReader, "read_data", outpaced)
    out = tmp_path / "ema.safetensors"
    with pytest.raises(SystemExit) as exc:
        export_main([str(run), "--out", str(out), "--ema"])
    message = str(exc.value.code)
    assert f"could not read a checkpoint of {run}" in message and "4 times in a row" in message
    assert "checkpoint.keep_last" in message and "step_00000006 was removed while it was being read" in message
    assert caplog.text.count("reading the newest checkpoint") == 3
    assert not out.exists() and not list(tmp_path.glob(".ema.safetensors*"))


def test_a_named_checkpoint_deleted_mid_load_is_an_error_that_says_so(live, monkeypatch):
    run, _ = live
    named = run / "checkpoints" / "step_00000002"
    _hook(monkeypatch, "shards", lambda: ck._remove(named))
    with pytest.raises(ck.CheckpointError) as exc:
        load_for_sampling(checkpoint=str(named))
    message = str(exc.value)
    assert f"checkpoint {named} was removed while it was being read" in message
    assert "FileNotFoundError" in message and "Name a newer checkpoint" in message


def test_leftovers_of_the_writer_are_never_read_and_nothing_is_changed(tmp_path, live, caplog):
    """A live (or stopped, not yet restarted) run's directory as the tools find it: an unpublished
    finished save (tmp-, which only the trainer's clean_partial makes visible), a retention
    deletion under way (deleting-), a checkpoint renamed aside by a second save (replaced-), and a
    newest published checkpoint that fails its checksums (partially copied). The tools read step
    3, warn about step 4, and leave every file as it was (names, sizes, times)."""
    run, step4 = live
    root = run / "checkpoints"
    shutil.copytree(step4, root / "tmp-step_00000005")
    (root / "tmp-step_00000005" / ck.COMPLETE).unlink()
    os.replace(root / "step_00000001", root / "deleting-step_00000001")
    shutil.copytree(root / "step_00000002", root / "replaced-step_00000002")
    shutil.copytree(step4, root / "step_00000004")
    shard = next((root / "step_00000004").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    before = _snapshot(run)
    want = _weights(root / "step_00000003")
    caplog.clear()

    got, step = _read_with("export", run, tmp_path)
    assert step == 3 and _same(got, want)
    assert "step_00000004 is damaged" in caplog.text and "falling back to the one before" in caplog.text
    got, step = _read_with("sample", run, tmp_path)
    assert step == 3 and _same(got, want)
    from mpdit_dist.models import MPDiT

    model = MPDiT(load_exported(tmp_path / "ema.safetensors")[0].args)
    load_weights_into(model, str(run))
    assert _same(model.state_dict(), want)
    assert _snapshot(run) == before


def test_no_published_checkpoint_names_what_is_there(tmp_path, live):
    """Before the run's first publication (or after a crash between the two renames of a second
    save): no step_* yet. The message names what the directory holds; nothing is read from a tmp-
    or replaced- directory, also when it is named explicitly, and nothing is changed."""
    run, step4 = live
    root = run / "checkpoints"
    for _, p in ck.list_checkpoints(root):
        shutil.rmtree(p)
    shutil.copytree(step4, root / "tmp-step_00000004")
    shutil.copytree(step4, root / "replaced-step_00000004")
    before = _snapshot(run)
    with pytest.raises(SystemExit) as exc:
        export_main([str(run), "--out", str(tmp_path / "e.safetensors")])
    message = str(exc.value.code)
    assert f"no published checkpoint under {root}" in message
    assert "tmp-step_00000004 (a save in progress" in message and "replaced-step_00000004 (a checkpoint" in message
    with pytest.raises(ck.CheckpointError, match="tmp-step_00000004 is not a published checkpoint"):
        load_for_sampling(checkpoint=str(root / "tmp-step_00000004"))
    from mpdit_dist.models import MPDiT

    with pytest.raises(FileNotFoundError, match=f"train.init_from={run}: no published checkpoint"):
        load_weights_into(MPDiT(_args_of(step4)), str(run))
    assert _snapshot(run) == before


def _args_of(checkpoint: Path):
    model, _, _ = load_checkpoint_weights(checkpoint=str(checkpoint))
    return model.args


def test_a_warm_start_from_a_live_run_directory(tmp_path, live, npz, caplog):
    """``train.init_from=<run dir>``: the newest intact checkpoint's EMA weights start the new run
    (the real trainer; lr 0 keeps them), and the source run's directory is left as it was."""
    run, _ = live
    before = _snapshot(run)
    want = _weights(run / "checkpoints" / "step_00000003")
    proc = train(tmp_path / "b", npz, ["train.steps=1", "train.ckpt_every=1", "optim.lr=0", f"train.init_from={run}"])
    assert "step_00000003" in proc.stderr  # the log says which checkpoint it started from
    got, _, _ = load_checkpoint_weights(run_dir=str(tmp_path / "b"), use_ema=False)
    assert _same(got.state_dict(), want)
    assert _snapshot(run) == before


def _ranks_worker(rank, port, run, step4, out):
    """Both ranks read the newest checkpoint together; on rank 1 only, the run saves step 4 and deletes
    the others while that rank reads step 3's shards."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    fileio.RETRY_WAITS_S = (0.0, 0.0, 0.0)
    run, step4 = Path(run), Path(step4)
    if rank == 1:
        real = FileSystemReader.read_data
        fire = _once(lambda: _save_and_retain(run, step4))

        def reading(self, *args, **kwargs):
            fire()
            return real(self, *args, **kwargs)
        FileSystemReader.read_data = reading
    try:
        model, _, info = load_checkpoint_weights(run_dir=str(run))
        from mpdit_dist.export import weights_sha256

        result = {"source": info["source"], "step": info["step"], "sha": weights_sha256(model)}
    except Exception as exc:  # noqa: BLE001 - recorded, asserted by the test
        result = {"error": f"{type(exc).__name__}: {exc}"}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_ranks_read_the_same_checkpoint_when_one_meets_a_deletion(tmp_path, live):
    """``torchrun -m mpdit_dist.sample --run-dir`` and a multi-rank warm start: rank 0 picks the
    checkpoint and every rank reads that one; a rank that meets a deletion makes all start again
    (no hang, no two ranks on different steps)."""
    from mpdit_dist.export import weights_sha256

    run, step4 = live
    out = tmp_path / "out"
    out.mkdir()
    spawn_ranks(_ranks_worker, (str(run), str(step4), str(out)), nprocs=2, deadline_s=4 * PG_TIMEOUT_S)
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    model, _, _ = load_checkpoint_weights(checkpoint=str(step4))
    for result in results:
        assert result.get("step") == 4, results
        assert result["source"] == str((run / "checkpoints" / "step_00000004").resolve())
        assert result["sha"] == weights_sha256(model)
