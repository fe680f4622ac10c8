"""Ray Tune glue: a search over dotted config keys with Optuna (TPE) and ASHA, run or resumed.

One trial is one Ray Train run: a small driver function applies the trial's dotted parameters to the config
and fits a `TorchTrainer` (`train.build_trainer`) named after the trial id, so a restarted or resumed trial
continues from its own Train checkpoints. `TuneReportCallback` forwards every rank-0 report (one per
evaluation window) to Tune; `search.RungScheduler` (ASHA), `search.SearchSchedule` (Optuna) and
`search.TablesCallback` (the Parquet tables) take it from there.

A search keeps one consistent state across stops and restarts: one driver at a time (`lease.Lease`), the
config and package versions it was started with (`experiment.ExperimentRecord`, checked on `--resume`),
ASHA's rungs on storage, trials that started after Tune's last saved state forgotten rather than doubled,
and SIGTERM (what `ray job stop` sends) turned into Tune's graceful stop.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import posixpath
import signal
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import FIFOScheduler

from raycontrast.checkpoint import checkpoint_iteration, list_checkpoints, load_latest, save_state
from raycontrast.config import Config, ConfigError, apply_overrides
from raycontrast.data.info import dataset_info
from raycontrast.engine import NonFiniteLossError
from raycontrast.experiment import record_start
from raycontrast.lease import Lease
from raycontrast.loop import LoopOptions
from raycontrast.plan import Plan, plan_resources, wait_until_fit
from raycontrast.preflight import check_nodes
from raycontrast.results import TRUNK_ID, ResultsWriter, load_results
from raycontrast.rungs import Rungs
from raycontrast.search import (
    DIVERGED_KEY,
    METRIC,
    MODE,
    SCHEDULER_FILE,
    ExtendableSearch,
    RungScheduler,
    SearchSchedule,
    TablesCallback,
    asha_schedule,
    decode_params,
    is_confirmation,
    optuna_search,
)
from raycontrast.space import Param, check_confirm, describe_searcher, initial_points, parse_space
from raycontrast.storage import (
    Storage,
    absolute_paths,
    check_run_dir,
    check_shared_storage,
    exists,
    locate,
    mount_fs_type,
    run_storage,
    write_atomic,
)
from raycontrast.summary import SearchOutcome, search_unfinished, summarise_search
from raycontrast.tables import TABLES
from raycontrast.train import (
    abandon,
    build_trainer,
    checkpoint_dir_name,
    divergence,
    init_ray,
    record_divergence,
)
from raycontrast.trunk import Sharing, TrunkReports, fork_state, plan_sharing, prefix_report, read_reports

__all__ = ["DIVERGED_KEY", "METRIC", "MODE", "SearchOutcome", "decode_params", "run_search", "to_tune_space"]


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


# ---------------------------------------------------------------------------------------- trials


def _worker_overrides(cfg: Config, plan: Plan) -> dict[str, Any]:
    """Resources the Train workers actually reserve; keep the thread count the user's CPUs imply."""
    threads = cfg.train.threads_per_worker or max(1, int(cfg.train.cpus_per_worker))
    return {"train.cpus_per_worker": plan.worker_cpus, "train.threads_per_worker": threads}


