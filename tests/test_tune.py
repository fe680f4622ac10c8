"""End-to-end searches on one module-scoped local Ray (2 CPUs, dashboard on): ASHA + Optuna on the smoke
config with the result tables checked row by row against Tune's own per-trial results, a failing trial, and
(slow) an interrupted search resumed from its storage.

Determinism: `max_concurrent_trials: 1` fills ASHA's rungs in trial order, and every trial is seeded, so
which trials ASHA stops is the same on every run.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from raycontrast.config import load_config
from raycontrast.results import load_results

ray = pytest.importorskip("ray")
tune_mod = pytest.importorskip("raycontrast.tune")
from ray.tune import ExperimentAnalysis, ResultGrid  # noqa: E402

pytestmark = pytest.mark.ray

ROOT = Path(__file__).parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
ITERS = 6  # smoke: train.iterations, evaluated every 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A private local Ray with its dashboard (Train's placement-group cleaner needs the State API)."""
    port = _free_port()
    env = {"RAY_AUTH_MODE": "disabled", "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # before ray.init: every Ray process inherits it
    ctx = ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        log_to_driver=False,
    )
    yield ctx.address_info["gcs_address"]
    ray.shutdown()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _smoke(tmp_path: Path, **overrides):
    return load_config(
        SMOKE,
        {
            "run.storage_path": str(tmp_path / "results"),
            "data.root": str(tmp_path / "cache"),
            "tune.max_concurrent_trials": 1,
            **overrides,
        },
    )


