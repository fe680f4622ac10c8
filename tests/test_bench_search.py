"""The search benchmark's recorded grid and its scoring (no Ray; the replay itself is `benchmarks/bench_search.py`)."""

from __future__ import annotations

import math

import pandas as pd
import pyarrow.parquet as pq

from conftest import load_benchmark

bench = load_benchmark("bench_search")


def test_the_recorded_grid_holds_every_point_with_its_curve_and_provenance() -> None:
    table = pq.read_table(bench.TABLE)
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["command"] == "python benchmarks/bench_search.py record"
    assert {"overrides", "grid", "machine", "recorded"} <= set(meta)
    grid = bench.Grid(table.to_pandas())
    assert len(grid.curves) == math.prod(len(v) for v in bench.GRID.values()) == 18
    assert grid.max_t == bench.REDUCED["train.iterations"]
    for curve in grid.curves.values():
        assert curve[:, 0].tolist() == list(range(100, 1001, 100))  # every evaluation
        assert (curve[:, 2] > 0).all() and (curve[1:, 2] > curve[:-1, 2]).all()  # worker-seconds grow
    assert tuple(bench.PUBLISHED[k] for k in bench.KEYS) in grid.curves


def _grid() -> bench.Grid:
    rows = []
    for point, finals in {(0.1, 0.1, 0): (0.2, 0.5), (0.03, 1.0, 5000): (0.1, 0.7)}.items():
        for it, v in zip((1, 2), finals, strict=True):
            rows.append({**dict(zip(bench.KEYS, point, strict=True)), "iteration": it, "val_miou": v,
                         "worker_seconds": 10.0 * it})  # fmt: skip
    return bench.Grid(pd.DataFrame(rows))


def test_score_counts_worker_seconds_until_a_full_budget_trial_is_near_the_best() -> None:
    grid = _grid()  # two points of 20 worker-seconds each: the grid costs 40; the best ends at 0.7
    assert grid.cost == 40.0 and grid.best == 0.7
    reports = pd.DataFrame(
        {
            "iteration": [1, 2, 1, 2],
            "val_miou": [0.2, 0.5, 0.1, 0.695],
            "cost": [10.0] * 4,
            "at": [1, 2, 3, 4],
        }
    )
    s = bench.score(grid, reports, tolerance=0.01)
    assert s["to_target"] == 1.0 and s["total"] == 1.0  # reached with the last report: all 40 worker-s
    assert abs(s["regret@0.5"] - (0.7 - 0.5)) < 1e-12  # one full-budget trial (0.5) by half the cost
    assert math.isnan(s["regret@0.1"])  # nothing had run the full budget by 10%
    # An intermediate value above the target does not count: only full-budget values do.
    early = pd.DataFrame({"iteration": [1], "val_miou": [0.9], "cost": [10.0], "at": [1]})
    assert bench.score(grid, early, tolerance=0.01)["to_target"] == math.inf
