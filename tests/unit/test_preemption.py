"""The stop flag of mpdit_dist.preemption under signals that come at awkward moments."""
import subprocess
import sys
import textwrap

from tests.helpers.runs import REPO, env

# A second signal (SLURM's SIGTERM right after the warning signal, a user's second scancel) whose
# handler runs while the first handler is still setting the flag: the tracer sends SIGTERM at
# every line executed inside the first (SIGUSR2) handler and whatever it calls, so the second
# handler runs nested at each of those moments.
NESTED = textwrap.dedent("""
    import os, signal, sys
    from mpdit_dist import preemption

    preemption.install_signal_handlers()
    sent = [0]

    def tracer(frame, event, arg):
        if event == "line" and sent[0] < 200:
            sent[0] += 1
            os.kill(os.getpid(), signal.SIGTERM)
        return tracer

    def first():
        os.kill(os.getpid(), signal.SIGUSR2)

    sys.settrace(tracer)
    first()
    sys.settrace(None)
    print("stopped", preemption.stop_requested(), sent[0] > 0, sorted(set([preemption.stop_reason()])), flush=True)
""")


def test_a_second_signal_during_the_first_handler_does_not_hang():
    """The handlers must take no lock: with a ``threading.Event`` behind the flag, a nested handler
    waited forever for the lock its interrupted caller held (the process then ignored SIGTERM)."""
    try:
        proc = subprocess.run([sys.executable, "-c", NESTED], cwd=REPO, env=env(), capture_output=True, text=True,
                              timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError("a signal that arrived while the first signal's handler ran hung the process") from None
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[:3] == ["stopped", "True", "True"], proc.stdout


def test_stop_flag_reasons_and_clear():
    from mpdit_dist import preemption

    preemption.clear()
    try:
        assert not preemption.stop_requested() and preemption.stop_reason() is None
        preemption.request_stop("SIGUSR2")
        preemption.request_stop("SIGTERM")
        assert preemption.stop_requested() and preemption.stop_reason() == "SIGTERM"
    finally:
        preemption.clear()
    assert not preemption.stop_requested()


def test_train_py_exit_status_after_a_stop_is_the_signals():
    """A run stopped before its last step must not exit 0 like a finished one (a job system or
    ``torchrun --max-restarts`` would take it for done): 128 + the signal, SIGTERM's when among them."""
    import signal

    from mpdit_dist.trainer import stop_exit_status

    def result(status, reasons=()):
        return {"status": status, "step": 3, "run_dir": "r", "stop_reasons": list(reasons)}

    assert stop_exit_status(result("finished")) == 0
    assert stop_exit_status(result("preempted", ["SIGUSR2"])) == 128 + signal.SIGUSR2
    assert stop_exit_status(result("preempted", ["SIGUSR2", "SIGTERM"])) == 128 + signal.SIGTERM
    assert stop_exit_status(result("preempted", ["requested"])) == 128 + signal.SIGTERM
    assert stop_exit_status({"status": "preempted", "step": 3, "run_dir": "r"}) == 128 + signal.SIGTERM


def test_sigterm_to_every_process_of_the_run_saves_a_checkpoint_with_dataloader_workers(tmp_path):
    """SLURM (scancel, time limit, preemption) and torchrun send SIGTERM to every process of the step or
    group, DataLoader workers included. PyTorch's worker handler died of a SIGTERM not sent by its main
    process, and the main process then failed ("DataLoader worker ... is killed by signal: Terminated")
    before the checkpoint its own handler had asked for: no checkpoint, the steps since the last lost.
    Now the workers outlive it; the run stops at a step boundary with its checkpoint, exits 143, leaves
    no process behind, and the same command continues it."""
    import json
    import os
    import signal
    import time

    from tests.helpers.runs import PY, TINY, digits_npz, env

    npz = digits_npz(tmp_path / "digits.npz", 60)
    run = tmp_path / "run"
    args = [PY, str(REPO / "train.py"), "--config", str(REPO / "configs/demo.yaml"), "--run-dir", str(run),
            f"data.path={npz}", *TINY, "data.num_workers=2", "train.ckpt_every=0"]
    proc = subprocess.Popen([*args, "train.steps=400"], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM and torchrun deliver it: the main process and its workers
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "killed by signal" not in err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["status"] == "preempted" and result["stop_reasons"] == ["SIGTERM"]
    assert (run / "checkpoints" / f"step_{result['step']:08d}").is_dir()
    time.sleep(6)  # a worker left behind would notice its main process gone within PyTorch's 5 s check
    try:
        os.killpg(proc.pid, 0)
        raise AssertionError("processes of the stopped run are still alive")
    except ProcessLookupError:
        pass
    done = subprocess.run([*args, f"train.steps={result['step'] + 2}"], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and json.loads(done.stdout.strip().splitlines()[-1])["status"] == "finished"
