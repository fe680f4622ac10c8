"""The training loop in local mode (`train.workers: 0`, in-process, no Ray instance) and the driver helpers."""

from __future__ import annotations

import io
import math
import os
import random

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
from torch.utils.data import DistributedSampler

from raycontrast import checkpoint, loop, sampling, storage, train
from raycontrast.engine import NonFiniteLossError

from conftest import tiny_config
from fault_hooks import FaultHooks

METRIC_KEYS = {
    "best_val_miou", "iteration", "epoch", "lr", "loss", "ce_loss", "contrast_loss", "anchors", "hard_share", "intra_cos",
    "inter_cos", "memory_fill", "nonfinite_steps", "overflow_steps", "val_miou", "val_pixel_acc", "val_class_iou", "images_per_s",
    "time_s", "worker_seconds", "peak_rss_mb", "train_time_s", "eval_time_s",
}  # fmt: skip


def make_config(tmp_path, name: str = "local", **overrides):
    return tiny_config(tmp_path, name, **{"train.iterations": 4, **overrides})


def dump(path) -> dict:
    return torch.load(path / "rank0.pt", weights_only=True)


def test_local_run_reports_contract_metrics(tmp_path):
    cfg = make_config(tmp_path, **{"train.num_to_keep": 1, "train.iterations": 6})
    out = train.fit(cfg)
    m = out.metrics
    assert set(m) == METRIC_KEYS
    assert m["iteration"] == 6 and m["epoch"] == 2  # 2 steps per epoch (4 images, batch 2)
    assert len(m["val_class_iou"]) == 13 and 0 <= m["val_miou"] <= 1
    assert m["nonfinite_steps"] == 0 and math.isfinite(m["loss"]) and m["memory_fill"] > 0
    assert m["time_s"] >= m["train_time_s"] > 0 and m["worker_seconds"] == pytest.approx(
        m["time_s"], rel=0.05
    )
    assert out.run_path == str(tmp_path / "results" / "local")
    # num_to_keep=1: the best checkpoint by val mIoU plus the latest survive (the latest is needed to resume).
    run = tmp_path / "results" / "local"
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith("checkpoint_")) == [
        "experiment.json"
    ]
    kept = sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint_"))
    assert "checkpoint_00000006" in kept and 1 <= len(kept) <= 2
    assert out.checkpoint_path.endswith("checkpoint_00000006")
    state = torch.load(os.path.join(out.checkpoint_path, "state.pt"), weights_only=True)
    assert state["iteration"] == 6 and state["config"] == cfg.model_dump(mode="json")
    assert out.best_val_miou == pytest.approx(max(state["best_val_miou"], m["val_miou"]))


def test_local_resume_continues_exactly(tmp_path):
    ref_dir, res_dir = tmp_path / "ref", tmp_path / "res"
    ref_dir.mkdir()
    res_dir.mkdir()
    train.fit(make_config(tmp_path, "reference"), hooks=FaultHooks(dump_dir=str(ref_dir)))
    cfg = make_config(tmp_path, "stopped")
    marker = tmp_path / "marker"
    with pytest.raises(RuntimeError, match="injected failure at iteration 3"):
        train.fit(cfg, hooks=FaultHooks(fail_at=3, fail_marker=str(marker)))
    out = train.fit(cfg, resume=True, hooks=FaultHooks(dump_dir=str(res_dir)))
    ref, got = dump(ref_dir), dump(res_dir)
    assert got["start_iteration"] == 2 and out.metrics["iteration"] == 4
    for k, v in ref["model"].items():
        assert torch.equal(got["model"][k], v), k
    for k, v in ref["memory"].items():
        assert torch.equal(got["memory"][k], v), k
    assert torch.equal(got["losses"], ref["losses"][2:])


def test_existing_run_needs_resume_and_resume_needs_a_run(tmp_path):
    cfg = make_config(tmp_path, **{"train.iterations": 2})
    with pytest.raises(FileNotFoundError, match="no run named 'local'"):
        train.fit(cfg, resume=True)
    train.fit(cfg)
    with pytest.raises(FileExistsError, match="pass --resume"):
        train.fit(cfg)
    out = train.fit(cfg, resume=True)  # already finished: reports its final metrics again
    assert out.metrics["iteration"] == 2


def test_nonfinite_steps_stop_the_run(tmp_path, monkeypatch):
    real_step = loop.train_step

    def nan_step(*args, **kwargs):
        stats = real_step(*args, **kwargs)
        return {**stats, "finite": torch.tensor(False), "loss": torch.tensor(math.nan)}

    monkeypatch.setattr(loop, "train_step", nan_step)
    cfg = make_config(tmp_path, **{"train.iterations": 6, "train.max_nonfinite_steps": 3})
    with pytest.raises(NonFiniteLossError, match=r"^non-finite loss: 3 consecutive steps up to iteration 3"):
        train.fit(cfg)
    assert train.divergence(pafs.LocalFileSystem(), str(tmp_path / "results" / "local")).startswith(
        "3 consec"
    )
    monkeypatch.setattr(loop, "train_step", real_step)  # a resume would diverge the same way: refused at once
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps .* diverged; start a new run.name"):
        train.fit(cfg, resume=True)


