"""Ray Train glue: the session inside a Ray Train worker, the TorchTrainer around the loop, `fit`, `init_ray`.

The training loop itself is `raycontrast.loop.run_loop` (pure torch, no Ray). It talks to its surroundings
through a `session.Session`: `_RaySession` here inside a Ray Train worker, `session.LocalSession` for
`train.workers: 0`, which runs the same loop in the calling process.

Why local mode is not Ray Train's own `num_workers=0`: that mode keeps only the last reported checkpoint
object in memory (pointing at a directory the loop deletes right after reporting), never writes to
`storage_path`, returns no checkpoint at start (so no resume) and ignores the failure and checkpoint
configs. `LocalSession` persists checkpoints under `<storage>/<run.name>/checkpoint_<iteration>/` and resumes
from the latest complete one, so local runs behave like Ray runs.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.distributed as dist
from threadpoolctl import threadpool_limits

from raycontrast.checkpoint import (
    DamagedCheckpointError,
    TrainState,
    checkpoint_iteration,
    list_checkpoints,
    load_latest,
    load_state,
    save_state,
)
from raycontrast.config import Config
from raycontrast.data.info import dataset_info
from raycontrast.engine import NonFiniteLossError
from raycontrast.experiment import record_start
from raycontrast.lease import Lease
from raycontrast.loop import LoopHooks, LoopOptions, run_loop, say
from raycontrast.plan import check_fit, node_views, placement_strategy
from raycontrast.session import LocalSession
from raycontrast.storage import Storage, absolute_paths, check_run_dir, exists, run_storage, write_atomic

__all__ = [
    "TrainOutcome",
    "abandon",
    "build_trainer",
    "check_resources",
    "fit",
    "free_port",
    "init_ray",
    "divergence",
    "record_divergence",
    "train_loop_per_worker",
]

HOOKS_KEY = "_hooks"  # train_loop_config keys beside the config: the loop's hooks ...
OPTIONS_KEY = "_options"  # ... and its options (`loop.LoopOptions`)
NODE_ID_LABEL = "ray.io/node-id"  # the label every Ray node carries
IN_TUNE_KEY = "_in_tune"  # train_loop_config key: the run is a Tune trial (its reports go on to Tune)
DIVERGED_FILE = "diverged.json"  # in a run folder: the run's losses stayed non-finite


# ------------------------------------------------------------------------------------------- sessions


class _RaySession:
    """The loop's view of a Ray Train worker (a `session.Session`)."""

    def __init__(self, in_tune: bool = False) -> None:
        import ray.train
        import ray.train.torch

        self._in_tune = in_tune
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self._train = ray.train
        storage = ctx.get_storage()  # the run folder on its filesystem, the same for every rank
        self._fs, self._run_path = storage.storage_filesystem, storage.experiment_fs_path

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def load_checkpoint(self) -> TrainState | None:
        """The newest complete checkpoint of this run on storage, whether or not Ray registered it, chosen
        once by rank 0 and loaded by every rank (see `resume_consistently`)."""
        return resume_consistently(self._fs, self._run_path, self.rank, self.world, self.device)

    def redeliver(self, state: TrainState) -> bool:
        """Re-send `state.metrics` when its report may have been lost: in a Tune trial always (Ray Train may
        have registered it, yet the Tune driver that was to receive it died; a duplicate is harmless
        downstream), in a plain run when it is newer than the checkpoint Ray registered (the process that
        wrote it died before reporting). The same decision on every rank."""
        registered = self._train.get_checkpoint()
        delivered = -1 if registered is None or self._in_tune else checkpoint_iteration(registered.path)
        if state.metrics is None or state.metrics["iteration"] <= delivered:
            return False
        self._train.report(state.metrics)
        return True

    def preempted(self) -> str | None:
        info = self._train.get_preemption_info()  # a collective across the workers
        return None if info is None else repr(info)

    def checkpoint_now(self, state: TrainState) -> str:
        """Straight to the run folder on storage: Ray does not register it, `resume_consistently` finds it."""
        path = posixpath.join(self._run_path, checkpoint_dir_name(state.iteration))
        save_state(self._fs, path, state.to_checkpoint())
        return path

    def report(self, metrics: dict[str, Any], state: TrainState | None) -> None:
        if state is None:
            self._train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_state(pafs.LocalFileSystem(), tmp, state.to_checkpoint())
            self._train.report(
                metrics,
                checkpoint=self._train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=checkpoint_dir_name(state.iteration),
            )


