"""Failures with Ray, each checked on the checkpoints and result tables (one module-scoped local Ray with its
dashboard): a Train worker SIGKILLed mid-run, a truncated checkpoint under Ray, and a Tune driver
interrupted with SIGINT then SIGKILL. The machine may be loaded: every wait has a generous timeout and
nothing asserts on wall time.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from raycontrast import checkpoint as ck
from raycontrast.config import load_config
from raycontrast.results import load_results

from conftest import DDP, ROOT, SMOKE, tiny_config
from fault_hooks import FaultHooks

ray = pytest.importorskip("ray")

from raycontrast import train, tune  # noqa: E402
from raycontrast.search import optuna_search  # noqa: E402
from raycontrast.space import initial_points, parse_space  # noqa: E402

# The report log below runs in the Train controller, which cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
WORLD = 2


class ReportLog(ray.train.UserCallback):
    """Appends every report the Train controller receives (rank 0's metrics, checkpoint) to a JSONL file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def after_report(self, run_context, metrics, checkpoint) -> None:
        m = metrics[0]
        line = {"iteration": m["iteration"], "val_miou": m["val_miou"], "loss": m["loss"]}
        line["checkpoint"] = checkpoint.path if checkpoint is not None else None
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")


def _reports(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


def _ray_config(workdir: Path, name: str):
    # smoke: 6 iterations, evaluation + checkpoint every 2, train.max_failures 1
    return tiny_config(workdir, name, **DDP, **{"train.num_to_keep": 3})


def _trainer(cfg, workdir: Path, hooks: FaultHooks):
    log = workdir / f"{cfg.run.name}.reports.jsonl"
    return train.build_trainer(
        cfg,
        name=cfg.run.name,
        storage_path=cfg.run.storage_path,
        callbacks=[ReportLog(str(log))],
        hooks=hooks,
    ), log


def _dumps(d: Path) -> list[dict]:
    return [torch.load(d / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference(ray_cluster, workdir):
    """The uninterrupted 2-worker run: (config, result, per-rank dumps, reports)."""
    cfg, dump = _ray_config(workdir, "reference"), workdir / "dump_reference"
    dump.mkdir()
    trainer, log = _trainer(cfg, workdir, FaultHooks(dump_dir=str(dump)))
    result = trainer.fit()
    return cfg, result, _dumps(dump), _reports(log)


def _same_model(a: dict, b: dict) -> None:
    for k, v in b.items():
        assert torch.equal(a[k], v), k


# ------------------------------------------------------------------------- Ray: SIGKILL of a worker


@pytest.mark.extended
@pytest.mark.slow
@pytest.mark.ray
def test_worker_sigkill_restarts_group_and_resumes(reference, workdir):
    _, _, ref_dumps, ref_reports = reference
    assert [r["iteration"] for r in ref_reports] == [2, 4, 6]
    cfg, dump, pid_file = _ray_config(workdir, "killed"), workdir / "dump_killed", workdir / "killed.pid"
    dump.mkdir()
    # Rank 0 stops at iteration 3 (after the iteration-2 checkpoint, mid-window) and writes its PID.
    trainer, log = _trainer(
        cfg, workdir, FaultHooks(dump_dir=str(dump), pause_at=3, pause_file=str(pid_file))
    )
    box: dict = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # surfaced below
            box["error"] = e

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    end = time.time() + 300
    # Kill only once the controller has registered the iteration-2 report and its checkpoint.
    while not (pid_file.exists() and [r["iteration"] for r in _reports(log)] == [2]):
        assert thread.is_alive() and time.time() < end, box.get("error", "timed out")
        time.sleep(0.5)
    killed = int(pid_file.read_text())
    os.kill(killed, signal.SIGKILL)  # a real crash of the process, not a Python exception
    thread.join(timeout=600)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    result = box["result"]
    assert result.error is None and result.metrics["iteration"] == cfg.train.iterations

    # The curve: every evaluation exactly once, in order, each with its checkpoint, equal to the reference.
    got = _reports(log)
    assert [r["iteration"] for r in got] == [2, 4, 6]
    assert all(r["checkpoint"] for r in got)
    assert [r["val_miou"] for r in got] == [r["val_miou"] for r in ref_reports]
    assert [r["loss"] for r in got] == [r["loss"] for r in ref_reports]
    # A new worker group resumed from the iteration-2 checkpoint and replayed 3..6 exactly.
    for r, (d, ref) in enumerate(zip(_dumps(dump), ref_dumps, strict=True)):
        assert d["start_iteration"] == 2 and d["pid"] != killed, r
        _same_model(d["model"], ref["model"])
        assert torch.equal(d["memory"]["feats"], ref["memory"]["feats"])
        assert torch.equal(d["losses"], ref["losses"][2:])
    # Storage: one complete checkpoint per evaluation, the killed attempt left nothing behind.
    fs, run = pafs.LocalFileSystem(), result.path
    iters = [ck.load_state(fs, p)["iteration"] for p in ck.list_checkpoints(fs, run)]
    assert iters == [2, 4, 6]


# ---------------------------------------------------------------------- Ray: truncated checkpoint


@pytest.mark.slow
@pytest.mark.ray
def test_ray_resume_skips_truncated_checkpoint(reference, workdir):
    cfg, result, ref_dumps, _ = reference
    fs = pafs.LocalFileSystem()
    latest = Path(result.checkpoint.path)  # what Ray registered last (iteration 6)
    assert ck.load_state(fs, str(latest))["iteration"] == 6
    state = latest / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 3])
    dump = workdir / "dump_truncated"
    dump.mkdir()
    out = train.fit(cfg, resume=True, hooks=FaultHooks(dump_dir=str(dump)))
    assert out.metrics["iteration"] == 6
    for d, ref in zip(_dumps(dump), ref_dumps, strict=True):
        assert d["start_iteration"] == 4  # the newest complete checkpoint, not the truncated one
        _same_model(d["model"], ref["model"])
    # Rank 0 said so, in its worker log.
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    said = "".join(p.read_text(errors="replace") for p in logs.rglob("*.out"))
    assert f"checkpoint {state} is incomplete or corrupt (" in said
    assert "; resuming from " in said and "resumed at iteration 4/6" in said
    newest = ck.load_latest(fs, result.path)  # the resumed run wrote a new, complete iteration-6 one
    assert newest.state["iteration"] == 6 and newest.path != str(latest)


# ---------------------------------------------------------- Ray: Tune driver SIGINT, then SIGKILL


LRS = (0.01, 1000000.0)  # SGD at lr 1e6 diverges: non-finite losses end that trial


def _failed_then_checkpointed(exp: Path) -> bool:
    """An ERROR trial in the tables, and a Train checkpoint of another trial on storage."""
    try:
        trials = load_results(exp)["trials"]
    except (FileNotFoundError, OSError):
        return False
    failed = set(trials.loc[trials["status"] == "ERROR", "trial_id"])
    runs = [p for p in (exp / "train_runs").glob("*-train-*") if p.name.rsplit("-", 1)[1] not in failed]
    return bool(failed) and any(any(p.glob("checkpoint_*/state.pt")) for p in runs)


@pytest.mark.slow
@pytest.mark.ray
def test_tune_driver_sigint_then_sigkill_resumes(tmp_path, ray_cluster):
    storage, exp = tmp_path / "results", tmp_path / "results" / "smoke"
    sets = {
        "run.storage_path": str(storage),
        "data.root": str(tmp_path / "cache"),
        "tune.max_concurrent_trials": 1,
        "tune.scheduler": "fifo",
        "tune.max_failures": 0,
        "train.max_failures": 0,
        "train.max_nonfinite_steps": 2,
        "tune.space": {"loss.temperature": {"loguniform": [0.05, 0.5]}, "optim.lr": {"choice": list(LRS)}},
        "tune.points_to_evaluate": [{"loss.temperature": 0.1, "optim.lr": lr} for lr in reversed(LRS)],
    }
    cfg = load_config(SMOKE, sets)
    args = [sys.executable, "-m", "raycontrast.cli", "tune", "--config", str(SMOKE), "--no-analyze"]
    args += ["--address", ray_cluster]
    for k, v in sets.items():
        args += ["--set", f"{k}={json.dumps(v) if isinstance(v, dict | list) else v}"]
    log_path = tmp_path / "first.log"
    log = log_path.open("w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        # Interrupt once the diverging trial has failed and the next one has written a Train checkpoint.
        end = time.time() + 300
        while not _failed_then_checkpointed(exp):
            assert proc.poll() is None and time.time() < end, (
                f"search ended early or timed out: {proc.poll()}"
            )
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # Tune starts saving its state one last time ...
        end = time.time() + 60
        while "Stop signal received" not in log_path.read_text() and time.time() < end:
            time.sleep(0.02)
        proc.kill()  # ... and the impatient user kills it (SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL  # the kill landed in a live driver
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    first = load_results(exp)["trials"]
    assert len(first) < 3 or (first["status"] == "RUNNING").any()  # really interrupted mid-search
    done_before = dict(first.loc[first["status"] != "RUNNING", ["trial_id", "status"]].values)

    again = subprocess.run([*args, "--resume"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]

    # Tables: every planned trial exactly once, finished, with its reason if it failed.
    tables = load_results(exp)
    trials, curves, class_iou = tables["trials"], tables["curves"], tables["class_iou"]
    assert len(trials) == cfg.tune.num_samples and trials["trial_id"].is_unique
    for tid, status in done_before.items():  # finished before the kill: kept, not re-run under new ids
        assert trials.set_index("trial_id").loc[tid, "status"] == status
    assert not curves.duplicated(["trial_id", "iteration"]).any()
    assert not class_iou.duplicated(["trial_id", "iteration", "class_id"]).any()
    for _, row in trials.iterrows():
        its = sorted(curves.loc[curves["trial_id"] == row["trial_id"], "iteration"])
        if row["optim.lr"] == LRS[1]:
            assert row["status"] == "ERROR" and row["error"].startswith(
                "non-finite loss: 2 consecutive steps"
            )
        else:
            assert row["status"] == "TERMINATED" and its == [2, 4, 6], (row["trial_id"], its)
    assert (trials["status"] == "TERMINATED").any() and (trials["status"] == "ERROR").any()

    # Optuna: the restored study holds each trial once, told its outcome, in the seeded sequence.
    with max(exp.glob("searcher-state-*.pkl")).open("rb") as f:  # the newest: Tune saves one per start
        study = pickle.load(f)["inner"]._ot_study.trials  # the Optuna searcher behind SearchSchedule
    by_start = trials.sort_values("started_at")
    keys = ["loss.temperature", "optim.lr"]
    assert [t.params for t in study] == [dict(zip(keys, r, strict=True)) for r in by_start[keys].values]
    assert [t.state.name for t in study] == [
        "COMPLETE" if s == "TERMINATED" else "FAIL" for s in by_start["status"]
    ]
    for t, r in zip(study, by_start.itertuples(index=False), strict=True):
        if r.status == "TERMINATED":
            assert t.value == pytest.approx(r.last_val_miou)
    params = parse_space(cfg)
    fresh = optuna_search(cfg, initial_points(cfg, params))
    fresh.set_search_properties(tune.METRIC, tune.MODE, tune.to_tune_space(params))
    expected = [fresh.suggest(f"ref{i}") for i in range(cfg.tune.num_samples)]
    assert [t.params for t in study] == expected
