"""Ray Train glue: `train_loop_per_worker`, the TorchTrainer around it, and `fit`.

The training loop itself is `raycontrast.loop.run_loop` (pure torch, no Ray), which talks to its
surroundings through a small session object: `_RaySession` here inside a Ray Train worker,
`checkpoint.LocalSession` for `train.workers: 0`, which runs the same loop in the calling process.

Why local mode is not Ray Train's own `num_workers=0`: that mode keeps only the last reported checkpoint
object in memory (pointing at a directory the loop deletes right after reporting), never writes to
`storage_path`, returns no checkpoint at start (so no resume) and ignores the failure and checkpoint
configs. `checkpoint.LocalSession` persists checkpoints under `<storage>/<run.name>/checkpoint_<iteration>/`
and resumes from the latest complete one, so local runs behave like Ray runs.
"""

from __future__ import annotations

import math
import os
import posixpath
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import torch
from threadpoolctl import threadpool_limits

from raycontrast.checkpoint import (
    LocalSession,
    SeededItems,
    ShardSampler,
    capture_rng_state,
    filesystem_for,
    load_latest,
    restore_rng_state,
    save_state,
    step_seed,
    storage_location,
)
from raycontrast.config import Config, apply_overrides
from raycontrast.data.loader import dataset_info
from raycontrast.engine import (
    NonFiniteLossError,
)
from raycontrast.loop import run_loop, say

__all__ = [
    "InsufficientResourcesError",
    "ShardSampler",
    "SeededItems",
    "TrainOutcome",
    "build_trainer",
    "check_resources",
    "fit",
    "init_ray",
    "nonfinite_cause",
    "resolve_storage",
    "run_loop",
    "step_seed",
    "train_loop_per_worker",
]

# Former names of helpers that moved to `raycontrast.checkpoint`, kept for importers.
_rng_state, _set_rng_state = capture_rng_state, restore_rng_state


class InsufficientResourcesError(RuntimeError):
    """The cluster cannot place the requested Train workers (raised before any actor starts)."""


# ------------------------------------------------------------------------------------------- sessions


class _RaySession:
    """The loop's view of a Ray Train worker."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self._train = ray.train

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint Ray registered last, else (damaged) the newest complete one of this run."""
        ck = self._train.get_checkpoint()
        if ck is None:
            return None
        ck_path = ck.path.rstrip("/")
        loaded = load_latest(ck.filesystem, posixpath.dirname(ck_path), preferred=ck_path)
        if self.rank == 0 and (msg := loaded.describe()) is not None:
            say(msg)
        return loaded.state

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        if state is None:
            self._train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_state(pafs.LocalFileSystem(), tmp, state)
            self._train.report(metrics, checkpoint=self._train.Checkpoint.from_directory(tmp))


def train_loop_per_worker(config_dict: dict) -> dict[str, Any]:
    """Ray Train entry point: `run_loop` on this worker (config = `Config.model_dump(mode="json")`)."""
    return run_loop(config_dict, _RaySession())


# ------------------------------------------------------------------------------------------- driver


def resolve_storage(cfg: Config) -> tuple[str, pafs.FileSystem | None]:
    """`(storage path for Ray, pyarrow filesystem or None)` of `run.storage_path` (see
    `checkpoint.storage_location`: S3 URIs get an `S3FileSystem`, local paths become absolute)."""
    r = cfg.run
    return storage_location(r.storage_path, s3_endpoint=r.s3_endpoint, s3_scheme=r.s3_scheme)


def init_ray(address: str | None = None) -> None:
    """Connect to `address` (or `RAY_ADDRESS`), else start a local Ray sized to this machine with the
    dashboard on 127.0.0.1 (Tune+Train needs it, see the placement-group cleaner). No-op if connected."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", dashboard_host="127.0.0.1")


def check_resources(cfg: Config) -> None:
    """Fail fast (instead of waiting for a placement group forever) when the connected cluster cannot
    host `train.workers` workers of `train.cpus_per_worker` CPUs (+ 1 GPU each with `train.use_gpu`)."""
    import ray

    t = cfg.train
    total = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    need = {"CPU": t.workers * t.cpus_per_worker, "GPU": float(t.workers) if t.use_gpu else 0.0}
    per_worker = {"CPU": t.cpus_per_worker, "GPU": 1.0 if t.use_gpu else 0.0}
    problems = []
    for res, amount in need.items():
        have = total.get(res, 0.0)
        if amount > have + 1e-9:
            problems.append(
                f"{amount:g} {res}s in total (train.workers={t.workers} x {per_worker[res]:g}) "
                f"but the cluster has {have:g}"
            )
        elif amount > 0 and per_worker[res] > max((n.get(res, 0.0) for n in nodes), default=0.0) + 1e-9:
            problems.append(f"{per_worker[res]:g} {res}s per worker but no node has that many")
    if problems:
        raise InsufficientResourcesError(
            "not enough Ray resources for training: "
            + "; ".join(problems)
            + ". Lower train.workers or train.cpus_per_worker, set train.use_gpu=false, or pass --address of a "
            "bigger cluster."
        )


def build_trainer(
    cfg: Config,
    *,
    name: str,
    storage_path: str,
    storage_filesystem: pafs.FileSystem | None = None,
    callbacks: Sequence[Any] = (),
    loop_extras: Mapping[str, Any] | None = None,
):
    """A `TorchTrainer` for `cfg` (needs `train.workers >= 1`): gloo on CPU, NCCL on GPUs, failure and
    checkpoint config (best `num_to_keep` by val mIoU) from `cfg.train`, run `<storage_path>/<name>`.
    `loop_extras` adds private `_`-keys to the loop config (tests only)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    if t.workers < 1:
        raise ValueError(
            "train.workers=0 is local mode, which runs without a TorchTrainer; call fit() instead"
        )
    if any(not k.startswith("_") for k in (loop_extras or {})):
        raise ValueError(f"loop_extras keys must start with '_': {sorted(loop_extras or {})}")
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**cfg.model_dump(mode="json"), **(loop_extras or {})},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.workers, use_gpu=t.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=t.num_to_keep, checkpoint_score_attribute="val_miou", checkpoint_score_order="max"
            ),
            callbacks=list(callbacks),
        ),
    )


