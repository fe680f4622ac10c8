"""The search as a Ray job: a head node started with plain `ray start --head` (no custom resources) on
loopback, `experiments/tune.py` submitted with `ray job submit --working-dir .`, stopped with `ray job stop`
and finished by a resume job, the tables checked.

The head gets its own temp dir and ports, and is stopped by killing exactly the processes it started (those
whose command line names its temp dir, and their children): `ray stop` would stop every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from raycontrast.results import load_results

from conftest import ROOT, free_port

pytest.importorskip("ray")

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
EXCLUDES = [".venv", ".cache", "results", ".git", "tests"]


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) from /proc."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out[int(entry)] = (ppid, cmd)
    return out


def _cluster_pids(temp_dir: str) -> set[int]:
    procs = _processes()
    pids = {pid for pid, (_, cmd) in procs.items() if temp_dir in cmd}
    grew = True
    while grew:  # add descendants: workers, agents and the job's driver only name the dir indirectly
        new = {pid for pid, (ppid, _) in procs.items() if ppid in pids} - pids
        pids |= new
        grew = bool(new)
    return pids - {os.getpid()}


def _stop_cluster(temp_dir: str) -> None:
    pids = _cluster_pids(temp_dir)
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        end = time.time() + wait
        while time.time() < end and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)
        pids = {p for p in pids if Path(f"/proc/{p}").exists()}
        if not pids:
            return


@pytest.fixture
def head_node():
    """`ray start --head` on loopback with 2 CPUs; yields the dashboard (job API) URL."""
    temp_dir = tempfile.mkdtemp(prefix="rct", dir="/tmp")  # short: Ray's unix socket paths must fit
    dash = free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        # The job supervisor's grace period between `ray job stop`'s SIGTERM and its SIGKILL (default 3 s):
        # long enough for Tune to save the experiment state on a loaded machine.
        "RAY_JOB_STOP_WAIT_TIME_S": "60",
        # Train's placement-group cleaner must reach this cluster's State API even if other Ray instances
        # run on the same machine (auto-detection refuses to choose).
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dash}",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        RAY, "start", "--head", "--num-cpus=2", "--num-gpus=0", f"--port={free_port()}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
    ]  # fmt: skip
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        yield f"http://127.0.0.1:{dash}", env
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _job(
    url: str, env: dict, sid: str, entry: list[str], *, wait: bool = True
) -> subprocess.CompletedProcess:
    cmd = [
        RAY, "job", "submit", "--address", url, "--submission-id", sid, "--working-dir", str(ROOT),
        "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), *([] if wait else ["--no-wait"]), "--", *entry,
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=540)


def _status(url: str, env: dict, sid: str) -> str:
    out = subprocess.run(
        [RAY, "job", "status", "--address", url, sid], env=env, capture_output=True, text=True
    )
    return re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)


@pytest.mark.extended
def test_a_search_job_stopped_then_resumed_by_another_job_finishes(tmp_path, head_node) -> None:
    url, env = head_node
    base = [sys.executable, "experiments/tune.py", "--config", "configs/smoke.yaml", "--no-analyze"]
    # A relative run.storage_path would be lost in the job's copy of the working dir: refused, with why.
    rel = _job(url, env, f"rel-{uuid.uuid4().hex[:6]}", base)
    assert rel.returncode != 0 and "'results' is a relative path" in rel.stdout + rel.stderr
    storage, cache = tmp_path / "results", tmp_path / "cache"
    entry = [*base, "--set", f"run.storage_path={storage}", "--set", f"data.root={cache}"]
    entry += ["--set", "tune.max_concurrent_trials=1"]
    sid = f"stop-{uuid.uuid4().hex[:6]}"
    assert _job(url, env, sid, entry, wait=False).returncode == 0
    exp, end = storage / "smoke", time.time() + 300
    while not ((exp / "tables" / "trials.parquet").exists() and _finished_trials(exp) >= 1):
        assert time.time() < end and "FAILED" not in _status(url, env, sid), _status(url, env, sid)
        time.sleep(1)
    stop = subprocess.run(
        [RAY, "job", "stop", "--address", url, sid], env=env, capture_output=True, text=True, timeout=180
    )
    assert stop.returncode == 0, stop.stdout + stop.stderr
    logs = subprocess.run(
        [RAY, "job", "logs", "--address", url, sid], env=env, capture_output=True, text=True
    ).stdout
    assert "Stop signal received" in logs  # SIGTERM became Tune's graceful stop: the state was saved
    assert "force-killed" not in _status(url, env, sid) and not (exp / "lease.json").exists()
    first = load_results(exp)["trials"]
    assert len(first) < 3 or (first["status"] == "RUNNING").any()  # stopped mid-search
    resume = f"resume-{uuid.uuid4().hex[:6]}"
    again = _job(url, env, resume, [*entry, "--resume"])
    logs = again.stdout + again.stderr
    assert again.returncode == 0, logs[-4000:]
    assert re.search(rf"job '{resume}' succeeded", _status(url, env, resume), re.IGNORECASE)
    # The plan was derived from the cluster: 2 CPUs / (0.02 driver + 0.98 worker) fit 2 trials at once.
    assert "concurrent trials: 1 (cluster fits 2" in logs
    tables = load_results(exp)
    trials, curves = tables["trials"], tables["curves"]
    assert len(trials) == 3 and trials["status"].isin(["TERMINATED", "STOPPED_EARLY"]).all()
    assert (trials["status"] == "TERMINATED").any()
    assert set(first.loc[first["status"] != "RUNNING", "trial_id"]) <= set(trials["trial_id"])
    assert not curves.duplicated(["trial_id", "iteration"]).any()
    assert (
        curves.groupby("trial_id")["iteration"].max() == trials.set_index("trial_id")["last_iteration"]
    ).all()


def _finished_trials(exp: Path) -> int:
    try:
        trials = load_results(exp)["trials"]
    except (FileNotFoundError, OSError):
        return 0
    return int(trials["status"].isin(["TERMINATED", "STOPPED_EARLY"]).sum())
