"""Search efficiency on recorded learning curves: a tabular benchmark replayed through the real searcher.

Record once (about 30 minutes on 2 cores; not part of CI), a full grid of reduced-demo runs, 3 temperatures x
3 loss weights x 2 memory sizes, every evaluation's val mIoU and worker-seconds:

    python benchmarks/bench_search.py record                 # -> benchmarks/data/search_grid.parquet

Replay (minutes): each strategy is a real Ray Tune search, the searcher and scheduler raycontrast builds
(`search.SearchSchedule` over `search.optuna_search`, `search.RungScheduler` for ASHA), run against a
trainable that reports the recorded curve of the grid point it is given, at the recorded times (scaled
down by `--speedup`), so trials overlap, finish and are stopped in the order the real search would see:

    python benchmarks/bench_search.py                        # 20 seeds
    python benchmarks/bench_search.py --seeds 5 --set tune.grace_period=1 --set tune.reduction_factor=3

Strategies: Optuna TPE + ASHA as configured (the defaults), random + ASHA (every trial a start-up trial),
TPE without early stopping, and the plain grid (every point once, in a random order per seed). All run
`tune.num_samples` trials (the grid: every point), 2 at a time, and start with the demo's published point.
Printed per strategy, over the seeds: the median worker-seconds until a trial that ran the full budget is
within `--tolerance` val mIoU of the grid's best (as a share of the grid's total), how many seeds got there,
and the median regret (grid best - best full-budget trial so far) at fixed shares of the grid's cost.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "benchmarks" / "data" / "search_grid.parquet"
BASE_CONFIG = ROOT / "configs" / "demo.yaml"
# The reduced demo: a quarter of the demo's pixels per image, so one run takes about 3 minutes on one core.
REDUCED = {
    "data.canvases.height": 64, "data.canvases.width": 128, "data.canvases.digit_size": [20, 26],
    "data.crop_size": [64, 128], "loss.max_views": 8, "optim.lr": 0.004, "train.iterations": 1000,
    "train.eval_interval": 100, "train.checkpoint_interval": 1000, "train.log_interval": 100,
    "loss.warmup_iters": 100,  # the demo's when the grid was recorded
    # The searches replayed: as many trials as the grid has points, the start-up count by its default rule.
    "tune.num_samples": 18, "tune.searcher.n_startup_trials": None,
}  # fmt: skip
GRID = {"loss.temperature": [0.03, 0.1, 0.3], "loss.weight": [0.01, 0.1, 1.0], "memory.size": [0, 5000]}
KEYS = list(GRID)
PUBLISHED = {"loss.temperature": 0.1, "loss.weight": 0.1, "memory.size": 0}  # the demo's defaults
STRATEGIES = {
    "TPE + ASHA (defaults)": {},
    "random + ASHA": {"tune.searcher.n_startup_trials": 10_000},  # never leaves TPE's random start-up
    "TPE, no early stopping": {"tune.scheduler": "fifo"},
    "grid (random order)": None,  # every point once, FIFO
}
SHARES = (0.1, 0.2, 0.35, 0.5)  # of the grid's worker-seconds, for the regret columns


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _config(overrides: dict[str, Any]):  # noqa: ANN202 - a raycontrast Config
    from raycontrast.config import load_config

    return load_config(BASE_CONFIG, {**REDUCED, **overrides})


# ------------------------------------------------------------------------------------------------ record


def record_one(point: dict[str, Any], data_root: str, out: str) -> None:
    """Train one grid point in this process (no Ray) and write its evaluations as JSON to `out`."""
    from pyarrow import fs as pafs

    from raycontrast.loop import run_loop
    from raycontrast.session import LocalSession

    class Recording(LocalSession):
        """Keeps every report; writes no checkpoint (a recording needs none)."""

        rows: list[dict[str, float]] = []

        def report(self, metrics: dict[str, Any], state: Any) -> None:
            keep = ("iteration", "val_miou", "worker_seconds", "time_s")
            self.rows.append({k: float(metrics[k]) for k in keep})

    cfg = _config({**point, "data.root": data_root})
    with tempfile.TemporaryDirectory(prefix="grid-run-") as tmp:
        session = Recording(tmp, pafs.LocalFileSystem(), num_to_keep=1)
        run_loop(cfg.model_dump(mode="json"), session)
    Path(out).write_text(json.dumps(session.rows))


def record(out: Path, parallel: int, data_root: str) -> None:
    """Every grid point, `parallel` runs at a time (one thread each), into one Parquet table at `out`."""
    points = [dict(zip(KEYS, values, strict=True)) for values in product(*GRID.values())]
    t0, rows, running = time.time(), [], []
    with tempfile.TemporaryDirectory(prefix="grid-") as tmp:
        # Generate the canvases once, before the runs race to write the same cache.
        subprocess.run([sys.executable, __file__, "_data", data_root], check=True)
        queue = list(enumerate(points))
        while queue or running:
            while queue and len(running) < parallel:
                i, point = queue.pop(0)
                path = f"{tmp}/{i}.json"
                cmd = [sys.executable, __file__, "_one", json.dumps(point), data_root, path]
                log = open(f"{tmp}/{i}.log", "w")  # noqa: SIM115 - closed with the process below
                running.append(
                    (point, path, log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
                )
            time.sleep(1.0)
            for job in [j for j in running if j[3].poll() is not None]:
                running.remove(job)
                point, path, log, proc = job
                log.close()
                if proc.returncode != 0:
                    raise SystemExit(
                        f"grid point {point} failed; its log: {Path(log.name).read_text()[-2000:]}"
                    )
                curve = json.loads(Path(path).read_text())
                rows += [{**point, **row} for row in curve]
                print(
                    f"{time.time() - t0:6.0f} s  {point}: final val mIoU {curve[-1]['val_miou']:.4f}",
                    flush=True,
                )
    table = pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False)
    meta = {
        "command": "python benchmarks/bench_search.py record",
        "base_config": "configs/demo.yaml", "overrides": json.dumps(REDUCED), "grid": json.dumps(GRID),
        "machine": f"{os.cpu_count()}-core {_cpu_model()}, {parallel} runs at a time, 1 thread each",
        "recorded": datetime.date.today().isoformat(), "wall_s": f"{time.time() - t0:.0f}",
    }  # fmt: skip
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), **{k: str(v) for k, v in meta.items()}}
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".tmp")
    pq.write_table(table, tmp_out)
    tmp_out.replace(out)  # never a half-written table
    print(f"recorded {len(points)} runs, {len(rows)} evaluations in {time.time() - t0:.0f} s -> {out}")


# ------------------------------------------------------------------------------------------------ replay


class Grid:
    """The recorded table: per grid point, its curve (iteration -> val mIoU, worker-seconds)."""

    def __init__(self, table: pd.DataFrame) -> None:
        self.curves = {
            tuple(v.item() if hasattr(v, "item") else v for v in key): g.sort_values("iteration")[
                ["iteration", "val_miou", "worker_seconds"]
            ].to_numpy()
            for key, g in table.groupby(KEYS)
        }
        self.max_t = int(table["iteration"].max())
        finals = {k: c[-1, 1] for k, c in self.curves.items()}
        self.best_point = max(finals, key=finals.get)
        self.best = finals[self.best_point]
        self.finals = finals
        self.cost = float(sum(c[-1, 2] for c in self.curves.values()))  # every point to the full budget


def replay_trainable(curves: dict[tuple, np.ndarray], speedup: float):
    """A Tune function trainable: reports the recorded curve of its grid point, each evaluation after the
    recorded worker-seconds since the previous one (divided by `speedup`), with the event's wall clock."""

    def trainable(params: dict[str, Any]) -> None:
        from ray import tune

        curve, spent = curves[tuple(params[k] for k in KEYS)], 0.0
        for it, miou, ws in curve:
            time.sleep((ws - spent) / speedup)
            tune.report({"iteration": int(it), "val_miou": float(miou), "cost": float(ws - spent),
                         "at": time.time()})  # fmt: skip
            spent = ws

    return trainable


