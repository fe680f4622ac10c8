"""The outcome of a search, from its tables alone, and the short summary printed at its end (no Ray)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from raycontrast.analyze import best_trials, confirmation_verdict, rank_configs, rank_trials, startup_overhead
from raycontrast.config import Config, apply_overrides
from raycontrast.results import load_results, trial_config

__all__ = ["SearchOutcome", "search_unfinished", "summarise_search"]


@dataclass(frozen=True)
class SearchOutcome:
    """What a search left behind; `best_*` come from the trials table (best val mIoU over its reports)."""

    experiment_path: str  # <storage>/<run.name> on `filesystem` (None: local or URI)
    tables_path: str
    filesystem: Any
    best_trial_id: str | None
    best_val_miou: float | None
    best_params: dict[str, Any]
    best_config: Config | None
    best_checkpoint: str | None = None  # the best trial's kept checkpoint of its best val mIoU
    status_counts: dict[str, int] = field(default_factory=dict)
    num_trials: int = 0
    num_finished: int = 0  # TERMINATED + STOPPED_EARLY
    num_errors: int = 0
    interrupted: bool = False
    median_first_report_s: float | None = None  # trial start to first report
    median_startup_s: float | None = None  # the same minus the first window's training + evaluation
    worker_seconds: float = 0.0
    disk_bytes: int = 0  # checkpoints the ended trials keep on storage
    wall_s: float = 0.0


def search_unfinished(cfg: Config, trials: pd.DataFrame, searched: list[str]) -> bool:
    """Whether trials the config asks for have not ended: `tune.num_samples` search trials (run with
    `run.seed`), then one confirmation trial per config of the search's top `tune.confirm.top_k` and seed."""
    ended = trials[trials["status"] != "RUNNING"]
    if int((ended["run.seed"] == cfg.run.seed).sum()) < cfg.tune.num_samples:
        return True
    c = cfg.tune.confirm
    top = rank_trials(trials[trials["run.seed"] == cfg.run.seed]).head(c.top_k)
    done = set(ended[[*searched, "run.seed"]].itertuples(index=False, name=None))
    wanted = [(*row, seed) for row in top[searched].itertuples(index=False, name=None) for seed in c.seeds]
    return any(w not in done for w in wanted)


def summarise_search(
    cfg: Config, exp_path: str, fs: Any, searched: list[str], wall_s: float, interrupted: bool
):
    """Outcome from the tables on storage (what users and `analyze` see), printed as a short summary."""
    try:
        tables = load_results(exp_path, filesystem=fs)
    except FileNotFoundError:  # stopped before any trial started
        print(f"\nsearch '{cfg.run.name}': no trial started; tables: none")
        return SearchOutcome(
            exp_path, f"{exp_path}/tables", fs, None, None, {}, None, interrupted=interrupted
        )
    trials, curves = tables["trials"], tables["curves"]
    trunk = tables["trunk"]["worker_seconds"].sum() if len(tables["trunk"]) else 0.0
    cost = float(trials["worker_seconds"].fillna(0).sum() + trunk)  # the shared warm-up trained once
    disk = int(trials["disk_bytes"].fillna(0).sum()) if "disk_bytes" in trials else 0
    counts = {str(k): int(v) for k, v in trials["status"].value_counts().items()}
    ranked = best_trials(trials)
    picks = {}  # "best" / "worst" -> (table row, searched params as Python values)
    for label, row in (("best", ranked.head(1)), ("worst", ranked.tail(1))):
        for r in row.itertuples(index=False):
            flat = trial_config(trials, r.trial_id)
            picks[label] = (r, {k: flat.get(k) for k in searched})
    first_report_s, startup_s = startup_overhead(trials, curves)
    best_row, best_params = picks.get("best", (None, {}))
    outcome = SearchOutcome(
        experiment_path=exp_path,
        tables_path=f"{exp_path}/tables",
        filesystem=fs,
        best_trial_id=None if best_row is None else str(best_row.trial_id),
        best_val_miou=None if best_row is None else float(best_row.best_val_miou),
        best_params=best_params,
        best_config=None if best_row is None else apply_overrides(cfg, best_params),
        best_checkpoint=None if best_row is None else _or_none(getattr(best_row, "best_checkpoint", None)),
        status_counts=counts,
        num_trials=len(trials),
        num_finished=counts.get("TERMINATED", 0) + counts.get("STOPPED_EARLY", 0),
        num_errors=counts.get("ERROR", 0),
        interrupted=interrupted,
        median_first_report_s=first_report_s,
        median_startup_s=startup_s,
        worker_seconds=cost,
        disk_bytes=disk,
        wall_s=wall_s,
    )
    lines = [f"\nsearch '{cfg.run.name}': {outcome.num_trials} trials {counts} in {wall_s:.0f} s"]
    for label, (r, ps) in picks.items():
        lines.append(
            f"  {label:<5}: trial {r.trial_id} val mIoU {r.best_val_miou:.4f} @ it {r.iteration_of_best} | {ps}"
        )
    if len(configs := rank_configs(trials)):
        c = configs.iloc[0]
        lines.append(
            f"  best config over seeds {c['seeds']}: val mIoU {c['mean']:.4f} ± {c['std']:.4f}; "
            f"{confirmation_verdict(configs)}"
        )
    if outcome.best_checkpoint:
        lines.append(f"  best checkpoint: {outcome.best_checkpoint}")
    for r in trials[trials["status"] == "ERROR"].itertuples(index=False):
        lines.append(f"  error: trial {r.trial_id}: {r.error}")
    if first_report_s is not None:
        lines.append(
            f"  per trial (median): {first_report_s:.1f} s from start to first report, of "
            f"which {startup_s or 0:.1f} s start-up (Tune + Train actors, model, data)"
        )
    kept = (
        f"{outcome.disk_bytes / 2**30:.2f} GiB"
        if outcome.disk_bytes >= 2**30
        else f"{outcome.disk_bytes / 2**20:.1f} MiB"
    )
    lines.append(f"  worker-seconds: {outcome.worker_seconds:.0f}; checkpoints kept on storage: {kept}")
    lines.append(f"  tables: {outcome.tables_path}")
    if interrupted:
        lines.append("  interrupted: run again with --resume to finish the search")
    print("\n".join(lines), flush=True)
    return outcome


def _or_none(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None
