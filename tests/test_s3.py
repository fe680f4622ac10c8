"""A search whose storage is an S3-compatible store (a local moto server): checkpoints, Tune state and the
tables all land in the bucket, the tables read back from it, and a resume from it is a no-op."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from raycontrast.config import load_config
from raycontrast.results import load_results

ray = pytest.importorskip("ray")
boto3 = pytest.importorskip("boto3")
tune_mod = pytest.importorskip("raycontrast.tune")
from pyarrow import fs as pafs  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.ray]

SMOKE = Path(__file__).parents[1] / "configs" / "smoke.yaml"
BUCKET, PREFIX = "raycontrast-test", "searches"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_and_ray(tmp_path_factory):
    """moto S3 on loopback with one bucket, then a private Ray whose processes inherit the credentials."""
    exe = shutil.which("moto_server")
    if exe is None:
        pytest.skip("moto_server not installed (pip install 'moto[server]')")
    port, dash = _free_port(), _free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    server = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    env = {**CREDENTIALS, "RAY_AUTH_MODE": "disabled", "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dash}"}
    old = {k: os.environ.get(k) for k in env}
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        os.environ.update(env)
        endpoint = f"127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=f"http://{endpoint}").create_bucket(Bucket=BUCKET)
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=dash,
            log_to_driver=False,
        )
        yield endpoint
    finally:
        ray.shutdown()
        server.terminate()
        server.wait(timeout=30)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _keys(endpoint: str, prefix: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=f"http://{endpoint}")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_search_on_s3_and_resume_from_it(tmp_path, s3_and_ray) -> None:
    endpoint = s3_and_ray
    cfg = load_config(
        SMOKE,
        {
            "run.storage_path": f"s3://{BUCKET}/{PREFIX}",
            "run.s3_endpoint": endpoint,
            "run.s3_scheme": "http",
            "data.root": str(tmp_path / "cache"),
            "tune.num_samples": 2,  # both trials run at once on the 2 CPUs
        },
    )
    out = tune_mod.run_search(cfg)
    assert out.experiment_path == f"{BUCKET}/{PREFIX}/smoke" and out.num_finished == 2
    assert not (tmp_path / "results").exists() and not Path("results/smoke").exists()

    s3 = pafs.S3FileSystem(
        endpoint_override=endpoint, scheme="http", access_key="testing", secret_key="testing"
    )
    tables = load_results(f"{BUCKET}/{PREFIX}/smoke", filesystem=s3)
    trials, curves = tables["trials"], tables["curves"]
    assert len(trials) == 2 and set(trials["status"]) <= {"TERMINATED", "STOPPED_EARLY"}
    assert not curves.duplicated(["trial_id", "iteration"]).any()
    assert (curves.groupby("trial_id").size() == trials.set_index("trial_id")["num_reports"]).all()
    assert len(tables["class_iou"]) == len(curves) * cfg.data.num_classes

    keys = _keys(endpoint, f"{PREFIX}/smoke/")
    assert f"{PREFIX}/smoke/tuner.pkl" in keys  # Tune state
    for tid in trials["trial_id"]:  # each trial's Train checkpoints, under its stable run name
        assert any(k.startswith(f"{PREFIX}/smoke/train_runs/smoke-train-{tid}/checkpoint_") for k in keys), (
            tid
        )

    again = tune_mod.run_search(cfg, resume=True)  # everything finished: nothing to run, same rows
    assert (again.num_trials, again.num_finished, again.best_trial_id) == (2, 2, out.best_trial_id)
    after = load_results(f"{BUCKET}/{PREFIX}/smoke", filesystem=s3)
    for name in ("curves", "class_iou"):
        pd.testing.assert_frame_equal(after[name], tables[name], check_exact=True)
    clocks = ["wall_time_s", "time_to_first_report_s"]  # rebuilt from microsecond timestamps on load
    pd.testing.assert_frame_equal(
        after["trials"].drop(columns=clocks), trials.drop(columns=clocks), check_exact=True
    )
    pd.testing.assert_frame_equal(
        after["trials"][clocks], trials[clocks], check_exact=False, rtol=0, atol=1e-5
    )