def _make_trial_driver(
    base: dict[str, Any], json_keys: frozenset[str], plan: Plan, sharing: Sharing, exp_root: str, fs: Any
):
    """The Tune function trainable: trial params -> Config -> one TorchTrainer fit of
    `<exp_root>/train_runs/<name>-train-<trial id>`.

    With a shared warm-up, a trial's first start writes its fork of the trunk's checkpoint into its run
    folder (the run resumes from it) and every start reports the trunk's evaluations as its own first
    ones, as the same trial from scratch would. A diverged run (non-finite losses) is reported once with
    `DIVERGED_KEY` and then raised: the tables callback tells Tune not to retry it, and a marker in the run
    folder makes a restarted or resumed trial fail at once instead of training again.
    """
    train_root, trunk_root = posixpath.join(exp_root, "train_runs"), posixpath.join(exp_root, TRUNK_ID)

    def trial(params: dict[str, Any]) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        cfg = apply_overrides(Config.model_validate(base), decode_params(params, json_keys), "trial params")
        name = f"{cfg.run.name}-train-{tune.get_context().get_trial_id()}"  # stable: a restart resumes it
        run_fs, run_path = locate(posixpath.join(train_root, name), fs)
        detail = divergence(run_fs, run_path) if exists(run_fs, run_path) else None
        if detail is None and sharing.enabled and not is_confirmation(params):  # another seed: from scratch
            _start_from_trunk(cfg, sharing, run_fs, run_path, *locate(trunk_root, fs))
        if detail is None:
            run_cfg = apply_overrides(cfg, _worker_overrides(cfg, plan))
            trainer = build_trainer(
                run_cfg, name=name, storage_path=train_root, storage_filesystem=fs, callbacks=[TuneReportCallback()],
                placement=plan.placement, exclude_nodes=plan.excluded, in_tune=True,
            )  # fmt: skip
            summary = trainer.fit().return_value or {}
            if (detail := summary.get("diverged")) is not None:
                record_divergence(run_fs, run_path, detail)
        if detail is not None:
            tune.report({"iteration": -1, METRIC: math.nan, DIVERGED_KEY: detail})
            raise NonFiniteLossError(detail)

    return trial


def _start_from_trunk(
    cfg: Config, sharing: Sharing, fs: Any, run_path: str, trunk_fs: Any, trunk_path: str
) -> None:
    """Fork the trunk into a trial's empty run folder, then report the trunk's evaluations as the trial's."""
    if not list_checkpoints(fs, run_path):
        loaded = load_latest(trunk_fs, trunk_path)
        if loaded.state is None or loaded.state["iteration"] != sharing.fork_at:
            raise RuntimeError(f"the shared warm-up trunk at {trunk_path} has no checkpoint at its fork")
        forked = fork_state(loaded.state, cfg, sharing.sizes)
        save_state(fs, posixpath.join(run_path, checkpoint_dir_name(sharing.fork_at)), forked)
    for report in read_reports(trunk_fs, trunk_path):
        tune.report(prefix_report(report, cfg.memory.size))


def _run_trunk(cfg: Config, storage: Storage, plan: Plan, sharing: Sharing) -> None:
    """Train the shared warm-up once, as Train run `<experiment>/trunk` (resumable like a trial), and record
    its cost in the `trunk` table. Nothing to do when it reached its fork."""
    name, fs = cfg.run.name, storage.fs
    run_path = storage.path(name, TRUNK_ID)
    if any(checkpoint_iteration(p) == sharing.fork_at for p in list_checkpoints(fs, run_path)):
        return
    trunk_cfg = apply_overrides(cfg, {"memory.size": sharing.trunk_memory, **_worker_overrides(cfg, plan)})
    print(f"shared warm-up: training iterations 1-{sharing.fork_at} once, at {run_path}", flush=True)
    summary = build_trainer(
        trunk_cfg, name=TRUNK_ID, storage_path=storage.ray(name), storage_filesystem=storage.ray_fs,
        placement=plan.placement, exclude_nodes=plan.excluded, hooks=TrunkReports(fs, run_path),
        options=LoopOptions(stop_at=sharing.fork_at, fill_sizes=sharing.sizes),
    ).fit().return_value  # fmt: skip
    if summary.get("diverged"):
        raise NonFiniteLossError(f"{summary['diverged']} (in the shared warm-up: every trial would diverge)")
    writer = ResultsWriter(storage.path(name, "tables"), class_names=[], searched_keys=[], filesystem=fs)
    writer.load_existing()
    writer.on_trunk(sharing.fork_at, sharing.trunk_memory, summary["worker_seconds"])


# -------------------------------------------------------------------------------------- checks