def check_tables_against_tune(exp_path: str, searched: list[str]) -> tuple:
    """Every table row agrees with Tune's per-trial results (progress.csv / result.json)."""
    tables = load_results(exp_path)
    trials, curves, class_iou = tables["trials"], tables["curves"], tables["class_iou"]
    grid = ResultGrid(ExperimentAnalysis(exp_path))
    assert sorted(trials["trial_id"]) == sorted(r.metrics["trial_id"] for r in grid)
    assert not curves.duplicated(["trial_id", "iteration"]).any()
    assert not class_iou.duplicated(["trial_id", "iteration", "class_id"]).any()
    for r in grid:
        tid = r.metrics["trial_id"]
        row = trials.set_index("trial_id").loc[tid]
        hist = r.metrics_dataframe.drop_duplicates("iteration", keep="last").sort_values("iteration")
        mine = curves[curves["trial_id"] == tid].sort_values("iteration")
        assert mine["iteration"].tolist() == hist["iteration"].tolist()
        np.testing.assert_allclose(mine["val_miou"], hist["val_miou"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(mine["loss"], hist["loss"], rtol=1e-12, equal_nan=True)
        last = r.metrics  # the last report, with the per-class list intact
        ious = class_iou[(class_iou["trial_id"] == tid) & (class_iou["iteration"] == last["iteration"])]
        np.testing.assert_allclose(ious.sort_values("class_id")["iou"], last["val_class_iou"], equal_nan=True)
        assert row["best_val_miou"] == pytest.approx(hist["val_miou"].max())
        assert row["last_iteration"] == hist["iteration"].max() == last["iteration"]
        assert row["num_reports"] == len(hist)
        for key in searched:
            assert row[key] == pytest.approx(r.config[key])
        if r.error is not None:
            assert row["status"] == "ERROR"
        else:
            assert row["status"] == ("TERMINATED" if last["iteration"] == ITERS else "STOPPED_EARLY")
    return tables, grid


def test_smoke_search_asha_and_tables(tmp_path, ray_cluster) -> None:
    cfg = _smoke(tmp_path)
    out = tune_mod.run_search(cfg)
    searched = list(cfg.tune.space)
    tables, grid = check_tables_against_tune(out.experiment_path, searched)
    trials = tables["trials"]

    assert len(trials) == cfg.tune.num_samples == out.num_trials
    assert out.num_finished == 3 and out.num_errors == 0 and not out.interrupted
    stopped = trials[trials["status"] == "STOPPED_EARLY"]
    assert len(stopped) >= 1  # ASHA (grace 1 evaluation, rate 2) cut at least one trial
    assert set(stopped["last_iteration"]) <= {2, 4}  # ... only at its rungs, in iterations
    # The published point is evaluated first (Optuna's points_to_evaluate) and sets the first rungs.
    first = trials.sort_values("started_at").iloc[0]
    assert (first["loss.temperature"], first["loss.weight"], first["memory.size"]) == (0.1, 0.1, 0)
    assert first["status"] == "TERMINATED" and first["last_iteration"] == ITERS
    # Fixed keys are columns too, with the user's values (not the driver-adjusted worker CPUs).
    assert (trials["optim.lr"] == 0.01).all() and (trials["train.cpus_per_worker"] == 1.0).all()
    # Outcome = the tables' best finished trial.
    best = trials.loc[trials["best_val_miou"].idxmax()]
    assert out.best_trial_id == best["trial_id"] and out.best_val_miou == pytest.approx(best["best_val_miou"])
    assert out.best_params == {k: best[k] for k in searched}
    assert out.best_config.loss.temperature == pytest.approx(best["loss.temperature"])
    assert out.median_startup_s > 0 and out.worker_seconds > 0
    # One Train run per trial, named from its trial id (what a restart resumes from).
    runs = sorted(p.name for p in (Path(out.experiment_path) / "train_runs").iterdir())
    assert runs == sorted(f"smoke-train-{t}" for t in trials["trial_id"])


def test_failing_trial_is_recorded_and_the_search_goes_on(tmp_path, ray_cluster) -> None:
    lrs = [1e6, 0.01]  # SGD at lr 1e6 diverges within two steps: non-finite losses end the run
    cfg = _smoke(
        tmp_path,
        **{
            "tune.space": {"optim.lr": {"choice": lrs}},
            "tune.points_to_evaluate": [{"optim.lr": lr} for lr in lrs],
            "tune.num_samples": 2,
            "tune.scheduler": "fifo",
            "tune.max_failures": 0,
            "train.max_failures": 0,
        },
    )
    out = tune_mod.run_search(cfg)
    tables, grid = check_tables_against_tune(out.experiment_path, ["optim.lr"])
    trials = tables["trials"].set_index("optim.lr")
    assert trials.loc[1e6, "status"] == "ERROR"
    assert trials.loc[1e6, "error"].startswith("non-finite loss:")
    assert trials.loc[0.01, "status"] == "TERMINATED" and trials.loc[0.01, "last_iteration"] == ITERS
    assert isinstance(trials.loc[0.01, "error"], float) and math.isnan(trials.loc[0.01, "error"])
    assert (out.num_errors, out.num_finished, out.best_params) == (1, 1, {"optim.lr": 0.01})
    assert sum(r.error is not None for r in grid) == 1


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"search exited early with {proc.returncode}")
        time.sleep(1)
    raise AssertionError("timed out")


def _finished_trials(exp: Path) -> int:
    try:
        trials = load_results(exp)["trials"]
    except (FileNotFoundError, OSError):
        return 0
    return int(trials["status"].isin(["TERMINATED", "STOPPED_EARLY"]).sum())


@pytest.mark.slow
def test_interrupted_search_resumes(tmp_path, ray_cluster) -> None:
    storage, cache = tmp_path / "results", tmp_path / "cache"
    args = [sys.executable, "-m", "raycontrast.cli", "tune", "--config", str(SMOKE), "--no-analyze"]
    args += ["--address", ray_cluster]  # the fixture's cluster: no second Ray on a small machine
    for kv in (f"run.storage_path={storage}", f"data.root={cache}", "tune.max_concurrent_trials=1"):
        args += ["--set", kv]
    exp = storage / "smoke"
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        _wait_for(lambda: _finished_trials(exp) >= 1, 300, proc)
        proc.send_signal(signal.SIGINT)  # Tune saves its state and returns
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = load_results(exp)["trials"]
    assert len(first) < 3 or (first["status"] == "RUNNING").any()  # really interrupted mid-search
    done_before = set(first.loc[first["status"] != "RUNNING", "trial_id"])

    again = subprocess.run([*args, "--resume"], capture_output=True, text=True, cwd=ROOT, timeout=400)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    tables, _ = check_tables_against_tune(str(exp), list(load_config(SMOKE).tune.space))
    trials = tables["trials"]
    assert len(trials) == 3 and trials["status"].isin(["TERMINATED", "STOPPED_EARLY"]).all()
    assert done_before <= set(trials["trial_id"])  # finished trials kept, not re-run under new ids
    for tid, its in tables["curves"].groupby("trial_id")["iteration"]:
        assert sorted(its) == list(range(2, int(its.max()) + 1, 2)), tid  # no gaps, no duplicates
