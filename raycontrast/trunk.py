"""The shared warm-up trunk of a search: the first `loss.warmup_iters` iterations, trained once, and every
trial forked from them, exactly (no Ray).

Before `loss.warmup_iters` the contrast term is off, so trials that differ only in contrast-side settings
train the same network on the same batches. What the loop reads before the warm-up ends, key by key:
- model, data, optimiser, schedule (`train.iterations`: the poly decay), seed, CE weights, `train.*`: they
  shape every step, so a search over any of them trains different prefixes;
- `loss.weight`: multiplies the warm-up's contrast placeholder `0 * embed.sum()`: the loss and every
  gradient are the same for any weight (the projection head gets +0 gradients: its optimiser state and
  weight decay do not depend on the weight);
- `loss.temperature`, `loss.base_temperature`, `loss.max_samples`, `loss.max_views`: read only by the
  contrast term, which is not computed before the warm-up ends (no anchors sampled, no generator draws:
  the generator is re-seeded every step anyway);
- `memory.size`: the memory is filled during the warm-up but not read; a ring of size s that has received
  n entries holds exactly the newest min(n, s) (`memory.shrink_state`), so a trunk run at the largest size
  in the space holds every smaller memory; `memory.pixel_update_freq` changes what is enqueued: not free.
So `PREFIX_FREE_KEYS` are these six keys; `tests/test_trunk.py` checks each of them, and some keys outside,
against independently trained prefixes. The only state that differs between such trials at the fork is
the memory (and its fill in the reports), which `fork_state` and `prefix_report` cut to the trial's size.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from raycontrast.config import Config
from raycontrast.loop import LoopHooks, WindowMeter
from raycontrast.memory import shrink_state
from raycontrast.space import Param
from raycontrast.storage import exists, write_atomic

__all__ = [
    "PREFIX_FREE_KEYS",
    "REPORTS_FILE",
    "Sharing",
    "TrunkReports",
    "fork_state",
    "plan_sharing",
    "prefix_report",
    "read_reports",
]

REPORTS_FILE = "reports.json"  # in the trunk's run folder: its evaluations, for the trials' curves

PREFIX_FREE_KEYS = frozenset(
    {
        "loss.temperature",
        "loss.base_temperature",
        "loss.weight",
        "loss.max_samples",
        "loss.max_views",
        "memory.size",
    }
)


@dataclass(frozen=True)
class Sharing:
    """Whether a search shares its warm-up, and how: the trunk runs to `fork_at` with `trunk_memory`
    slots per queue and reports the memory fill of every size in `sizes`."""

    enabled: bool
    reason: str  # what is shared, or why nothing is
    fork_at: int = 0
    trunk_memory: int = 0
    sizes: tuple[int, ...] = ()

    def describe(self, cfg: Config) -> str:
        if not self.enabled:
            return f"shared warm-up: off ({self.reason})"
        n, w, total = cfg.tune.num_samples, self.fork_at, cfg.train.iterations
        most = (n - 1) * w / (n * total)  # every trial run to the end; more when ASHA stops trials early
        return (
            f"shared warm-up: {self.reason}; it saves {n - 1} x {w} of {n} x {total} iterations "
            f"({100 * most:.1f}% if every trial runs to the end; more when ASHA stops trials early)"
        )


def plan_sharing(cfg: Config, params: Sequence[Param]) -> Sharing:
    """Share the warm-up when every searched key is in `PREFIX_FREE_KEYS` (`tune.share_warmup: auto`)."""
    w = cfg.loss.warmup_iters
    if cfg.tune.share_warmup == "off":
        return Sharing(False, "tune.share_warmup is off")
    if w == 0 or w >= cfg.train.iterations:
        return Sharing(False, f"loss.warmup_iters={w}: no warm-up before the end of the run to share")
    changing = [p.key for p in params if p.key not in PREFIX_FREE_KEYS]
    if changing:
        return Sharing(False, f"{changing[0]} is searched and changes the first {w} iterations of a trial")
    memory = next((p for p in params if p.key == "memory.size"), None)
    if memory is not None and memory.kind != "choice":
        return Sharing(False, "memory.size is searched over a range; search a choice of sizes to share")
    sizes = tuple(sorted(set(memory.values))) if memory is not None else (cfg.memory.size,)
    biggest = max(sizes)
    what = f"with memory.size {biggest}" if biggest else "without a memory"
    return Sharing(
        True,
        f"the first {w} iterations are trained once ({what}), every trial forks from them",
        w,
        biggest,
        sizes,
    )


def prefix_report(report: dict[str, Any], size: int) -> dict[str, Any]:
    """A trunk's report as a trial of memory `size` would have made it: its own memory fill."""
    out = {k: v for k, v in report.items() if not k.startswith("memory_fill@")}
    out["memory_fill"] = report[f"memory_fill@{size}"]
    return out


def fork_state(trunk: dict[str, Any], cfg: Config, sizes: Sequence[int]) -> dict[str, Any]:
    """A trial's checkpoint at the fork, from the trunk's (`TrainState.to_checkpoint()` dicts): its memory
    cut to `cfg.memory.size` (dropped at 0), the window's fill to that size, its own config, and its own
    clock and cost starting at the fork. Model, optimiser, schedule, RNG and data position are the trunk's:
    they are the same for every such trial."""
    size = cfg.memory.size
    state = dict(trunk)
    state["memory"] = shrink_state(trunk["memory"], size) if size else None
    state["config"] = cfg.model_dump(mode="json")
    state["elapsed_s"] = state["worker_seconds"] = 0.0
    if trunk.get("metrics") is not None:
        state["metrics"] = prefix_report(trunk["metrics"], size)
    window = trunk.get("window")
    if window is not None:
        keys = WindowMeter.KEYS
        sums = window["sums"].clone()
        sums[keys.index("memory_fill")] = sums[len(keys) + list(sizes).index(size)]
        state["window"] = {**window, "sums": sums[list(range(len(keys))) + [-1]]}
    return state


def read_reports(fs: pafs.FileSystem, run_path: str) -> list[dict[str, Any]]:
    """The trunk's reports so far, by iteration."""
    path = posixpath.join(run_path, REPORTS_FILE)
    if not exists(fs, path):
        return []
    with fs.open_input_stream(path) as f:
        return sorted(json.loads(f.read()), key=lambda r: r["iteration"])


class TrunkReports(LoopHooks):
    """Keeps the trunk's evaluations in `<run_path>/reports.json` (rank 0; a resumed trunk replaces the
    reports it makes again), so every forked trial's curves can hold the shared prefix."""

    def __init__(self, fs: pafs.FileSystem, run_path: str) -> None:
        self.fs, self.run_path = fs, run_path

    def on_evaluation(self, metrics: dict[str, Any], rank: int) -> None:
        if rank != 0:
            return
        reports = {r["iteration"]: r for r in read_reports(self.fs, self.run_path)}
        reports[metrics["iteration"]] = metrics
        data = json.dumps([reports[i] for i in sorted(reports)]).encode()
        write_atomic(self.fs, posixpath.join(self.run_path, REPORTS_FILE), data)