def run_strategy(
    grid: Grid, name: str, seed: int, sets: dict[str, Any], speedup: float, tmp: str
) -> pd.DataFrame:
    """One search through Ray Tune; its reports (trial, iteration, val mIoU, cost, wall clock)."""
    from pyarrow import fs as pafs
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from raycontrast.experiment import ExperimentRecord, versions
    from raycontrast.search import RungScheduler, SearchSchedule, optuna_search

    overrides = STRATEGIES[name]
    space = {k: {"choice": v} for k, v in GRID.items()}
    points = [PUBLISHED]
    if overrides is None:  # the grid: every point, each once, as published points in a seeded order
        order = np.random.default_rng(seed).permutation(len(grid.curves))
        points = [dict(zip(KEYS, list(grid.curves)[i], strict=True)) for i in order]
        overrides = {"tune.scheduler": "fifo", "tune.num_samples": len(points), "tune.searcher.n_startup_trials": len(points)}  # fmt: skip
    cfg = _config({
        **sets, **overrides, "run.seed": seed, "tune.space": space, "tune.points_to_evaluate": points,
        "tune.max_concurrent_trials": 2,
    })  # fmt: skip
    folder = f"{tmp}/{name.split()[0]}-{seed}"
    fs = pafs.LocalFileSystem()
    fs.create_dir(folder)
    ExperimentRecord(cfg.model_dump(mode="json"), versions()).write(fs, folder)
    searcher = SearchSchedule(optuna_search(cfg, points), fs, folder)
    scheduler = RungScheduler(fs, folder) if cfg.tune.scheduler == "asha" else FIFOScheduler()
    tuner = tune.Tuner(
        tune.with_resources(replay_trainable(grid.curves, speedup), {"cpu": 1}),
        param_space={k: tune.choice(v) for k, v in GRID.items()},
        tune_config=tune.TuneConfig(metric="val_miou", mode="max", search_alg=searcher, scheduler=scheduler,
                                    num_samples=-1, reuse_actors=True),
        run_config=tune.RunConfig(name="replay", storage_path=folder, verbose=0),
    )  # fmt: skip
    results = tuner.fit()
    rows = []
    for r in results:
        df = r.metrics_dataframe
        if df is None or df.empty:
            continue
        point = tuple(r.config[k] for k in KEYS)
        rows += [{"trial": r.path, "point": point, "iteration": int(row.iteration), "val_miou": row.val_miou,
                  "cost": row.cost, "at": row.at} for row in df.itertuples()]  # fmt: skip
    return pd.DataFrame(rows).sort_values("at", kind="stable").reset_index(drop=True)


