"""Analyse a finished (or running) search from its Parquet tables alone: no Ray needed.

`analyze(path)` reads `<experiment>/tables/` (see `raycontrast.results`) and writes to `<experiment>/analysis/`:
- `best_config.yaml`: the best trial's full config, ready for `raycontrast train --config best_config.yaml`;
- `report.md`: best trial, top-k table, hyperparameter importance, failures, cost and Tune overhead;
- PNG plots: `history.png`, `params.png`, `curves.png`, `losses.png`, `class_iou.png`.

The best trial is the one with the highest best val mIoU among finished trials (TERMINATED or STOPPED_EARLY;
ties go to the earlier-started trial). Trials stopped early by ASHA count with the best mIoU they reached, as
ASHA judged them on exactly that. Importance compares trials on one budget (`importance_values`): the trials
that ran the full budget when at least 3 did, else every finished trial at the latest evaluation all of them
reached; the report says which. It rebuilds an Optuna study from those values and uses Optuna's fANOVA
evaluator with a fixed seed: Optuna 5's default (PED-ANOVA) looks only at the top 10% of trials and wants at least
5 of them, which a search of 6-20 trials never has (on 6 synthetic trials it gave the one parameter that set the
value 0.42 of the importance, fANOVA 0.73).
"""

from __future__ import annotations

import math
import os
import posixpath
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import yaml

from raycontrast.plots import (
    FINISHED,
    column_values,
    plot_class_iou,
    plot_curves,
    plot_history,
    plot_params,
    value_kind,
)
from raycontrast.results import load_results, trial_config
from raycontrast.storage import is_uri, locate, shown_path, write_atomic

__all__ = [
    "AnalysisReport",
    "analyze",
    "best_trials",
    "confirmation_verdict",
    "param_importance",
    "rank_configs",
    "rank_trials",
    "startup_overhead",
]


@dataclass
class AnalysisReport:
    """What `analyze` found and wrote. `paths` maps a name ("report", "best_config", "history", ...) to a path."""

    experiment: str
    num_trials: int
    best_trial_id: str | None
    best_val_miou: float | None
    best_config: dict[str, Any]  # nested sections, as in best_config.yaml
    top_trials: list[str]
    importance: dict[str, float] | None  # searched key -> share (sums to 1); None when unavailable
    importance_note: str
    paths: dict[str, str] = field(default_factory=dict)
    commands: dict[str, str] = field(
        default_factory=dict
    )  # "retrain", "eval", "predict", "export" -> a command


# ------------------------------------------------------------------------------------------- helpers


def _searched(trials: pd.DataFrame) -> list[str]:
    keys: set[str] = set()
    for v in trials["searched"]:
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            keys.update(str(k) for k in v)
    return sorted(k for k in keys if k in trials.columns)


def rank_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """The one "best trial" rule, shared by `analyze` and the search summary: finished trials
    (TERMINATED / STOPPED_EARLY) with a val mIoU, by best val mIoU, best first; ties keep table order."""
    done = trials[trials["status"].isin(FINISHED) & trials["best_val_miou"].notna()]
    return done.sort_values("best_val_miou", ascending=False, kind="stable")


def _fmt(v: Any) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float | np.floating):
        return f"{float(v):.4g}"
    return str(v)


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _config_yaml(flat: dict[str, Any], header: str) -> tuple[dict[str, Any], str]:
    """Nested config and its YAML; validated through `Config` when the table matches this version."""
    from raycontrast.config import Config, to_yaml

    nested = _unflatten(flat)
    try:
        body = to_yaml(Config.model_validate(nested))
    except ValueError as exc:  # a table written by another version: keep the values as they are
        header += f"# note: not valid for this raycontrast version ({str(exc).splitlines()[0]})\n"
        body = yaml.safe_dump(nested, sort_keys=False)
    return nested, header + body


