"""Parquet result tables of a search: one row per trial, learning curves and per-class IoU (no Ray).

Three tables live under `<storage_path>/<experiment>/tables/`:
- `trials.parquet`: one row per trial: id, status, error, summary metrics, and every hyperparameter (searched
  or fixed) as its own column named by its dotted config key (`loss.temperature`); the `searched` column
  lists the keys the search varied. Lists/dicts (`data.crop_size`, `tune.space`) are JSON strings; the schema
  metadata key `raycontrast.json_columns` names those columns.
- `curves.parquet`: one row per (trial_id, iteration) report.
- `class_iou.parquet`: one row per (trial_id, iteration, class_id).

`ResultsWriter` keeps all rows in memory keyed as above (a re-reported key replaces the old row, so a trial
that resumes from a checkpoint and reports an iteration again never duplicates it) and rewrites whole tables.
Every table is serialised in memory first, then written atomically: on local/NFS/HDFS storage to a
`<name>.tmp-<uuid>` sibling that is renamed over the target; on object stores (S3, GCS, ABFS) with a single
upload to the final key, which becomes visible only when complete. `trials` is written first, so a crash
between two tables still leaves every trial of `curves`/`class_iou` present in `trials`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import posixpath
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = [
    "CLASS_IOU_SCHEMA",
    "CURVES_SCHEMA",
    "STATUSES",
    "TRIALS_FIXED_FIELDS",
    "ResultsWriter",
    "load_results",
    "resolve_path",
    "short_error",
    "trial_config",
    "trials_schema",
    "write_bytes_atomic",
]

STATUSES = ("RUNNING", "TERMINATED", "STOPPED_EARLY", "ERROR")
TABLES = ("trials", "curves", "class_iou")
JSON_COLUMNS_KEY = b"raycontrast.json_columns"
_TS = pa.timestamp("us", tz="UTC")
_OBJECT_STORES = {"s3", "gcs", "abfs"}

TRIALS_FIXED_FIELDS: tuple[pa.Field, ...] = (
    pa.field("trial_id", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),  # short failure reason, e.g. "non-finite loss: ..."
    pa.field("searched", pa.list_(pa.string())),  # dotted keys the search varied for this trial
    pa.field("best_val_miou", pa.float64()),
    pa.field("last_val_miou", pa.float64()),
    pa.field("iteration_of_best", pa.int64()),
    pa.field("last_iteration", pa.int64()),
    pa.field("num_reports", pa.int64()),
    pa.field("wall_time_s", pa.float64()),  # trial start to end (or to its latest report while running)
    pa.field("worker_seconds", pa.float64()),  # cumulative workers x wall, as reported at the last iteration
    pa.field("peak_rss_mb", pa.float64()),
    pa.field("time_to_first_report_s", pa.float64()),  # trial start to first report: start-up + 1st window
    pa.field("started_at", _TS),
    pa.field("ended_at", _TS),
)

CURVES_SCHEMA = pa.schema(
    [pa.field("trial_id", pa.string(), nullable=False), pa.field("iteration", pa.int64(), nullable=False)]
    + [pa.field("epoch", pa.int64())]
    + [
        pa.field(n, pa.float64())
        for n in (
            "time_s", "lr", "loss", "ce_loss", "contrast_loss", "val_miou", "val_pixel_acc", "anchors",
            "hard_share", "intra_cos", "inter_cos", "memory_fill",
        )
    ]
    + [pa.field("nonfinite_steps", pa.int64())]
    + [
        pa.field(n, pa.float64())
        for n in ("images_per_s", "worker_seconds", "peak_rss_mb", "train_time_s", "eval_time_s")
    ]
)  # fmt: skip

CLASS_IOU_SCHEMA = pa.schema(
    [
        pa.field("trial_id", pa.string(), nullable=False),
        pa.field("iteration", pa.int64(), nullable=False),
        pa.field("class_id", pa.int64(), nullable=False),
        pa.field("class_name", pa.string()),
        pa.field("iou", pa.float64()),  # NaN: class absent from both prediction and ground truth
    ]
)


# ------------------------------------------------------------------------------------------ storage


def resolve_path(
    path: str | os.PathLike[str], filesystem: pafs.FileSystem | None = None
) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it): a given filesystem is used as is; `s3://...`-style URIs via `from_uri`."""
    p = os.fspath(path)
    if filesystem is not None:
        return filesystem, p.rstrip("/") or "/"
    if "://" in p:
        return pafs.FileSystem.from_uri(p)
    return pafs.LocalFileSystem(), os.path.abspath(p)


