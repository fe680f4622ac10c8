"""End-to-end searches on one module-scoped local Ray (2 CPUs, dashboard on): ASHA + Optuna on the smoke
config with the result tables checked row by row against Tune's own per-trial results, a failing trial, and
(slow) an interrupted search resumed from its storage.

Determinism: `max_concurrent_trials: 1` fills ASHA's rungs in trial order, and every trial is seeded, so
which trials ASHA stops is the same on every run.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest

from raycontrast import checkpoint as ck
from raycontrast.config import load_config
from raycontrast.results import load_results

from conftest import ROOT, SMOKE, search_content

ray = pytest.importorskip("ray")
tune_mod = pytest.importorskip("raycontrast.tune")
from ray.tune import ExperimentAnalysis, ResultGrid  # noqa: E402

pytestmark = pytest.mark.ray

ITERS = 6  # smoke: train.iterations, evaluated every 2


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
        hist = r.metrics_dataframe
        if tune_mod.DIVERGED_KEY in hist:  # the one report of a diverged trial is not a curve row
            assert r.error is not None and "non-finite loss" in str(r.error)
            hist = hist[hist[tune_mod.DIVERGED_KEY].isna()]
        hist = hist.drop_duplicates("iteration", keep="last").sort_values("iteration")
        mine = curves[curves["trial_id"] == tid].sort_values("iteration")
        assert mine["iteration"].tolist() == hist["iteration"].tolist()
        np.testing.assert_allclose(mine["val_miou"], hist["val_miou"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(mine["loss"], hist["loss"], rtol=1e-12, equal_nan=True)
        last = r.metrics  # the last report, with the per-class list intact
        if tune_mod.DIVERGED_KEY in last:  # ... unless it was the diverged report
            last = {"iteration": hist["iteration"].max()}
        else:
            ious = class_iou[(class_iou["trial_id"] == tid) & (class_iou["iteration"] == last["iteration"])]
            np.testing.assert_allclose(
                ious.sort_values("class_id")["iou"], last["val_class_iou"], equal_nan=True
            )
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


def asha_by_hand(trial_ids, curves, rungs: tuple[int, ...], rate: float) -> dict[str, int]:
    """The last iteration of each trial under asynchronous successive halving, trials run one at a time in
    `trial_ids` order: at each rung, a trial whose val mIoU is below the (1 - 1/rate) quantile of those
    recorded there before it stops."""
    recorded: dict[int, list[float]] = {r: [] for r in rungs}
    last = {}
    for tid in trial_ids:
        values = curves[curves["trial_id"] == tid].set_index("iteration")["val_miou"]
        last[tid] = ITERS
        for r in rungs:
            value, before = float(values.loc[r]), list(recorded[r])
            recorded[r].append(value)
            if before and value < np.percentile(before, 100 * (1 - 1 / rate)):
                last[tid] = r
                break
    return last


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, ray_cluster):
    """The smoke search, run once without interruption: (config, outcome)."""
    cfg = _smoke(tmp_path_factory.mktemp("uninterrupted"))
    return cfg, tune_mod.run_search(cfg)


def test_smoke_search_asha_and_tables(uninterrupted) -> None:
    cfg, out = uninterrupted
    searched = list(cfg.tune.space)
    tables, grid = check_tables_against_tune(out.experiment_path, searched)
    trials = tables["trials"]

    assert len(trials) == cfg.tune.num_samples == out.num_trials
    assert out.num_finished == 3 and out.num_errors == 0 and not out.interrupted
    stopped = trials[trials["status"] == "STOPPED_EARLY"]
    assert len(stopped) >= 1  # ASHA (grace 1 evaluation, rate 2) cut at least one trial
    assert set(stopped["last_iteration"]) <= {2, 4}  # ... only at its rungs, in iterations
    # Optuna's points_to_evaluate come first, in order; the first one sets the rungs and runs to the end.
    by_start = trials.sort_values("started_at")
    points = [
        (p["loss.temperature"], p["loss.weight"], p["memory.size"]) for p in cfg.tune.points_to_evaluate
    ]
    got = by_start[["loss.temperature", "loss.weight", "memory.size"]].itertuples(index=False, name=None)
    assert list(got)[: len(points)] == points
    assert by_start.iloc[0]["status"] == "TERMINATED" and by_start.iloc[0]["last_iteration"] == ITERS
    # Which trials stopped where: ASHA's rule applied by hand to the curves, in trial order.
    assert dict(zip(by_start["trial_id"], by_start["last_iteration"], strict=True)) == asha_by_hand(
        by_start["trial_id"], tables["curves"], rungs=(2, 4), rate=2
    )
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
    # tune.keep_checkpoints: best: each ended trial keeps only its best checkpoint, whose size is recorded.
    fs = pafs.LocalFileSystem()
    for t in trials.itertuples():
        kept = ck.list_checkpoints(
            fs, str(Path(out.experiment_path) / "train_runs" / f"smoke-train-{t.trial_id}")
        )
        assert [ck.checkpoint_iteration(p) for p in kept] == [t.iteration_of_best], t.trial_id
        assert t.disk_bytes >= sum(f.stat().st_size for f in Path(kept[0]).iterdir()) > 0
        assert t.best_checkpoint == kept[0]  # the kept one, named in the table
    assert out.disk_bytes == trials["disk_bytes"].sum()
    assert out.best_checkpoint == best["best_checkpoint"]
    # Every report comes with the checkpoint written at it (every 2 iterations), named in its curve row.
    curves = tables["curves"]
    assert curves["checkpoint_path"].notna().all()
    assert all(
        ck.checkpoint_iteration(p) == it
        for p, it in zip(curves["checkpoint_path"], curves["iteration"], strict=True)
    )


def test_eval_on_ray_workers_adds_up_the_shards(uninterrupted) -> None:
    """`raycontrast eval --workers 2`: two Ray tasks, each a shard of the split; their confusion matrices sum
    to the in-process evaluation's."""
    from raycontrast.evaluation import evaluate_model
    from raycontrast.inference import load_model
    from raycontrast.remote_eval import evaluate_on_ray

    _, out = uninterrupted
    fs = pafs.LocalFileSystem()
    model = load_model(fs, out.experiment_path)
    here = evaluate_model(model, progress=False)
    there = evaluate_on_ray(fs, model.source, 2, sets={}, use_gpu=False)
    assert there.images == here.images == 4 and int(there.confusion.sum()) == int(here.confusion.sum())
    assert abs(there.miou - here.miou) <= 1e-6, (there.miou, here.miou)


