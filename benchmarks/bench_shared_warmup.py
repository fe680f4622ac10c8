"""The demo search with and without a shared warm-up, run as a user runs it, one after the other:

    python benchmarks/bench_shared_warmup.py                      # configs/demo.yaml, as shipped
    python benchmarks/bench_shared_warmup.py --set tune.num_samples=4 --set train.iterations=300

Each search is `python experiments/tune.py` in a subprocess (its own local Ray), storage under a temporary
folder (`--keep DIR` keeps both searches under DIR/auto and DIR/off). Printed per search: wall time of the
command, and the search's worker-seconds (trials plus, with sharing, the trunk). Then the check that sharing
changes no result: trial by trial (matched by their searched values), the same status, iterations and every
curve row's training and validation figures, bitwise (clock and cost columns aside).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from raycontrast.results import load_results

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ["loss", "ce_loss", "contrast_loss", "val_miou", "val_pixel_acc", "anchors", "hard_share",
           "intra_cos", "inter_cos", "memory_fill", "lr"]  # fmt: skip


def run_search(root: Path, share: str, extra: list[str]) -> tuple[float, dict]:
    args = [sys.executable, "experiments/tune.py", "--no-analyze"]
    for kv in (f"run.storage_path={root}", f"tune.share_warmup={share}", *extra):
        args += ["--set", kv]
    t0 = time.time()
    subprocess.run(args, cwd=ROOT, check=True)
    return time.time() - t0, load_results(next(root.iterdir()))


def by_params(tables: dict, keys: list[str]) -> dict[tuple, tuple]:
    """Searched values -> (trials row, curve rows by iteration)."""
    curves = tables["curves"]
    return {
        tuple(row[k] for k in keys): (
            row,
            curves[curves["trial_id"] == row["trial_id"]].sort_values("iteration"),
        )
        for _, row in tables["trials"].iterrows()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", action="append", default=[], help="dotted.key=value for both searches")
    ap.add_argument("--keep", type=Path, help="store both searches here (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-shared-") as tmp:
        root = args.keep or Path(tmp)
        runs = {}
        for share in ("auto", "off"):
            runs[share] = run_search(root / share, share, args.set)
        print("\n| search | wall (command) | worker-seconds | of which the trunk |\n|---|---|---|---|")
        cost = {}
        for share, (wall, tables) in runs.items():
            trunk = float(tables["trunk"]["worker_seconds"].sum()) if len(tables["trunk"]) else 0.0
            cost[share] = float(tables["trials"]["worker_seconds"].sum()) + trunk
            print(f"| share_warmup={share} | {wall:.0f} s | {cost[share]:.0f} | {trunk:.0f} |")
        print(
            f"\nsharing: {100 * (1 - cost['auto'] / cost['off']):.1f}% fewer worker-seconds, "
            f"{100 * (1 - runs['auto'][0] / runs['off'][0]):.1f}% less wall time"
        )
        keys = list(runs["off"][1]["trials"]["searched"].iloc[0])
        shared, plain = by_params(runs["auto"][1], keys), by_params(runs["off"][1], keys)
        same = sorted(shared) == sorted(plain)
        for point in sorted(plain):
            if point not in shared:
                continue
            (a, ca), (b, cb) = shared[point], plain[point]
            same &= (a["status"], a["last_iteration"]) == (b["status"], b["last_iteration"])
            same &= ca["iteration"].tolist() == cb["iteration"].tolist()
            same &= all(np.array_equal(ca[f], cb[f], equal_nan=True) for f in FIGURES)
        print(f"every trial's status, iterations and curve figures bitwise equal: {same}")


if __name__ == "__main__":
    main()
