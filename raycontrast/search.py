"""What a search tells Ray Tune: the objects Tune calls back (Ray Tune glue).

- `RungScheduler`: ASHA (`rungs.Rungs`) whose rungs live on the experiment's storage, so a resumed search
  stops exactly the trials an uninterrupted one would (Tune itself does not save its scheduler);
- `SearchSchedule`: the searcher Tune sees: Optuna (TPE) behind the trial count and the concurrency, and
  the filter of what Optuna learns (values at ASHA's milestones, early-stopped trials as PRUNED);
- `ExtendableSearch`: Tune's generator around it, which a resume that asks for more trials un-finishes;
- `TablesCallback`: trial events to `results.ResultsWriter`, the Parquet tables.

They read the experiment's record (`experiment.json`: the config of the latest start or accepted
resume) from storage when first used in a driver process, so what a resume may change (a larger
`tune.num_samples`, another concurrency) applies to the objects Tune restores.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import time
from typing import Any

import ray
from optuna.samplers import TPESampler
from ray.tune import Callback
from ray.tune.result import TRAINING_ITERATION
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher, SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from raycontrast.checkpoint import best_checkpoint, list_checkpoints, retain_checkpoints
from raycontrast.config import Config, apply_overrides, flatten
from raycontrast.data.info import dataset_info
from raycontrast.experiment import ExperimentRecord, SearchStateError
from raycontrast.plan import plan_resources
from raycontrast.results import ResultsWriter
from raycontrast.rungs import Rungs
from raycontrast.space import parse_space, startup_trials
from raycontrast.storage import Storage, disk_use, exists, run_storage, write_atomic
from raycontrast.trunk import plan_sharing

__all__ = [
    "CONFIRM_KEY",
    "DIVERGED_KEY",
    "ITERATION",
    "METRIC",
    "MODE",
    "ExtendableSearch",
    "RungScheduler",
    "SCHEDULER_FILE",
    "SearchSchedule",
    "SearchStateError",
    "TablesCallback",
    "asha_schedule",
    "decode_params",
    "is_confirmation",
    "optuna_search",
]

METRIC, MODE, ITERATION = "val_miou", "max", "iteration"
DIVERGED_KEY = "diverged"  # in the one report of a diverged trial: why its losses stayed non-finite
SCHEDULER_FILE = "scheduler.json"
SEARCHER_FILE = "searcher.pkl"  # the searcher's state as of Tune's last save, kept on storage by us


def decode_params(params: dict[str, Any], json_keys: set[str] | frozenset[str]) -> dict[str, Any]:
    """A trial's sampled values as config overrides (JSON-encoded choices decoded, numpy scalars unwrapped)."""
    out = {}
    for k, v in params.items():
        v = v.item() if hasattr(v, "item") and getattr(v, "ndim", 0) == 0 else v
        out[k] = json.loads(v) if k in json_keys and isinstance(v, str) else v
    return out


CONFIRM_KEY = "run.seed"  # in a trial's params only for a confirmation trial (`tune.confirm`)


def is_confirmation(params: dict[str, Any]) -> bool:
    """A confirmation trial: one of the search's best configs run again with another seed."""
    return CONFIRM_KEY in params


def asha_schedule(cfg: Config) -> tuple[int, int, float]:
    """ASHA's `(grace period, max_t, reduction factor)` in iterations (its clock is our `iteration`)."""
    return cfg.tune.grace_period * cfg.train.eval_interval, cfg.train.iterations, cfg.tune.reduction_factor


class _FromRecord:
    """Reads the experiment's config from its record once per driver process (not pickled)."""

    def __init__(self, fs: Any, folder: str) -> None:
        self.fs, self.folder = fs, folder
        self._cfg: Config | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cfg": None}

    @property
    def cfg(self) -> Config:
        if self._cfg is None:
            record = ExperimentRecord.read(self.fs, self.folder)
            if record is None:
                raise FileNotFoundError(f"no experiment record in {self.folder}")
            self._cfg = Config.model_validate(record.config)
        return self._cfg