@pytest.mark.extended
@pytest.mark.slow
def test_the_reports_commands_take_the_search_to_a_model(uninterrupted, tmp_path) -> None:
    """Each command the report prints, run as printed (retrain, eval with TTA, predict, export); and the best
    checkpoint, evaluated as it was trained, scores the val mIoU of its curves row."""
    from raycontrast.analyze import analyze
    from raycontrast.evaluation import evaluate_model
    from raycontrast.inference import load_model

    cfg, out = uninterrupted
    fs = pafs.LocalFileSystem()
    model = load_model(fs, out.experiment_path)
    assert model.source == out.best_checkpoint
    curves = load_results(out.experiment_path)["curves"]
    row = curves[(curves["trial_id"] == out.best_trial_id) & (curves["iteration"] == model.iteration)]
    assert abs(evaluate_model(model, progress=False).miou - float(row["val_miou"].iloc[0])) <= 1e-6

    report = analyze(out.experiment_path, out_dir=tmp_path / "analysis")
    assert set(report.commands) == {"retrain", "eval", "predict", "export"}
    assert all(c in (tmp_path / "analysis" / "report.md").read_text() for c in report.commands.values())
    cli = str(Path(sys.executable).with_name("raycontrast"))
    for name, command in report.commands.items():
        argv = [cli, *command.split()[1:]]
        if name == "retrain":  # a run of its own next to the search, on this module's Ray
            argv += ["--address", ray.get_runtime_context().gcs_address]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, (name, done.stdout[-2000:], done.stderr[-2000:])
        if name == "eval":
            assert "mIoU" in done.stdout and "scales [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] + flip" in done.stdout
    assert (Path(cfg.run.storage_path) / "smoke-best").is_dir()
    assert len(list((tmp_path / "analysis" / "predictions").glob("*_overlay.png"))) == 4
    exported = load_model(fs, str(tmp_path / "analysis" / "smoke-best.safetensors"))
    assert exported.config == model.config and exported.val_miou == model.val_miou


CURVE_VALUES = ["iteration", "lr", "loss", "ce_loss", "contrast_loss", "val_miou", "val_pixel_acc", "anchors",
                "hard_share", "intra_cos", "inter_cos", "memory_fill", "nonfinite_steps"]  # fmt: skip


