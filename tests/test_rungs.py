"""`rungs.Rungs` decides exactly as Ray Tune's own ASHA bracket, and keeps deciding so after a restart."""

from __future__ import annotations

import json
import math
import random

import pytest

from raycontrast.rungs import Rungs

tune_asha = pytest.importorskip("ray.tune.schedulers.async_hyperband")


class _Trial:
    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id


def _reports(seed: int, n_trials: int = 12, max_t: int = 16, step: int = 2):
    """Interleaved reports (trial, iteration, value) of trials that each report every `step` iterations."""
    rng = random.Random(seed)
    pending = {f"t{i}": step for i in range(n_trials)}
    out = []
    while pending:
        tid = rng.choice(sorted(pending))
        it = pending[tid]
        value = math.nan if rng.random() < 0.05 else rng.random()
        out.append((tid, it, value))
        pending[tid] = it + step
        if pending[tid] > max_t or rng.random() < 0.1:
            del pending[tid]
    return out


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered")  # Tune's reference, on all-NaN rungs
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("grace", "rf"), [(2, 2.0), (4, 3.0), (2, 2.5)])
def test_same_decisions_as_tunes_asha(seed: int, grace: int, rf: float) -> None:
    max_t = 16
    ref = tune_asha._Bracket(grace, max_t, rf, s=0)
    ours = Rungs(grace, max_t, rf)
    assert ours.milestones == sorted(m for m, _ in ref._rungs)
    stopped: set[str] = set()
    for tid, it, value in _reports(seed, max_t=max_t):
        if tid in stopped:
            continue  # Tune stops the trial: it reports no more
        want = it >= max_t or ref.on_result(_Trial(tid), it, value) == "STOP"
        assert ours.judge(tid, it, value) == want, (tid, it)
        if want:
            stopped.add(tid)
    for m, recorded in ref._rungs:
        assert dict(ours.records[m]) == pytest.approx(recorded, nan_ok=True)


def test_a_restored_record_decides_as_the_uninterrupted_one() -> None:
    reports = _reports(3)
    full, stops = Rungs(2, 16, 2.0), []
    for tid, it, v in reports:
        stops.append(full.judge(tid, it, v))
    cut = len(reports) // 2
    first = Rungs(2, 16, 2.0)
    for tid, it, v in reports[:cut]:
        first.judge(tid, it, v)
    restored = Rungs.from_dict(json.loads(json.dumps(first.to_dict())))  # through JSON, as on storage
    assert [restored.judge(tid, it, v) for tid, it, v in reports[cut:]] == stops[cut:]


def test_a_replayed_trial_keeps_its_decisions_and_records() -> None:
    r = Rungs(2, 16, 2.0)
    for tid, v in (("a", 0.6), ("b", 0.7), ("c", 0.8), ("d", 0.9)):
        assert r.judge(tid, 2, v) is False  # the first trial at a rung always continues
    assert r.judge("a", 4, 0.95) is False and r.judge("b", 4, 0.1) is True  # b is below the cutoff at 4
    # After a restart the trials resume from older checkpoints and report again.
    assert r.judge("b", 4, 0.1) is True  # the recorded stop is applied again
    assert r.judge("c", 6, 0.99) is False  # c resumed past milestone 4: judged there once, with this value
    assert r.recorded_at("c") == {2: 0.8, 4: 0.99}
    assert r.judge("c", 8, 0.99) is False and r.recorded_at("c")[8] == 0.99
    assert r.recorded_at("a") == {2: 0.6, 4: 0.95}  # a replayed report at 2 records nothing new
    assert r.judge("a", 2, 0.0) is False and r.recorded_at("a") == {2: 0.6, 4: 0.95}
    r.forget({"a"})
    assert r.recorded_at("a") == {}