def test_fp16_overflow_steps_are_not_divergence(tmp_path, monkeypatch):
    real_step, calls = loop.train_step, []

    def overflowing_step(*args, **kwargs):  # the first 5 steps overflow, as while a GradScaler calibrates
        stats = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) <= 5:
            stats = {**stats, "finite": torch.tensor(False), "overflow": torch.tensor(True)}
        return stats

    monkeypatch.setattr(loop, "train_step", overflowing_step)
    out = train.fit(make_config(tmp_path, **{"train.iterations": 6, "train.max_nonfinite_steps": 3}))
    rows = sorted(out.metrics.items())
    assert out.metrics["iteration"] == 6 and out.metrics["nonfinite_steps"] == 0, rows
    monkeypatch.setattr(loop, "MAX_OVERFLOW_STEPS", 4)  # but an overflow that never ends is a divergence
    calls.clear()
    with pytest.raises(NonFiniteLossError, match=r"4 consecutive fp16 overflows up to iteration 4"):
        train.fit(make_config(tmp_path, "endless", **{"train.iterations": 6}))


def test_shard_sampler_matches_distributed_sampler():
    data = list(range(11))
    for epoch in (0, 1):
        shards = []
        for rank in range(3):
            ours = sampling.ShardSampler(data, num_replicas=3, rank=rank, seed=5)
            ref = DistributedSampler(data, num_replicas=3, rank=rank, shuffle=True, seed=5, drop_last=True)
            ours.set_epoch(epoch)
            ref.set_epoch(epoch)
            keys = list(ours)
            assert keys == [(epoch, i) for i in ref] and len(ours) == 3
            ours.skip = 2
            assert list(ours) == keys[2:] and len(ours) == 1
            shards.append([i for _, i in keys])
        flat = sum(shards, [])
        assert len(set(flat)) == 9  # drop_last: 9 of 11, no duplicates
    s = sampling.ShardSampler(data, num_replicas=1, rank=0, seed=5)
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(1)
    assert [i for _, i in first] != [i for _, i in s]


def test_seeded_items_ignore_global_rng():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3) + i  # draws from the global RNG, like the augmentations

    items = sampling.SeededItems(Noisy(), seed=0)
    torch.manual_seed(1)
    a = items[(0, 2)]
    torch.manual_seed(2)
    assert torch.equal(items[(0, 2)], a)
    assert not torch.equal(items[(1, 2)], a)  # a new epoch draws new augmentations
    state = torch.get_rng_state()
    items[(0, 3)]
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is left untouched


def test_rng_state_round_trip_with_weights_only():
    buf = io.BytesIO()
    torch.save(checkpoint.capture_rng_state(), buf)
    expected = (torch.rand(2), np.random.rand(2), random.random())  # noqa: NPY002
    torch.rand(5), np.random.rand(5), random.random()  # noqa: NPY002
    checkpoint.restore_rng_state(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    got = (torch.rand(2), np.random.rand(2), random.random())  # noqa: NPY002
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_run_storage(tmp_path):
    cfg = make_config(
        tmp_path, **{"run.storage_path": "s3://bucket/some/prefix/", "run.s3_endpoint": "127.0.0.1:9"}
    )
    st = storage.run_storage(cfg)
    path, fs = st.ray_path, st.ray_fs
    assert path == "bucket/some/prefix" and fs.type_name == "s3"
    cfg = make_config(tmp_path, **{"run.storage_path": "relative/results"})
    st = storage.run_storage(cfg)
    path, fs = st.ray_path, st.ray_fs
    assert fs is None and path == os.path.abspath("relative/results")


def test_build_trainer_maps_the_config(tmp_path):
    import ray.train

    cfg = make_config(tmp_path, **{"train.workers": 2, "train.cpus_per_worker": 0.5, "train.max_failures": 3})
    hooks = FaultHooks(dump_dir="d")
    trainer = train.build_trainer(cfg, name="x", storage_path=str(tmp_path), hooks=hooks)
    assert trainer.scaling_config.num_workers == 2 and not trainer.scaling_config.use_gpu
    assert trainer.scaling_config.resources_per_worker == {"CPU": 0.5}
    rc = trainer.run_config
    assert isinstance(rc, ray.train.RunConfig) and rc.name == "x" and rc.failure_config.max_failures == 3
    assert rc.checkpoint_config.checkpoint_score_attribute == "val_miou"
    assert rc.checkpoint_config.checkpoint_score_order == "max" and rc.checkpoint_config.num_to_keep == 2
    assert trainer.train_loop_config == {**cfg.model_dump(mode="json"), train.HOOKS_KEY: hooks}
    assert trainer.backend_config.backend == "gloo"
    gpu = train.build_trainer(
        make_config(tmp_path, **{"train.workers": 1, "train.use_gpu": True}),
        name="g",
        storage_path=str(tmp_path),
    )
    assert gpu.backend_config.backend == "nccl" and gpu.scaling_config.resources_per_worker["GPU"] == 1
    with pytest.raises(ValueError, match="local mode"):
        train.build_trainer(make_config(tmp_path), name="y", storage_path=str(tmp_path))
    assert not ray.is_initialized()
