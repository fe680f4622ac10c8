"""Failures a long search meets on a shared cluster, each checked on the checkpoints and result tables.

Fast (no Ray): a writer process SIGKILLed in the middle of writing a result table, a checkpoint or a canvas
cache leaves the previous file intact; a local run resumes past a truncated checkpoint.
Slow (one module-scoped local Ray with its dashboard, reused from test_tune): a Train worker SIGKILLed
mid-run, a truncated checkpoint under Ray, and a Tune driver interrupted with SIGINT then SIGKILL.
The machine may be loaded: every wait has a generous timeout and nothing asserts on wall time.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from raycontrast import checkpoint as ck
from raycontrast.config import load_config
from raycontrast.data.canvases import CanvasDataset, save_npz_atomic
from raycontrast.results import ResultsWriter, load_results

ROOT = Path(__file__).parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
KILL_TIMEOUT = 180  # s: waits for a child to reach its kill point on a loaded machine

# ------------------------------------------------------------------------ SIGKILL of a writer mid-write

# The child rewrites one file with the project's own writer; its storage is slowed down (512-byte chunks, a
# pause before each once 2 KiB are out) and it prints MID-WRITE at that point, so the test's SIGKILL lands
# with the temporary file half-written.
WRITER_CHILD = r"""
import os, sys, time
import numpy as np
mode, target = sys.argv[1], sys.argv[2]
CHUNK = 512

