"""Search glue without a Ray instance: space -> Tune domains, resource arithmetic, storage checks, and the
errors `run_search` raises before Ray starts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from raycontrast import plan as plan_mod
from raycontrast import storage
from raycontrast.config import ConfigError, apply_overrides, load_config
from raycontrast.space import describe_searcher, parse_space, startup_trials

ray = pytest.importorskip("ray")
tune_mod = pytest.importorskip("raycontrast.tune")
from ray.tune.search import sample  # noqa: E402

SMOKE = Path(__file__).parents[1] / "configs" / "smoke.yaml"


def _cfg(**overrides):
    return load_config(SMOKE, overrides)


# ------------------------------------------------------------------------------------------- space


def test_params_map_to_tune_domains() -> None:
    cfg = _cfg(
        **{
            "tune.space": {
                "loss.temperature": {"loguniform": [0.05, 0.5]},
                "loss.weight": {"uniform": [0.1, 0.9]},
                "memory.size": {"int": [10, 12]},
                "model.proj_dim": {"choice": [16, 32]},
            },
            "tune.points_to_evaluate": [],
        }
    )
    space = tune_mod.to_tune_space(parse_space(cfg))
    t, w, m, d = (space[k] for k in ("loss.temperature", "loss.weight", "memory.size", "model.proj_dim"))
    assert isinstance(t, sample.Float) and isinstance(t.sampler, sample.LogUniform)
    assert (t.lower, t.upper) == (0.05, 0.5)
    assert isinstance(w, sample.Float) and isinstance(w.sampler, sample.Uniform)
    assert (w.lower, w.upper) == (0.1, 0.9)
    assert isinstance(m, sample.Integer) and (m.lower, m.upper) == (10, 13)  # Tune's upper is exclusive
    assert isinstance(d, sample.Categorical) and d.categories == [16, 32]
    np.random.seed(0)  # noqa: NPY002 - Tune's samplers draw from NumPy's global RNG
    draws = m.sample(size=300)
    assert set(draws) == {10, 11, 12}  # both inclusive ends are reached, nothing outside
    logs = np.log(t.sample(size=300))
    assert logs.min() >= math.log(0.05) and logs.max() <= math.log(0.5)


def test_list_choices_travel_as_json_and_decode_to_config_values() -> None:
    cfg = _cfg(
        **{"tune.space": {"data.crop_size": {"choice": [[64, 128], [32, 64]]}}, "tune.points_to_evaluate": []}
    )
    params = parse_space(cfg)
    dom = tune_mod.to_tune_space(params)["data.crop_size"]
    assert dom.categories == ["[64, 128]", "[32, 64]"]  # Optuna samples scalars only
    decoded = tune_mod.decode_params({"data.crop_size": "[32, 64]"}, {"data.crop_size"})
    assert apply_overrides(cfg, decoded).data.crop_size == (32, 64)
    assert tune_mod.decode_params({"memory.size": np.int64(5)}, set()) == {"memory.size": 5}


# ---------------------------------------------------------------------------------------- searcher


@pytest.mark.parametrize(
    ("samples", "points", "expected"),
    [(16, 2, 4), (6, 2, 4), (3, 2, 4), (8, 0, 2), (40, 2, 10), (400, 0, 10), (30, 12, 12)],
)
def test_tpe_start_up_grows_with_the_trial_count(samples: int, points: int, expected: int) -> None:
    pts = [{"loss.temperature": 0.1 + 0.01 * i} for i in range(points)]
    cfg = _cfg(**{"tune.num_samples": samples, "tune.points_to_evaluate": pts})
    assert startup_trials(cfg) == expected
    assert startup_trials(apply_overrides(cfg, {"tune.searcher.n_startup_trials": 7})) == 7


def test_the_plan_says_how_many_trials_are_random() -> None:
    cfg = _cfg(**{"tune.num_samples": 16, "tune.searcher.seed": 3})
    assert describe_searcher(cfg, 4) == (
        "searcher: Optuna TPE (multivariate, seed 3): 2 published point(s), 2 random, then 12 modelled of 16 "
        "trials (up to 3 more random while 4 run at once)"
    )
    few = apply_overrides(cfg, {"tune.searcher.n_startup_trials": 20, "tune.searcher.multivariate": False})
    assert describe_searcher(few, 4) == (
        "searcher: Optuna TPE (independent, seed 3): 2 published point(s), 14 random, then 0 modelled of 16 trials"
    )


def test_the_searcher_follows_tune_searcher() -> None:
    from raycontrast.search import optuna_search

    cfg = _cfg(**{"tune.num_samples": 16, "tune.points_to_evaluate": [], "tune.searcher.seed": 7})
    space = tune_mod.to_tune_space(parse_space(cfg))
    sampler = optuna_search(cfg, None)._sampler
    assert (sampler._n_startup_trials, sampler._multivariate) == (4, True)

    def suggestions(c, n: int = 4) -> list[dict]:
        """`n` suggestions, each trial ending with a value before the next is asked for."""
        s = optuna_search(c, None)
        s.set_search_properties(tune_mod.METRIC, tune_mod.MODE, space)
        out = []
        for i in range(n):
            out.append(s.suggest(f"t{i}"))
            s.on_trial_complete(f"t{i}", {tune_mod.METRIC: out[-1]["loss.weight"]})
        return out

    assert (
        suggestions(cfg) == suggestions(cfg) != suggestions(apply_overrides(cfg, {"tune.searcher.seed": 8}))
    )
    two = apply_overrides(cfg, {"tune.searcher.n_startup_trials": 2})
    all_random = apply_overrides(cfg, {"tune.searcher.n_startup_trials": 100})
    modelled, random = suggestions(two), suggestions(all_random)
    assert modelled[:2] == random[:2] and modelled[2:] != random[2:]  # TPE takes over after 2 trials
    with pytest.raises(ConfigError, match="tune.searcher.n_startup_trials"):
        apply_overrides(cfg, {"tune.searcher.n_startup_trials": -1})


# --------------------------------------------------------------------------------------- resources


def test_plan_one_worker_trials_on_two_cpus() -> None:
    plan = plan_mod.plan_resources(2.0, 0.0, _cfg())  # smoke: 1 worker x 1 CPU, 3 samples
    assert plan.driver_cpus == plan_mod.DRIVER_CPUS
    assert plan.worker_cpus == pytest.approx(1.0 - plan_mod.DRIVER_CPUS)
    assert plan.trial_cpus == pytest.approx(1.0) and plan.trial_gpus == 0
    assert (plan.fit, plan.max_concurrent) == (2, 2)
    text = plan.describe()
    assert "2 CPUs" in text and "concurrent trials: 2" in text


@pytest.mark.parametrize(
    ("cpus", "gpus", "overrides", "fit", "conc"),
    [
        (2, 0, {"train.workers": 2}, 1, 1),  # the RAY.md case: 2 x 0.99 + 0.02
        (16, 0, {"train.workers": 4, "train.cpus_per_worker": 4}, 1, 1),  # exactly the cluster
        (7, 0, {"train.workers": 3}, 2, 2),  # floor(7 / 3)
        (8, 3, {"train.workers": 2, "train.use_gpu": True}, 1, 1),  # GPUs limit: floor(3 / 2)
        (8, 0, {"tune.max_concurrent_trials": 1}, 8, 1),  # explicit setting wins
        (64, 0, {}, 64, 3),  # never more than tune.num_samples
    ],
)
def test_plan_arithmetic(cpus: float, gpus: float, overrides: dict, fit: int, conc: int) -> None:
    cfg = _cfg(**overrides)
    plan = plan_mod.plan_resources(cpus, gpus, cfg)
    assert (plan.fit, plan.max_concurrent) == (fit, conc)
    t = cfg.train
    # A trial never reserves more than the user's workers x cpus_per_worker, and Ray's 1e-4 resource grid holds.
    assert plan.trial_cpus <= t.workers * t.cpus_per_worker + 1e-12
    assert plan.worker_cpus * 1e4 == pytest.approx(round(plan.worker_cpus * 1e4))
    assert plan.trial_gpus == (t.workers if t.use_gpu else 0)


@pytest.mark.parametrize(
    ("cpus", "gpus", "overrides", "nodes", "message"),
    [
        (2, 0, {"train.workers": 3}, None, r"needs 3 CPUs .* cluster has 2 CPUs and 0 GPUs"),
        (
            8,
            1,
            {"train.workers": 2, "train.use_gpu": True},
            None,
            r"and 2 GPUs .* cluster has 8 CPUs and 1 GPUs",
        ),
        (
            8,
            0,
            {"train.cpus_per_worker": 4},
            [{"CPU": 2}] * 4,
            r"one worker needs 3\.98 CPUs .* largest node has 2",
        ),
        (8, 0, {"train.workers": 0}, None, r"train\.workers"),
        (8, 0, {"train.cpus_per_worker": 0.01}, None, r"train\.cpus_per_worker"),
    ],
)
def test_plan_refuses_trials_that_never_fit(cpus, gpus, overrides, nodes, message) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_mod.plan_resources(cpus, gpus, _cfg(**overrides), node_resources=nodes)


def test_workers_keep_the_thread_count_of_their_cpus() -> None:
    plan = plan_mod.plan_resources(8, 0, _cfg(**{"train.cpus_per_worker": 2}))
    over = tune_mod._worker_overrides(_cfg(**{"train.cpus_per_worker": 2}), plan)
    assert over == {"train.cpus_per_worker": plan.worker_cpus, "train.threads_per_worker": 2}
    explicit = _cfg(**{"train.threads_per_worker": 3})
    assert tune_mod._worker_overrides(explicit, plan)["train.threads_per_worker"] == 3


# ----------------------------------------------------------------------------------------- storage


@pytest.mark.parametrize(
    ("path", "nodes", "fs_type", "ok"),
    [
        ("/data/results", 1, "ext4", True),  # one node: any path
        ("/data/results", 2, "ext4", False),
        ("/data/results", 3, None, False),
        ("file:///data/results", 2, None, False),
        ("/mnt/shared", 2, "nfs4", True),
        ("/mnt/lustre", 2, "lustre", True),
        ("/mnt/bucket", 2, "fuse.s3fs", True),
        ("s3://bucket/prefix", 4, None, True),
        ("gs://bucket/prefix", 4, None, True),
    ],
)
def test_multi_node_needs_shared_storage(path: str, nodes: int, fs_type: str | None, ok: bool) -> None:
    if ok:
        storage.check_shared_storage(path, nodes, fs_type)
        return
    with pytest.raises(ConfigError, match=rf"{nodes} nodes but .* local path.*NFS.*s3://") as err:
        storage.check_shared_storage(path, nodes, fs_type)
    assert err.value.key == "run.storage_path"


def test_mount_type_of_the_root_filesystem() -> None:
    assert storage.mount_fs_type("/") is not None  # Linux CI: /proc/mounts lists "/"


# ------------------------------------------------------------------------- errors before Ray starts


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        ({"tune.space": {"loss.nope": {"uniform": [0, 1]}}}, "loss.nope", "unknown config key"),
        ({"tune.space": {"loss.temperature": {"uniform": [-1.0, 0.5]}}}, "loss.temperature", "not a valid"),
        ({"tune.grace_period": 3}, "tune.grace_period", "ASHA could never stop a trial"),
    ],
)
def test_run_search_rejects_bad_searches_before_ray(tmp_path, overrides, key, message) -> None:
    cfg = _cfg(**{"run.storage_path": str(tmp_path), "tune.points_to_evaluate": [], **overrides})
    with pytest.raises(ConfigError, match=message) as err:
        tune_mod.run_search(cfg)
    assert err.value.key == key
    assert not ray.is_initialized()


def test_existing_experiment_needs_resume_and_resume_needs_state(tmp_path) -> None:
    cfg = _cfg(**{"run.storage_path": str(tmp_path)})
    with pytest.raises(ConfigError, match="does not exist; run without --resume"):
        tune_mod.run_search(cfg, resume=True)
    (tmp_path / "smoke").mkdir()
    with pytest.raises(ConfigError, match="already exists .* pass --resume .* or choose another run.name"):
        tune_mod.run_search(cfg)
    with pytest.raises(ConfigError, match="holds no Tune state"):
        tune_mod.run_search(cfg, resume=True)
    assert not ray.is_initialized()


# ------------------------------------------------------------------- placement, drivers, autoscaling


def test_placement_packs_strictly_when_one_node_holds_the_trial() -> None:
    nodes = [{"CPU": 4.0}, {"CPU": 1.0}, {"CPU": 1.0}]
    two = _cfg(**{"train.workers": 2})
    assert plan_mod.plan_resources(6, 0, two, node_resources=nodes).placement == "STRICT_PACK"
    four = _cfg(**{"train.workers": 4, "train.cpus_per_worker": 1.5})  # no node holds 4 x 1.5: as few as fit
    assert (
        plan_mod.plan_resources(6, 0, four, node_resources=[{"CPU": 4.0}, {"CPU": 4.0}]).placement == "PACK"
    )
    spread = _cfg(**{"train.workers": 2, "train.placement": "spread"})
    assert plan_mod.plan_resources(6, 0, spread, node_resources=nodes).placement == "SPREAD"


def test_a_head_with_the_driver_resource_pins_the_drivers() -> None:
    head = {plan_mod.DRIVER_RESOURCE: 2.0}
    plan = plan_mod.plan_resources(
        2, 0, _cfg(), node_resources=[head, {"CPU": 1.0}, {"CPU": 1.0}], node_ids=["h", "a", "b"]
    )
    assert plan.pinned_drivers and plan.driver_resources() == {"cpu": 0.0, plan_mod.DRIVER_RESOURCE: 1.0}
    assert plan.worker_cpus == 1.0 and plan.trial_cpus == 1.0  # the driver takes no CPU of the workers'
    one_slot = plan_mod.plan_resources(
        8, 0, _cfg(), node_resources=[{plan_mod.DRIVER_RESOURCE: 1.0}, {"CPU": 8.0}]
    )
    assert one_slot.fit == 1  # drivers slots cap concurrency
    text = plan.describe()
    assert (
        "node h: 0 CPUs, 0 GPUs, 2 driver slots" in text
        and "node a: 1 CPUs" in text
        and "drivers: on the nodes" in text
    )
    plain = plan_mod.plan_resources(2, 0, _cfg())
    assert not plain.pinned_drivers and plain.driver_resources() == {"cpu": plan_mod.DRIVER_CPUS}


def test_excluded_nodes_give_nothing() -> None:
    nodes, ids = [{"CPU": 2.0}, {"CPU": 2.0}], ["good", "bad"]
    plan = plan_mod.plan_resources(4, 0, _cfg(), node_resources=nodes, node_ids=ids, excluded=["bad"])
    assert (
        plan.cluster_cpus == 2.0
        and plan.fit == 2
        and "node bad: 2 CPUs, 0 GPUs; holds 2 worker(s) of a trial (excluded)" in plan.describe()
    )
    with pytest.raises(ConfigError, match="needs 4 CPUs .* cluster has 2 CPUs"):
        plan_mod.plan_resources(
            4,
            0,
            _cfg(**{"train.workers": 2, "train.cpus_per_worker": 2}),
            node_resources=nodes,
            node_ids=ids,
            excluded=["bad"],
        )


def test_shared_memory_need_per_rank() -> None:
    # 4 loader workers x 2 batches of 2 x (512x1024 float32 RGB + uint8 label), plus 2 val workers x 2 x 1024x2048
    need = plan_mod.shm_per_rank(loader_workers=4, batch_size=2, crop=(512, 1024), val_size=(1024, 2048))
    assert need == 2 * (4 * 2 * 512 * 1024 * 13 + 2 * 2 * 1024 * 2048 * 13)
    assert plan_mod.shm_per_rank(loader_workers=0, batch_size=2, crop=(512, 1024), val_size=(1024, 2048)) == 0
    assert plan_mod.val_loader_workers(4) == 2 and plan_mod.val_loader_workers(1) == 0


def test_waiting_for_an_autoscaling_cluster() -> None:
    cfg = _cfg(**{"train.workers": 2})  # a trial needs 2 CPUs
    seen = iter([{"CPU": 0.0}, {"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 4.0}])  # nodes coming up
    asked, now = [], [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    res = plan_mod.wait_until_fit(
        cfg,
        lambda: next(seen),
        wait_s=60,
        request=asked.append,
        sleep=sleep,
        clock=lambda: now[0],
        log=lambda m: None,
    )
    assert res == {"CPU": 4.0} and now[0] == 15.0
    assert asked == [plan_mod.trial_bundles(cfg)] and asked[0][0] == {"CPU": plan_mod.DRIVER_CPUS}
    assert len(asked[0]) == 3 and all(b == {"CPU": 0.99} for b in asked[0][1:])
    with pytest.raises(
        ConfigError, match="needs 2 CPUs"
    ):  # never enough before the deadline: the plan's error
        plan_mod.wait_until_fit(
            cfg,
            lambda: {"CPU": 1.0},
            wait_s=10,
            request=lambda b: None,
            sleep=sleep,
            clock=lambda: now[0],
            log=lambda m: None,
        )
    with pytest.raises(ConfigError, match="needs 2 CPUs"):  # wait_s 0: refused at once, nothing requested
        plan_mod.wait_until_fit(
            cfg,
            lambda: {"CPU": 1.0},
            wait_s=0,
            request=pytest.fail,
            sleep=sleep,
            clock=lambda: now[0],
            log=lambda m: None,
        )
