"""Writing a search's result tables (`raycontrast.tables`) as trials report and end (no Ray).

`ResultsWriter` keeps all rows in memory keyed by (trial_id), (trial_id, iteration) and (trial_id, iteration,
class_id): a re-reported key replaces the old row, so a trial that resumes from a checkpoint and reports an
iteration again never duplicates it; whole tables are rewritten. Every table is serialised in memory first,
then written atomically (`storage.write_atomic`: a renamed temporary sibling on disks and NFS, one upload on
object stores). `trials` is written first, so a crash between two tables still leaves every trial of
`curves`/`class_iou` present in `trials`. `load_results` reads them back as pandas DataFrames.
"""

from __future__ import annotations

import math
import os
import posixpath
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raycontrast.storage import exists, locate, write_atomic
from raycontrast.tables import (
    CLASS_IOU_SCHEMA,
    CURVES_SCHEMA,
    STATUSES,
    TABLES,
    TRIALS_FIXED_FIELDS,
    TRUNK_SCHEMA,
    column_type,
    decode_config,
    json_columns,
    load_results,
    num,
    plain,
    read_tables,
    short_error,
    to_json,
    trial_config,
    trials_schema,
    ts,
)

TRUNK_ID = "trunk"  # the Train run name of a search's shared warm-up

__all__ = [
    "TRUNK_ID",
    "CLASS_IOU_SCHEMA",
    "CURVES_SCHEMA",
    "STATUSES",
    "TRIALS_FIXED_FIELDS",
    "ResultsWriter",
    "TrialRecord",
    "load_results",
    "short_error",
    "trial_config",
    "trials_schema",
]


def _table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


# ------------------------------------------------------------------------------------------- writer


