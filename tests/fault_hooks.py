"""Loop hooks that tests install to inject faults and record runs (`loop.LoopHooks`); the production loop
installs none. Pickled by value into Ray workers (see conftest.local_ray)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from raycontrast.loop import LoopHooks


@dataclass
class FaultHooks(LoopHooks):
    """- `dump_dir`: each rank saves its final parameters, memory and per-step losses to `rank<r>.pt`;
    - `fail_at` / `fail_marker`: the last rank raises once before iteration `fail_at + 1` (if the marker
      file does not exist yet, which it then creates);
    - `pause_at` / `pause_file` / `pause_s`: rank 0 writes its PID to `pause_file` once and sleeps, so a
      test can kill the process at a known point;
    - `step_sleep_s`: every step takes at least this long (a slow step, for timing a preemption);
    - `step_log`: each rank appends "<iteration> <unix time> <node id>" to `<step_log>/rank<r>` per step."""

    dump_dir: str | None = None
    fail_at: int | None = None
    fail_marker: str | None = None
    pause_at: int | None = None
    pause_file: str | None = None
    pause_s: float = 300.0
    step_sleep_s: float = 0.0
    step_log: str | None = None
    losses: list[torch.Tensor] = field(default_factory=list)

    def before_step(self, iteration: int, rank: int, world: int) -> None:
        if self.step_sleep_s:
            time.sleep(self.step_sleep_s)
        if self.step_log is not None:
            import ray

            with open(os.path.join(self.step_log, f"rank{rank}"), "a") as f:
                f.write(f"{iteration} {time.time()} {ray.get_runtime_context().get_node_id()}\n")
        if self.fail_at == iteration and rank == world - 1 and not os.path.exists(self.fail_marker):
            open(self.fail_marker, "w").close()  # noqa: SIM115 - an empty marker file
            raise RuntimeError(f"injected failure at iteration {iteration} (rank {rank})")
        if self.pause_at == iteration and rank == 0 and not os.path.exists(self.pause_file):
            with open(self.pause_file + ".tmp", "w") as f:  # first attempt only; a restarted group runs on
                f.write(str(os.getpid()))
            os.replace(self.pause_file + ".tmp", self.pause_file)  # the reader never sees an empty file
            time.sleep(self.pause_s)

    def after_step(self, iteration: int, stats: dict[str, torch.Tensor]) -> None:
        if self.dump_dir is not None:
            self.losses.append(stats["loss"])

    def at_end(self, parts, start_iteration: int, rank: int) -> None:
        if self.dump_dir is None:
            return
        torch.save(
            {
                "model": {k: v.cpu() for k, v in parts.net.state_dict().items()},
                "memory": parts.memory.state_dict() if parts.memory is not None else None,
                "losses": torch.stack(self.losses).cpu() if self.losses else torch.zeros(0),
                "start_iteration": start_iteration,
                "pid": os.getpid(),
            },
            os.path.join(self.dump_dir, f"rank{rank}.pt"),
        )
