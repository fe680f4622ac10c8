"""Asynchronous successive halving (ASHA) as a plain record that survives a driver restart (no Ray).

The rule is Ray Tune's `ASHAScheduler` with one bracket, unchanged: milestones `grace * rf**k` below `max_t`;
a trial that reports at iteration t is judged at the highest milestone <= t it has not been recorded at,
and stopped when its value is below the `(1 - 1/rf)` quantile (`nanpercentile`) of the values recorded
there before it; at `max_t` every trial stops. Tune does not save its scheduler with the experiment, so
after `--resume` its rungs would start empty: little early stopping, and a trial replaying past a
milestone would record a later, better value at an earlier rung. `Rungs` keeps the recorded values in the
order they came and every stop decision, serialises to JSON, and re-applies a recorded decision when a
trial replays the iterations it was judged at, so a resumed search decides exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

__all__ = ["Rungs"]


class Rungs:
    """The rungs of one ASHA bracket: `records[m]` = `[(trial_id, value), ...]` in arrival order;
    `stopped[trial_id]` = the milestone it was stopped at. Values are "higher is better"."""

    def __init__(self, grace: float, max_t: float, reduction_factor: float) -> None:
        if not 0 < grace <= max_t or reduction_factor <= 1:
            raise ValueError(
                f"need 0 < grace <= max_t and reduction_factor > 1, got {grace}, {max_t}, {reduction_factor}"
            )
        self.grace, self.max_t, self.rf = grace, max_t, reduction_factor
        n = int(np.log(max_t / grace) / np.log(reduction_factor) + 1)  # as Tune's _Bracket(s=0)
        self.milestones = [grace * reduction_factor**k for k in range(n)]
        self.records: dict[float, list[tuple[str, float]]] = {m: [] for m in self.milestones}
        self.stopped: dict[str, float] = {}

    def cutoff(self, milestone: float) -> float | None:
        values = [v for _, v in self.records[milestone]]
        if not values:
            return None
        with warnings.catch_warnings():  # all NaN: the cutoff is NaN and nothing is below it, as in Tune
            warnings.simplefilter("ignore", RuntimeWarning)
            return float(np.nanpercentile(values, (1 - 1 / self.rf) * 100))

    def judge(self, trial_id: str, iteration: float, value: float) -> bool:
        """Record a report; True when the trial must stop (below the cutoff, at `max_t`, or a replay of an
        iteration at which it was already stopped)."""
        if iteration >= self.max_t:
            return True
        if trial_id in self.stopped and iteration >= self.stopped[trial_id]:
            return True
        for m in reversed(self.milestones):
            recorded = self.records[m]
            if iteration < m or any(t == trial_id for t, _ in recorded):
                continue
            cutoff = self.cutoff(m)
            stop = cutoff is not None and value < cutoff
            recorded.append((trial_id, value))
            if stop:
                self.stopped[trial_id] = m
            return stop
        return False

    def recorded_at(self, trial_id: str) -> dict[float, float]:
        """The trial's value at each milestone it was judged at."""
        return {m: v for m in self.milestones for t, v in self.records[m] if t == trial_id}

    def forget(self, trial_ids: set[str]) -> None:
        """Drop trials that will run again under new ids (started after the last saved search state)."""
        for m in self.milestones:
            self.records[m] = [(t, v) for t, v in self.records[m] if t not in trial_ids]
        self.stopped = {t: m for t, m in self.stopped.items() if t not in trial_ids}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state (NaN values as None)."""

        def clean(v: float) -> float | None:
            return None if math.isnan(v) else v

        return {
            "grace": self.grace, "max_t": self.max_t, "reduction_factor": self.rf,
            "records": [[m, [[t, clean(v)] for t, v in self.records[m]]] for m in self.milestones],
            "stopped": self.stopped,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Rungs:
        rungs = cls(state["grace"], state["max_t"], state["reduction_factor"])
        for m, rows in state["records"]:
            rungs.records[m] = [(t, math.nan if v is None else v) for t, v in rows]
        rungs.stopped = {t: float(m) for t, m in state["stopped"].items()}
        return rungs