def checkpoint_dir_name(iteration: int) -> str:
    """`checkpoint_<iteration>_<UTC time>`: names sort by iteration first, so the newest checkpoint does not
    depend on the clocks of the nodes that wrote them, and a replayed iteration never overwrites an older
    checkpoint of the same iteration (a cut-short copy must not destroy a complete one)."""
    return f"checkpoint_{iteration:08d}_{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{time.time_ns() % 10**9:09d}"


def resume_consistently(
    fs: pafs.FileSystem, run_path: str, rank: int, world: int, device: torch.device
) -> TrainState | None:
    """Every rank resumes from the same checkpoint, or every rank fails.

    Rank 0 picks the newest complete checkpoint on storage (damaged newer ones are skipped; a storage error
    that persists is raised, never taken for damage) and broadcasts its path; every rank loads that path and
    says which damaged ones it skipped; one collective then checks that all ranks hold the same iteration.
    """
    choice: list[Any] = [None, None]
    raw = None
    if rank == 0:
        loaded = load_latest(fs, run_path)
        choice, raw = [loaded.path, loaded.describe()], loaded.state
    if world > 1:
        dist.broadcast_object_list(choice, src=0, device=device if device.type == "cuda" else None)
    path, skipped = choice
    if skipped:
        say(f"rank {rank}: {skipped}")
    if path is not None and raw is None:
        try:
            raw = load_state(fs, path)
        except DamagedCheckpointError as e:  # rank 0 read it: the storage disagrees with itself
            raise RuntimeError(f"rank {rank} cannot read the checkpoint rank 0 chose: {e}") from e
    state = None if raw is None else TrainState.from_checkpoint(raw)
    if world > 1:
        it = -1 if state is None else state.iteration
        seen = torch.tensor([it, -it], dtype=torch.long, device=device)
        dist.all_reduce(seen, op=dist.ReduceOp.MIN)
        if int(seen[0]) != -int(seen[1]):
            raise RuntimeError(
                f"ranks resumed from different iterations ({int(seen[0])}..{-int(seen[1])}); rank {rank} has {it}"
            )
    return state


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point: `run_loop` on this worker (config = `Config.model_dump(mode="json")`, plus
    the loop hooks under `HOOKS_KEY` when a test installed them)."""
    config = dict(config)
    hooks, options = config.pop(HOOKS_KEY, None), config.pop(OPTIONS_KEY, None)
    return run_loop(config, _RaySession(in_tune=config.pop(IN_TUNE_KEY, False)), hooks, options)


# --------------------------------------------------------------------------------------------- Ray


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ray(address: str | None = None) -> None:
    """Connect to `address` (or `RAY_ADDRESS`), else start a local Ray sized to this machine with its
    dashboard on 127.0.0.1. No-op when already connected.

    Tune + Train needs the dashboard: Ray Train's placement-group cleaner polls the State API, and without
    it early-stopped trials leak their workers' placement group, so the next trial waits forever. The
    cleaner finds the State API by auto-detection, which fails when another Ray instance runs on the same
    machine; pinning the dashboard port and exporting RAY_API_SERVER_ADDRESS before the raylet starts gives
    every Ray process of this instance the right address.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(address="local", dashboard_host="127.0.0.1", dashboard_port=port)


def alive_nodes() -> list[dict[str, float]]:
    """Resources of every alive node of the connected cluster."""
    import ray

    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]