class RungScheduler(FIFOScheduler, _FromRecord):
    """ASHA with one bracket, as Tune's `ASHAScheduler(time_attr="iteration")`, its rungs kept in
    `<experiment>/scheduler.json` and rewritten after every judged report."""

    def __init__(self, fs: Any, folder: str) -> None:
        FIFOScheduler.__init__(self)
        _FromRecord.__init__(self, fs, folder)
        self._rungs: Rungs | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**_FromRecord.__getstate__(self), "_rungs": None}  # the truth is on storage

    @property
    def path(self) -> str:
        return posixpath.join(self.folder, SCHEDULER_FILE)

    @property
    def rungs(self) -> Rungs:
        if self._rungs is None:
            if exists(self.fs, self.path):
                with self.fs.open_input_stream(self.path) as f:
                    self._rungs = Rungs.from_dict(json.loads(f.read()))
            else:
                self._rungs = Rungs(*asha_schedule(self.cfg))
        return self._rungs

    def _judge(self, trial: Any, result: dict[str, Any]) -> bool:
        stop = self.rungs.judge(trial.trial_id, result[ITERATION], result[METRIC])
        write_atomic(self.fs, self.path, json.dumps(self.rungs.to_dict()).encode())
        return stop

    @staticmethod
    def _judgeable(result: dict[str, Any]) -> bool:
        return DIVERGED_KEY not in result and ITERATION in result and METRIC in result

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if not self._judgeable(result) or is_confirmation(trial.config):  # seeds run the full budget
            return TrialScheduler.CONTINUE
        return TrialScheduler.STOP if self._judge(trial, result) else TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        if is_confirmation(trial.config):
            return
        if result and self._judgeable(result):  # as Tune's ASHA: the last result is recorded too
            self._judge(trial, result)

    def debug_string(self) -> str:
        cutoffs = ", ".join(f"{m:g}: {self.rungs.cutoff(m)}" for m in self.rungs.milestones)
        return f"ASHA rungs (iteration: cutoff) {cutoffs}"


def optuna_search(cfg: Config, points: list[dict[str, Any]] | None) -> OptunaSearch:
    """Ray's Optuna searcher with the TPE sampler of `tune.searcher`; `points`: the published points, in
    Tune's encoding, suggested first."""
    s = cfg.tune.searcher
    sampler = TPESampler(
        n_startup_trials=startup_trials(cfg),
        seed=cfg.run.seed if s.seed is None else s.seed,
        multivariate=s.multivariate,
    )
    return OptunaSearch(points_to_evaluate=points, sampler=sampler)