def _is_object_store(fs: pafs.FileSystem) -> bool:
    while isinstance(fs, pafs.SubTreeFileSystem):
        fs = fs.base_fs
    return fs.type_name in _OBJECT_STORES


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` so readers see the old or the new file, never a partial one."""
    parent = posixpath.dirname(path)
    if _is_object_store(fs):  # one upload; the object appears only once it completed
        with fs.open_output_stream(path) as out:
            out.write(data)
        return
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)  # rename(2) on local and NFS: atomic replace
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise


def _table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


# ------------------------------------------------------------------------------------ value typing


def _plain(v: Any) -> Any:
    """numpy / torch scalars -> Python scalars (Tune hands over numpy types)."""
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:
        return v.item()
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


def _column_type(values: Iterable[Any]) -> tuple[pa.DataType, bool]:
    """Arrow type of a hyperparameter column from its values, and whether it is stored as JSON."""
    vals = [v for v in values if v is not None]
    if not vals:
        return pa.string(), False
    if all(isinstance(v, bool) for v in vals):
        return pa.bool_(), False
    if all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        return pa.int64(), False
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in vals):
        return pa.float64(), False
    if all(isinstance(v, str) for v in vals):
        return pa.string(), False
    return pa.string(), True  # lists, dicts or mixed kinds


def _to_json(v: Any) -> str:
    return json.dumps(v, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def trials_schema(hparam_types: Mapping[str, pa.DataType], json_columns: Iterable[str] = ()) -> pa.Schema:
    """Schema of `trials.parquet`: the fixed fields, then one column per dotted hyperparameter key (sorted)."""
    fields = list(TRIALS_FIXED_FIELDS) + [pa.field(k, hparam_types[k]) for k in sorted(hparam_types)]
    return pa.schema(fields, metadata={JSON_COLUMNS_KEY: json.dumps(sorted(json_columns)).encode()})


def _num(v: Any) -> float | None:
    v = _plain(v)
    return None if v is None or isinstance(v, bool) or not isinstance(v, int | float) else float(v)


def _ts(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, tz=timezone.utc)


def short_error(error: str | BaseException | None) -> str | None:
    """One line naming the failure: the 'non-finite loss: ...' line if present, else the last line."""
    if error is None:
        return None
    text = str(error).strip() or type(error).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # the last match is the exception line; earlier ones may be the source line that raised it
    pick = next((ln for ln in reversed(lines) if "non-finite loss:" in ln), lines[-1] if lines else text)
    if "non-finite loss:" in pick:
        pick = pick[pick.index("non-finite loss:") :]
    return pick[:500]


# ------------------------------------------------------------------------------------------- writer


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
        self.fs, self.dir = resolve_path(tables_dir, filesystem)
        self.class_names = list(class_names)
        self.searched_keys = sorted(searched_keys)
        self.target_iterations = target_iterations
        self.flush_interval_s = flush_interval_s
        self.clock = clock
        self._trials: dict[str, dict[str, Any]] = {}  # trial_id -> state (config, status, times)
        self._curves: dict[tuple[str, int], dict[str, Any]] = {}
        self._class_iou: dict[tuple[str, int, int], dict[str, Any]] = {}
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

    def _trial(self, trial_id: str, config_flat: Mapping[str, Any] | None, start: bool) -> dict[str, Any]:
        st = self._trials.get(trial_id)
        if st is None:  # `start_known`: created by on_trial_start, so time to first report is meaningful
            st = self._trials[trial_id] = {
                "status": "RUNNING", "error": None, "config": {}, "searched": list(self.searched_keys),
                "started_at": self.clock(), "start_known": start, "first_report_at": None, "last_seen": None,
                "ended_at": None,
            }  # fmt: skip
        if config_flat:
            st["config"] = {k: _plain(v) for k, v in config_flat.items()}
        return st

    def on_trial_start(self, trial_id: str, config_flat: Mapping[str, Any] | None = None) -> None:
        """Record a trial's start time and config (optional: the first report does it too)."""
        with self._lock:
            st = self._trial(str(trial_id), config_flat, start=True)
            if st["status"] != "RUNNING":  # restarted after an error (Tune's max_failures)
                st.update(status="RUNNING", error=None, ended_at=None)

    def on_report(
        self, trial_id: str, config_flat: Mapping[str, Any] | None, metrics: Mapping[str, Any]
    ) -> None:
        """One report (the train loop's metrics dict); `val_class_iou` becomes class_iou rows."""
        it = metrics.get("iteration", metrics.get("training_iteration"))
        if it is None:
            raise ValueError(f"report of trial {trial_id} has no 'iteration' (keys: {sorted(metrics)})")
        tid, it, now = str(trial_id), int(_plain(it)), self.clock()
        with self._lock:
            st = self._trial(tid, config_flat, start=False)
            if st["first_report_at"] is None and st["start_known"]:
                st["first_report_at"] = now
            if st["status"] == "ERROR":  # reporting again: Tune restarted it (tune.max_failures)
                st.update(status="RUNNING", error=None, ended_at=None)
            st["last_seen"] = now
            row: dict[str, Any] = {"trial_id": tid, "iteration": it}
            for f in CURVES_SCHEMA:
                if f.name not in row:
                    v = _num(metrics.get(f.name))
                    if v is not None and pa.types.is_integer(f.type):
                        v = int(v) if math.isfinite(v) else None
                    row[f.name] = v
            self._curves[(tid, it)] = row
            ious = metrics.get("val_class_iou")
            for cid, iou in enumerate(() if ious is None else ious):
                name = self.class_names[cid] if cid < len(self.class_names) else f"class_{cid}"
                self._class_iou[(tid, it, cid)] = {
                    "trial_id": tid, "iteration": it, "class_id": cid, "class_name": name, "iou": _num(iou)
                }  # fmt: skip
        if now - self._last_flush >= self.flush_interval_s:
            self.flush()

    def on_trial_end(self, trial_id: str, status: str, error: str | BaseException | None = None) -> None:
        """Final status (TERMINATED / STOPPED_EARLY / ERROR) and failure reason; flushes the tables."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r} of trial {trial_id} is not one of {', '.join(STATUSES)}")
        with self._lock:
            st = self._trial(str(trial_id), None, start=False)
            last = max((it for (t, it) in self._curves if t == str(trial_id)), default=None)
            if status == "TERMINATED" and self.target_iterations and (last or 0) < self.target_iterations:
                status = "STOPPED_EARLY"
            st.update(status=status, error=short_error(error), ended_at=self.clock())
        self.flush()

    # ---- tables -------------------------------------------------------------------------------

    @staticmethod
    def _trial_row(tid: str, st: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Summary of one trial from its curve rows (sorted by iteration), so re-reports stay consistent."""
        val = [
            (r["iteration"], r["val_miou"])
            for r in rows
            if r["val_miou"] is not None and not math.isnan(r["val_miou"])
        ]
        best = max(val, key=lambda x: (x[1], -x[0]), default=(None, None))  # ties -> earliest iteration
        end = st["ended_at"] or st["last_seen"]
        first = st["first_report_at"]
        rss = [r["peak_rss_mb"] for r in rows if r["peak_rss_mb"] is not None]
        return {
            "trial_id": tid, "status": st["status"], "error": st["error"], "searched": st["searched"],
            "best_val_miou": best[1], "last_val_miou": val[-1][1] if val else None,
            "iteration_of_best": best[0], "last_iteration": rows[-1]["iteration"] if rows else None,
            "num_reports": len(rows), "wall_time_s": None if end is None else end - st["started_at"],
            "worker_seconds": rows[-1]["worker_seconds"] if rows else None,
            "peak_rss_mb": max(rss) if rss else None,
            "time_to_first_report_s": None if first is None else first - st["started_at"],
            "started_at": _ts(st["started_at"]), "ended_at": _ts(st["ended_at"]),
        }  # fmt: skip

    def tables(self) -> dict[str, pa.Table]:
        """The three tables as they stand (sorted by key), with exact schemas."""
        with self._lock:
            keys = sorted({k for st in self._trials.values() for k in st["config"]})
            types, json_cols = {}, []
            for k in keys:
                types[k], is_json = _column_type(st["config"].get(k) for st in self._trials.values())
                if is_json:
                    json_cols.append(k)
            curves = [self._curves[k] for k in sorted(self._curves)]
            by_trial: dict[str, list[dict[str, Any]]] = {}
            for r in curves:
                by_trial.setdefault(r["trial_id"], []).append(r)
            rows = []
            for tid in sorted(self._trials):
                st = self._trials[tid]
                row = self._trial_row(tid, st, by_trial.get(tid, []))
                for k in keys:
                    v = st["config"].get(k)
                    row[k] = _to_json(v) if k in json_cols and v is not None else v
                rows.append(row)
            schema = trials_schema(types, json_cols)
            ious = [self._class_iou[k] for k in sorted(self._class_iou)]
        return {
            "trials": pa.Table.from_pylist(rows, schema=schema),
            "curves": pa.Table.from_pylist(curves, schema=CURVES_SCHEMA),
            "class_iou": pa.Table.from_pylist(ious, schema=CLASS_IOU_SCHEMA),
        }

    def flush(self) -> None:
        """Write all three tables atomically, `trials` first (see the module docstring)."""
        tables = self.tables()
        for name in TABLES:
            write_bytes_atomic(self.fs, self.path(name), _table_bytes(tables[name]))
        self._last_flush = self.clock()

    def load_existing(self) -> int:
        """Start from the tables on disk (resumed search); rows already in memory win. Returns #trials loaded."""
        if not _exists(self.fs, self.path("trials")):
            return 0
        loaded = _read_tables(self.fs, self.dir, required=False)  # a crash may have cut the first flush short
        json_cols = _json_columns(loaded["trials"].schema)
        with self._lock:
            for r in loaded["curves"].to_pylist():
                self._curves.setdefault((r["trial_id"], r["iteration"]), r)
            for r in loaded["class_iou"].to_pylist():
                self._class_iou.setdefault((r["trial_id"], r["iteration"], r["class_id"]), r)
            n = 0
            for r in loaded["trials"].to_pylist():
                if r["trial_id"] in self._trials:
                    continue
                started = r["started_at"].timestamp() if r["started_at"] else self.clock()
                ended = r["ended_at"].timestamp() if r["ended_at"] else None
                ttfr, wall = r["time_to_first_report_s"], r["wall_time_s"]
                self._trials[r["trial_id"]] = {
                    "status": r["status"], "error": r["error"], "searched": r["searched"] or [],
                    "config": _decode_config(r, json_cols), "started_at": started, "ended_at": ended,
                    "start_known": ttfr is not None or not r["num_reports"],
                    "first_report_at": None if ttfr is None else started + ttfr,
                    "last_seen": None if wall is None else started + wall,
                }  # fmt: skip
                n += 1
        return n


# ------------------------------------------------------------------------------------------- readers


def _json_columns(schema: pa.Schema) -> list[str]:
    meta = schema.metadata or {}
    return json.loads(meta.get(JSON_COLUMNS_KEY, b"[]"))


def _decode_config(row: Mapping[str, Any], json_columns: Iterable[str]) -> dict[str, Any]:
    js = set(json_columns)
    out = {}
    for k, v in row.items():
        if "." not in k:  # hyperparameter columns are exactly the dotted keys
            continue
        v = None if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)) else _plain(v)
        out[k] = json.loads(v) if k in js and isinstance(v, str) else v
    return out


def trial_config(trials: pd.DataFrame, trial_id: str) -> dict[str, Any]:
    """Flattened config (dotted keys -> Python values) of one trial of a `load_results()["trials"]` frame."""
    match = trials[trials["trial_id"] == trial_id]
    if match.empty:
        raise KeyError(f"trial {trial_id!r} is not in the trials table")
    return _decode_config(match.iloc[0].to_dict(), trials.attrs.get("json_columns", []))


def _tables_dir(fs: pafs.FileSystem, path: str) -> str:
    """`path` itself when it is a tables dir (named `tables/` or holding trials.parquet), else `path/tables`."""
    if posixpath.basename(path.rstrip("/")) == "tables" or _exists(
        fs, posixpath.join(path, "trials.parquet")
    ):
        return path
    return posixpath.join(path, "tables")


def _read_tables(fs: pafs.FileSystem, tables_dir: str, required: bool = True) -> dict[str, pa.Table]:
    out = {}
    empty = {"curves": CURVES_SCHEMA, "class_iou": CLASS_IOU_SCHEMA}
    for name in TABLES:
        p = posixpath.join(tables_dir, f"{name}.parquet")
        if not required and name in empty and not _exists(fs, p):
            out[name] = empty[name].empty_table()
            continue
        if not _exists(fs, p):
            raise FileNotFoundError(
                f"results table {p} not found; `raycontrast tune --config FILE` creates the tables under "
                f"<run.storage_path>/<run.name>/tables/ (pass the experiment dir or its tables/ dir)"
            )
        out[name] = pq.read_table(p, filesystem=fs)
    return out


def load_results(
    path: str | os.PathLike[str], filesystem: pafs.FileSystem | None = None
) -> dict[str, pd.DataFrame]:
    """The tables as DataFrames: {"trials", "curves", "class_iou"}; `path` is the experiment or tables dir.

    In `trials`, int/bool columns are pandas nullable dtypes; `attrs["json_columns"]` names JSON-string
    columns (decode one trial's config with `trial_config`).
    """
    fs, p = resolve_path(path, filesystem)
    tables = _read_tables(fs, _tables_dir(fs, p))
    mapper = {pa.int64(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype()}.get
    out = {name: t.to_pandas(types_mapper=mapper if name == "trials" else None) for name, t in tables.items()}
    out["trials"].attrs["json_columns"] = _json_columns(tables["trials"].schema)
    return out
