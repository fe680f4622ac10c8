"""Ray Train overhead: the same training loop under a 1-worker TorchTrainer against in-process local mode.

Both modes use the same config, thread count and report interval (`train.eval_interval`), in one process,
alternating over `--repeats` rounds (the best figure of each mode is shown: the machine's load drifts):

    python benchmarks/bench_ray_overhead.py                       # configs/demo.yaml, 100 iterations
    python benchmarks/bench_ray_overhead.py --iterations 40 --set data.canvases.val_images=16

Printed per mode: training throughput (images/s over training windows only), loop throughput (images/s
from the first step to the end of the loop, evaluations and reports included), time to the first
iteration (from the `fit` call; for Ray plus `ray.init`), and total wall time. Then the ratios Ray/local.
Goal: loop throughput ratio >= 0.95 at the default report interval.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from raycontrast import train
from raycontrast.config import apply_overrides, load_config, parse_overrides
from raycontrast.data.loader import dataset_from_config

ROOT = Path(__file__).resolve().parents[1]


def warm_data_cache(cfg) -> None:
    """Generate the canvases cache once, so neither mode pays for it."""
    for split in ("train", "val"):
        dataset_from_config(cfg.data, split, train=split == "train")


def run(cfg, mode: str) -> dict[str, float]:
    t0 = time.time()
    if mode == "ray":
        import ray

        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    t_fit = time.time()
    try:
        out = train.fit(cfg)
    finally:
        if mode == "ray":
            ray.shutdown()
    end = time.time()
    s = out.summary
    loop_s = s["loop_end_unix"] - s["first_step_unix"]
    return {
        "train_img_s": s["train_images"] / s["train_time_s"],
        "loop_img_s": s["train_images"] / loop_s,
        "ray_init_s": t_fit - t0,
        "first_step_s": s["first_step_unix"] - t0,
        "wall_s": end - t0,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--threads", type=int, default=None, help="torch threads in both modes (default: config)")
    p.add_argument(
        "--repeats", type=int, default=2, help="alternating rounds; the best of each mode is shown"
    )
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    with tempfile.TemporaryDirectory() as tmp:
        overrides = {
            "train.iterations": args.iterations,
            "run.storage_path": tmp,
            "data.root": os.path.join(tmp, "cache"),
            **parse_overrides(args.sets),
        }
        if args.threads:
            overrides["train.threads_per_worker"] = args.threads
        cfg = load_config(args.config, overrides)
        t = cfg.train
        threads = t.threads_per_worker or max(1, int(t.cpus_per_worker))
        print(
            f"config {args.config}: {t.iterations} iterations, batch {t.batch_size}, {threads} thread(s), "
            f"report every {t.eval_interval} iterations, model {cfg.model.variant}",
            flush=True,
        )
        warm_data_cache(cfg)  # both modes then read the same cached canvases
        results: dict[str, dict[str, float]] = {}
        for rep in range(args.repeats):  # alternate the order: the machine's load drifts
            order = (("local", 0), ("ray", 1)) if rep % 2 == 0 else (("ray", 1), ("local", 0))
            for mode, workers in order:
                mode_cfg = apply_overrides(cfg, {"train.workers": workers, "run.name": f"bench_{mode}_{rep}"})
                r = run(mode_cfg, mode)
                print(f"round {rep} {mode}: {r['loop_img_s']:.2f} img/s", flush=True)
                best = results.setdefault(mode, r)
                for key in ("train_img_s", "loop_img_s"):
                    best[key] = max(best[key], r[key])
                for key in ("ray_init_s", "first_step_s", "wall_s"):
                    best[key] = min(best[key], r[key])

    header = ("mode", "train img/s", "loop img/s", "ray.init s", "first step s", "wall s")
    print("\n{:<6} {:>12} {:>11} {:>11} {:>13} {:>8}".format(*header))
    for mode, r in results.items():
        cells = (r["train_img_s"], r["loop_img_s"], r["ray_init_s"], r["first_step_s"], r["wall_s"])
        print("{:<6} {:12.2f} {:11.2f} {:11.1f} {:13.1f} {:8.1f}".format(mode, *cells))
    loc, ray_ = results["local"], results["ray"]
    ratio = ray_["loop_img_s"] / loc["loop_img_s"]
    verdict = "met" if ratio >= 0.95 else "NOT met"
    print(
        f"\nthroughput ratio ray/local: training {ray_['train_img_s'] / loc['train_img_s']:.3f}, "
        f"loop {ratio:.3f} (goal >= 0.95: {verdict})"
    )
    print(
        f"fixed start-up cost of Ray: {ray_['first_step_s'] - loc['first_step_s']:.1f} s to the first "
        f"iteration (ray.init {ray_['ray_init_s']:.1f} s, then the worker group start)"
    )


if __name__ == "__main__":
    sys.exit(main())