class SearchSchedule(Searcher, _FromRecord):
    """Optuna behind the trial count and the concurrency, and what it is told.

    - Trials: `tune.num_samples` of the record (Tune's own count is unbounded), so `--resume --accept
      tune.num_samples` extends a search.
    - At once: `tune.max_concurrent_trials`, else as many as the cluster holds *now*
      (`plan.plan_resources` on its current resources), so a cluster that scales up runs more.
    - Optuna learns each trial's val mIoU at ASHA's milestones as intermediate values (step = iteration),
      the final val mIoU of a trial that ran to `train.iterations` (COMPLETE), PRUNED for a trial ASHA
      stopped, FAIL for an error or a divergence.
    - Confirmation (`tune.confirm`): once every search trial has ended, the `top_k` configs by best val
      mIoU (`analyze.rank_trials`) are suggested again with each of `seeds` as `run.seed` (`CONFIRM_KEY`),
      each (config, seed) once: a resume that adds samples, seeds or `top_k` runs only what is new.
      Optuna never sees those trials, ASHA never stops them, and they train from scratch (another seed
      changes the warm-up).
    """

    RECHECK_S = 5.0  # how often the cluster's resources are read again

    def __init__(self, inner: OptunaSearch, fs: Any, folder: str) -> None:
        Searcher.__init__(self)
        _FromRecord.__init__(self, fs, folder)
        self.inner = inner
        self.started = 0
        self.live: set[str] = set()
        self.suggested: dict[str, dict[str, Any]] = {}  # search trial -> its params, in start order
        self.best: dict[str, float] = {}  # search trial -> best val mIoU reported
        self.ended: dict[str, str] = {}  # search trial that finished -> TERMINATED / STOPPED_EARLY
        self.confirm_ids: list[str] = []  # the confirmation trials started, in order
        self.confirmed: dict[str, dict[str, Any]] = {}  # confirmation trial -> its params
        self._restored = False  # by `restore`; a fresh search's first `suggest` sets it too
        self._concurrency: tuple[float, int] | None = None  # (read at, value)

    def __getstate__(self) -> dict[str, Any]:
        return {
            **_FromRecord.__getstate__(self), "_concurrency": None, "_restored": False, "_announced": False
        }  # fmt: skip

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return self.inner.set_search_properties(metric, mode, config, **spec)

    def concurrency(self) -> int:
        t = self.cfg.tune
        if t.max_concurrent_trials:
            return min(t.max_concurrent_trials, t.num_samples)
        now = time.monotonic()
        if self._concurrency is None or now - self._concurrency[0] > self.RECHECK_S:
            res = ray.cluster_resources()
            fit = plan_resources(res.get("CPU", 0.0), res.get("GPU", 0.0), self.cfg).max_concurrent
            self._concurrency = (now, max(1, fit))
        return self._concurrency[1]

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if not getattr(self, "_restored", False) and self.started == 0:  # absent in older saved searchers
            self._refuse_a_silent_restart()
        if self.started >= self.cfg.tune.num_samples:
            return self._confirm(trial_id)
        if len(self.live) >= self.concurrency():
            return None  # Tune asks again later
        suggestion = self.inner.suggest(trial_id)
        if isinstance(suggestion, dict):
            self.started += 1
            self.live.add(trial_id)
            self.suggested[trial_id] = suggestion
        return suggestion

    def _confirm(self, trial_id: str) -> dict[str, Any] | str | None:
        """The next confirmation trial's params; None while search trials run (the ranking is not final)."""
        c = self.cfg.tune.confirm
        if not c.top_k:
            return Searcher.FINISHED
        if self.live - set(self.confirm_ids):
            return None
        pending = self.pending_confirmations()
        if pending and not getattr(self, "_announced", False):
            self._announced = True
            print(f"confirm: {len(pending)} trial(s) to run, the top {c.top_k} with seeds {list(c.seeds)}")
        if not pending:
            return Searcher.FINISHED
        if len(self.live) >= self.concurrency():
            return None
        self.confirm_ids.append(trial_id)
        self.confirmed[trial_id] = pending[0]
        self.live.add(trial_id)
        return pending[0]

    def pending_confirmations(self) -> list[dict[str, Any]]:
        """The (config, seed) pairs `tune.confirm` asks for, by the search's ranking now, not yet started."""
        import pandas as pd

        from raycontrast.analyze import rank_trials

        c = self.cfg.tune.confirm
        if not c.top_k:
            return []
        rows = [
            {"trial_id": t, "status": self.ended[t], "best_val_miou": self.best.get(t)}
            for t in self.suggested
            if t in self.ended
        ]
        top = rank_trials(pd.DataFrame(rows, columns=["trial_id", "status", "best_val_miou"])).head(c.top_k)
        started = list(self.confirmed.values())  # set by __init__, or by restore for older states
        wanted = [{**self.suggested[t], CONFIRM_KEY: seed} for t in top["trial_id"] for seed in c.seeds]
        return [p for p in wanted if p not in started]

    def has_more(self) -> bool:
        """Trials left to suggest: search trials under `tune.num_samples`, or confirmations."""
        return self.started < self.cfg.tune.num_samples or bool(self.pending_confirmations())

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        grace, max_t, rf = asha_schedule(self.cfg)
        if DIVERGED_KEY in result or METRIC not in result or trial_id in self.confirm_ids:
            return
        if math.isfinite(result[METRIC]):
            self.best[trial_id] = max(result[METRIC], self.best.get(trial_id, -math.inf))
        milestones = Rungs(grace, max_t, rf).milestones if self.cfg.tune.scheduler == "asha" else []
        if result.get(ITERATION) in milestones:
            self.inner.on_trial_result(
                trial_id, {METRIC: result[METRIC], TRAINING_ITERATION: result[ITERATION]}
            )

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        self.live.discard(trial_id)
        if trial_id in self.confirm_ids:
            return
        if error or not result or DIVERGED_KEY in result:
            self.inner.on_trial_complete(trial_id, None, error=True)  # FAIL
        elif result.get(ITERATION, 0) < self.cfg.train.iterations:
            self.ended[trial_id] = "STOPPED_EARLY"
            self.inner.on_trial_complete(trial_id, None, error=False)  # PRUNED: stopped by ASHA
        else:
            self.ended[trial_id] = "TERMINATED"
            self.inner.on_trial_complete(trial_id, result)  # COMPLETE with its final val mIoU

    @property
    def copy_path(self) -> str:
        return posixpath.join(self.folder, SEARCHER_FILE)

    def save(self, checkpoint_path: str) -> None:
        """Tune's copy at `checkpoint_path`, and one of ours on storage, written atomically: Tune copies its
        own to storage after the experiment state, and a driver killed during that copy leaves it cut short."""
        import pickle

        data = pickle.dumps(self.__getstate__())
        with open(checkpoint_path, "wb") as f:
            f.write(data)
        write_atomic(self.fs, self.copy_path, data)

    def restore(self, checkpoint_path: str) -> None:
        """Tune's copy; when it is damaged, ours, written at the same save (so it agrees with the experiment
        state Tune copied before it)."""
        import pickle

        try:
            with open(checkpoint_path, "rb") as f:
                state = pickle.load(f)
        except (EOFError, pickle.UnpicklingError, OSError) as e:
            if not exists(self.fs, self.copy_path):
                raise RuntimeError(
                    f"search state {checkpoint_path} is damaged ({type(e).__name__}: {e}) and "
                    f"{self.copy_path} does not exist; the search cannot be resumed"
                ) from e
            print(f"search state: Tune's copy is damaged ({type(e).__name__}); using {self.copy_path}")
            with self.fs.open_input_stream(self.copy_path) as f:
                state = pickle.loads(f.read())
        self.__dict__.update(state)
        if "confirmed" not in state:  # saved before confirmations were kept by trial
            self.confirmed = dict(zip(self.confirm_ids, state.get("confirmations") or [], strict=False))
        self._sync_startup_trials()
        self._restored = True

    def _sync_startup_trials(self) -> None:
        """The restored TPE's random start-up count, as the record derives it now: a search extended to N
        samples (`--accept tune.num_samples`) samples as a search started with N would, and as its plan says."""
        study = getattr(self.inner, "_ot_study", None)
        if study is not None and isinstance(study.sampler, TPESampler):
            study.sampler._n_startup_trials = startup_trials(self.cfg)  # Optuna has no setter

    def _refuse_a_silent_restart(self) -> None:
        """Tune falls back to a fresh experiment when it cannot restore one ("Restarting experiment"): the
        trials already run would run again under new ids, and the search would start over. A searcher
        that was never restored, in an experiment whose tables already hold trials, stops it instead."""
        tables = posixpath.join(self.folder, "tables", "trials.parquet")
        if exists(self.fs, tables) and _rows(self.fs, tables) > 0:
            raise SearchStateError(
                f"the search state of {self.folder} could not be restored (see Tune's 'Failed to restore the "
                "run state' above), and its tables already hold trials: refusing to start the search over. "
                "Start a new run.name, or move the experiment folder away to start again"
            )
        self._restored = True  # a fresh search: nothing to lose


