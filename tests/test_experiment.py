"""What a resume may change: the start config and package versions are recorded and compared."""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest

from raycontrast import experiment, preflight, train
from raycontrast.config import ConfigError, apply_overrides

from conftest import tiny_config


def _record(cfg, **versions):
    return experiment.ExperimentRecord(cfg.model_dump(mode="json"), {**experiment.versions(), **versions})


def test_same_config_and_versions_resume(tmp_path):
    cfg = tiny_config(tmp_path)
    assert experiment.check_resume(_record(cfg), cfg) == []


def test_other_versions_are_refused_with_what_to_install(tmp_path):
    cfg = tiny_config(tmp_path)
    with pytest.raises(ConfigError, match=r"started with ray 2\.0\.0 \(now .*pip install ray==2\.0\.0"):
        experiment.check_resume(_record(cfg, ray="2.0.0"), cfg)


def test_changes_that_change_results_are_refused_and_listed(tmp_path):
    cfg = tiny_config(tmp_path)
    new = apply_overrides(cfg, {"optim.lr": 0.5, "loss.temperature": 0.2})
    with pytest.raises(ConfigError, match="changes results") as err:
        experiment.check_resume(_record(cfg), new)
    msg = str(err.value)
    assert (
        "optim.lr: 0.01 -> 0.5" in msg
        and "loss.temperature: 0.1 -> 0.2" in msg
        and err.value.key == "run.name"
    )


def test_free_keys_change_and_are_applied(tmp_path):
    cfg = tiny_config(tmp_path)
    new = apply_overrides(cfg, {"tune.max_concurrent_trials": 4, "train.log_interval": 7})
    applied = experiment.check_resume(_record(cfg), new)
    assert applied == ["train.log_interval: 2 -> 7", "tune.max_concurrent_trials: None -> 4"]
    moved = apply_overrides(cfg, {"data.root": str(tmp_path / "elsewhere")})  # a canvas cache: regenerated
    assert experiment.check_resume(_record(cfg), moved)[0].startswith("data.root:")


def test_more_samples_only_when_accepted_and_only_more(tmp_path):
    cfg = tiny_config(tmp_path)
    more = apply_overrides(cfg, {"tune.num_samples": 8})
    with pytest.raises(
        ConfigError, match=r"tune.num_samples: 3 -> 8 \(--accept tune.num_samples: may only grow"
    ):
        experiment.check_resume(_record(cfg), more)
    applied = experiment.check_resume(_record(cfg), more, accept=["tune.num_samples"])
    assert applied == ["tune.num_samples: 3 -> 8 (accepted; may only grow: more trials extend the search)"]
    fewer = apply_overrides(cfg, {"tune.num_samples": 2})
    with pytest.raises(ConfigError, match="tune.num_samples: 3 -> 2"):
        experiment.check_resume(_record(cfg), fewer, accept=["tune.num_samples"])
    with pytest.raises(ConfigError, match="--accept optim.lr: only tune.num_samples"):
        experiment.check_resume(_record(cfg), cfg, accept=["optim.lr"])


def test_confirmation_may_grow_on_resume_when_accepted(tmp_path):
    """More of the best configs, or more seeds after the old ones: the new confirmation trials run, the old
    ones stay what the record says. Fewer, or other seeds, would leave trials the record does not describe."""
    cfg = tiny_config(tmp_path, **{"tune.confirm.top_k": 1, "tune.confirm.seeds": [1]})
    keys = ["tune.confirm.top_k", "tune.confirm.seeds"]
    grown = apply_overrides(cfg, {"tune.confirm.top_k": 2, "tune.confirm.seeds": [1, 2]})
    with pytest.raises(
        ConfigError, match=r"tune.confirm.seeds: \[1\] -> \[1, 2\] \(--accept tune.confirm.seeds"
    ):
        experiment.check_resume(_record(cfg), grown)
    applied = experiment.check_resume(_record(cfg), grown, accept=keys)
    assert [a.split(":")[0] for a in applied] == ["tune.confirm.seeds", "tune.confirm.top_k"]
    for sets in ({"tune.confirm.top_k": 0}, {"tune.confirm.seeds": [2]}, {"tune.confirm.seeds": [2, 1]}):
        with pytest.raises(ConfigError, match="changes results"):
            experiment.check_resume(_record(cfg), apply_overrides(cfg, sets), accept=keys)


def test_a_train_resume_with_another_config_is_refused_before_training(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.iterations": 2})
    train.fit(cfg)
    record = json.loads((tmp_path / "results" / "tiny" / experiment.EXPERIMENT_FILE).read_text())
    assert record["config"] == cfg.model_dump(mode="json") and record["versions"]["torch"]
    with pytest.raises(ConfigError, match="optim.lr: 0.01 -> 0.02"):
        train.fit(apply_overrides(cfg, {"optim.lr": 0.02}), resume=True)
    out = train.fit(cfg, resume=True)  # the same config resumes (a finished run reports its end again)
    assert out.metrics["iteration"] == 2
    assert not pafs.LocalFileSystem().get_file_info(str(tmp_path / "results" / "tiny" / "lease.json")).is_file


def test_relative_storage_is_refused_in_a_job_with_a_working_dir(monkeypatch):
    preflight.check_job_storage("results")  # not a job: fine
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_abc.zip"}, "metadata": {"job_submission_id": "j1"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    with pytest.raises(preflight.PreflightError, match="'results' is a relative path.*Ray job.*s3://") as err:
        preflight.check_job_storage("results")
    assert err.value.key == "run.storage_path"
    preflight.check_job_storage("/mnt/shared/results")
    preflight.check_job_storage("s3://bucket/prefix")