def score(grid: Grid, reports: pd.DataFrame, tolerance: float) -> dict[str, float]:
    """Worker-seconds (as a share of the grid's) until a full-budget trial is within `tolerance` of the
    grid's best; regret at each of `SHARES`; the total spent."""
    spent = reports["cost"].cumsum().to_numpy() / grid.cost
    final = reports["iteration"].to_numpy() == grid.max_t
    values = np.where(final, reports["val_miou"].to_numpy(), -np.inf)
    best_so_far = np.maximum.accumulate(values)
    hit = np.flatnonzero(best_so_far >= grid.best - tolerance)
    out = {"to_target": float(spent[hit[0]]) if len(hit) else np.inf, "total": float(spent[-1])}
    for share in SHARES:
        within = np.flatnonzero(spent <= share)
        found = best_so_far[within[-1]] if len(within) else -np.inf
        out[f"regret@{share:g}"] = float(grid.best - found) if np.isfinite(found) else np.nan
    return out


def _median(values: list[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return statistics.median(finite) if finite else np.nan


def report(grid: Grid, scores: dict[str, list[dict[str, float]]], tolerance: float) -> None:
    near = sum(v >= grid.best - tolerance for v in grid.finals.values())
    print(
        f"\ngrid: {len(grid.curves)} points, {grid.max_t} iterations each, {grid.cost:.0f} worker-seconds in all; "
        f"best final val mIoU {grid.best:.4f} at {dict(zip(KEYS, grid.best_point, strict=True))}; "
        f"{near} point(s) within {tolerance} of it; the published default ends at "
        f"{grid.finals[tuple(PUBLISHED[k] for k in KEYS)]:.4f}"
    )
    head = " | ".join(f"regret at {s:.0%}" for s in SHARES)
    print(f"\n| strategy | seeds within {tolerance} | median cost to get there | {head} | median total |")
    print("|---|---|---|" + "---|" * len(SHARES) + "---|")
    for name, rows in scores.items():
        reached = [r["to_target"] for r in rows if np.isfinite(r["to_target"])]
        # Seeds that never got there count as infinitely expensive: the median is over all seeds.
        med = statistics.median([r["to_target"] for r in rows])
        regrets = " | ".join(f"{_median([r[f'regret@{s:g}'] for r in rows]):.4f}" for s in SHARES)
        print(
            f"| {name} | {len(reached)}/{len(rows)} | {'never' if not np.isfinite(med) else f'{med:.0%}'} | "
            f"{regrets} | {_median([r['total'] for r in rows]):.0%} |"
        )
    print("\n(costs and regret budgets are shares of the grid's worker-seconds; regret: grid best - best "
          "full-budget trial so far, median over the seeds that had one by then)")  # fmt: skip


def replay(args: argparse.Namespace) -> None:
    import ray

    from raycontrast.config import parse_overrides

    table = pq.read_table(args.table)
    meta = {
        k.decode(): v.decode()
        for k, v in (table.schema.metadata or {}).items()
        if not k.startswith(b"pandas")
    }
    grid = Grid(table.to_pandas())
    print(
        f"recorded grid {args.table.name}: {meta.get('machine')}, {meta.get('recorded')}, by `{meta.get('command')}`"
    )
    sets = parse_overrides(args.set)
    import logging

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per search is noise over 80 searches
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    names = [n for n in STRATEGIES if not args.strategy or any(n.startswith(p) for p in args.strategy)]
    print(f"strategies: {names}; every search with {args.set or 'the defaults'}")
    scores: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    t0 = time.time()
    try:
        with tempfile.TemporaryDirectory(prefix="replay-") as tmp:
            for seed in range(args.seeds):
                for name in names:
                    reports = run_strategy(grid, name, seed, sets, args.speedup, tmp)
                    scores[name].append(score(grid, reports, args.tolerance))
                print(f"seed {seed} done ({time.time() - t0:.0f} s)", flush=True)
    finally:
        ray.shutdown()
    report(grid, scores, args.tolerance)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_one":
        record_one(json.loads(sys.argv[2]), sys.argv[3], sys.argv[4])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_data":
        from raycontrast.data.loader import dataset_from_config

        data = _config({"data.root": sys.argv[2]}).data
        dataset_from_config(data, "train", train=True), dataset_from_config(data, "val", train=False)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", choices=["replay", "record"], default="replay")
    ap.add_argument("--table", type=Path, default=TABLE)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--speedup", type=float, default=200.0, help="recorded seconds per replayed second")
    ap.add_argument("--parallel", type=int, default=2, help="record: runs at a time")
    ap.add_argument("--data-root", default=str(ROOT / ".cache" / "canvases-64x128"))
    ap.add_argument("--set", action="append", default=[], help="replay: dotted.key=value for every search")
    ap.add_argument(
        "--strategy", action="append", default=[], help="replay: only the strategies so named (prefix)"
    )
    args = ap.parse_args()
    if args.mode == "record":
        record(args.table, args.parallel, args.data_root)
    else:
        replay(args)


if __name__ == "__main__":
    main()
