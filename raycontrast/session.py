"""The training loop's view of its surroundings (`Session`), and the in-process one (`LocalSession`, no Ray).

`loop.run_loop` never asks where it runs: rank, world size, device, how to wrap the model, where its
checkpoint comes from and where reports go all come from a `Session`. `train._RaySession` implements it
inside a Ray Train worker; `LocalSession` for `train.workers: 0`, in the calling process.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import pyarrow.fs as pafs
import torch

from raycontrast.checkpoint import TrainState, list_checkpoints, load_latest, save_state

__all__ = ["LocalSession", "Session"]


@runtime_checkable
class Session(Protocol):
    """What the loop needs from where it runs."""

    rank: int
    world: int
    device: torch.device

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on `device`, wrapped for data parallelism when `world > 1`."""
        ...

    def load_checkpoint(self) -> TrainState | None:
        """The state to resume from (the same on every rank), or None for a fresh run."""
        ...

    def report(self, metrics: dict[str, Any], state: TrainState | None) -> None:
        """One evaluation's metrics, with a checkpoint when `state` is given (rank 0 passes it). Every rank
        calls it the same number of times: it may be a barrier."""
        ...

    def redeliver(self, state: TrainState) -> bool:
        """Called once on every rank after resuming from `state`: send its last report again if it may
        never have reached the driver (a checkpoint written, then the process died before the report was
        registered), so nothing downstream (tables, ASHA, Optuna) misses an evaluation. True if sent."""
        ...

    def preempted(self) -> str | None:
        """A notice that a node of this run is about to be reclaimed (its description), else None. Every
        rank calls it at the same iterations: it may be a collective."""
        ...

    def checkpoint_now(self, state: TrainState) -> str:
        """Write `state` to the run's storage at once, without a report (rank 0 only): the just-in-time
        checkpoint of a preemption notice. Returns its path."""
        ...


class LocalSession:
    """`train.workers: 0`: the loop's one in-process rank.

    Checkpoints go to `<run_path>/checkpoint_<iteration>/` on `fs` (atomically); the best `num_to_keep`
    by val mIoU plus the latest are kept; `load_checkpoint` resumes from the newest complete one.
    `log` receives the line saying which damaged checkpoints were skipped.
    """

    def __init__(
        self,
        run_path: str,
        fs: pafs.FileSystem,
        *,
        num_to_keep: int,
        use_gpu: bool = False,
        log: Callable[[str], None] = print,
    ) -> None:
        self.rank, self.world = 0, 1
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError("train.use_gpu=true but torch sees no CUDA device; set train.use_gpu=false")
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        self.run_path, self.fs, self.num_to_keep, self.log = run_path, fs, num_to_keep, log
        self.fs.create_dir(run_path)
        self.scores: dict[str, float] = {}  # checkpoint dir -> val mIoU

    def checkpoints(self) -> list[str]:
        return list_checkpoints(self.fs, self.run_path)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def load_checkpoint(self) -> TrainState | None:
        loaded = load_latest(self.fs, self.run_path)
        if (msg := loaded.describe()) is not None:
            self.log(msg)
        return None if loaded.state is None else TrainState.from_checkpoint(loaded.state)

    def redeliver(self, state: TrainState) -> bool:
        return False  # reports are synchronous here: each one arrived with its checkpoint

    def preempted(self) -> str | None:
        return None  # no cluster, no reclaim notices

    def checkpoint_now(self, state: TrainState) -> str:
        path = f"{self.run_path}/checkpoint_{state.iteration:08d}"
        save_state(self.fs, path, state.to_checkpoint())
        return path

    def report(self, metrics: dict[str, Any], state: TrainState | None) -> None:
        if state is None:
            return
        path = f"{self.run_path}/checkpoint_{metrics['iteration']:08d}"
        save_state(self.fs, path, state.to_checkpoint())
        score = metrics["val_miou"]
        self.scores[path] = -math.inf if math.isnan(score) else score
        latest = self.checkpoints()[-1]
        ranked = sorted(self.scores, key=lambda p: self.scores[p], reverse=True)
        for old in ranked[self.num_to_keep :]:
            if old != latest:
                self.fs.delete_dir(old)
                del self.scores[old]