def check_resources(cfg: Config) -> None:
    """Fail fast (instead of waiting for a placement group forever) when the connected cluster cannot
    host `train.workers` workers of `train.cpus_per_worker` CPUs (+ 1 GPU each with `train.use_gpu`)."""
    import ray

    t, total = cfg.train, ray.cluster_resources()
    check_fit(
        workers=t.workers, cpus_per_worker=t.cpus_per_worker, use_gpu=t.use_gpu, cpus=total.get("CPU", 0.0),
        gpus=total.get("GPU", 0.0), where="the cluster", nodes=alive_nodes(),
    )  # fmt: skip


def build_trainer(
    cfg: Config,
    *,
    name: str,
    storage_path: str,
    storage_filesystem: pafs.FileSystem | None = None,
    callbacks: Sequence[Any] = (),
    placement: str = "PACK",
    exclude_nodes: Sequence[str] = (),
    hooks: LoopHooks | None = None,
    options: LoopOptions | None = None,
    in_tune: bool = False,
):
    """A `TorchTrainer` for `cfg` (needs `train.workers >= 1`): gloo on CPU, NCCL on GPUs, failure and
    checkpoint config (best `num_to_keep` by val mIoU) from `cfg.train`, run `<storage_path>/<name>`.
    `placement`: Ray's strategy for the workers (`plan.placement_strategy`); `exclude_nodes`: node ids no
    worker may use. `in_tune`: the run is a Tune trial. `hooks` (tests only) travel with the loop config."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    if t.workers < 1:
        raise ValueError(
            "train.workers=0 is local mode, which runs without a TorchTrainer; call fit() instead"
        )
    loop_config = cfg.model_dump(mode="json")
    if hooks is not None:
        loop_config[HOOKS_KEY] = hooks
    if options is not None:
        loop_config[OPTIONS_KEY] = options
    if in_tune:
        loop_config[IN_TUNE_KEY] = True
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.workers,
            use_gpu=t.use_gpu,
            resources_per_worker=resources,
            placement_strategy=placement,
            label_selector={NODE_ID_LABEL: f"!in({','.join(exclude_nodes)})"} if exclude_nodes else None,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            # A preempted node's restart is Ray's preemption budget (unlimited), not train.max_failures.
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures, max_preemption_failures=-1),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=t.num_to_keep, checkpoint_score_attribute="val_miou", checkpoint_score_order="max"
            ),
            callbacks=list(callbacks),
        ),
    )


def record_divergence(fs: pafs.FileSystem, run_path: str, detail: str) -> None:
    """Mark the run at `run_path` as diverged (`DIVERGED_FILE`), so neither a retry nor a resume trains it
    again: the same seed and config would only diverge the same way."""
    write_atomic(fs, posixpath.join(run_path, DIVERGED_FILE), json.dumps({"error": detail}).encode())


def divergence(fs: pafs.FileSystem, run_path: str) -> str | None:
    """Why the run at `run_path` diverged (the `NonFiniteLossError` detail), or None."""
    path = posixpath.join(run_path, DIVERGED_FILE)
    if not exists(fs, path):
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())["error"]


# ------------------------------------------------------------------------------------------- driver


@dataclass
class TrainOutcome:
    """What `fit` returns: the last report's metrics (rank 0), the best val mIoU seen, the latest checkpoint
    and the run folder."""

    metrics: dict[str, Any]
    best_val_miou: float
    best_iteration: int
    checkpoint_path: str | None
    run_path: str
    summary: dict[str, Any]


def _fit_local(cfg: Config, run_path: str, fs: pafs.FileSystem, hooks: LoopHooks | None) -> dict[str, Any]:
    session = LocalSession(run_path, fs, num_to_keep=cfg.train.num_to_keep, use_gpu=cfg.train.use_gpu)
    torch_threads = torch.get_num_threads()
    with threadpool_limits(limits=None):  # restores this process's thread pools on exit
        try:
            summary = run_loop(cfg.model_dump(mode="json"), session, hooks)
        finally:
            torch.set_num_threads(torch_threads)
    return summary


def _fit(cfg: Config, storage: Storage, run_path: str, address: str | None, hooks: LoopHooks | None):
    if cfg.train.workers == 0:
        return _fit_local(cfg, run_path, storage.fs, hooks)
    init_ray(address)
    check_resources(cfg)
    t, nodes = cfg.train, alive_nodes()
    views = node_views(
        nodes, [str(i) for i in range(len(nodes))], t.cpus_per_worker, 1.0 if t.use_gpu else 0.0
    )
    trainer = build_trainer(
        cfg, name=cfg.run.name, storage_path=storage.ray_path, storage_filesystem=storage.ray_fs,
        placement=placement_strategy(t.placement, t.workers, views), hooks=hooks,
    )  # fmt: skip
    return trainer.fit().return_value or {}


def abandon(message: str) -> None:
    """The lease was taken over: another driver now owns the run, so this one stops at once, writing
    nothing more (a last save would overwrite the new owner's state)."""
    sys.stderr.write(f"raycontrast: error: {message}; this driver stops without writing anything more\n")
    sys.stderr.flush()
    os._exit(3)


def fit(
    cfg: Config,
    *,
    resume: bool = False,
    address: str | None = None,
    accept: Iterable[str] = (),
    hooks: LoopHooks | None = None,
) -> TrainOutcome:
    """Train `cfg` as run `<run.storage_path>/<run.name>`; prints progress and a per-class IoU table.

    `resume=True` continues that run from its latest checkpoint; without it an existing run folder is an
    error, so runs never mix. A resume with another config or other package versions is refused
    (`experiment.check_resume`; `accept` names the keys it may change), and one driver at a time holds
    the run (`lease.Lease`).
    `train.workers: 0` runs in this process without Ray; otherwise Ray is started or joined (`init_ray`).
    A run whose losses stay non-finite raises `NonFiniteLossError` once (Ray does not retry it) and is
    marked, so `--resume` refuses to train it again.
    """
    cfg = absolute_paths(cfg)
    storage = run_storage(cfg)
    run_path = check_run_dir(storage, cfg.run.name, resume=resume)
    if resume and (detail := divergence(storage.fs, run_path)) is not None:
        raise NonFiniteLossError(
            f"{detail} (run '{cfg.run.name}' diverged; start a new run.name to train again)"
        )
    what = f"run '{cfg.run.name}'"
    with Lease(storage.fs, run_path, timeout_s=cfg.run.lease_timeout_s, what=what, on_lost=abandon):
        record_start(storage.fs, run_path, cfg, resume=resume, accept=accept, what=what)
        summary = _fit(cfg, storage, run_path, address, hooks)
    if summary.get("diverged"):
        record_divergence(storage.fs, run_path, summary["diverged"])
        raise NonFiniteLossError(summary["diverged"])
    metrics = summary.get("metrics") or {}
    found = list_checkpoints(storage.fs, run_path)  # newest on storage, registered with Ray or not
    ckpt = found[-1] if found else None
    names = summary.get("class_names") or list(dataset_info(cfg.data.dataset).class_names)
    if metrics.get("val_class_iou"):
        print(f"\nper-class IoU at iteration {metrics['iteration']} (val mIoU {metrics['val_miou']:.4f}):")
        for name, v in zip(names, metrics["val_class_iou"], strict=False):
            absent = v is None or math.isnan(v)  # NaN comes back as None from Ray's JSON snapshot
            print(f"  {name:<16} {'   n/a' if absent else f'{v:6.4f}'}")
    return TrainOutcome(
        metrics=metrics,
        best_val_miou=summary.get("best_val_miou", math.nan),
        best_iteration=summary.get("best_iteration", 0),
        checkpoint_path=ckpt,
        run_path=run_path,
        summary=summary,
    )