@pytest.mark.extended
@pytest.mark.slow
def test_a_shared_warm_up_gives_the_tables_of_an_unshared_search(tmp_path, ray_cluster) -> None:
    """The smoke search with a 2-iteration warm-up, once sharing it (a trunk trained once, every trial
    forked from it) and once not: every trial's results are bitwise the same (trial ids aside)."""
    shared = tune_mod.run_search(_smoke(tmp_path / "shared", **{"loss.warmup_iters": 2}))
    tables = load_results(shared.experiment_path)
    trunk = tables["trunk"]
    assert trunk["fork_at"].tolist() == [2] and trunk["memory_size"].tolist() == [50]
    assert (tables["trials"]["forked_at"] == 2).all() and trunk["worker_seconds"].iloc[0] > 0
    off = tune_mod.run_search(
        _smoke(tmp_path / "off", **{"loss.warmup_iters": 2, "tune.share_warmup": "off"})
    )
    plain = load_results(off.experiment_path)
    assert len(plain["trunk"]) == 0 and plain["trials"]["forked_at"].isna().all()
    searched = list(load_config(SMOKE).tune.space)
    assert search_content(tables["trials"], searched) == search_content(plain["trials"], searched)
    assert shared.worker_seconds > 0 and off.worker_seconds > 0

    def curves(t):
        order = t["trials"].sort_values("started_at")["trial_id"].tolist()
        c = t["curves"].set_index("trial_id")
        return [c.loc[[tid], CURVE_VALUES].to_numpy(dtype=float) for tid in order]

    for got, want in zip(curves(tables), curves(plain), strict=True):
        np.testing.assert_array_equal(got, want)  # every row, the shared prefix included, to the bit


def test_failing_trial_is_recorded_and_the_search_goes_on(tmp_path, ray_cluster) -> None:
    lrs = [1e6, 0.01]  # SGD at lr 1e6 diverges within two steps: non-finite losses end the run
    cfg = _smoke(
        tmp_path,
        **{
            "tune.space": {"optim.lr": {"choice": lrs}},
            "tune.points_to_evaluate": [{"optim.lr": lr} for lr in lrs],
            "tune.num_samples": 2,
            "tune.scheduler": "fifo",
            "tune.max_failures": 1,  # a divergence is deterministic: retried by neither Tune ...
            "train.max_failures": 1,  # ... nor Train
        },
    )
    out = tune_mod.run_search(cfg)
    tables, grid = check_tables_against_tune(out.experiment_path, ["optim.lr"])
    attempts = {
        t.config["optim.lr"]: t.run_metadata.num_failures
        for t in ExperimentAnalysis(out.experiment_path).trials
    }
    assert attempts == {1e6: 1, 0.01: 0}  # one failure, no retry
    trials = tables["trials"].set_index("optim.lr")
    assert trials.loc[1e6, "status"] == "ERROR"
    assert trials.loc[1e6, "error"].startswith("non-finite loss:")
    assert trials.loc[0.01, "status"] == "TERMINATED" and trials.loc[0.01, "last_iteration"] == ITERS
    assert isinstance(trials.loc[0.01, "error"], float) and math.isnan(trials.loc[0.01, "error"])
    assert (out.num_errors, out.num_finished, out.best_params) == (1, 1, {"optim.lr": 0.01})
    assert sum(r.error is not None for r in grid) == 1


def test_a_confirmed_search_runs_its_best_config_again_with_another_seed(tmp_path, ray_cluster) -> None:
    """`tune.confirm`: once the search's trials end, its best config runs again with seed 1, as a trial of the
    same experiment: trained from scratch (another seed changes the shared warm-up), never told to Optuna.
    Then the finished search is extended on --resume (more samples, a larger top_k)."""
    import pickle

    keys = ["loss.temperature", "loss.weight", "memory.size"]
    sets = {"tune.num_samples": 2, "loss.warmup_iters": 2, "tune.scheduler": "fifo"}
    cfg = _smoke(tmp_path, **sets, **{"tune.confirm.top_k": 1, "tune.confirm.seeds": [1]})
    out = tune_mod.run_search(cfg)
    tables, _ = check_tables_against_tune(out.experiment_path, keys)
    trials = tables["trials"].sort_values("started_at")
    assert trials["run.seed"].tolist() == [0, 0, 1] and (trials["status"] == "TERMINATED").all()
    search, confirm = trials.iloc[:2], trials.iloc[2]
    searched_first = search["trial_id"].tolist()
    best = search.sort_values("best_val_miou", ascending=False, kind="stable").iloc[0]
    assert confirm[keys].tolist() == best[keys].tolist()
    assert (search["forked_at"] == 2).all() and pd.isna(confirm["forked_at"])
    at_2 = tables["curves"].query("iteration == 2").set_index("trial_id")["loss"]
    assert at_2[search["trial_id"].iloc[0]] == at_2[search["trial_id"].iloc[1]] != at_2[confirm["trial_id"]]
    assert out.best_trial_id in {best["trial_id"], confirm["trial_id"]}
    with max(Path(out.experiment_path).glob("searcher-state-*.pkl")).open("rb") as f:
        study = pickle.load(f)["inner"]._ot_study.trials
    assert [t.params["loss.temperature"] for t in study] == pytest.approx(search["loss.temperature"].tolist())
    assert not out.interrupted

    # The finished search, extended on --resume: one more search trial, then the new top 2 with seed 1,
    # each (config, seed) once: the best config's seed-1 trial does not run again.
    more = {"tune.num_samples": 3, "tune.confirm.top_k": 2, "tune.confirm.seeds": [1]}
    out = tune_mod.run_search(
        _smoke(tmp_path, **{**sets, **more}), resume=True, accept=["tune.num_samples", "tune.confirm.top_k"]
    )
    tables, _ = check_tables_against_tune(out.experiment_path, keys)
    trials = tables["trials"].sort_values("started_at")
    assert not out.interrupted and (trials["status"] == "TERMINATED").all()
    search, confirm = trials[trials["run.seed"] == 0], trials[trials["run.seed"] == 1]
    assert len(search) == 3 and search["trial_id"].iloc[:2].tolist() == searched_first
    top2 = search.sort_values("best_val_miou", ascending=False, kind="stable").head(2)
    assert sorted(map(tuple, confirm[keys].values.tolist())) == sorted(map(tuple, top2[keys].values.tolist()))


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"search exited early with {proc.returncode}")
        time.sleep(0.5)
    raise AssertionError("timed out")


