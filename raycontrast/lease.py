"""One driver per run or experiment: a lease file with the owner and a heartbeat, on the run's storage
(local disk, NFS or S3), so a second `raycontrast tune --resume` or a resubmitted job cannot work on the
same trials while the first still runs (no Ray)."""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import pyarrow.fs as pafs

from raycontrast.config import ConfigError
from raycontrast.storage import write_atomic

__all__ = ["LEASE_FILE", "Lease", "LeaseHeldError", "owner_record"]

LEASE_FILE = "lease.json"


class LeaseHeldError(ConfigError):
    """Another live driver owns the run or experiment (the message names it)."""


def _process_start(pid: int) -> str | None:
    """Start time of local process `pid` in clock ticks since boot (/proc), None when there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def owner_record() -> dict[str, Any]:
    """Who this process is: host, boot, pid and its start time (a reused pid is not the owner), the Ray
    job submission id when it runs as a job, and the command."""
    job = None
    with contextlib.suppress(KeyError, ValueError, TypeError):  # set by Ray's job supervisor
        job = json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"])["metadata"].get("job_submission_id")
    pid = os.getpid()
    return {
        "host": socket.gethostname(), "boot": _boot_id(), "pid": pid, "pid_start": _process_start(pid),
        "job": job, "command": " ".join(sys.argv)[:500], "token": uuid.uuid4().hex,
    }  # fmt: skip


def _owner_gone(owner: Mapping[str, Any]) -> bool:
    """The owner ran on this machine (same host and boot) and its process no longer exists."""
    if (
        owner.get("host") != socket.gethostname()
        or owner.get("boot") != _boot_id()
        or owner.get("boot") is None
    ):
        return False
    return _process_start(int(owner["pid"])) != owner.get("pid_start")


def _describe(owner: Mapping[str, Any]) -> str:
    job = f", job {owner['job']}" if owner.get("job") else ""
    return f"pid {owner.get('pid')} on {owner.get('host')}{job} ({owner.get('command', '?')})"


class Lease:
    """One driver per run or experiment: `<folder>/lease.json` names the owner and carries a heartbeat.

    `acquire` refuses while another owner's heartbeat is younger than `timeout_s` (`LeaseHeldError`, naming
    it), and takes the lease over, with a message, when the heartbeat is stale or the owner's process is
    gone from this machine. A background thread renews the heartbeat every `timeout_s / 4`; if it finds the
    lease taken over (this driver stalled past the timeout), `on_lost` runs. Object stores have no
    conditional write, so two drivers starting in the same instant are told apart by writing, waiting
    `settle_s` and reading back: the later write wins, the other driver backs off.
    """

    def __init__(
        self,
        fs: pafs.FileSystem,
        folder: str,
        *,
        timeout_s: float,
        what: str,
        on_lost: Callable[[str], None],
        log: Callable[[str], None] = print,
        settle_s: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.fs, self.path, self.timeout_s, self.what = (
            fs,
            posixpath.join(folder, LEASE_FILE),
            timeout_s,
            what,
        )
        self.on_lost, self.log, self.settle_s, self.clock = on_lost, log, settle_s, clock
        self.owner = owner_record()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except ValueError:  # a cut-short file: nobody's lease
            return None

    def _write(self) -> None:
        record = {**self.owner, "heartbeat": self.clock(), "timeout_s": self.timeout_s}
        write_atomic(self.fs, self.path, json.dumps(record).encode())

    def acquire(self) -> Lease:
        held = self._read()
        if held is not None and held.get("token") != self.owner["token"]:
            age = self.clock() - float(held.get("heartbeat", 0))
            if age < self.timeout_s and not _owner_gone(held):
                raise LeaseHeldError(
                    f"run.name: {self.what} is in use by {_describe(held)}, heartbeat {age:.0f} s ago; stop "
                    f"that driver first, or wait: a lease silent for run.lease_timeout_s={self.timeout_s:g} s "
                    "is taken over",
                    "run.name",
                )
            why = "its process is gone" if _owner_gone(held) else f"no heartbeat for {age:.0f} s"
            self.log(f"{self.what}: taking over the lease of {_describe(held)} ({why})")
        self._write()
        time.sleep(self.settle_s)
        now_held = self._read()
        if now_held is None or now_held.get("token") != self.owner["token"]:
            other = _describe(now_held) if now_held else "another driver"
            raise LeaseHeldError(f"run.name: {self.what} was claimed by {other} at the same time", "run.name")
        self._thread = threading.Thread(target=self._renew, name="raycontrast-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            try:
                held = self._read()
                if held is not None and held.get("token") != self.owner["token"]:
                    self.on_lost(f"{self.what}: the lease was taken over by {_describe(held)}")
                    return
                self._write()
            except OSError as exc:  # storage hiccup: try again at the next beat, the timeout allows it
                self.log(f"{self.what}: lease heartbeat failed ({exc}); retrying")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with contextlib.suppress(OSError):
            held = self._read()
            if held is not None and held.get("token") == self.owner["token"]:
                self.fs.delete_file(self.path)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
