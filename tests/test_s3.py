"""A search whose storage is an S3-compatible store (a local moto server): checkpoints, Tune state and the
tables all land in the bucket, the tables read back from it, and a resume from it is a no-op."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from raycontrast.config import load_config
from raycontrast.results import load_results

from conftest import S3_CREDENTIALS, local_ray, moto_s3, s3_filesystem

ray = pytest.importorskip("ray")
boto3 = pytest.importorskip("boto3")
tune_mod = pytest.importorskip("raycontrast.tune")

pytestmark = [pytest.mark.slow, pytest.mark.ray]

SMOKE = Path(__file__).parents[1] / "configs" / "smoke.yaml"
BUCKET, PREFIX = "raycontrast-test", "searches"


@pytest.fixture(scope="module")
def s3_and_ray(tmp_path_factory):
    """moto S3 on loopback with one bucket, then a private Ray whose processes inherit the credentials."""
    with moto_s3(BUCKET, tmp_path_factory.mktemp("moto")) as endpoint, local_ray(env=S3_CREDENTIALS):
        yield endpoint


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

    s3 = s3_filesystem(endpoint)
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
