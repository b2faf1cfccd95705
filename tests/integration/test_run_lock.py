"""One process at a time runs stages in a run directory (``nxm_deploy.stages.hold_run_dir``).

Two ``nxm-deploy run`` on one run directory at the same time: the second refuses in one line naming the holder and
exits 2, the first completes, a third finds every stage up to date. A lock whose holder was killed is taken over.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from nxm_deploy.errors import RunDirError
from nxm_deploy.run.layout import RunLayout
from nxm_deploy.stages import STAGES, hold_run_dir


def _cli(log, *args: str) -> subprocess.Popen:
    """``nxm-deploy ARGS`` in a subprocess, its stdout and stderr to the file ``log`` (a pipe could fill and stall it)."""
    with open(log, "w") as handle:
        return subprocess.Popen([sys.executable, "-m", "nxm_deploy.cli.main", *args], stdout=handle,
                                stderr=subprocess.STDOUT, text=True, env={**os.environ, "TQDM_DISABLE": "1"})


def _holder(lock) -> dict:
    try:
        return json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        return {}


# A child that takes the lock, says so, and waits (or kills itself with SIGKILL, as a crash would).
_HOLD = textwrap.dedent("""
    import os, signal, sys, time
    from nxm_deploy.stages import hold_run_dir

    with hold_run_dir(sys.argv[1]):
        print("held", flush=True)
        if sys.argv[2] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)
""")


def test_a_held_run_directory_is_refused_naming_its_holder_and_a_dead_holder_is_taken_over(tmp_path, caplog):
    run_dir = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir), "wait"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match="is in use") as err:
            with hold_run_dir(run_dir):
                pass
        assert f"pid {child.pid} on {socket.gethostname()}" in err.value.message
        assert "\n" not in err.value.message and "Wait" in err.value.hint
    finally:
        child.kill()
        child.wait()
    child = subprocess.run([sys.executable, "-c", _HOLD, str(run_dir), "kill"], capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL
    assert _holder(RunLayout(run_dir).lock)["pid"]  # the killed holder's record is left behind
    with caplog.at_level("WARNING", logger="nxm_deploy.stages"):
        with hold_run_dir(run_dir):
            with hold_run_dir(run_dir):  # re-entrant in one process
                assert _holder(RunLayout(run_dir).lock)["pid"] == os.getpid()
    assert any("taking over the lock of pid" in r.getMessage() for r in caplog.records)
    assert RunLayout(run_dir).lock.read_text() == ""  # released cleanly: no holder recorded
    assert not run_dir.exists()  # the lock lives beside the run directory, not in it


@pytest.mark.slow
def test_two_concurrent_runs_on_one_run_directory(tmp_path, repo_root, glue_dir):
    run_dir = tmp_path / "runs" / "tiny"
    args = ("run", str(repo_root / "recipes" / "tiny_smoke.yaml"), "--run-dir", str(run_dir), "--glue-dir",
            str(glue_dir), "--set", "task.max_train_examples=64", "--set", "task.max_eval_examples=32",
            "--set", "validate.latency_shapes=[[1, 64]]", "--set", "validate.timed_runs=2")  # smaller: the lock's the point
    logs = [tmp_path / f"run{i}.log" for i in range(3)]
    first = _cli(logs[0], *args)
    try:
        deadline = time.monotonic() + 120
        while _holder(RunLayout(run_dir).lock).get("pid") != first.pid:  # the first run holds the directory
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.2)
        second = _cli(logs[1], *args)
        assert second.wait(timeout=120) == 2, logs[1].read_text()[-2000:]
        err = logs[1].read_text()
        lines = [line for line in err.splitlines() if line.startswith(("error:", "hint:"))]
        assert lines[0].startswith(f"error: Run directory {run_dir} is in use: pid {first.pid} on ")
        assert "Traceback" not in err and len(lines) == 2
        assert first.wait(timeout=600) == 0, logs[0].read_text()[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
    third = _cli(logs[2], *args)
    assert third.wait(timeout=300) == 0, logs[2].read_text()[-2000:]
    out = logs[2].read_text()
    for stage in STAGES:
        assert f"stage {stage.name}: up to date" in out, stage.name
    assert json.loads(RunLayout(run_dir).timings.read_text()) == {stage.name: 0.0 for stage in STAGES}
    # the tiny recipe turns the report's Polygraphy CLI re-run and its plots off (the session's tiny run turns them on)
    layout = RunLayout(run_dir)
    assert json.loads(layout.report_json.read_text())["plots"] == {} and not layout.plots_dir.exists()
    rows = json.loads(layout.validation.read_text())["diff"]["comparisons"]
    assert rows and not any("cli_exit_code" in row for row in rows)
