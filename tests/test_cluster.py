"""The search as a Ray job: a head node started with plain `ray start --head` (no custom resources) on
loopback, `experiments/tune.py` submitted with `ray job submit --working-dir .`, the tables checked.

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
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from raycontrast.results import load_results

pytest.importorskip("ray")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
EXCLUDES = [".venv", ".cache", "results", ".git", "tests"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    dash = _free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        # Train's placement-group cleaner must reach this cluster's State API even if other Ray instances
        # run on the same machine (auto-detection refuses to choose).
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dash}",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        RAY, "start", "--head", "--num-cpus=2", "--num-gpus=0", f"--port={_free_port()}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
    ]  # fmt: skip
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        yield f"http://127.0.0.1:{dash}", env
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_search_submitted_as_a_ray_job(tmp_path, head_node) -> None:
    url, env = head_node
    storage, cache = tmp_path / "results", tmp_path / "cache"
    sid = f"raycontrast-test-{uuid.uuid4().hex[:8]}"
    entry = [sys.executable, "experiments/tune.py", "--config", "configs/smoke.yaml", "--no-analyze"]
    entry += ["--set", f"run.storage_path={storage}", "--set", f"data.root={cache}"]
    submit = [
        RAY, "job", "submit", "--address", url, "--submission-id", sid, "--working-dir", str(ROOT),
        "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--", *entry,
    ]  # fmt: skip
    job = subprocess.run(submit, env=env, cwd=ROOT, capture_output=True, text=True, timeout=540)
    logs = job.stdout + job.stderr
    assert job.returncode == 0, logs[-4000:]
    status = subprocess.run(
        [RAY, "job", "status", "--address", url, sid], env=env, capture_output=True, text=True
    )
    plain = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr)  # drop colour codes
    assert re.search(rf"job '{sid}' succeeded", plain, re.IGNORECASE), plain
    # The plan was derived from the cluster: 2 CPUs / (0.02 driver + 0.98 worker) = 2 trials at once.
    assert "concurrent trials: 2" in logs

    tables = load_results(storage / "smoke")
    trials, curves = tables["trials"], tables["curves"]
    assert len(trials) == 3 and trials["status"].isin(["TERMINATED", "STOPPED_EARLY"]).all()
    assert (trials["status"] == "TERMINATED").any()
    assert not curves.duplicated(["trial_id", "iteration"]).any()
    assert (
        curves.groupby("trial_id")["iteration"].max() == trials.set_index("trial_id")["last_iteration"]
    ).all()
