"""Ray Tune glue: a search over dotted config keys with OptunaSearch (TPE) and ASHA, run or resumed.

One trial is one Ray Train run: a small driver function applies the trial's dotted parameters to the base
config and fits a `TorchTrainer` (`train.build_trainer`) named after the trial id, so a restarted or resumed
trial continues from its own Train checkpoints. `TuneReportCallback` forwards every rank-0 report (one per
evaluation window) to Tune, where ASHA compares `val_miou` at iteration milestones. A Tune callback feeds
`results.ResultsWriter`, so the tables under `<storage>/<run.name>/tables/` are rewritten as trials report
and end, and a crashed search still leaves consistent tables.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import tune
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from raycontrast.config import Config, ConfigError, apply_overrides, flatten
from raycontrast.plan import Plan, check_shared_storage, mount_fs_type, plan_resources
from raycontrast.results import ResultsWriter, load_results, resolve_path, trial_config
from raycontrast.space import Param, initial_points, parse_space

__all__ = ["SearchOutcome", "decode_params", "run_search", "to_tune_space"]

METRIC, MODE = "val_miou", "max"


# ------------------------------------------------------------------------------------------- space


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, bool | int | float | str)


def _json_keys(params: Sequence[Param]) -> set[str]:
    """Choice keys with list/dict options: Optuna only samples scalars, so those travel as JSON strings."""
    return {p.key for p in params if p.kind == "choice" and not all(_is_scalar(v) for v in p.values)}


def to_tune_space(params: Sequence[Param]) -> dict[str, Any]:
    """`space.Param`s -> Ray Tune domains keyed by dotted config key (`int` bounds are inclusive)."""
    out: dict[str, Any] = {}
    for p in params:
        if p.kind == "loguniform":
            out[p.key] = tune.loguniform(*p.values)
        elif p.kind == "uniform":
            out[p.key] = tune.uniform(*p.values)
        elif p.kind == "int":
            out[p.key] = tune.randint(p.values[0], p.values[1] + 1)  # Tune's upper bound is exclusive
        elif p.key in _json_keys([p]):
            out[p.key] = tune.choice([json.dumps(v) for v in p.values])
        else:
            out[p.key] = tune.choice(list(p.values))
    return out


def _encode_points(points: list[dict[str, Any]], json_keys: set[str]) -> list[dict[str, Any]]:
    return [{k: json.dumps(v) if k in json_keys else v for k, v in pt.items()} for pt in points]


def decode_params(params: Mapping[str, Any], json_keys: set[str] | frozenset[str]) -> dict[str, Any]:
    """A trial's sampled values as config overrides (JSON-encoded choices decoded, numpy scalars unwrapped)."""
    out = {}
    for k, v in params.items():
        v = v.item() if hasattr(v, "item") and getattr(v, "ndim", 0) == 0 else v
        out[k] = json.loads(v) if k in json_keys and isinstance(v, str) else v
    return out


# ------------------------------------------------------------------------------------------ ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_ray(address: str | None) -> None:
    """Connect (`address` / RAY_ADDRESS), else start a local instance with its dashboard on 127.0.0.1.

    Ray Train's placement-group cleaner finds the State API by auto-detection, which fails when another Ray
    instance runs on the same machine; early-stopped trials then leak their workers' placement group and
    the next trial waits forever. Pinning the dashboard port and exporting RAY_API_SERVER_ADDRESS before
    the raylet starts gives every Ray process of this instance the right address.
    """
    from raycontrast.train import init_ray

    if ray.is_initialized() or address or os.environ.get("RAY_ADDRESS"):
        init_ray(address)
        return
    port = _free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(address="local", dashboard_host="127.0.0.1", dashboard_port=port)


def _worker_overrides(cfg: Config, plan: Plan) -> dict[str, Any]:
    """Resources the Train workers actually reserve; keep the thread count the user's CPUs imply."""
    threads = cfg.train.threads_per_worker or max(1, int(cfg.train.cpus_per_worker))
    return {"train.cpus_per_worker": plan.worker_cpus, "train.threads_per_worker": threads}


# ---------------------------------------------------------------------------------- trial + tables


def _make_trial_driver(base: dict[str, Any], json_keys: frozenset[str], plan: Plan, train_root: str, fs: Any):
    """The Tune function trainable: trial params -> Config -> one TorchTrainer fit."""

    def trial(params: dict[str, Any]) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        from raycontrast.train import build_trainer

        cfg = apply_overrides(Config.model_validate(base), decode_params(params, json_keys), "trial params")
        trial_id = tune.get_context().get_trial_id()
        run_cfg = apply_overrides(cfg, _worker_overrides(cfg, plan))
        build_trainer(
            run_cfg,
            name=f"{cfg.run.name}-train-{trial_id}",  # stable per trial: a restart resumes its checkpoints
            storage_path=train_root,
            storage_filesystem=fs,
            callbacks=[TuneReportCallback()],
        ).fit()

    return trial


