"""One driver per run or experiment: the lease on local storage and on the loopback S3 server."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pyarrow.fs as pafs
import pytest

from raycontrast.lease import LEASE_FILE, Lease, LeaseHeldError, owner_record

from conftest import moto_s3, s3_filesystem


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The loopback S3 server with one bucket; yields (filesystem, bucket)."""
    with moto_s3("leases", tmp_path_factory.mktemp("moto")) as endpoint:
        yield s3_filesystem(endpoint), "leases"


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    if request.param == "local":
        return pafs.LocalFileSystem(), str(tmp_path)
    fs, bucket = request.getfixturevalue("s3")
    return fs, f"{bucket}/{request.node.name.replace('[', '_').replace(']', '')}"


def _lease(fs, folder, lost=None, **kw):
    return Lease(fs, folder, timeout_s=kw.pop("timeout_s", 60.0), what="experiment 'x'", on_lost=lost or (lambda m: None), settle_s=0.05, log=kw.pop("log", lambda m: None), **kw)  # fmt: skip


def _read(fs, folder):
    with fs.open_input_stream(f"{folder}/{LEASE_FILE}") as f:
        return json.loads(f.read())


def test_second_driver_is_refused_naming_the_owner(where):
    fs, folder = where
    with _lease(fs, folder):
        held = _read(fs, folder)
        assert held["pid"] == owner_record()["pid"] and held["host"] == socket.gethostname()
        with pytest.raises(
            LeaseHeldError, match=rf"experiment 'x' is in use by pid {held['pid']} on .*heartbeat"
        ):
            _lease(fs, folder).acquire()
    with pytest.raises(FileNotFoundError):  # released: the file is gone
        _read(fs, folder)
    with _lease(fs, folder):  # and the next driver gets it
        pass


def test_a_stale_lease_is_taken_over_with_a_message(where):
    fs, folder = where
    said = []
    old = _lease(fs, folder, timeout_s=60.0).acquire()
    old._stop.set()  # the old driver hangs: no more heartbeats
    record = {**_read(fs, folder), "heartbeat": time.time() - 120, "host": "elsewhere"}
    with fs.open_output_stream(f"{folder}/{LEASE_FILE}") as f:
        f.write(json.dumps(record).encode())
    with _lease(fs, folder, log=said.append):
        assert said and "taking over the lease of pid" in said[0] and "no heartbeat for 1" in said[0]


def test_the_lease_of_a_dead_process_here_is_taken_over_at_once(where):
    fs, folder = where
    dead = subprocess.Popen(["true"])
    dead.wait()
    record = {**owner_record(), "pid": dead.pid, "pid_start": "0", "heartbeat": time.time()}
    with fs.open_output_stream(f"{folder}/{LEASE_FILE}") as f:
        f.write(json.dumps(record).encode())
    said = []
    with _lease(fs, folder, log=said.append):
        assert "its process is gone" in said[0]


def test_an_owner_that_loses_its_lease_is_told(tmp_path):
    fs, folder, lost = pafs.LocalFileSystem(), str(tmp_path), []
    lease = _lease(fs, folder, lost=lost.append, timeout_s=0.4).acquire()
    record = {**_read(fs, folder), "token": "someone-else", "pid": 1}
    with fs.open_output_stream(f"{folder}/{LEASE_FILE}") as f:
        f.write(json.dumps(record).encode())
    deadline = time.time() + 10
    while not lost and time.time() < deadline:
        time.sleep(0.05)
    lease.release()
    assert lost and "taken over by pid 1" in lost[0]
    assert _read(fs, folder)["token"] == "someone-else"  # the new owner's lease is not deleted


def test_heartbeats_keep_a_lease_alive(tmp_path):
    fs, folder = pafs.LocalFileSystem(), str(tmp_path)
    with _lease(fs, folder, timeout_s=0.4):
        first = _read(fs, folder)["heartbeat"]
        time.sleep(0.5)
        assert _read(fs, folder)["heartbeat"] > first