def rank_configs(trials: pd.DataFrame) -> pd.DataFrame:
    """The searched configs that ran to the full budget with two seeds or more (`tune.confirm`), by mean
    best val mIoU over those runs, best first: `trial_ids` (the first is the search's own), `seeds`,
    `values`, `mean`, `std` (sample standard deviation), `n`. Empty when no config did."""
    cols = ["trial_ids", "seeds", "values", "mean", "std", "n"]
    keys = _searched(trials)
    full = trials[(trials["status"] == "TERMINATED") & trials["best_val_miou"].notna()]
    if not keys or "run.seed" not in full or full.empty:
        return pd.DataFrame(columns=cols)
    if "started_at" in full:
        full = full.sort_values("started_at", kind="stable", na_position="last")
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for rec in full.to_dict("records"):
        groups.setdefault(tuple(repr(rec[k]) for k in keys), []).append(rec)
    rows = []
    for recs in groups.values():
        seeds = [int(r["run.seed"]) for r in recs]
        if len(set(seeds)) < 2:
            continue
        values = np.array([float(r["best_val_miou"]) for r in recs])
        ids = [str(r["trial_id"]) for r in recs]
        rows.append([ids, seeds, values.tolist(), values.mean(), values.std(ddof=1), len(values)])
    ranked = pd.DataFrame(rows, columns=cols)
    return ranked.sort_values("mean", ascending=False, kind="stable").reset_index(drop=True)


def best_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """The one best-trial rule, shared by `analyze`, the search summary and `raycontrast eval/predict/export`:
    `rank_trials`, except that when configs ran with several seeds (`rank_configs`), the runs of the config
    with the best mean come first (its best run first)."""
    ranked = rank_trials(trials)
    configs = rank_configs(trials)
    if configs.empty:
        return ranked
    first = ranked["trial_id"].astype(str).isin(configs.iloc[0]["trial_ids"])
    return pd.concat([ranked[first], ranked[~first]])


def confirmation_verdict(configs: pd.DataFrame) -> str:
    """Whether the best config's lead over the runner-up (means over seeds) exceeds the seeds' spread."""
    if configs.empty:
        return ""
    w = configs.iloc[0]
    if len(configs) == 1:
        return f"only one config ran with several seeds ({w['mean']:.4f} ± {w['std']:.4f} over {w['n']}): no lead to judge"
    r = configs.iloc[1]
    lead, spread = w["mean"] - r["mean"], max(w["std"], r["std"])
    if lead > spread:
        return f"the best config leads the runner-up by {lead:.4f} mIoU, more than the seeds' spread (std up to {spread:.4f})"
    return (
        f"the best config leads the runner-up by {lead:.4f} mIoU, within the seeds' spread (std up to "
        f"{spread:.4f}): the two are not told apart by these seeds"
    )


# ---------------------------------------------------------------------------------------- importance


FULL_BUDGET_MIN = 3  # trials that ran the full budget before importance uses those alone
FULL_BUDGET = "trials that ran the full budget (best val mIoU)"


def importance_values(trials: pd.DataFrame, curves: pd.DataFrame | None = None) -> tuple[pd.DataFrame, str]:
    """The trials importance is computed over, each with a `value`, all on one budget: the trials that ran
    the full budget (TERMINATED) with their best val mIoU, the value the report ranks by, when at least
    `FULL_BUDGET_MIN` did; else every finished trial's val mIoU at the latest evaluation all of them reached
    (from `curves`), as ASHA compares them at a rung. Returns (rows, which trials and value, in words)."""
    done = rank_trials(trials)
    full = done[done["status"] == "TERMINATED"]
    if len(full) >= FULL_BUDGET_MIN or curves is None or len(done) == len(full):
        return full.assign(value=full["best_val_miou"]), FULL_BUDGET
    c = curves[curves["trial_id"].isin(done["trial_id"]) & curves["val_miou"].notna()]
    reached = [set(g["iteration"]) for _, g in c.groupby("trial_id")]
    common = set.intersection(*reached) if len(reached) == len(done) else set()
    if not common:
        return full.assign(value=full["best_val_miou"]), FULL_BUDGET
    at = max(common)
    values = (
        c[c["iteration"] == at].drop_duplicates("trial_id", keep="last").set_index("trial_id")["val_miou"]
    )
    rows = done.assign(value=done["trial_id"].map(values))
    return rows, f"finished trials (val mIoU at iteration {at}, the latest evaluation all of them reached)"


