"""What polling for preemption notices costs: `ray.train.get_preemption_info()` (a collective across the
workers) against a training step of the same run, both measured inside one 2-worker Ray Train run.

    python benchmarks/bench_preemption_poll.py                  # demo config (W18-small, 128x256, batch 4)
    python benchmarks/bench_preemption_poll.py --polls 200 --steps 20

Prints the median poll and step times and the poll's share of a step at `train.preemption_poll_interval`
(one poll every that many steps); the goal is under 1%.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _worker(cfg_json: dict) -> None:
    import ray.train
    import torch

    from raycontrast.build import build_parts, limit_threads
    from raycontrast.config import Config
    from raycontrast.engine import train_step
    from raycontrast.train import _RaySession

    cfg = Config.model_validate(cfg_json["cfg"])
    limit_threads(cfg.train)
    session = _RaySession()
    parts = build_parts(cfg, session, pretrained=False)
    polls, steps = [], []
    for _ in range(cfg_json["polls"]):
        t0 = time.perf_counter()
        ray.train.get_preemption_info()
        polls.append(time.perf_counter() - t0)
    batches = iter(parts.train_loader)
    parts.model.train()
    for it in range(cfg_json["steps"]):
        images, labels = next(batches)
        t0 = time.perf_counter()
        train_step(
            parts.model, parts.criterion, parts.optimizer, parts.scheduler, images, labels.long(),
            iteration=it, memory=parts.memory, generator=parts.generator,
        )  # fmt: skip
        steps.append(time.perf_counter() - t0)
    torch.distributed.barrier()
    ray.train.report({"poll_s": statistics.median(polls), "step_s": statistics.median(steps[2:])})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--polls", type=int, default=100)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from raycontrast.config import load_config
    from raycontrast.storage import absolute_paths

    cfg = absolute_paths(load_config(args.config, {"train.workers": 2, "train.threads_per_worker": 1}))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"cfg": cfg.model_dump(mode="json"), "polls": args.polls, "steps": args.steps},
            scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(
                name=f"bench-poll-{os.getpid()}", storage_path="/tmp/raycontrast-bench"
            ),
        )
        m = trainer.fit().metrics
    finally:
        ray.shutdown()
    every = cfg.train.preemption_poll_interval
    share = m["poll_s"] / (every * m["step_s"])
    print(f"machine: {os.cpu_count()} CPUs; 2 Ray Train workers (gloo), {args.config}")
    print(f"get_preemption_info: median {m['poll_s'] * 1e3:.2f} ms over {args.polls} polls")
    print(f"training step:       median {m['step_s'] * 1e3:.1f} ms over {args.steps - 2} steps")
    print(f"one poll every {every} steps: {100 * share:.3f}% of the step time (goal < 1%)")


if __name__ == "__main__":
    main()
