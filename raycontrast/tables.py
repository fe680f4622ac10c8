"""The three Parquet result tables of a search: their schemas, how values are typed, and reading them back
with pandas (no Ray).

Under `<storage_path>/<experiment>/tables/`:
- `trials.parquet`: one row per trial: id, status, error, summary metrics, and every hyperparameter (searched
  or fixed) as its own column named by its dotted config key (`loss.temperature`); the `searched` column
  lists the keys the search varied. Lists/dicts (`data.crop_size`, `tune.space`) are JSON strings; the schema
  metadata key `raycontrast.json_columns` names those columns.
- `curves.parquet`: one row per (trial_id, iteration) report.
- `class_iou.parquet`: one row per (trial_id, iteration, class_id).

`raycontrast.results.ResultsWriter` writes them.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raycontrast.storage import exists, locate

__all__ = [
    "CLASS_IOU_SCHEMA",
    "CURVES_SCHEMA",
    "JSON_COLUMNS_KEY",
    "STATUSES",
    "TABLES",
    "TRIALS_FIXED_FIELDS",
    "TRUNK_SCHEMA",
    "column_type",
    "decode_config",
    "json_columns",
    "load_results",
    "num",
    "plain",
    "read_tables",
    "short_error",
    "trial_config",
    "to_json",
    "trials_schema",
    "ts",
]

STATUSES = ("RUNNING", "TERMINATED", "STOPPED_EARLY", "ERROR")
TABLES = ("trials", "curves", "class_iou", "trunk")
JSON_COLUMNS_KEY = b"raycontrast.json_columns"
_TS = pa.timestamp("us", tz="UTC")

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
    pa.field("disk_bytes", pa.int64()),  # its checkpoints on storage once it ended (tune.keep_checkpoints)
    pa.field("forked_at", pa.int64()),  # it started from the shared warm-up trunk here (None: from scratch)
    pa.field("best_checkpoint", pa.string()),  # its kept checkpoint of the best val mIoU (a path or URI)
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
    + [pa.field("nonfinite_steps", pa.int64()), pa.field("overflow_steps", pa.int64())]
    + [
        pa.field(n, pa.float64())
        for n in ("images_per_s", "worker_seconds", "peak_rss_mb", "train_time_s", "eval_time_s")
    ]
    + [pa.field("checkpoint_path", pa.string())]  # the checkpoint written with this report (null: none)
)  # fmt: skip

# A search's shared warm-up (raycontrast.trunk), when it had one: trained once, forked by every trial.
TRUNK_SCHEMA = pa.schema(
    [
        pa.field("fork_at", pa.int64(), nullable=False),  # the iteration every trial starts from
        pa.field("memory_size", pa.int64()),  # its memory (the largest in the space)
        pa.field("worker_seconds", pa.float64()),  # what it cost, once (part of the search's cost)
        pa.field("ended_at", _TS),
    ]
)

CLASS_IOU_SCHEMA = pa.schema(
    [
        pa.field("trial_id", pa.string(), nullable=False),
        pa.field("iteration", pa.int64(), nullable=False),
        pa.field("class_id", pa.int64(), nullable=False),
        pa.field("class_name", pa.string()),
        pa.field("iou", pa.float64()),  # NaN: class absent from both prediction and ground truth
    ]
)


# ------------------------------------------------------------------------------------ value typing


def plain(v: Any) -> Any:
    """numpy / torch scalars -> Python scalars (Tune hands over numpy types)."""
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:
        return v.item()
    if isinstance(v, tuple):
        return [plain(x) for x in v]
    return v


def column_type(values: Iterable[Any]) -> tuple[pa.DataType, bool]:
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


def to_json(v: Any) -> str:
    return json.dumps(v, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def trials_schema(hparam_types: Mapping[str, pa.DataType], json_columns: Iterable[str] = ()) -> pa.Schema:
    """Schema of `trials.parquet`: the fixed fields, then one column per dotted hyperparameter key (sorted)."""
    fields = list(TRIALS_FIXED_FIELDS) + [pa.field(k, hparam_types[k]) for k in sorted(hparam_types)]
    return pa.schema(fields, metadata={JSON_COLUMNS_KEY: json.dumps(sorted(json_columns)).encode()})


def num(v: Any) -> float | None:
    v = plain(v)
    return None if v is None or isinstance(v, bool) or not isinstance(v, int | float) else float(v)


def ts(t: float | None) -> datetime | None:
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


# ------------------------------------------------------------------------------------------- readers


def json_columns(schema: pa.Schema) -> list[str]:
    meta = schema.metadata or {}
    return json.loads(meta.get(JSON_COLUMNS_KEY, b"[]"))


def decode_config(row: Mapping[str, Any], json_columns: Iterable[str]) -> dict[str, Any]:
    js = set(json_columns)
    out = {}
    for k, v in row.items():
        if "." not in k:  # hyperparameter columns are exactly the dotted keys
            continue
        v = None if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)) else plain(v)
        out[k] = json.loads(v) if k in js and isinstance(v, str) else v
    return out


def trial_config(trials: pd.DataFrame, trial_id: str) -> dict[str, Any]:
    """Flattened config (dotted keys -> Python values) of one trial of a `load_results()["trials"]` frame."""
    match = trials[trials["trial_id"] == trial_id]
    if match.empty:
        raise KeyError(f"trial {trial_id!r} is not in the trials table")
    return decode_config(match.iloc[0].to_dict(), trials.attrs.get("json_columns", []))


def _tables_dir(fs: pafs.FileSystem, path: str) -> str:
    """`path` itself when it is a tables dir (named `tables/` or holding trials.parquet), else `path/tables`."""
    if posixpath.basename(path.rstrip("/")) == "tables" or exists(fs, posixpath.join(path, "trials.parquet")):
        return path
    return posixpath.join(path, "tables")


def read_tables(fs: pafs.FileSystem, tables_dir: str, required: bool = True) -> dict[str, pa.Table]:
    out = {}
    optional = {"trunk": TRUNK_SCHEMA} if required else {
        "curves": CURVES_SCHEMA, "class_iou": CLASS_IOU_SCHEMA, "trunk": TRUNK_SCHEMA
    }  # fmt: skip
    for name in TABLES:
        p = posixpath.join(tables_dir, f"{name}.parquet")
        if name in optional and not exists(fs, p):
            out[name] = optional[name].empty_table()
            continue
        if not exists(fs, p):
            raise FileNotFoundError(
                f"results table {p} not found; `raycontrast tune --config FILE` creates the tables under "
                f"<run.storage_path>/<run.name>/tables/ (pass the experiment dir or its tables/ dir)"
            )
        out[name] = _read_table(fs, p)
    return out


def _read_table(fs: pafs.FileSystem, path: str) -> pa.Table:
    """One table, read whole in one request: a reader of a table a running search rewrites gets one
    version of it. (Parquet readers fetch the footer by offset from a size they asked for first; an object
    store may swap the object in between, and the footer read then lands in the other version.)"""
    with fs.open_input_stream(path) as f:
        data = f.read()
    try:
        return pq.read_table(pa.BufferReader(data))
    except pa.ArrowInvalid as e:
        raise ValueError(f"results table {path} is not a readable Parquet file ({e})") from e


def load_results(
    path: str | os.PathLike[str], filesystem: pafs.FileSystem | None = None
) -> dict[str, pd.DataFrame]:
    """The tables as DataFrames: {"trials", "curves", "class_iou", "trunk"} (`trunk`: empty unless the
    search shared its warm-up); `path` is the experiment or tables dir.

    In `trials`, int/bool columns are pandas nullable dtypes; `attrs["json_columns"]` names JSON-string
    columns (decode one trial's config with `trial_config`).
    """
    fs, p = locate(path, filesystem)
    tables = read_tables(fs, _tables_dir(fs, p))
    mapper = {pa.int64(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype()}.get
    out = {name: t.to_pandas(types_mapper=mapper if name == "trials" else None) for name, t in tables.items()}
    out["trials"].attrs["json_columns"] = json_columns(tables["trials"].schema)
    return out