class ExtendableSearch(SearchGenerator):
    """Tune's wrapper of a `SearchSchedule`, which a resume can extend.

    Tune saves "the searcher has finished" with the experiment, and a restored search that had finished
    never asks its searcher again. After `--resume --accept tune.num_samples` (or `tune.confirm.*`), the
    record asks for more trials: the flag is cleared when the restored searcher has some left to suggest.
    """

    def restore_from_dir(self, dirpath: str) -> None:
        super().restore_from_dir(dirpath)
        if self._finished and self.searcher.has_more():
            print("resume: the search had finished; the config asks for more trials", flush=True)
            self._finished = False


def _rows(fs: Any, path: str) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fs.open_input_stream(path) as f:
        return pq.ParquetFile(pa.BufferReader(f.read())).metadata.num_rows


def _trial_error(trial: Any) -> str:
    """Text of a failed trial's error (Tune appends one entry per failure to its error file)."""
    path = trial.error_file  # on the driver's disk, written before on_trial_error is called
    if path and os.path.exists(path):
        with open(path) as f:
            return f.read()
    return "unknown error (no error file)"


class TablesCallback(Callback, _FromRecord):
    """Feeds `ResultsWriter` from Tune's trial events. The writer is made in `setup` (on resume it first
    loads the tables on storage), so this object stays picklable into Tune's saved tuner state."""

    def __init__(self, json_keys: frozenset[str], fs: Any, folder: str) -> None:
        _FromRecord.__init__(self, fs, folder)
        self.json_keys = json_keys
        self.writer: ResultsWriter | None = None
        self._flat: dict[str, dict[str, Any]] = {}
        self._storage: Storage | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**_FromRecord.__getstate__(self), "writer": None, "_flat": {}, "_storage": None}

    def setup(self, **info: Any) -> None:
        cfg = self.cfg
        self.writer = ResultsWriter(
            posixpath.join(self.folder, "tables"),
            class_names=list(dataset_info(cfg.data.dataset).class_names),
            searched_keys=[p.key for p in parse_space(cfg)],
            filesystem=self.fs,
            target_iterations=cfg.train.iterations,  # TERMINATED short of it -> STOPPED_EARLY (ASHA)
        )
        if n := self.writer.load_existing():
            print(f"tables: continuing {n} trial(s) from {self.writer.dir}", flush=True)

    def _config(self, trial: Any) -> dict[str, Any]:
        """The trial's full config, flattened: every searched and fixed key becomes a column."""
        if trial.trial_id not in self._flat:
            params = decode_params(trial.config, self.json_keys)
            self._flat[trial.trial_id] = flatten(apply_overrides(self.cfg, params))
        return self._flat[trial.trial_id]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.writer.on_trial_start(trial.trial_id, self._config(trial))
        sharing = plan_sharing(self.cfg, parse_space(self.cfg))
        if sharing.enabled and not is_confirmation(trial.config):  # a confirmation trains from scratch
            self.writer.on_fork(trial.trial_id, sharing.fork_at)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if DIVERGED_KEY in result:
            # Deterministic: the error that follows this report must not be retried (tune.max_failures).
            # Tune offers no per-error retry policy, so the trial's own limit is lowered here.
            trial.max_failures = 0
            return
        if result.get("checkpoint_path"):  # a path on the storage filesystem: recorded as users write it
            result = {**result, "checkpoint_path": self._uri(result["checkpoint_path"])}
        self.writer.on_report(trial.trial_id, self._config(trial), result)

    def _train_run(self, trial_id: str) -> str:
        return posixpath.join(self.folder, "train_runs", f"{self.cfg.run.name}-train-{trial_id}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # Ended for good: keep what tune.keep_checkpoints says (errored trials keep all, to be resumed).
        run, scores = self._train_run(trial.trial_id), self.writer.scores(trial.trial_id)
        best = retain_checkpoints(self.fs, run, scores, self.cfg.tune.keep_checkpoints)
        self._record_disk(trial.trial_id, run, best)
        self.writer.on_trial_end(trial.trial_id, "TERMINATED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run = self._train_run(trial.trial_id)
        best = best_checkpoint(list_checkpoints(self.fs, run), self.writer.scores(trial.trial_id))
        self._record_disk(trial.trial_id, run, best)
        self.writer.on_trial_end(trial.trial_id, "ERROR", error=_trial_error(trial))

    def _record_disk(self, trial_id: str, run: str, best: str | None) -> None:
        uri = None if best is None else self._uri(best)
        self.writer.on_disk_use(trial_id, disk_use(self.fs, run), best_checkpoint=uri)

    def _uri(self, path: str) -> str:
        if self._storage is None:
            self._storage = run_storage(self.cfg)
        return self._storage.uri(path)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.writer.flush()