def _check_schedule(cfg: Config) -> None:
    """A grace period ASHA could never act on is an error."""
    grace, max_t, _ = asha_schedule(cfg)
    if cfg.tune.scheduler == "asha" and grace >= max_t:
        raise ConfigError(
            f"tune.grace_period: {cfg.tune.grace_period} evaluations x train.eval_interval "
            f"{cfg.train.eval_interval} = {grace} iterations >= train.iterations {max_t}: ASHA could never "
            "stop a trial; lower tune.grace_period or set tune.scheduler: fifo",
            "tune.grace_period",
        )


def _request_resources(bundles: list[dict[str, float]]) -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


def _plan(cfg: Config, storage: Storage) -> Plan:
    """Wait for the cluster to hold a trial (`tune.wait_for_resources_s`), check every node
    (`preflight.check_nodes`), then plan the trials on what is left, and print the plan."""
    res = wait_until_fit(
        cfg, ray.cluster_resources, wait_s=cfg.tune.wait_for_resources_s, request=_request_resources
    )
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    check_shared_storage(
        cfg.run.storage_path, len(nodes), mount_fs_type(storage.root) if storage.is_local else None
    )
    excluded = check_nodes(cfg, storage.fs, storage.path(cfg.run.name))
    info, c = dataset_info(cfg.data.dataset), cfg.data.canvases
    plan = plan_resources(
        res.get("CPU", 0.0), res.get("GPU", 0.0), cfg, node_resources=[n.get("Resources", {}) for n in nodes],
        node_ids=[n["NodeID"] for n in nodes], excluded=excluded, val_size=info.image_size or (c.height, c.width),
    )  # fmt: skip
    print(plan.describe(), flush=True)
    print(describe_searcher(cfg, plan.max_concurrent), flush=True)
    return plan


# -------------------------------------------------------------------------------------- resume


def _forget_orphans(storage: Storage, name: str) -> None:
    """Trials that started after Tune's last saved state are unknown to it: Tune's restored searcher will
    suggest them again under new ids. Drop their rows, rungs and Train runs, so nothing is counted twice."""
    folder = storage.path(name)
    known = {
        t.trial_id
        for t in tune.ExperimentAnalysis(storage.ray(name), storage_filesystem=storage.ray_fs).trials
    }
    try:
        tables = load_results(folder, filesystem=storage.fs)
    except FileNotFoundError:
        return
    orphans = set(tables["trials"]["trial_id"]) - known
    if not orphans:
        return
    print(
        f"resume: {len(orphans)} trial(s) started after the last saved search state run again: {sorted(orphans)}"
    )
    writer = ResultsWriter(
        posixpath.join(folder, "tables"), class_names=[], searched_keys=[], filesystem=storage.fs
    )
    writer.load_existing()
    writer.forget(orphans)
    writer.flush()
    rungs_path = posixpath.join(folder, SCHEDULER_FILE)
    if exists(storage.fs, rungs_path):
        with storage.fs.open_input_stream(rungs_path) as f:
            rungs = Rungs.from_dict(json.loads(f.read()))
        rungs.forget(orphans)
        write_atomic(storage.fs, rungs_path, json.dumps(rungs.to_dict()).encode())
    for tid in orphans:
        run = storage.path(name, "train_runs", f"{name}-train-{tid}")
        if exists(storage.fs, run):
            storage.fs.delete_dir(run)


@contextlib.contextmanager
def _sigterm_stops_gracefully() -> Iterator[None]:
    """SIGTERM (what `ray job stop` sends, SIGKILL following after RAY_JOB_STOP_WAIT_TIME_S) becomes
    SIGUSR1, Tune's graceful stop: the experiment state is saved one last time."""
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: os.kill(os.getpid(), signal.SIGUSR1))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _make_extendable(tuner: tune.Tuner) -> None:
    """A search saved before `ExtendableSearch` existed holds the bare `SearchSchedule`, which Tune wraps in a
    generator that, once finished, never asks it again: wrap it, so `--accept tune.num_samples` extends it
    too (Ray 2.60 keeps the restored `TuneConfig` in the tuner's `_local_tuner._tune_config`)."""
    tune_config = getattr(getattr(tuner, "_local_tuner", None), "_tune_config", None)
    if tune_config is not None and isinstance(tune_config.search_alg, SearchSchedule):
        tune_config.search_alg = ExtendableSearch(tune_config.search_alg)


