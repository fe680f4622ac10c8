"""The shared warm-up trunk is exact: the keys it shares leave the warm-up unchanged, and a trial forked
from the trunk ends bitwise equal to the same trial trained from scratch (in-process runs, no Ray)."""

from __future__ import annotations

import math

import pyarrow.fs as pafs
import pytest
import torch

from raycontrast import checkpoint as ck
from raycontrast import trunk
from raycontrast.config import apply_overrides
from raycontrast.loop import LoopHooks, LoopOptions, run_loop
from raycontrast.memory import shrink_state
from raycontrast.session import LocalSession
from raycontrast.space import parse_space

from conftest import tiny_config

# Evaluations every 3 iterations, contrast from iteration 4: the warm-up spans one evaluation and the fork
# falls mid-window (the window's statistics travel with the fork).
BASE = {
    "train.iterations": 8, "train.eval_interval": 3, "train.checkpoint_interval": 3, "loss.warmup_iters": 4,
    "memory.size": 50, "loss.max_views": 5, "loss.weight": 0.5,
}  # fmt: skip
TIMES = ("time_s", "images_per_s", "worker_seconds", "peak_rss_mb", "train_time_s", "eval_time_s")


class Record(LoopHooks):
    def __init__(self) -> None:
        self.reports: list[dict] = []

    def on_evaluation(self, metrics: dict, rank: int) -> None:
        self.reports.append(dict(metrics))


def _run(cfg, root, name, *, stop_at=None, sizes=(), fork: dict | None = None):
    """One in-process run to the end (or `stop_at`), optionally starting from a `fork` checkpoint dict."""
    fs, run = pafs.LocalFileSystem(), str(root / name)
    session = LocalSession(run, fs, num_to_keep=10)
    if fork is not None:
        ck.save_state(fs, f"{run}/checkpoint_{fork['iteration']:08d}", fork)
    rec = Record()
    run_loop(cfg.model_dump(mode="json"), session, rec, LoopOptions(stop_at=stop_at, fill_sizes=sizes))
    final = ck.load_state(fs, ck.list_checkpoints(fs, run)[-1])
    return final, rec.reports


def _same_state(a: dict, b: dict) -> None:
    for k, v in b["model"].items():
        assert torch.equal(a["model"][k], v), k
    assert (a["memory"] is None) == (b["memory"] is None)
    if a["memory"] is not None:
        for k in b["memory"]:
            assert torch.equal(a["memory"][k], b["memory"][k]), k
    assert a["iteration"] == b["iteration"] and a["best_val_miou"] == b["best_val_miou"]


def _same_rows(got: list[dict], want: list[dict]) -> None:
    assert [r["iteration"] for r in got] == [r["iteration"] for r in want]
    for g, w in zip(got, want, strict=True):
        for k, v in w.items():
            if k in TIMES:
                continue
            same = v == g[k] or (isinstance(v, float) and math.isnan(v) and math.isnan(g[k]))
            if k == "val_class_iou":
                same = all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(g[k], v, strict=True))
            assert same, (w["iteration"], k, g[k], v)