@dataclass
class TrialRecord:
    """What the writer knows of one trial besides its curve rows (times are Unix seconds)."""

    config: dict[str, Any]  # flattened: dotted key -> value
    searched: list[str]
    started_at: float
    start_known: bool  # seen at its start (not first at a report), so time to first report means something
    status: str = "RUNNING"
    error: str | None = None
    first_report_at: float | None = None
    last_seen: float | None = None
    ended_at: float | None = None
    disk_bytes: int | None = None
    forked_at: int | None = None  # started from the shared warm-up trunk at this iteration
    kept: str | None = None  # once ended: the checkpoint its retention kept as the best
    retained: bool = False  # retention has run (kept None then means none was kept)

    def running_again(self) -> None:
        """Tune restarted the trial (`tune.max_failures`) or a resumed search continues it."""
        self.status, self.error, self.ended_at = "RUNNING", None, None

    def summary(self, trial_id: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The fixed columns of its `trials` row, from its curve rows (sorted by iteration), so re-reports
        stay consistent."""
        val = [
            (r["iteration"], r["val_miou"])
            for r in rows
            if r["val_miou"] is not None and not math.isnan(r["val_miou"])
        ]
        best = max(val, key=lambda x: (x[1], -x[0]), default=(None, None))  # ties -> earliest iteration
        end, first = self.ended_at or self.last_seen, self.first_report_at
        rss = [r["peak_rss_mb"] for r in rows if r["peak_rss_mb"] is not None]
        return {
            "trial_id": trial_id, "status": self.status, "error": self.error, "searched": self.searched,
            "best_val_miou": best[1], "last_val_miou": val[-1][1] if val else None,
            "iteration_of_best": best[0], "last_iteration": rows[-1]["iteration"] if rows else None,
            "num_reports": len(rows), "wall_time_s": None if end is None else end - self.started_at,
            "worker_seconds": rows[-1]["worker_seconds"] if rows else None,
            "peak_rss_mb": max(rss) if rss else None,
            "time_to_first_report_s": None if first is None else first - self.started_at,
            "disk_bytes": self.disk_bytes, "forked_at": self.forked_at,
            "best_checkpoint": self._best_ckpt(rows),
            "started_at": ts(self.started_at), "ended_at": ts(self.ended_at),
        }  # fmt: skip

    def _best_ckpt(self, rows: list[dict[str, Any]]) -> str | None:
        """The kept best checkpoint once ended; while running, that of the best report with a checkpoint
        (Train keeps its best `train.num_to_keep` by val mIoU)."""
        if self.retained:
            return self.kept
        scored = [
            (r["val_miou"], -r["iteration"], r["checkpoint_path"])
            for r in rows
            if r.get("checkpoint_path") and r["val_miou"] is not None and not math.isnan(r["val_miou"])
        ]
        return max(scored)[2] if scored else None

    @classmethod
    def from_row(cls, row: Mapping[str, Any], json_columns: Iterable[str], now: float) -> TrialRecord:
        """The record behind a `trials` table row (a resumed search continues from the tables)."""
        started = row["started_at"].timestamp() if row["started_at"] else now
        ttfr, wall = row["time_to_first_report_s"], row["wall_time_s"]
        return cls(
            config=decode_config(row, json_columns),
            searched=list(row["searched"] or []),
            started_at=started,
            start_known=ttfr is not None or not row["num_reports"],
            status=row["status"],
            error=row["error"],
            first_report_at=None if ttfr is None else started + ttfr,
            last_seen=None if wall is None else started + wall,
            ended_at=row["ended_at"].timestamp() if row["ended_at"] else None,
            disk_bytes=row.get("disk_bytes"),
            forked_at=row.get("forked_at"),
            kept=row.get("best_checkpoint"),
            retained=row["status"] != "RUNNING" and row.get("disk_bytes") is not None,
        )


class ResultsWriter:
    """Collects Tune reports into the three tables and writes them atomically.

    `tables_dir` is a local path, a URI (`s3://bucket/prefix/exp/tables`) or a path on `filesystem`.
    `target_iterations`: a trial ending TERMINATED before reaching it is recorded as STOPPED_EARLY (ASHA).
    `flush_interval_s` rate-limits flushes on reports; trial ends always flush. `clock` is injectable for tests.
    """

    def __init__(
        self,
        tables_dir: str | os.PathLike[str],
        *,
        class_names: list[str],
        searched_keys: Iterable[str],
        filesystem: pafs.FileSystem | None = None,
        target_iterations: int | None = None,
        flush_interval_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.fs, self.dir = locate(tables_dir, filesystem)
        self.class_names = list(class_names)
        self.searched_keys = sorted(searched_keys)
        self.target_iterations = target_iterations
        self.flush_interval_s = flush_interval_s
        self.clock = clock
        self._trials: dict[str, TrialRecord] = {}
        self._curves: dict[tuple[str, int], dict[str, Any]] = {}
        self._class_iou: dict[tuple[str, int, int], dict[str, Any]] = {}
        self._trunk: dict[str, Any] | None = None
        self._last_flush = -math.inf
        # Tune calls back on its driver thread; a user may flush from another one.
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks (tuner.pkl); locks cannot be
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def path(self, table: str) -> str:
        return posixpath.join(self.dir, f"{table}.parquet")

    # ---- events -------------------------------------------------------------------------------

    def _trial(self, trial_id: str, config_flat: Mapping[str, Any] | None, start: bool) -> TrialRecord:
        rec = self._trials.get(trial_id)
        if rec is None:
            rec = self._trials[trial_id] = TrialRecord({}, list(self.searched_keys), self.clock(), start)
        if config_flat:
            rec.config = {k: plain(v) for k, v in config_flat.items()}
        return rec

    def on_trial_start(self, trial_id: str, config_flat: Mapping[str, Any] | None = None) -> None:
        """Record a trial's start time and config (optional: the first report does it too)."""
        with self._lock:
            rec = self._trial(str(trial_id), config_flat, start=True)
            if rec.status != "RUNNING":  # restarted after an error (Tune's max_failures)
                rec.running_again()

    def on_report(
        self, trial_id: str, config_flat: Mapping[str, Any] | None, metrics: Mapping[str, Any]
    ) -> None:
        """One report (the train loop's metrics dict); `val_class_iou` becomes class_iou rows."""
        it = metrics.get("iteration", metrics.get("training_iteration"))
        if it is None:
            raise ValueError(f"report of trial {trial_id} has no 'iteration' (keys: {sorted(metrics)})")
        tid, it, now = str(trial_id), int(plain(it)), self.clock()
        with self._lock:
            rec = self._trial(tid, config_flat, start=False)
            if rec.first_report_at is None and rec.start_known:
                rec.first_report_at = now
            if rec.status == "ERROR":  # reporting again: Tune restarted it (tune.max_failures)
                rec.running_again()
            rec.last_seen = now
            row: dict[str, Any] = {"trial_id": tid, "iteration": it}
            row["checkpoint_path"] = metrics.get("checkpoint_path") or None
            for f in CURVES_SCHEMA:
                if f.name not in row:
                    v = num(metrics.get(f.name))
                    if v is not None and pa.types.is_integer(f.type):
                        v = int(v) if math.isfinite(v) else None
                    row[f.name] = v
            self._curves[(tid, it)] = row
            ious = metrics.get("val_class_iou")
            for cid, iou in enumerate(() if ious is None else ious):
                name = self.class_names[cid] if cid < len(self.class_names) else f"class_{cid}"
                self._class_iou[(tid, it, cid)] = {
                    "trial_id": tid, "iteration": it, "class_id": cid, "class_name": name, "iou": num(iou)
                }  # fmt: skip
        if now - self._last_flush >= self.flush_interval_s:
            self.flush()

    def on_trial_end(self, trial_id: str, status: str, error: str | BaseException | None = None) -> None:
        """Final status (TERMINATED / STOPPED_EARLY / ERROR) and failure reason; flushes the tables."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r} of trial {trial_id} is not one of {', '.join(STATUSES)}")
        with self._lock:
            rec = self._trial(str(trial_id), None, start=False)
            last = max((it for (t, it) in self._curves if t == str(trial_id)), default=None)
            if status == "TERMINATED" and self.target_iterations and (last or 0) < self.target_iterations:
                status = "STOPPED_EARLY"
            rec.status, rec.error, rec.ended_at = status, short_error(error), self.clock()
        self.flush()

    def scores(self, trial_id: str) -> dict[int, float]:
        """The trial's val mIoU per reported iteration (NaN left out)."""
        with self._lock:
            return {
                it: r["val_miou"]
                for (t, it), r in self._curves.items()
                if t == trial_id and r["val_miou"] is not None and not math.isnan(r["val_miou"])
            }

    def on_fork(self, trial_id: str, iteration: int) -> None:
        """The trial starts from the shared warm-up trunk at `iteration`."""
        with self._lock:
            self._trial(str(trial_id), None, start=False).forked_at = int(iteration)

    def on_trunk(self, fork_at: int, memory_size: int, worker_seconds: float) -> None:
        """The search's shared warm-up reached its fork, having cost `worker_seconds`; flushes."""
        with self._lock:
            self._trunk = {
                "fork_at": int(fork_at), "memory_size": int(memory_size), "worker_seconds": float(worker_seconds),
                "ended_at": ts(self.clock()),
            }  # fmt: skip
        self.flush()

    def on_disk_use(self, trial_id: str, disk_bytes: int, best_checkpoint: str | None = None) -> None:
        """What the ended trial keeps on storage, and the best checkpoint among it (None: none kept);
        written with the next flush."""
        with self._lock:
            rec = self._trial(str(trial_id), None, start=False)
            rec.disk_bytes, rec.kept, rec.retained = int(disk_bytes), best_checkpoint, True

    def forget(self, trial_ids: set[str]) -> None:
        """Drop every row of these trials (they run again under new ids after a resume)."""
        with self._lock:
            self._trials = {t: r for t, r in self._trials.items() if t not in trial_ids}
            self._curves = {k: r for k, r in self._curves.items() if k[0] not in trial_ids}
            self._class_iou = {k: r for k, r in self._class_iou.items() if k[0] not in trial_ids}

    # ---- tables -------------------------------------------------------------------------------

    def tables(self) -> dict[str, pa.Table]:
        """The three tables as they stand (sorted by key), with exact schemas."""
        with self._lock:
            keys = sorted({k for rec in self._trials.values() for k in rec.config})
            types, json_cols = {}, []
            for k in keys:
                types[k], is_json = column_type(rec.config.get(k) for rec in self._trials.values())
                if is_json:
                    json_cols.append(k)
            curves = [self._curves[k] for k in sorted(self._curves)]
            by_trial: dict[str, list[dict[str, Any]]] = {}
            for r in curves:
                by_trial.setdefault(r["trial_id"], []).append(r)
            rows = []
            for tid in sorted(self._trials):
                rec = self._trials[tid]
                row = rec.summary(tid, by_trial.get(tid, []))
                for k in keys:
                    v = rec.config.get(k)
                    row[k] = to_json(v) if k in json_cols and v is not None else v
                rows.append(row)
            schema = trials_schema(types, json_cols)
            ious = [self._class_iou[k] for k in sorted(self._class_iou)]
        return {
            "trials": pa.Table.from_pylist(rows, schema=schema),
            "curves": pa.Table.from_pylist(curves, schema=CURVES_SCHEMA),
            "class_iou": pa.Table.from_pylist(ious, schema=CLASS_IOU_SCHEMA),
            "trunk": pa.Table.from_pylist([self._trunk] if self._trunk else [], schema=TRUNK_SCHEMA),
        }

    def flush(self) -> None:
        """Write the tables atomically, `trials` first (see the module docstring); `trunk` only when the
        search shares its warm-up."""
        tables = self.tables()
        for name in TABLES:
            if name != "trunk" or self._trunk is not None:
                write_atomic(self.fs, self.path(name), _table_bytes(tables[name]))
        self._last_flush = self.clock()

    def load_existing(self) -> int:
        """Start from the tables on disk (resumed search); rows already in memory win. Returns #trials loaded."""
        if not exists(self.fs, self.path("trials")):
            return 0
        loaded = read_tables(self.fs, self.dir, required=False)  # a crash may have cut the first flush short
        json_cols = json_columns(loaded["trials"].schema)
        with self._lock:
            for r in loaded["curves"].to_pylist():
                self._curves.setdefault((r["trial_id"], r["iteration"]), r)
            for r in loaded["class_iou"].to_pylist():
                self._class_iou.setdefault((r["trial_id"], r["iteration"], r["class_id"]), r)
            trunk = loaded["trunk"].to_pylist()
            self._trunk = self._trunk or (trunk[0] if trunk else None)
            n = 0
            for r in loaded["trials"].to_pylist():
                if r["trial_id"] in self._trials:
                    continue
                self._trials[r["trial_id"]] = TrialRecord.from_row(r, json_cols, self.clock())
                n += 1
        return n