def _tuner(
    cfg: Config, storage: Storage, plan: Plan, sharing: Sharing, params: list[Param], resume: bool
) -> tune.Tuner:
    name, json_keys = cfg.run.name, frozenset(_json_keys(params))
    base = cfg.model_dump(mode="json")
    driver = _make_trial_driver(base, json_keys, plan, sharing, storage.ray(name), storage.ray_fs)
    trainable = tune.with_resources(driver, plan.driver_resources())
    if resume:
        print(f"resuming search from {storage.ray(name)}", flush=True)
        restored = tune.Tuner.restore(
            storage.ray(name), trainable=trainable, resume_errored=True, storage_filesystem=storage.ray_fs
        )
        _make_extendable(restored)
        return restored
    folder = storage.path(name)
    points = _encode_points(initial_points(cfg, params), json_keys) or None
    searcher = SearchSchedule(optuna_search(cfg, points), storage.fs, folder)
    scheduler = RungScheduler(storage.fs, folder) if cfg.tune.scheduler == "asha" else FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=to_tune_space(params),
        tune_config=tune.TuneConfig(
            metric=METRIC,  # set once here: passed on to the searcher and the scheduler
            mode=MODE,
            search_alg=ExtendableSearch(searcher),
            scheduler=scheduler,
            num_samples=-1,  # the searcher counts (tune.num_samples of the record: a resume may raise it)
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage.ray_path,
            storage_filesystem=storage.ray_fs,
            failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
            callbacks=[TablesCallback(json_keys, storage.fs, folder)],
            verbose=1,
        ),
    )


def run_search(
    cfg: Config, *, resume: bool = False, address: str | None = None, accept: Iterable[str] = ()
) -> SearchOutcome:
    """Search `cfg.tune.space` as experiment `<run.storage_path>/<run.name>`; `resume` continues it
    (`accept`: keys of `experiment.ACCEPTABLE` the resume may change).

    Config, space, storage, lease and drift errors are raised (`ConfigError`) before Ray starts; resource
    errors before any trial is launched.
    """
    t0 = time.time()
    cfg = absolute_paths(cfg)
    params = parse_space(cfg)
    check_confirm(cfg)
    initial_points(cfg, params)  # validated before anything starts
    storage, name = run_storage(cfg), cfg.run.name
    check_run_dir(storage, name, resume=resume, noun="experiment")
    if resume and not tune.Tuner.can_restore(storage.ray(name), storage_filesystem=storage.ray_fs):
        raise ConfigError(
            f"run.name: --resume: {storage.ray(name)} holds no Tune state (it stopped before its first save); "
            "run without --resume",
            "run.name",
        )
    _check_schedule(cfg)
    what = f"experiment '{name}'"
    with Lease(storage.fs, storage.path(name), timeout_s=cfg.run.lease_timeout_s, what=what, on_lost=abandon):
        record_start(storage.fs, storage.path(name), cfg, resume=resume, accept=accept, what=what)
        init_ray(address)
        plan, sharing = _plan(cfg, storage), plan_sharing(cfg, params)
        print(sharing.describe(cfg), flush=True)
        if resume:
            _forget_orphans(storage, name)
        if sharing.enabled:
            _run_trunk(cfg, storage, plan, sharing)
        tuner = _tuner(cfg, storage, plan, sharing, params, resume)
        with _sigterm_stops_gracefully():
            tuner.fit()
    tables, searched, interrupted = storage.path(name, "tables"), [p.key for p in params], True
    if exists(storage.fs, posixpath.join(tables, f"{TABLES[0]}.parquet")):
        trials = load_results(tables, filesystem=storage.fs)["trials"]
        interrupted = search_unfinished(cfg, trials, searched)
    return summarise_search(cfg, storage.path(name), storage.fs, searched, time.time() - t0, interrupted)
