"""CE-only against CE + pixel contrast on the built-in demo data, over several seeds (an experiment, not a test).

Each run is `raycontrast train` in local mode (`train.workers=0`) on `configs/demo.yaml` with a longer budget;
runs go `--parallel` at a time, one thread each, so a 2-core machine runs two at once. Prints, per condition,
the final and best val mIoU of every seed, their mean and the seed spread (population std of the final mIoU),
the wall time to the final evaluation, and the val-mIoU curve (mean over seeds at every evaluation).

    python benchmarks/bench_demo_recipe.py --iterations 1200 --eval-interval 300 --seeds 0 1 2 --parallel 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = {"ce_only": {"loss.weight": 0.0}, "ce_contrast": {}}

_CHILD = """
import json, sys
from raycontrast.cli import _resolve_config
from raycontrast.train import fit
cfg = _resolve_config(sys.argv[1], sys.argv[3:])
out = fit(cfg)
json.dump({"final": out.metrics["val_miou"], "best": out.best_val_miou, "best_iteration": out.best_iteration,
           "time_s": out.metrics["time_s"], "class_iou": out.metrics["val_class_iou"]}, open(sys.argv[2], "w"))
"""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--iterations", type=int, default=1200)
    ap.add_argument("--eval-interval", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=100, help="loss.warmup_iters (the recipe's: 100)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--out", help="JSON file for the raw results")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="demo-recipe-"))
    jobs = []
    for cond, extra in CONDITIONS.items():
        for seed in args.seeds:
            sets = {
                "train.workers": 0,
                "train.threads_per_worker": 1,
                "train.iterations": args.iterations,
                "train.eval_interval": args.eval_interval,
                "loss.warmup_iters": args.warmup,
                "train.checkpoint_interval": args.iterations,
                "run.seed": seed,
                "run.name": f"{cond}-s{seed}",
                "run.storage_path": str(work / "runs"),
                "data.root": str(ROOT / ".cache" / "canvases"),
                **extra,
            }
            jobs.append((cond, seed, [f"{k}={v}" for k, v in sets.items()]))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    results: dict[str, dict[int, dict]] = {c: {} for c in CONDITIONS}
    pending, running = list(jobs), []
    start = time.perf_counter()
    while pending or running:
        while pending and len(running) < args.parallel:
            cond, seed, sets = pending.pop(0)
            out = work / f"{cond}-s{seed}.json"
            log = open(work / f"{cond}-s{seed}.log", "w")  # noqa: SIM115 - closed when the job ends
            proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD, args.config, str(out), *sets],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
            )
            running.append((cond, seed, out, proc, log))
        time.sleep(2)
        for job in list(running):
            cond, seed, out, proc, log = job
            if proc.poll() is None:
                continue
            running.remove(job)
            log.close()
            if proc.returncode != 0:
                sys.exit(f"run {cond} seed {seed} failed; log: {log.name}")
            results[cond][seed] = json.loads(out.read_text())
            evals = re.findall(r"eval it (\d+): val mIoU ([0-9.]+)", Path(log.name).read_text())
            results[cond][seed]["curve"] = {int(i): float(v) for i, v in evals}
            r = results[cond][seed]
            print(
                f"  {cond:<12} seed {seed}: final {r['final']:.4f} best {r['best']:.4f} ({r['time_s']:.0f} s)"
            )

    print(f"\nmachine: {_cpu_model()}, {os.cpu_count()} CPUs; {args.parallel} runs at a time, 1 thread each")
    print(f"recipe: {args.config}, {args.iterations} iterations, eval every {args.eval_interval}")
    print(
        "| condition | seeds | final val mIoU per seed | mean | std (seed spread) | best mean | time per run |"
    )
    print("|---|---|---|---|---|---|---|")
    for cond, per_seed in results.items():
        finals = [per_seed[s]["final"] for s in args.seeds]
        bests = [per_seed[s]["best"] for s in args.seeds]
        times = [per_seed[s]["time_s"] for s in args.seeds]
        print(
            f"| {cond} | {len(finals)} | {', '.join(f'{v:.3f}' for v in finals)} | {statistics.mean(finals):.3f} "
            f"| {statistics.pstdev(finals):.3f} | {statistics.mean(bests):.3f} | {statistics.mean(times):.0f} s |"
        )
    print("\nval mIoU curve, mean over seeds:")
    its = sorted({i for per_seed in results.values() for r in per_seed.values() for i in r["curve"]})
    print("| iteration | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for i in its:
        means = [
            statistics.mean(r["curve"].get(i, float("nan")) for r in per_seed.values())
            for per_seed in results.values()
        ]
        print(f"| {i} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    print(f"total wall time {time.perf_counter() - start:.0f} s; logs and runs in {work}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