@pytest.mark.parametrize("size", [20, 0])
def test_a_forked_trial_ends_bitwise_equal_to_one_trained_from_scratch(tmp_path, size):
    base = tiny_config(tmp_path, **BASE)
    space = {"loss.temperature": {"loguniform": [0.05, 0.5]}, "memory.size": {"choice": [0, 20, 50]}}
    sharing = trunk.plan_sharing(
        apply_overrides(base, {"tune.space": space}),
        parse_space(apply_overrides(base, {"tune.space": space})),
    )
    assert sharing.enabled and sharing.trunk_memory == 50 and sharing.sizes == (0, 20, 50)
    trial = apply_overrides(base, {"memory.size": size, "loss.temperature": 0.2})
    scratch, scratch_rows = _run(trial, tmp_path, "scratch")
    trunk_state, trunk_rows = _run(base, tmp_path, "trunk", stop_at=4, sizes=sharing.sizes)
    assert trunk_state["iteration"] == 4 and [r["iteration"] for r in trunk_rows] == [3]
    forked, forked_rows = _run(
        trial, tmp_path, "forked", fork=trunk.fork_state(trunk_state, trial, sharing.sizes)
    )
    _same_state(forked, scratch)  # parameters, memory, best val mIoU
    rows = [trunk.prefix_report(r, size) for r in trunk_rows] + forked_rows
    _same_rows(rows, scratch_rows)  # every curve row, the shared prefix included; the final mIoU with them
    # the fork's first window began in the trunk (iteration 4 of 4-6): its rate counts the 2 steps timed here
    first = forked_rows[0]
    assert first["iteration"] == 6
    assert first["images_per_s"] * first["train_time_s"] == pytest.approx(2 * trial.train.batch_size)


def _prefix(cfg, root, name) -> dict:
    state, _ = _run(cfg, root, name, stop_at=4, sizes=(cfg.memory.size,))
    return state


FREE = {
    "loss.temperature": 0.3, "loss.base_temperature": 0.2, "loss.weight": 0.0, "loss.max_samples": 64,
    "loss.max_views": 3, "memory.size": 20,
}  # fmt: skip
CHANGING = {"optim.lr": 0.02, "train.iterations": 9, "memory.pixel_update_freq": 3, "run.seed": 1}


def test_the_shared_keys_leave_the_warm_up_unchanged_and_others_do_not(tmp_path):
    assert set(FREE) == trunk.PREFIX_FREE_KEYS
    base = tiny_config(tmp_path, **BASE)
    ref = _prefix(base, tmp_path, "ref")
    for key, value in FREE.items():
        got = _prefix(apply_overrides(base, {key: value}), tmp_path, key)
        if key == "memory.size":  # the smaller ring holds the newest entries of the larger one
            ref_cut = {**ref, "memory": shrink_state(ref["memory"], value)}
            _same_state(got, ref_cut)
        else:
            _same_state(got, ref)
        for part in ("optimizer", "scheduler"):
            assert str(got[part]) == str(ref[part]), (key, part)
        assert torch.equal(got["rng"]["torch"], ref["rng"]["torch"]), key
    for key, value in CHANGING.items():
        got = _prefix(apply_overrides(base, {key: value}), tmp_path, key)
        moved = any(not torch.equal(got["model"][k], v) for k, v in ref["model"].items())
        memory = not all(torch.equal(got["memory"][k], ref["memory"][k]) for k in ("feats", "count"))
        assert moved or memory, key


def test_sharing_is_off_when_a_searched_key_changes_the_warm_up(tmp_path):
    base = tiny_config(tmp_path, **BASE)

    def plan(space, **over):
        cfg = apply_overrides(base, {"tune.space": space, **over})
        return trunk.plan_sharing(cfg, parse_space(cfg))

    assert not plan({"optim.lr": {"loguniform": [0.001, 0.1]}}).enabled
    assert (
        "optim.lr is searched and changes the first 4 iterations"
        in plan({"optim.lr": {"loguniform": [0.001, 0.1]}}).reason
    )
    assert "range" in plan({"memory.size": {"int": [0, 50]}}).reason
    assert "no warm-up" in plan({"loss.weight": {"uniform": [0.1, 1.0]}}, **{"loss.warmup_iters": 0}).reason
    assert (
        plan({"loss.weight": {"uniform": [0.1, 1.0]}}, **{"tune.share_warmup": "off"}).reason
        == "tune.share_warmup is off"
    )
    on = plan({"loss.weight": {"uniform": [0.1, 1.0]}})
    assert (
        on.enabled
        and on.sizes == (50,)
        and "2 x 4 of 3 x 8 iterations" in on.describe(apply_overrides(base, {"tune.num_samples": 3}))
    )