def _tables(exp: Path) -> dict | None:
    try:
        return load_results(exp)
    except (FileNotFoundError, OSError):
        return None


def _finished(exp: Path) -> int:
    t = _tables(exp)
    return 0 if t is None else int(t["trials"]["status"].isin(["TERMINATED", "STOPPED_EARLY"]).sum())


def _reported(exp: Path, n_trials: int) -> bool:
    """`n_trials` trials exist and the newest has reported at least once."""
    t = _tables(exp)
    if t is None or len(t["trials"]) < n_trials:
        return False
    newest = t["trials"].sort_values("started_at").iloc[-1]["trial_id"]
    return (t["curves"]["trial_id"] == newest).any()


@pytest.mark.extended
@pytest.mark.slow
def test_interrupted_twice_ends_with_the_same_tables(tmp_path, ray_cluster, uninterrupted) -> None:
    """SIGINT once, SIGKILL once, each followed by --resume: the same trials table as the uninterrupted
    search: the same trials, statuses, last iterations, best mIoU and early-stopping decisions. What is
    pinned for a fair comparison: one trial at a time (ASHA's rungs fill in trial order) and the seeds of
    Optuna and of every trial."""
    ref_cfg, ref = uninterrupted
    searched = list(ref_cfg.tune.space)
    storage, cache = tmp_path / "results", tmp_path / "cache"
    args = [sys.executable, "-m", "raycontrast.cli", "tune", "--config", str(SMOKE), "--no-analyze"]
    args += ["--address", ray_cluster]  # the fixture's cluster: no second Ray on a small machine
    for kv in (f"run.storage_path={storage}", f"data.root={cache}", "tune.max_concurrent_trials=1"):
        args += ["--set", kv]
    exp = storage / "smoke"
    for sig, point in (
        (signal.SIGINT, lambda: _reported(exp, 1)),  # the first trial mid-run (it runs to the end)
        (signal.SIGKILL, lambda: _finished(exp) >= 2),  # the next one stopped by ASHA, the third to come
    ):
        log = (tmp_path / f"{sig.name}.log").open("w")
        proc = subprocess.Popen(
            [*args, *(["--resume"] if exp.exists() else [])], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
        )
        try:
            _wait_for(point, 300, proc)
            if sig == signal.SIGINT:  # a second driver is refused while this one runs
                again = subprocess.run(
                    [*args, "--resume"], capture_output=True, text=True, cwd=ROOT, timeout=120
                )
                assert again.returncode == 2 and "is in use by pid" in again.stderr, again.stderr[-2000:]
            proc.send_signal(sig)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        trials = load_results(exp)["trials"]
        assert len(trials) < 3 or (trials["status"] == "RUNNING").any()  # really interrupted mid-search
    done = subprocess.run([*args, "--resume"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    tables, _ = check_tables_against_tune(str(exp), searched)
    want = load_results(ref.experiment_path)["trials"]
    assert search_content(tables["trials"], searched) == search_content(want, searched)
    for tid, its in tables["curves"].groupby("trial_id")["iteration"]:
        assert sorted(its) == list(range(2, int(its.max()) + 1, 2)), tid  # no gaps, no duplicates