@pytest.mark.parametrize("damage", [b"", b"\x80\x05 cut short"])
def test_a_searcher_state_cut_short_by_a_kill_is_restored_from_storage(tmp_path, damage):
    """Tune copies its searcher file to storage after the experiment state; a driver killed during that copy
    leaves it empty or cut short, and Tune would then restart the whole search from scratch. The copy the
    searcher itself wrote atomically at the same save is used instead."""
    from pathlib import Path

    import pyarrow.fs as pafs
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from raycontrast.config import load_config
    from raycontrast.experiment import ExperimentRecord
    from raycontrast.search import SearchSchedule

    fs, folder = pafs.LocalFileSystem(), str(tmp_path / "exp")
    fs.create_dir(folder)
    smoke = load_config(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")
    ExperimentRecord(smoke.model_dump(mode="json"), {}).write(fs, folder)  # written at every start
    inner = OptunaSearch(space={"x": tune.uniform(0, 1)}, seed=3)
    inner.set_search_properties("val_miou", "max", {})
    first = SearchSchedule(inner, fs, folder)
    first.started, first.live = 2, {"t1"}
    tune_copy = tmp_path / "searcher-state-x.pkl"
    first.save(str(tune_copy))
    tune_copy.write_bytes(damage)
    again = SearchSchedule(OptunaSearch(seed=3), fs, folder)
    again.restore(str(tune_copy))
    assert again.started == 2 and again.live == {"t1"} and again.inner._space
    (tmp_path / "exp" / "searcher.pkl").unlink()
    with pytest.raises(RuntimeError, match="is damaged .* cannot be resumed"):
        SearchSchedule(OptunaSearch(seed=3), fs, folder).restore(str(tune_copy))


def test_a_search_whose_state_tune_could_not_restore_is_not_started_over(tmp_path):
    """When Tune cannot restore a search it starts a fresh one ("Restarting experiment"): every trial would
    run again. A searcher that was never restored, in an experiment whose tables hold trials, refuses."""
    import pyarrow.fs as pafs
    from ray.tune.search.optuna import OptunaSearch

    from raycontrast.experiment import SearchStateError
    from raycontrast.results import ResultsWriter
    from raycontrast.search import SearchSchedule

    fs, folder = pafs.LocalFileSystem(), str(tmp_path / "exp")
    writer = ResultsWriter(f"{folder}/tables", class_names=["a"], searched_keys=[])
    writer.flush()  # the tables a shared warm-up writes before any trial: no rows
    fresh = SearchSchedule(OptunaSearch(seed=0), fs, folder)
    fresh._refuse_a_silent_restart()  # a new search: nothing to lose
    assert fresh._restored
    writer.on_report("t1", {}, {"iteration": 2, "val_miou": 0.1})
    writer.flush()
    with pytest.raises(SearchStateError, match="could not be restored .* refusing to start the search over"):
        SearchSchedule(OptunaSearch(seed=0), fs, folder).suggest("t2")


class _RecordingSearcher:
    """Stands in for Optuna: suggests numbered points and records what it is told."""

    def __init__(self) -> None:
        self.told: list[tuple] = []
        self.n = 0

    def suggest(self, trial_id: str) -> dict:
        self.n += 1
        return {"loss.temperature": self.n / 10}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.told.append(("result", trial_id))

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        self.told.append(("complete", trial_id, None if result is None else result["val_miou"], error))


def test_the_best_configs_are_confirmed_with_more_seeds_once_the_search_ends(tmp_path):
    """`tune.confirm`: after the search's trials end, its top configs come back with each extra seed as
    run.seed; Optuna never hears of them and ASHA never stops them."""
    from pathlib import Path

    import pyarrow.fs as pafs
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.search import Searcher

    from raycontrast.config import load_config
    from raycontrast.experiment import ExperimentRecord
    from raycontrast.search import RungScheduler, SearchSchedule

    smoke = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    sets = {"tune.num_samples": 3, "tune.max_concurrent_trials": 3, "tune.confirm.top_k": 2}
    cfg = load_config(smoke, {**sets, "tune.confirm.seeds": [5, 6]})
    fs, folder = pafs.LocalFileSystem(), str(tmp_path / "exp")
    fs.create_dir(folder)
    ExperimentRecord(cfg.model_dump(mode="json"), {}).write(fs, folder)
    inner = _RecordingSearcher()
    search = SearchSchedule(inner, fs, folder)
    search._restored = True
    end = cfg.train.iterations
    assert [search.suggest(f"t{i}")["loss.temperature"] for i in range(3)] == [0.1, 0.2, 0.3]
    for tid, miou in (("t0", 0.3), ("t1", 0.5), ("t2", 0.4)):
        search.on_trial_result(tid, {"val_miou": miou, "iteration": end})
    search.on_trial_complete("t1", {"val_miou": 0.5, "iteration": end})
    search.on_trial_complete("t2", {"val_miou": 0.4, "iteration": end})
    assert search.suggest("c0") is None  # t0 still runs: the ranking is not final
    search.on_trial_complete("t0", {"val_miou": 0.3, "iteration": end})
    confirm = [search.suggest(f"c{i}") for i in range(3)]
    assert search.suggest("c3") is None  # 3 at once, as tune.max_concurrent_trials says
    told = len(inner.told)
    search.on_trial_result("c0", {"val_miou": 0.9, "iteration": 2})
    search.on_trial_complete("c0", {"val_miou": 0.9, "iteration": end})
    assert len(inner.told) == told and search.best == {"t0": 0.3, "t1": 0.5, "t2": 0.4}  # Optuna: not told
    confirm.append(search.suggest("c3"))
    assert confirm == [
        {"loss.temperature": 0.2, "run.seed": 5}, {"loss.temperature": 0.2, "run.seed": 6},
        {"loss.temperature": 0.3, "run.seed": 5}, {"loss.temperature": 0.3, "run.seed": 6},
    ]  # fmt: skip
    assert search.suggest("c4") == Searcher.FINISHED

    asha = RungScheduler(fs, folder)

    class Trial:
        trial_id, config = "c1", confirm[1]

    for it in range(2, end + 1, 2):  # reports far below every rung: a search trial would be stopped
        assert (
            asha.on_trial_result(None, Trial, {"iteration": it, "val_miou": 0.0}) == TrialScheduler.CONTINUE
        )
    assert all(not records for _, records in asha.rungs.to_dict()["records"])  # nor counted in a rung


def test_a_finished_search_extended_on_resume_runs_only_what_is_new(tmp_path):
    """Tune saves "the searcher has finished" and never asks a restored finished searcher again; after
    `--resume --accept tune.num_samples tune.confirm.top_k`, `ExtendableSearch` asks it: one more search
    trial, then the confirmations of the new top configs that have not run (none twice)."""
    import sys
    from pathlib import Path

    import pyarrow.fs as pafs
    from ray.tune.search import Searcher

    from raycontrast.config import load_config
    from raycontrast.experiment import ExperimentRecord
    from raycontrast.search import ExtendableSearch, SearchSchedule

    smoke = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    sets = {"tune.num_samples": 2, "tune.max_concurrent_trials": 2, "tune.confirm.seeds": [5]}
    fs, folder, state = pafs.LocalFileSystem(), str(tmp_path / "exp"), str(tmp_path / "tune")
    fs.create_dir(folder)
    fs.create_dir(state)
    end = load_config(smoke).train.iterations

    def record(**more) -> None:
        cfg = load_config(smoke, {**sets, **more})
        ExperimentRecord(cfg.model_dump(mode="json"), {}).write(fs, folder)

    def run(search: SearchSchedule, tid: str, miou: float) -> dict:
        params = search.suggest(tid)
        search.on_trial_result(tid, {"val_miou": miou, "iteration": end})
        search.on_trial_complete(tid, {"val_miou": miou, "iteration": end})
        return params

    record(**{"tune.confirm.top_k": 1})
    search = SearchSchedule(_RecordingSearcher(), fs, folder)
    search._restored = True
    gen = ExtendableSearch(search)
    gen._total_samples = sys.maxsize  # what Tune sets for num_samples=-1 (the searcher counts)
    assert [run(search, t, m)["loss.temperature"] for t, m in (("t0", 0.3), ("t1", 0.5))] == [0.1, 0.2]
    assert run(search, "c0", 0.6) == {"loss.temperature": 0.2, "run.seed": 5}
    assert search.suggest("c1") == Searcher.FINISHED
    gen.set_finished()
    gen.save_to_dir(state, "s1")

    again = ExtendableSearch(SearchSchedule(_RecordingSearcher(), fs, folder))
    again.restore_from_dir(state)
    assert again.is_finished()  # the same config: nothing new

    record(**{"tune.num_samples": 3, "tune.confirm.top_k": 2})
    again = ExtendableSearch(SearchSchedule(_RecordingSearcher(), fs, folder))
    again.restore_from_dir(state)
    assert not again.is_finished()
    search = again.searcher
    assert run(search, "t2", 0.4) == {"loss.temperature": 0.3}  # Optuna's 3rd suggestion
    assert search.suggest("c1") == {"loss.temperature": 0.3, "run.seed": 5}  # the new 2nd best only
    assert search.suggest("c2") == Searcher.FINISHED


def test_a_resumed_tpe_starts_up_as_the_extended_search_would():
    """The TPE start-up count is derived from `tune.num_samples`: a search extended from 16 to 40 samples
    samples as a 40-sample search, as its plan says, not with the 16-sample count it was pickled with."""
    import tempfile
    from pathlib import Path

    import pyarrow.fs as pafs
    from ray import tune

    from raycontrast.config import load_config
    from raycontrast.experiment import ExperimentRecord
    from raycontrast.search import SearchSchedule, optuna_search
    from raycontrast.space import startup_trials

    smoke = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    small, large = (load_config(smoke, {"tune.num_samples": n}) for n in (16, 40))
    assert startup_trials(small) != startup_trials(large)
    with tempfile.TemporaryDirectory() as tmp:
        fs, folder = pafs.LocalFileSystem(), f"{tmp}/exp"
        fs.create_dir(folder)
        ExperimentRecord(small.model_dump(mode="json"), {}).write(fs, folder)
        inner = optuna_search(small, None)
        inner.set_search_properties("val_miou", "max", {"loss.temperature": tune.uniform(0.05, 0.2)})
        SearchSchedule(inner, fs, folder).save(f"{tmp}/searcher.pkl")
        ExperimentRecord(large.model_dump(mode="json"), {}).write(fs, folder)
        again = SearchSchedule(optuna_search(small, None), fs, folder)
        again.restore(f"{tmp}/searcher.pkl")
        assert again.inner._ot_study.sampler._n_startup_trials == startup_trials(large)
