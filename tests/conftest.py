"""Shared test helpers: one tiny-config builder, one module-scoped local Ray, one free-port helper, and a
loader for the benchmark scripts (they are scripts, not a package).

Test modules import the plain functions (`from conftest import tiny_config, free_port`); the `ray_cluster`
fixture starts one private Ray per test module that asks for it and stops exactly that one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from raycontrast.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
# Two Ray Train workers (DDP) need twice the canvases: each rank's shard must fill a batch.
DDP = {"train.workers": 2, "data.canvases.train_images": 8, "data.canvases.val_images": 4}


def load_benchmark(name: str) -> ModuleType:
    """`benchmarks/<name>.py` as a module, without running its `main` (loaded once per process)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before executing it: dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def toy_state(iteration: int) -> dict[str, Any]:
    """A minimal checkpoint dict at `iteration` (a 3-element "model"), for storage-level tests."""
    import torch

    from raycontrast.checkpoint import capture_rng_state

    return {
        "model": {"w": torch.full((3,), float(iteration))},
        "optimizer": {},
        "scheduler": {},
        "iteration": iteration,
        "rng": capture_rng_state(),
    }


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(root: Path, name: str = "tiny", **overrides: Any) -> Config:
    """`configs/smoke.yaml` (6 iterations, evaluation and checkpoint every 2) shrunk further: 4 train and
    2 val canvases, in-process (`train.workers: 0`), a 20-slot memory, storage and data cache under `root`.
    `overrides` are dotted keys, e.g. `**DDP`."""
    base = {
        "run.name": name,
        "run.storage_path": str(root / "results"),
        "data.root": str(root / "cache"),
        "data.canvases.train_images": 4,
        "data.canvases.val_images": 2,
        "train.workers": 0,
        "memory.size": 20,
    }
    return load_config(SMOKE, {**base, **overrides})


def search_content(trials, searched: list[str]) -> list[tuple]:
    """What a search's trials table must hold whatever interrupted it: per trial in start order, its
    params, status, last iteration, best val mIoU (trial ids differ between experiments)."""
    rows = trials.sort_values("started_at")
    cols = [*searched, "status", "last_iteration", "best_val_miou", "iteration_of_best", "num_reports"]
    return [tuple(r) for r in rows[cols].itertuples(index=False)]


@contextlib.contextmanager
def local_ray(env: Mapping[str, str] | None = None, num_cpus: int = 2) -> Iterator[str]:
    """A private local Ray with its dashboard (Train's placement-group cleaner needs the State API, found
    through a pinned RAY_API_SERVER_ADDRESS); `env` is set for it and its processes. Yields the GCS
    address and shuts down exactly this instance."""
    import ray

    port = free_port()
    env = {**(env or {}), "RAY_AUTH_MODE": "disabled", "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # before ray.init: every Ray process inherits it
    try:
        ctx = ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            log_to_driver=False,
        )
        import fault_hooks

        ray.cloudpickle.register_pickle_by_value(fault_hooks)  # workers cannot import the tests
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@contextlib.contextmanager
def moto_s3(bucket: str, log_dir: Path) -> Iterator[str]:
    """An S3-compatible server (moto) on loopback holding `bucket`; yields its `host:port`. Skips the test
    when moto_server is not installed; stops the server it started."""
    import shutil
    import subprocess
    import time

    boto3 = pytest.importorskip("boto3")
    exe = shutil.which("moto_server")
    if exe is None:
        pytest.skip("moto_server not installed (pip install 'moto[server]')")
    port = free_port()
    log = (log_dir / "moto.log").open("w")
    server = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        endpoint = f"127.0.0.1:{port}"
        client = boto3.client(
            "s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )  # fmt: skip
        client.create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def s3_filesystem(endpoint: str):
    """A pyarrow filesystem on the loopback S3 server."""
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(
        endpoint_override=endpoint,
        scheme="http",
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
    )


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """One local Ray (2 CPUs, dashboard on) for the whole test module; yields its GCS address."""
    pytest.importorskip("ray")
    with local_ray() as address:
        yield address
