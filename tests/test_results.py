"""Result tables: exact schemas, atomic writes, keyed replacement, resume and crash consistency."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from raycontrast.config import apply_overrides, flatten, load_config
from raycontrast.results import (
    CLASS_IOU_SCHEMA,
    CURVES_SCHEMA,
    TRIALS_FIXED_FIELDS,
    ResultsWriter,
    load_results,
    short_error,
    trial_config,
)

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
CLASSES = ["a", "b", "c"]
SEARCHED = ["loss.temperature", "memory.size"]


class Clock:
    def __init__(self) -> None:
        self.t = 1_000.0

    def __call__(self) -> float:
        return self.t


def _flat(**overrides) -> dict:
    return flatten(apply_overrides(load_config(SMOKE), overrides))


def _metrics(it: int, miou: float, **extra) -> dict:
    return {
        "iteration": it, "epoch": it // 2, "lr": 0.01, "loss": 1.0, "ce_loss": 0.9, "contrast_loss": 1.0,
        "val_miou": miou, "val_pixel_acc": 0.8, "val_class_iou": [miou, float("nan"), 0.5],
        "anchors": 30.0, "hard_share": 0.4, "intra_cos": 0.6, "inter_cos": 0.1, "memory_fill": 0.0,
        "nonfinite_steps": 0, "images_per_s": 5.0, "time_s": float(it), "worker_seconds": 2.0 * it,
        "peak_rss_mb": 800.0 + it, "train_time_s": 0.5 * it, "eval_time_s": 0.1, **extra,
    }  # fmt: skip


def _writer(tables: Path | str, clock: Clock | None = None, **kw) -> ResultsWriter:
    return ResultsWriter(tables, class_names=CLASSES, searched_keys=SEARCHED, clock=clock or Clock(), **kw)


def _tmp_files(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if ".tmp-" in p.name]


def test_schemas_exact(tmp_path):
    w = _writer(tmp_path)
    w.on_report("t1", _flat(), _metrics(2, 0.4))
    w.on_trial_end("t1", "TERMINATED")
    assert pq.read_schema(tmp_path / "curves.parquet").equals(CURVES_SCHEMA)
    assert pq.read_schema(tmp_path / "class_iou.parquet").equals(CLASS_IOU_SCHEMA)
    schema = pq.read_schema(tmp_path / "trials.parquet")
    fixed = len(TRIALS_FIXED_FIELDS)
    assert list(schema)[:fixed] == list(TRIALS_FIXED_FIELDS)
    assert schema.field("searched").type == pa.list_(pa.string())
    assert schema.field("started_at").type == pa.timestamp("us", tz="UTC")
    assert not schema.field("trial_id").nullable
    types = {f.name: f.type for f in list(schema)[fixed:]}
    assert set(types) == set(_flat())  # every hyperparameter, searched or fixed, as a dotted column
    assert types["loss.temperature"] == pa.float64()
    assert types["memory.size"] == pa.int64()
    assert types["model.sync_bn"] == pa.bool_()
    assert types["model.variant"] == pa.string()
    assert types["data.crop_size"] == pa.string()  # list -> JSON
    assert types["optim.grad_clip"] == pa.string()  # always None so far
    trials = load_results(tmp_path)["trials"]
    assert {"data.crop_size", "tune.space", "tune.points_to_evaluate"} <= set(trials.attrs["json_columns"])
    assert list(trials.loc[0, "searched"]) == SEARCHED


def test_values_and_summary(tmp_path):
    clock = Clock()
    w = _writer(tmp_path, clock, target_iterations=6)
    w.on_trial_start("t1", _flat())
    for it, v in [(2, 0.3), (4, 0.5), (6, 0.45)]:
        clock.t += 10
        w.on_report("t1", None, _metrics(it, v))
    w.on_trial_end("t1", "TERMINATED")
    r = load_results(tmp_path)
    row = r["trials"].iloc[0]
    assert row["status"] == "TERMINATED"
    assert (row["best_val_miou"], row["iteration_of_best"]) == (0.5, 4)
    assert (row["last_val_miou"], row["last_iteration"], row["num_reports"]) == (0.45, 6, 3)
    assert row["worker_seconds"] == 12.0 and row["peak_rss_mb"] == 806.0
    assert row["time_to_first_report_s"] == 10.0 and row["wall_time_s"] == 30.0
    iou = r["class_iou"]
    assert len(iou) == 9 and list(iou["class_name"][:3]) == CLASSES
    assert math.isnan(iou[(iou.iteration == 2) & (iou.class_id == 1)]["iou"].item())
    assert trial_config(r["trials"], "t1") == _flat()  # tuples come back as lists, dicts as dicts


def test_stopped_early_and_error_reason(tmp_path):
    w = _writer(tmp_path, target_iterations=6)
    w.on_report("short", _flat(), _metrics(2, 0.3))
    w.on_trial_end("short", "TERMINATED")  # ASHA stopped it before iteration 6
    w.on_report("bad", _flat(), _metrics(2, 0.3))
    tb = (
        'Traceback (most recent call last):\n  File "x", line 3\n'
        '    raise NonFiniteLossError(f"non-finite loss: {m}")\n'
        "raycontrast.engine.NonFiniteLossError: non-finite loss: nan at 3\n"
    )
    w.on_trial_end("bad", "ERROR", error=RuntimeError(tb))
    trials = load_results(tmp_path)["trials"].set_index("trial_id")
    assert trials.loc["short", "status"] == "STOPPED_EARLY"
    assert trials.loc["bad", "error"] == "non-finite loss: nan at 3"
    assert short_error("boom\nValueError: last line") == "ValueError: last line"
    assert math.isnan(trials.loc["bad", "time_to_first_report_s"])  # start never seen: unknown, not 0
    with pytest.raises(ValueError, match="FAILED"):
        w.on_trial_end("bad", "FAILED")
    w.on_report("bad", None, _metrics(4, 0.3))  # Tune restarted the failed trial
    w.flush()
    trials = load_results(tmp_path)["trials"].set_index("trial_id")
    assert trials.loc["bad", "status"] == "RUNNING" and trials.loc["bad", "num_reports"] == 2


class FailingFS:
    """Delegates to a real filesystem; fails writes to paths containing `target` half-way or at the rename."""

    def __init__(self, fs: pafs.FileSystem, target: str, at: str) -> None:
        self._fs, self.target, self.at = fs, target, at

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def open_output_stream(self, path):
        stream = self._fs.open_output_stream(path)
        if self.target not in path or self.at != "write":
            return stream

        class Half:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                stream.close()

            def write(self, data):
                stream.write(data[: len(data) // 2])
                raise OSError("disk full")

        return Half()

    def move(self, src, dst):
        if self.target in dst and self.at == "move":
            raise OSError("rename failed")
        return self._fs.move(src, dst)


@pytest.mark.parametrize("table", ["trials", "curves", "class_iou"])
@pytest.mark.parametrize("at", ["write", "move"])
def test_atomic_write_keeps_previous_file(tmp_path, at, table):
    w = _writer(tmp_path)
    w.on_report("t1", _flat(), _metrics(2, 0.3))
    w.flush()
    before = (tmp_path / f"{table}.parquet").read_bytes()
    w.on_report("t1", _flat(), _metrics(4, 0.4))
    w.on_report("t2", _flat(), _metrics(2, 0.1))  # a new trial appears in all three tables
    w.fs = FailingFS(w.fs, f"{table}.parquet", at)
    with pytest.raises(OSError):
        w.flush()
    assert (tmp_path / f"{table}.parquet").read_bytes() == before
    assert _tmp_files(tmp_path) == []
    # whichever table failed, trials is never behind the others: every trial they mention is in trials
    r = load_results(tmp_path)
    for name in ("curves", "class_iou"):
        assert set(r[name].trial_id) <= set(r["trials"].trial_id)


def test_rereport_replaces_not_duplicates(tmp_path):
    w = _writer(tmp_path)
    w.on_report("t1", _flat(), _metrics(2, 0.3))
    w.on_report("t1", _flat(), _metrics(4, 0.6))
    w.on_report("t1", _flat(), _metrics(4, 0.5))  # resumed from a checkpoint: iteration 4 again
    w.flush()
    w.flush()  # re-writing never duplicates
    r = load_results(tmp_path)
    assert len(r["curves"]) == 2 and len(r["class_iou"]) == 6 and len(r["trials"]) == 1
    assert r["curves"].set_index("iteration").loc[4, "val_miou"] == 0.5  # the newest wins
    assert r["trials"].loc[0, "best_val_miou"] == 0.5
    assert r["class_iou"].duplicated(["trial_id", "iteration", "class_id"]).sum() == 0


def test_resume_keeps_existing_rows(tmp_path):
    clock = Clock()
    w1 = _writer(tmp_path, clock)
    w1.on_trial_start("t1", _flat(**{"loss.temperature": 0.2}))
    clock.t += 5
    w1.on_report("t1", None, _metrics(2, 0.3))
    w1.on_report("t2", _flat(), _metrics(2, 0.2))
    clock.t += 5
    w1.on_trial_end("t1", "TERMINATED")
    first = load_results(tmp_path)

    w2 = _writer(tmp_path, clock)  # a resumed search
    assert w2.load_existing() == 2
    w2.on_report("t2", None, _metrics(2, 0.25))  # t2 re-reports its iteration 2 after the restart
    w2.on_report("t2", None, _metrics(4, 0.35))
    w2.on_trial_end("t2", "TERMINATED")
    r = load_results(tmp_path)
    t = r["trials"].set_index("trial_id")
    assert list(t.index) == ["t1", "t2"]
    cols = ["status", "best_val_miou", "wall_time_s", "time_to_first_report_s", "started_at", "ended_at"]
    assert t.loc["t1", cols].tolist() == first["trials"].set_index("trial_id").loc["t1", cols].tolist()
    assert trial_config(r["trials"], "t1")["loss.temperature"] == 0.2
    assert trial_config(r["trials"], "t1") == trial_config(first["trials"], "t1")
    assert len(r["curves"]) == 3 and t.loc["t2", "best_val_miou"] == 0.35
    assert r["curves"].set_index(["trial_id", "iteration"]).loc[("t2", 2), "val_miou"] == 0.25
    assert _writer(tmp_path / "empty").load_existing() == 0
    (tmp_path / "curves.parquet").unlink()  # a crash between the first trials and curves writes
    (tmp_path / "class_iou.parquet").unlink()
    assert _writer(tmp_path).load_existing() == 2


def test_crash_mid_search_leaves_consistent_tables(tmp_path):
    clock = Clock()
    w = _writer(tmp_path, clock, flush_interval_s=10.0)
    w.on_report("t1", _flat(), _metrics(2, 0.3))  # first report flushes
    clock.t += 5
    w.on_report("t2", _flat(), _metrics(2, 0.2))  # within 10 s: not yet on disk
    assert set(load_results(tmp_path)["trials"].trial_id) == {"t1"}
    clock.t += 6
    w.on_report("t1", _flat(), _metrics(4, 0.4))  # 11 s after the last flush
    del w  # the driver dies here: no trial end, no final flush
    r = load_results(tmp_path)
    assert set(r["trials"].trial_id) == {"t1", "t2"}
    assert set(r["trials"].status) == {"RUNNING"}
    for name in ("curves", "class_iou"):
        assert set(r[name].trial_id) <= set(r["trials"].trial_id)
    assert len(r["curves"]) == 3 and _tmp_files(tmp_path) == []


def test_load_results_missing_dir_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="raycontrast tune") as exc:
        load_results(tmp_path / "nope")
    assert str(tmp_path / "nope" / "tables" / "trials.parquet") in str(exc.value)


def test_subtree_and_uri_filesystems(tmp_path):
    sub = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    w = _writer("exp/tables", filesystem=sub)
    w.on_report("t1", _flat(), _metrics(2, 0.3))
    w.on_trial_end("t1", "TERMINATED")
    assert (tmp_path / "exp" / "tables" / "trials.parquet").is_file()
    for path, fs in [
        ("exp", sub),
        ("exp/tables", sub),
        (f"file://{tmp_path}/exp", None),
        (tmp_path / "exp", None),
    ]:
        r = load_results(path, filesystem=fs)
        assert r["trials"].loc[0, "trial_id"] == "t1" and len(r["curves"]) == 1


def test_a_damaged_table_is_named(tmp_path):
    w = _writer(tmp_path)
    w.on_report("t1", _flat(), _metrics(2, 0.3))
    w.on_trial_end("t1", "TERMINATED")
    curves = tmp_path / "curves.parquet"
    curves.write_bytes(curves.read_bytes()[:-20])  # the footer cut off
    with pytest.raises(ValueError, match=f"results table {curves} is not a readable Parquet file"):
        load_results(tmp_path)
