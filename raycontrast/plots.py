"""PNG plots of a search's tables (matplotlib's object API with the Agg renderer: no pyplot, no display)."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

__all__ = ["column_values", "plot_class_iou", "plot_curves", "plot_history", "plot_params", "value_kind"]

FINISHED = ("TERMINATED", "STOPPED_EARLY")


def column_values(col: pd.Series) -> list[Any]:
    """Python scalars of a column, missing values as None."""
    out = []
    for v in col.tolist():
        if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
            out.append(None)
        else:
            out.append(v.item() if hasattr(v, "item") else v)
    return out


def value_kind(values: list[Any]) -> str:
    """'log' / 'float' / 'int' / 'cat' for a searched column (log: all > 0 and spanning more than 10x)."""
    vals = [v for v in values if v is not None]
    if vals and all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        return "int"
    if vals and all(isinstance(v, int | float) and not isinstance(v, bool) for v in vals):
        return "log" if min(vals) > 0 and max(vals) > 10 * min(vals) else "float"
    return "cat"


_COLORS = {"TERMINATED": "tab:blue", "STOPPED_EARLY": "tab:orange", "ERROR": "tab:red", "RUNNING": "tab:gray"}


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)  # Figure.savefig renders with Agg; no pyplot, no display
    return buf.getvalue()


def plot_history(trials: pd.DataFrame) -> bytes:
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    x = np.arange(1, len(trials) + 1)
    y = trials["best_val_miou"].to_numpy(dtype=float, na_value=np.nan)
    for status, color in _COLORS.items():
        m = (trials["status"] == status).to_numpy()
        if m.any():
            ax.scatter(x[m], np.nan_to_num(y[m], nan=0.0), c=color, label=status, zorder=3)
    done = (trials["status"].isin(FINISHED) & trials["best_val_miou"].notna()).to_numpy()
    running = np.fmax.accumulate(np.where(done, y, -np.inf))
    ax.step(x, np.where(np.isfinite(running), running, np.nan), where="post", c="k", label="running best")
    ax.set(xlabel="trial (start order)", ylabel="best val mIoU", title="Optimisation history")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_params(trials: pd.DataFrame, keys: list[str]) -> bytes:
    n = len(keys)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4 * cols, 3.2 * rows))
    y = trials["best_val_miou"].to_numpy(dtype=float, na_value=np.nan)
    colors = [_COLORS.get(s, "tab:gray") for s in trials["status"]]
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        vals = column_values(trials[key])
        kind = value_kind(vals)
        if kind == "cat":
            cats = sorted({repr(v) for v in vals})
            xs = [cats.index(repr(v)) for v in vals]
            ax.set_xticks(range(len(cats)), [c.strip("'") for c in cats], rotation=30, fontsize=8)
        else:
            xs = [np.nan if v is None else float(v) for v in vals]
            if kind == "log":
                ax.set_xscale("log")
        ax.scatter(xs, y, c=colors)
        ax.set(xlabel=key, ylabel="best val mIoU")
        ax.grid(alpha=0.3)
    shown = [s for s in _COLORS if (trials["status"] == s).any()]
    handles = [Line2D([], [], ls="", marker="o", c=_COLORS[s]) for s in shown]
    fig.axes[0].legend(handles, shown, fontsize=7)
    return _png(fig)


def plot_curves(curves: pd.DataFrame, ids: list[str], columns: list[tuple[str, str]], title: str) -> bytes:
    fig = Figure(figsize=(6 * len(columns), 4))
    for i, (col, label) in enumerate(columns):
        ax = fig.add_subplot(1, len(columns), i + 1)
        for tid in ids:
            c = curves[(curves["trial_id"] == tid) & curves[col].notna()].sort_values("iteration")
            if len(c):
                ax.plot(c["iteration"], c[col], marker="o", ms=3, label=tid)
        ax.set(xlabel="iteration", ylabel=label, title=f"{title}: {label}" if len(columns) > 1 else title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)


def plot_class_iou(ious: pd.DataFrame, tid: str, iteration: int) -> bytes:
    ious = ious.sort_values("class_id")
    fig = Figure(figsize=(7, 0.3 * len(ious) + 1.5))
    ax = fig.add_subplot()
    vals = ious["iou"].to_numpy(dtype=float)
    pos = np.arange(len(ious))
    ax.barh(pos, np.nan_to_num(vals, nan=0.0), color="tab:blue")
    ax.set_yticks(pos, ious["class_name"].fillna("").tolist(), fontsize=8)
    for p, v in zip(pos, vals, strict=True):
        ax.text(
            0.005 if math.isnan(v) else v + 0.005,
            p,
            "absent" if math.isnan(v) else f"{v:.3f}",
            va="center",
            fontsize=7,
        )
    ax.invert_yaxis()
    ax.set(xlim=(0, 1.1), xlabel="IoU", title=f"Per-class IoU of {tid} at iteration {iteration}")
    return _png(fig)