class Slow:
    def __init__(self, f):
        self._f, self._n, self._said = f, 0, False
    def __getattr__(self, name):
        return getattr(self._f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self._f.close()
    def write(self, data):
        data = memoryview(data).cast("B")
        for i in range(0, len(data), CHUNK):
            if self._n >= 2048:
                if not self._said:
                    print("MID-WRITE", flush=True)
                    self._said = True
                time.sleep(0.05)
            self._f.write(data[i : i + CHUNK])
            self._f.flush()
            self._n += len(data[i : i + CHUNK])
        return len(data)

class SlowFS:
    def __init__(self, fs):
        self._fs = fs
    def __getattr__(self, name):
        return getattr(self._fs, name)
    def open_output_stream(self, path):
        return Slow(self._fs.open_output_stream(path))

real_fdopen = os.fdopen
os.fdopen = lambda fd, *a, **k: Slow(real_fdopen(fd, *a, **k))
import pyarrow.fs as pafs
fs = SlowFS(pafs.LocalFileSystem())
if mode == "table":
    from raycontrast.results import ResultsWriter
    w = ResultsWriter(target, class_names=["a", "b"], searched_keys=["x.y"])
    w.load_existing()  # a resumed search: the old rows, then many new ones written to slow storage
    w.fs = fs
    for t in range(200):
        w.on_report(f"new{t}", {"x.y": float(t)}, {"iteration": 2, "val_miou": 0.5, "val_class_iou": [0.5, 0.5]})
    w.flush()
elif mode == "checkpoint":
    import torch
    from raycontrast.checkpoint import capture_rng_state, save_state
    state = {"model": {"w": torch.zeros(10**5)}, "optimizer": {}, "scheduler": {}, "iteration": 4,
             "rng": capture_rng_state()}
    save_state(fs, target, state)
elif mode == "npz":
    from raycontrast.data.canvases import save_npz_atomic
    save_npz_atomic(target, a=np.arange(10**5))
elif mode == "dataset":
    from raycontrast.data.canvases import CanvasDataset
    CanvasDataset(target, "train", num_images=8, height=64, width=128)
print("DONE", flush=True)
"""


def _kill_when_mid_write(mode: str, target: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER_CHILD, mode, str(target)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        end, line = time.time() + KILL_TIMEOUT, ""
        while time.time() < end and line != "MID-WRITE":
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                line = proc.stdout.readline().strip()
                if not line and proc.poll() is not None:
                    break
        assert line == "MID-WRITE", f"child never reached the write ({line!r}): {proc.stderr.read()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()


def _partial_temps(d: Path) -> list[Path]:
    """The killed writer's temporary files: there must be one, half-written (proves the kill was mid-write)."""
    temps = [p for p in d.iterdir() if "tmp" in p.name]
    assert len(temps) == 1 and temps[0].stat().st_size >= 1024, temps
    return temps


def test_sigkill_mid_table_write_keeps_previous_tables(tmp_path):
    w = ResultsWriter(tmp_path, class_names=["a", "b"], searched_keys=["x.y"])
    w.on_report("old", {"x.y": 1.0}, {"iteration": 2, "val_miou": 0.25, "val_class_iou": [0.25, 0.25]})
    w.on_trial_end("old", "TERMINATED")
    before = {n: (tmp_path / f"{n}.parquet").read_bytes() for n in ("trials", "curves", "class_iou")}
    _kill_when_mid_write("table", tmp_path)
    for name, data in before.items():
        assert (tmp_path / f"{name}.parquet").read_bytes() == data, name
    (temp,) = _partial_temps(tmp_path)
    assert temp.name.startswith("trials.parquet.tmp-")  # trials is written first
    with pytest.raises(Exception):  # noqa: B017 - any parquet error: the file is cut short
        pq.read_table(temp)
    tables = load_results(tmp_path)
    assert tables["trials"]["trial_id"].tolist() == ["old"] and len(tables["curves"]) == 1


def test_sigkill_mid_checkpoint_write_keeps_previous_state(tmp_path):
    fs, ckdir = pafs.LocalFileSystem(), tmp_path / "run" / "checkpoint_00000004"
    state = {"model": {"w": torch.ones(3)}, "optimizer": {}, "scheduler": {}, "iteration": 2, "rng": {}}
    ck.save_state(fs, str(ckdir), state)
    before = (ckdir / "state.pt").read_bytes()
    _kill_when_mid_write("checkpoint", ckdir)
    assert (ckdir / "state.pt").read_bytes() == before
    _partial_temps(ckdir)
    loaded = ck.load_latest(fs, str(tmp_path / "run"))
    assert loaded.state["iteration"] == 2 and loaded.skipped == []


def test_sigkill_mid_npz_write_keeps_previous_file(tmp_path):
    path = tmp_path / "cache.npz"
    save_npz_atomic(path, a=np.arange(10))
    before = path.read_bytes()
    _kill_when_mid_write("npz", path)
    assert path.read_bytes() == before
    _partial_temps(tmp_path)
    with np.load(path) as z:
        np.testing.assert_array_equal(z["a"], np.arange(10))


def test_sigkill_while_caching_canvases_leaves_no_cache(tmp_path):
    _kill_when_mid_write("dataset", tmp_path)
    (temp,) = _partial_temps(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".npz")]  # nothing at the final name
    with warnings.catch_warnings():  # a half-written cache is never found, so never warned about
        warnings.simplefilter("error")
        ds = CanvasDataset(tmp_path, "train", num_images=8, height=64, width=128)
    with np.load(ds.cache_path) as z:
        assert np.array_equal(z["images"], ds.images)


# ------------------------------------------------------------------- truncated checkpoint, local mode


def _local_config(tmp_path, name: str, **overrides):
    base = {
        "run.name": name,
        "run.storage_path": str(tmp_path / "results"),
        "data.root": str(tmp_path / "cache"),
        "data.canvases.train_images": 4,
        "data.canvases.val_images": 2,
        "train.workers": 0,
        "train.num_to_keep": 3,
        "memory.size": 20,
    }
    return load_config(SMOKE, {**base, **overrides})