def nonfinite_cause(err: BaseException) -> NonFiniteLossError | None:
    """The `NonFiniteLossError` behind a failed Ray Train run (`WorkerGroupError`), if that is the cause.

    Worker exceptions reach the driver in `worker_failures`, but their `__cause__` chain does not survive
    pickling, so the error text (which carries the worker traceback) is the fallback.
    """
    for exc in [err, *getattr(err, "worker_failures", {}).values()]:
        while exc is not None:
            if isinstance(exc, NonFiniteLossError):
                return exc
            exc = exc.__cause__ or exc.__context__
    match = re.search(r"non-finite loss: (.*)", str(err))
    return NonFiniteLossError(match.group(1).strip()) if match else None


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


def fit(
    cfg: Config,
    *,
    resume: bool = False,
    address: str | None = None,
    loop_extras: Mapping[str, Any] | None = None,
) -> TrainOutcome:
    """Train `cfg` as run `<run.storage_path>/<run.name>`; prints progress and a per-class IoU table.

    `resume=True` continues that run from its latest checkpoint (Ray Train restores it when the same
    name and storage are reused); without it an existing run folder is an error, so runs never mix.
    `train.workers: 0` runs in this process without Ray; otherwise Ray is started or joined (`init_ray`).
    """
    if "://" not in cfg.data.root:  # workers run in another cwd
        cfg = apply_overrides(cfg, {"data.root": os.path.abspath(os.path.expanduser(cfg.data.root))})
    storage, fs = resolve_storage(cfg)
    pfs, base = filesystem_for(storage, fs)
    run_path = f"{base.rstrip('/')}/{cfg.run.name}"
    exists = pfs.get_file_info(run_path).type != pafs.FileType.NotFound
    if exists and not resume:
        raise FileExistsError(
            f"a run named '{cfg.run.name}' already exists at {run_path}; pass --resume to "
            "continue it, or choose another run.name"
        )
    if resume and not exists:
        raise FileNotFoundError(
            f"--resume: no run named '{cfg.run.name}' under {storage}; start it without --resume"
        )
    extras = dict(loop_extras or {})
    if cfg.train.workers == 0:
        session = LocalSession(run_path, pfs, num_to_keep=cfg.train.num_to_keep, use_gpu=cfg.train.use_gpu)
        torch_threads = torch.get_num_threads()
        with threadpool_limits(limits=None):  # restores this process's thread pools on exit
            try:
                summary = run_loop({**cfg.model_dump(mode="json"), **extras}, session)
            finally:
                torch.set_num_threads(torch_threads)
        metrics, found = session.last_metrics or {}, session.checkpoints()
        ckpt = found[-1] if found else None
    else:
        init_ray(address)
        check_resources(cfg)
        trainer = build_trainer(
            cfg, name=cfg.run.name, storage_path=storage, storage_filesystem=fs, loop_extras=extras
        )
        try:
            result = trainer.fit()
        except (
            Exception
        ) as err:  # TrainingFailedError; surface the deterministic non-finite failure as itself
            cause = nonfinite_cause(err)
            if cause is not None:
                raise cause from err
            raise
        metrics, summary = result.metrics or {}, result.return_value or {}
        ckpt = result.checkpoint.path if result.checkpoint is not None else None
    names = summary.get("class_names") or list(dataset_info(cfg.data.dataset)[1])
    if metrics.get("val_class_iou"):
        print(f"\nper-class IoU at iteration {metrics['iteration']} (val mIoU {metrics['val_miou']:.4f}):")
        for name, v in zip(names, metrics["val_class_iou"], strict=False):
            print(f"  {name:<16} {'   n/a' if math.isnan(v) else f'{v:6.4f}'}")
    return TrainOutcome(
        metrics=metrics,
        best_val_miou=summary.get("best_val_miou", math.nan),
        best_iteration=summary.get("best_iteration", 0),
        checkpoint_path=ckpt,
        run_path=run_path,
        summary=summary,
    )