def param_importance(
    trials: pd.DataFrame, curves: pd.DataFrame | None = None, seed: int = 0
) -> tuple[dict[str, float] | None, str]:
    """fANOVA importance of the searched keys on one budget (`importance_values`), or (None, why not)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    done, budget = importance_values(trials, curves)
    if len(done) < 2:
        return None, f"importance unavailable: needs at least 2 {budget}, found {len(done)}"
    if done["value"].nunique() < 2:
        return None, f"importance unavailable: the {len(done)} {budget} have the same val mIoU"
    dists, constant = {}, []
    for key in _searched(trials):
        vals = column_values(done[key])
        present = [v for v in vals if v is not None]
        if len({repr(v) for v in present}) < 2:
            constant.append(key)
            continue
        kind = value_kind(vals)
        if kind == "int":
            dists[key] = IntDistribution(min(present), max(present))
        elif kind in ("log", "float"):
            dists[key] = FloatDistribution(float(min(present)), float(max(present)), log=kind == "log")
        else:
            dists[key] = CategoricalDistribution(sorted({v for v in present}, key=repr))
    if not dists:
        return None, f"importance unavailable: no searched parameter varied across the {len(done)} {budget}"
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction="maximize")
        for _, row in done.iterrows():
            params = {k: column_values(pd.Series([row[k]]))[0] for k in dists}
            params = {
                k: float(v) if isinstance(dists[k], FloatDistribution) else v for k, v in params.items()
            }
            params = {k: v for k, v in params.items() if v is not None}
            study.add_trial(
                optuna.trial.create_trial(
                    params=params,
                    distributions={k: dists[k] for k in params},
                    value=float(row["value"]),
                )
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
            imp = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError) as exc:
        return None, f"importance unavailable: {exc}"
    finally:
        optuna.logging.set_verbosity(verbosity)
    note = f"fANOVA (seed {seed}) over {len(done)} {budget}"
    if constant:
        note += f"; constant across them, left out: {', '.join(constant)}"
    return {k: float(v) for k, v in imp.items()}, note


# -------------------------------------------------------------------------------------------- report


def _top_table(top: pd.DataFrame, keys: list[str]) -> str:
    head = ["rank", "trial", "status", *keys, "best mIoU", "last mIoU", "iter of best", "iters", "worker-s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, (_, r) in enumerate(top.iterrows(), 1):
        cells = [rank, f"`{r['trial_id']}`", r["status"], *(r[k] for k in keys), r["best_val_miou"]]
        cells += [r["last_val_miou"], r["iteration_of_best"], r["last_iteration"], r["worker_seconds"]]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines)


def _secs(v: float) -> str:
    return "-" if v is None or math.isnan(v) else (f"{v:.1f} s" if v < 600 else f"{v / 3600:.2f} h")


def startup_overhead(trials: pd.DataFrame, curves: pd.DataFrame) -> tuple[float | None, float | None]:
    """`(median trial start -> first report, median start-up)` in seconds, None when unknown. Start-up is
    the part of the first report's wait outside the training run's own clock (Tune + Train actors, model,
    data); None when the clocks disagree (a negative median)."""
    ttfr = trials.set_index("trial_id")["time_to_first_report_s"].dropna()
    if ttfr.empty:
        return None, None
    first = curves.sort_values("iteration").drop_duplicates("trial_id").set_index("trial_id")["time_s"]
    startup = (ttfr - first.reindex(ttfr.index)).dropna()
    median_startup = float(startup.median()) if len(startup) and startup.median() >= 0 else None
    return float(ttfr.median()), median_startup


def _overhead(trials: pd.DataFrame, curves: pd.DataFrame) -> str:
    first_report, startup = startup_overhead(trials, curves)
    if first_report is None:
        return "no trial start was recorded"
    text = f"median time from trial start to first report {_secs(first_report)}"
    if startup is not None:
        text += f", of which {_secs(startup)} before the training run's clock started (start-up)"
    return text


def _report_md(
    name: str, trials: pd.DataFrame, curves: pd.DataFrame, keys: list[str], top: pd.DataFrame, top_k: int,
    importance: dict[str, float] | None, imp_note: str, plots: list[str], trunk_s: float = 0.0,
    commands: dict[str, str] | None = None, best: pd.Series | None = None, configs: pd.DataFrame | None = None,
) -> str:  # fmt: skip
    counts = trials["status"].value_counts().to_dict()
    md = [f"# Search analysis: {name}", ""]
    md.append(
        f"{len(trials)} trials: "
        + ", ".join(f"{counts.get(s, 0)} {s}" for s in (*FINISHED, "ERROR", "RUNNING"))
    )
    md += ["", "## Best trial", ""]
    if best is None:
        md.append("No finished trial with a val mIoU yet.")
    else:
        b = best
        md.append(
            f"`{b['trial_id']}`: best val mIoU **{b['best_val_miou']:.4f}** at iteration {b['iteration_of_best']}"
            f" (last {_fmt(b['last_val_miou'])} at iteration {_fmt(b['last_iteration'])}, {b['status']})."
        )
        md += ["", "| setting | value |", "|---|---|"]
        md += [f"| `{k}` | {_fmt(column_values(pd.Series([best[k]]))[0])} |" for k in keys]
        md += ["", "Full config: [best_config.yaml](best_config.yaml) (run name of its own)."]
    if configs is not None and len(configs):
        md += ["", "## Confirmed across seeds", "", confirmation_verdict(configs) + ".", ""]
        md += [f"| rank | {' | '.join(f'`{k}`' for k in keys)} | val mIoU mean ± std | seeds | runs |"]
        md += ["|---|" + "---|" * len(keys) + "---|---|---|"]
        for i, c in configs.iterrows():
            first = trials[trials["trial_id"].astype(str) == c["trial_ids"][0]].iloc[0]
            vals = " | ".join(_fmt(column_values(pd.Series([first[k]]))[0]) for k in keys)
            runs = ", ".join(f"`{t}` {v:.4f}" for t, v in zip(c["trial_ids"], c["values"], strict=True))
            md.append(f"| {i + 1} | {vals} | {c['mean']:.4f} ± {c['std']:.4f} | {c['seeds']} | {runs} |")
    if commands:
        md += ["", "## From the search to a model", ""]
        for key, cmd in commands.items():
            md += [f"{_COMMAND_TITLES[key]}:", "", f"    {cmd}", ""]
    md += ["", f"## Top {top_k}", "", _top_table(top, keys) if len(top) else "No finished trials.", ""]
    md += ["## Hyperparameter importance", "", imp_note + ".", ""]
    if importance:
        md += ["| parameter | importance |", "|---|---|"]
        md += [f"| `{k}` | {v:.3f} |" for k, v in sorted(importance.items(), key=lambda kv: -kv[1])]
        md.append("")
    failed = trials[trials["status"] == "ERROR"]
    md += ["## Failures", ""]
    md += [f"- `{r['trial_id']}`: {_fmt(r['error'])}" for _, r in failed.iterrows()] or ["None."]
    span = (
        (trials["ended_at"].max() - trials["started_at"].min()).total_seconds()
        if len(trials)
        else float("nan")
    )
    md += ["", "## Cost", ""]
    total = float(trials["worker_seconds"].sum()) + trunk_s
    md.append(f"- total worker-seconds: {total:.0f} ({_secs(total)})")
    if trunk_s:
        md.append(
            f"- of which the shared warm-up, trained once for every trial: {trunk_s:.0f} worker-seconds"
        )
    md.append(
        f"- summed trial wall time: {_secs(trials['wall_time_s'].sum())}; first start to last end: {_secs(span)}"
    )
    md.append(f"- Tune overhead: {_overhead(trials, curves)}")
    md += ["", "## Plots", ""]
    md += [f"![{p.removesuffix('.png')}]({p})" for p in plots]
    return "\n".join(md) + "\n"


def analyze(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    top_k: int = 5,
    filesystem: pafs.FileSystem | None = None,
) -> AnalysisReport:
    """Analyse the tables under `path` (experiment dir or its tables/; local, URI or on `filesystem`).

    Outputs go to `out_dir` (default `<experiment>/analysis/`; a plain path is taken on the same filesystem
    as the tables, a URI on its own). Each file is written atomically.
    """
    fs, p = locate(path, filesystem)
    tables = load_results(p, filesystem=fs)
    exp_dir = posixpath.dirname(p) if posixpath.basename(p) == "tables" else p
    if out_dir is None:
        out_fs, out = fs, posixpath.join(exp_dir, "analysis")
    elif is_uri(os.fspath(out_dir)) or filesystem is None:
        out_fs, out = locate(out_dir)
    else:
        out_fs, out = fs, os.fspath(out_dir)
    trunk_s = float(tables["trunk"]["worker_seconds"].sum()) if len(tables["trunk"]) else 0.0
    trials = (
        tables["trials"].sort_values("started_at", kind="stable", na_position="last").reset_index(drop=True)
    )
    trials.attrs = tables["trials"].attrs
    curves, class_iou = tables["curves"], tables["class_iou"]
    keys = _searched(trials)
    ranked, configs = rank_trials(trials), rank_configs(trials)
    top = ranked.head(top_k)
    leaders = best_trials(trials)
    best = leaders.iloc[0] if len(leaders) else None
    name = posixpath.basename(exp_dir.rstrip("/"))
    paths: dict[str, str] = {}

    def put(fname: str, data: bytes | str, key: str) -> None:
        target = posixpath.join(out, fname)
        write_atomic(out_fs, target, data.encode() if isinstance(data, str) else data)
        paths[key] = target

    best_nested: dict[str, Any] = {}
    if best is not None:
        bid, biter = str(best["trial_id"]), int(best["iteration_of_best"])
        miou = best["best_val_miou"]
        header = f"# best trial {bid} of search '{name}': val mIoU {miou:.4f} at iteration {biter}\n"
        flat = trial_config(trials, bid)
        flat["run.name"] = (
            f"{flat.get('run.name') or name}-best"  # a run of its own: the search's name is taken
        )
        best_nested, text = _config_yaml(flat, header)
        put("best_config.yaml", text, "best_config")
    importance, imp_note = param_importance(trials, curves)

    top_ids = top["trial_id"].astype(str).tolist()
    if len(trials):
        put("history.png", plot_history(trials), "history")
    if keys:
        put("params.png", plot_params(trials, keys), "params")
    if top_ids and curves["val_miou"].notna().any():
        put(
            "curves.png",
            plot_curves(curves, top_ids, [("val_miou", "val mIoU")], "Learning curves"),
            "curves",
        )
    if top_ids and curves[["ce_loss", "contrast_loss"]].notna().any().any():
        loss_cols = [("ce_loss", "CE loss"), ("contrast_loss", "contrast loss")]
        put("losses.png", plot_curves(curves, top_ids, loss_cols, "Training loss"), "losses")
    if best is not None:
        sel = class_iou[(class_iou["trial_id"] == bid) & (class_iou["iteration"] == biter)]
        if len(sel):
            put("class_iou.png", plot_class_iou(sel, bid, biter), "class_iou")

    plots = [posixpath.basename(v) for v in paths.values() if v.endswith(".png")]
    commands = (
        model_commands(shown_path(fs, exp_dir), shown_path(out_fs, out), name, trials)
        if best is not None
        else {}
    )
    put(
        "report.md",
        _report_md(
            name,
            trials,
            curves,
            keys,
            top,
            top_k,
            importance,
            imp_note,
            plots,
            trunk_s,
            commands,
            best,
            configs,
        ),
        "report",
    )

    return AnalysisReport(
        experiment=exp_dir,
        num_trials=len(trials),
        best_trial_id=None if best is None else bid,
        best_val_miou=None if best is None else float(best["best_val_miou"]),
        best_config=best_nested,
        top_trials=top_ids,
        importance=importance,
        importance_note=imp_note,
        paths=paths,
        commands=commands,
    )


_COMMAND_TITLES = {
    "retrain": "Train the best config from scratch (a run of its own, `<name>-best`)",
    "eval": "Evaluate the best checkpoint with multi-scale + flip test-time augmentation",
    "predict": "Predict: trainId, colour and overlay PNGs",
    "export": "Export the inference weights with their config",
}


def model_commands(exp: str, out: str, name: str, trials: pd.DataFrame) -> dict[str, str]:
    """The commands that take the search's best model onwards, with this experiment's paths; the report
    prints them and a slow test runs each one."""
    s3 = " --s3-endpoint HOST:PORT" if exp.startswith("s3://") else ""
    dataset = trials["data.dataset"].iloc[0] if "data.dataset" in trials else None
    images = "--split val --limit 4" if dataset == "canvases" else "IMAGES_OR_FOLDERS"
    return {
        "retrain": f"raycontrast train --config {posixpath.join(out, 'best_config.yaml')}",
        "eval": f"raycontrast eval {exp} --scales 0.5 0.75 1.0 1.25 1.5 1.75 --flip{s3}",
        "predict": f"raycontrast predict {exp} {images} --out {posixpath.join(out, 'predictions')}{s3}",
        "export": f"raycontrast export {exp} --out {posixpath.join(out, name + '-best.safetensors')}{s3}",
    }