def test_local_resume_skips_truncated_checkpoint(tmp_path, capsys):
    from raycontrast import train

    dumps = {k: tmp_path / f"dump_{k}" for k in ("ref", "resumed")}
    for d in dumps.values():
        d.mkdir()
    train.fit(_local_config(tmp_path, "reference"), loop_extras={"_debug_dump_dir": str(dumps["ref"])})
    cfg = _local_config(tmp_path, "damaged")
    out = train.fit(cfg)
    run = Path(out.run_path)
    assert sorted(p.name for p in run.iterdir()) == [f"checkpoint_{i:08d}" for i in (2, 4, 6)]
    state = run / "checkpoint_00000006" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 3])  # e.g. a copy cut short
    capsys.readouterr()
    out = train.fit(cfg, resume=True, loop_extras={"_debug_dump_dir": str(dumps["resumed"])})
    said = capsys.readouterr().out
    assert f"checkpoint {state} is incomplete or corrupt (" in said
    assert f"; resuming from {run / 'checkpoint_00000004'} instead" in said
    assert "resumed at iteration 4/6" in said
    ref, got = (torch.load(d / "rank0.pt", weights_only=True) for d in (dumps["ref"], dumps["resumed"]))
    assert got["start_iteration"] == 4 and out.metrics["iteration"] == 6
    for k, v in ref["model"].items():  # iterations 5 and 6 replayed exactly
        assert torch.equal(got["model"][k], v), k
    assert torch.equal(got["losses"], ref["losses"][4:])
    # The damaged checkpoint was rewritten, complete, by the resumed run.
    assert ck.load_state(pafs.LocalFileSystem(), str(state.parent))["iteration"] == 6


# ------------------------------------------------------------------------------------- Ray: fixtures

ray = pytest.importorskip("ray")
import test_tune  # noqa: E402 - its private Ray fixture (dashboard on, pinned State API address)
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from raycontrast import train, tune  # noqa: E402
from raycontrast.space import initial_points, parse_space  # noqa: E402

ray_cluster = test_tune.ray_cluster
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
    return load_config(
        SMOKE,
        {
            "run.name": name,
            "run.storage_path": str(workdir / "results"),
            "data.root": str(workdir / "cache"),
            "data.canvases.train_images": 8,
            "data.canvases.val_images": 4,
            "train.workers": WORLD,
            "train.num_to_keep": 3,
            "memory.size": 20,
        },
    )  # smoke: 6 iterations, evaluation + checkpoint every 2, train.max_failures 1


def _trainer(cfg, workdir: Path, **extras):
    log = workdir / f"{cfg.run.name}.reports.jsonl"
    return train.build_trainer(
        cfg,
        name=cfg.run.name,
        storage_path=cfg.run.storage_path,
        callbacks=[ReportLog(str(log))],
        loop_extras=extras,
    ), log


def _dumps(d: Path) -> list[dict]:
    return [torch.load(d / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference(ray_cluster, workdir):
    """The uninterrupted 2-worker run: (config, result, per-rank dumps, reports)."""
    cfg, dump = _ray_config(workdir, "reference"), workdir / "dump_reference"
    dump.mkdir()
    trainer, log = _trainer(cfg, workdir, _debug_dump_dir=str(dump))
    result = trainer.fit()
    return cfg, result, _dumps(dump), _reports(log)


def _same_model(a: dict, b: dict) -> None:
    for k, v in b.items():
        assert torch.equal(a[k], v), k


# ------------------------------------------------------------------------- Ray: SIGKILL of a worker


@pytest.mark.slow
@pytest.mark.ray
def test_worker_sigkill_restarts_group_and_resumes(reference, workdir):
    _, _, ref_dumps, ref_reports = reference
    assert [r["iteration"] for r in ref_reports] == [2, 4, 6]
    cfg, dump, pid_file = _ray_config(workdir, "killed"), workdir / "dump_killed", workdir / "killed.pid"
    dump.mkdir()
    # Rank 0 stops at iteration 3 (after the iteration-2 checkpoint, mid-window) and writes its PID.
    trainer, log = _trainer(
        cfg, workdir, _debug_dump_dir=str(dump), _pause_at_iteration=3, _pause_file=str(pid_file)
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
    out = train.fit(cfg, resume=True, loop_extras={"_debug_dump_dir": str(dump)})
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
    searcher = OptunaSearch()
    searcher.restore_from_dir(str(exp))
    study = searcher._ot_study.trials
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
    fresh = OptunaSearch(points_to_evaluate=initial_points(cfg, params), seed=cfg.run.seed)
    fresh.set_search_properties(tune.METRIC, tune.MODE, tune.to_tune_space(params))
    expected = [fresh.suggest(f"ref{i}") for i in range(cfg.tune.num_samples)]
    assert [t.params for t in study] == expected