def _trial_error(trial: Any) -> str:
    """Text of a failed trial's error (Tune appends one entry per failure to its error file)."""
    path = trial.error_file  # on the driver's disk, written before on_trial_error is called
    if path and os.path.exists(path):
        with open(path) as f:
            return f.read()
    return "unknown error (no error file)"


class TablesCallback(Callback):
    """Feeds `ResultsWriter` from Tune's trial events. The writer is made in `setup` (on resume it first
    loads the tables on storage), so this object stays picklable into Tune's saved tuner state."""

    def __init__(self, base: dict[str, Any], json_keys: frozenset[str], tables_dir: str, fs: Any) -> None:
        self.base, self.json_keys, self.tables_dir, self.fs = base, json_keys, tables_dir, fs
        self.writer: ResultsWriter | None = None
        self._flat: dict[str, dict[str, Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "writer": None, "_flat": {}}

    def setup(self, **info: Any) -> None:
        from raycontrast.data.loader import dataset_info

        cfg = Config.model_validate(self.base)
        self.writer = ResultsWriter(
            self.tables_dir,
            class_names=list(dataset_info(cfg.data.dataset)[1]),
            searched_keys=[p.key for p in parse_space(cfg)],
            filesystem=self.fs,
            target_iterations=cfg.train.iterations,  # TERMINATED short of it -> STOPPED_EARLY (ASHA)
        )
        if n := self.writer.load_existing():
            print(f"tables: continuing {n} trial(s) from {self.tables_dir}", flush=True)

    def _config(self, trial: Any) -> dict[str, Any]:
        """The trial's full config, flattened: every searched and fixed key becomes a column."""
        if trial.trial_id not in self._flat:
            params = decode_params(trial.config, self.json_keys)
            self._flat[trial.trial_id] = flatten(apply_overrides(Config.model_validate(self.base), params))
        return self._flat[trial.trial_id]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.writer.on_trial_start(trial.trial_id, self._config(trial))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.writer.on_report(trial.trial_id, self._config(trial), result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.writer.on_trial_end(trial.trial_id, "TERMINATED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.writer.on_trial_end(trial.trial_id, "ERROR", error=_trial_error(trial))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.writer.flush()


# -------------------------------------------------------------------------------------------- search


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
    status_counts: dict[str, int] = field(default_factory=dict)
    num_trials: int = 0
    num_finished: int = 0  # TERMINATED + STOPPED_EARLY
    num_errors: int = 0
    interrupted: bool = False
    median_first_report_s: float | None = None  # trial start to first report
    median_startup_s: float | None = None  # the same minus the first window's training + evaluation
    worker_seconds: float = 0.0
    wall_s: float = 0.0


def _summarise(cfg: Config, exp_path: str, fs: Any, searched: list[str], wall_s: float, interrupted: bool):
    """Outcome from the tables on storage (what users and `analyze` see), printed as a short summary."""
    try:
        tables = load_results(exp_path, filesystem=fs)
    except FileNotFoundError:  # stopped before any trial started
        print(f"\nsearch '{cfg.run.name}': no trial started; tables: none")
        return SearchOutcome(
            exp_path, f"{exp_path}/tables", fs, None, None, {}, None, interrupted=interrupted
        )
    trials, curves = tables["trials"], tables["curves"]
    counts = {str(k): int(v) for k, v in trials["status"].value_counts().items()}
    done = trials[trials["status"].isin(["TERMINATED", "STOPPED_EARLY"]) & trials["best_val_miou"].notna()]
    ranked = done.sort_values("best_val_miou", ascending=False, kind="stable")
    picks = {}  # "best" / "worst" -> (table row, searched params as Python values)
    for label, row in (("best", ranked.head(1)), ("worst", ranked.tail(1))):
        for r in row.itertuples(index=False):
            flat = trial_config(trials, r.trial_id)
            picks[label] = (r, {k: flat.get(k) for k in searched})
    firsts = curves.sort_values("iteration").groupby("trial_id")["time_s"].first()
    ttfr = trials.set_index("trial_id")["time_to_first_report_s"].dropna()
    startup = [ttfr[t] - firsts[t] for t in ttfr.index if t in firsts.index]
    best_row, best_params = picks.get("best", (None, {}))
    outcome = SearchOutcome(
        experiment_path=exp_path,
        tables_path=f"{exp_path}/tables",
        filesystem=fs,
        best_trial_id=None if best_row is None else str(best_row.trial_id),
        best_val_miou=None if best_row is None else float(best_row.best_val_miou),
        best_params=best_params,
        best_config=None if best_row is None else apply_overrides(cfg, best_params),
        status_counts=counts,
        num_trials=len(trials),
        num_finished=counts.get("TERMINATED", 0) + counts.get("STOPPED_EARLY", 0),
        num_errors=counts.get("ERROR", 0),
        interrupted=interrupted,
        median_first_report_s=float(statistics.median(ttfr)) if len(ttfr) else None,
        median_startup_s=float(statistics.median(startup)) if startup else None,
        worker_seconds=float(trials["worker_seconds"].fillna(0).sum()),
        wall_s=wall_s,
    )
    lines = [f"\nsearch '{cfg.run.name}': {outcome.num_trials} trials {counts} in {wall_s:.0f} s"]
    for label, (r, ps) in picks.items():
        lines.append(
            f"  {label:<5}: trial {r.trial_id} val mIoU {r.best_val_miou:.4f} @ it {r.iteration_of_best} | {ps}"
        )
    for r in trials[trials["status"] == "ERROR"].itertuples(index=False):
        lines.append(f"  error: trial {r.trial_id}: {r.error}")
    if outcome.median_first_report_s is not None:
        lines.append(
            f"  per trial (median): {outcome.median_first_report_s:.1f} s from start to first report, of "
            f"which {outcome.median_startup_s or 0:.1f} s start-up (Tune + Train actors, model, data)"
        )
    lines.append(f"  worker-seconds: {outcome.worker_seconds:.0f}\n  tables: {outcome.tables_path}")
    if interrupted:
        lines.append("  interrupted: run again with --resume to finish the search")
    print("\n".join(lines), flush=True)
    return outcome


def run_search(cfg: Config, *, resume: bool = False, address: str | None = None) -> SearchOutcome:
    """Search `cfg.tune.space` as experiment `<run.storage_path>/<run.name>`; `resume` continues it.

    Config, space and storage errors are raised (`ConfigError`) before Ray starts; resource errors before
    any trial is launched.
    """
    t0 = time.time()
    params = parse_space(cfg)
    points = initial_points(cfg, params)
    json_keys = frozenset(_json_keys(params))

    from raycontrast.train import resolve_storage

    root, fs = resolve_storage(cfg)
    exp_path = f"{root.rstrip('/')}/{cfg.run.name}"
    pfs, p = resolve_path(exp_path, fs)
    exists = pfs.get_file_info(p).type.name != "NotFound"
    if exists and not resume:
        raise ConfigError(
            f"run.name: an experiment '{cfg.run.name}' already exists at {exp_path}; pass --resume to continue "
            "it, or choose another run.name",
            "run.name",
        )
    if resume and not tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        where = "holds no Tune state (it stopped before its first save)" if exists else "does not exist"
        raise ConfigError(f"run.name: --resume: {exp_path} {where}; run without --resume", "run.name")
    sched = cfg.tune.scheduler
    grace, max_t = cfg.tune.grace_period * cfg.train.eval_interval, cfg.train.iterations
    if sched == "asha" and grace >= max_t:
        raise ConfigError(
            f"tune.grace_period: {cfg.tune.grace_period} evaluations x train.eval_interval "
            f"{cfg.train.eval_interval} = {grace} iterations >= train.iterations {max_t}: ASHA could never "
            "stop a trial; lower tune.grace_period or set tune.scheduler: fifo",
            "tune.grace_period",
        )

    _init_ray(address)
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    check_shared_storage(cfg.run.storage_path, len(nodes), None if fs else mount_fs_type(root))
    res = ray.cluster_resources()
    plan = plan_resources(res.get("CPU", 0.0), res.get("GPU", 0.0), cfg, node_resources=nodes)
    print(plan.describe(), flush=True)

    base = cfg.model_dump(mode="json")
    driver = _make_trial_driver(base, json_keys, plan, f"{exp_path}/train_runs", fs)
    trainable = tune.with_resources(driver, {"cpu": plan.driver_cpus})
    if resume:
        print(f"resuming search from {exp_path}", flush=True)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True, storage_filesystem=fs)
    else:
        # ASHA's clock is our `iteration` metric, not Tune's report count: a trial resumed from an older
        # checkpoint re-reports iterations, which would push training_iteration past max_t early.
        scheduler = FIFOScheduler()
        if sched == "asha":
            asha = {"max_t": max_t, "grace_period": grace, "reduction_factor": cfg.tune.reduction_factor}
            scheduler = ASHAScheduler(time_attr="iteration", **asha)
        callback = TablesCallback(base, json_keys, f"{exp_path}/tables", fs)
        tuner = tune.Tuner(
            trainable,
            param_space=to_tune_space(params),
            tune_config=tune.TuneConfig(
                metric=METRIC,  # set once here: passed on to OptunaSearch and ASHA
                mode=MODE,
                search_alg=OptunaSearch(
                    points_to_evaluate=_encode_points(points, json_keys) or None, seed=cfg.run.seed
                ),
                scheduler=scheduler,
                num_samples=cfg.tune.num_samples,
                max_concurrent_trials=plan.max_concurrent,
            ),
            run_config=tune.RunConfig(
                name=cfg.run.name,
                storage_path=root,
                storage_filesystem=fs,
                failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
                callbacks=[callback],
                verbose=1,
            ),
        )
    grid = tuner.fit()
    interrupted = grid.num_terminated + grid.num_errors < cfg.tune.num_samples
    return _summarise(cfg, exp_path, fs, [p.key for p in params], time.time() - t0, interrupted)
