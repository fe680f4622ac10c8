"""Resource arithmetic: what a run or a search trial reserves, whether it fits, how many run at once.

Pure functions of plain numbers (no Ray): `preflight` feeds them this machine's counts before Ray starts,
`train` and `tune` the connected cluster's. So changing how CPU shares work means editing this module.

A Train run reserves `train.workers x train.cpus_per_worker` CPUs (+ 1 GPU per worker with `train.use_gpu`).
A search trial costs exactly the same: its driver actor reserves `DRIVER_CPUS` (Tune refuses 0), carved out
of the workers' share, so a trial runs on a plain `ray start --head` with no custom resources.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from raycontrast.config import Config, ConfigError

__all__ = [
    "DRIVER_CPUS",
    "InsufficientResourcesError",
    "Plan",
    "check_fit",
    "plan_resources",
    "require_workers",
]

DRIVER_CPUS = 0.02  # CPU reserved by each trial's driver actor; it only waits on its Train run
# A custom resource that pins trial drivers (and with them the Train controllers) to the nodes offering it:
# `ray start --head --resources='{"raycontrast_driver": 64}'` keeps them off the GPU nodes, and losing a
# GPU node then costs a trial a worker-group restart, not a Tune-level retry. It also caps concurrency.
DRIVER_RESOURCE = "raycontrast_driver"
BIGGER = "pass --address of a bigger cluster"


class InsufficientResourcesError(ConfigError):
    """The machine or cluster cannot place the requested workers (raised before any actor starts)."""


def _n(x: float) -> str:
    return f"{round(x, 3):g}"  # 2.9999 (Ray's 1e-4 resource grid) prints as 3


def require_workers(workers: int) -> None:
    """A search runs every trial on Ray Train workers."""
    if workers < 1:
        raise InsufficientResourcesError(
            f"train.workers: a search runs each trial on Ray Train workers, got train.workers={workers}; "
            "set train.workers to 1 or more",
            "train.workers",
        )


def check_fit(
    *,
    workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
    cpus: float,
    gpus: float,
    where: str,
    unit: str = "the run",
    worker_cpus: float | None = None,
    nodes: Sequence[Mapping[str, float]] | None = None,
) -> None:
    """`InsufficientResourcesError` (naming the key and the numbers) unless `workers` workers of
    `cpus_per_worker` CPUs (+ 1 GPU each with `use_gpu`) fit into `cpus` / `gpus`, and, given `nodes`
    (one `{"CPU": .., "GPU": ..}` per alive node), one worker of `worker_cpus` (default `cpus_per_worker`)
    fits on some node: a worker cannot span nodes. `where` names the place ("this machine", "the cluster")."""
    need_cpus, need_gpus = workers * cpus_per_worker, float(workers) if use_gpu else 0.0
    totals = (
        f" ({unit} needs {_n(need_cpus)} CPUs and {_n(need_gpus)} GPUs while {where} has {_n(cpus)} CPUs "
        f"and {_n(gpus)} GPUs)"
    )
    if need_gpus > gpus + 1e-9:
        fewer = f"lower train.workers to {int(gpus)}, " if gpus >= 1 else ""
        raise InsufficientResourcesError(
            f"train.use_gpu: {unit} asks for {workers} worker(s) x 1 GPU (train.workers={workers}, "
            f"train.use_gpu=true) = {_n(need_gpus)} GPUs, but {where} has {_n(gpus)} GPU(s); set "
            f"train.use_gpu=false, {fewer}or pass --address of a cluster with GPUs" + totals,
            "train.use_gpu",
        )
    if need_cpus > cpus + 1e-9:
        raise InsufficientResourcesError(
            f"train.workers: train.workers={workers} x train.cpus_per_worker={cpus_per_worker:g} = "
            f"{_n(need_cpus)} CPUs, but {where} has {_n(cpus)}; lower train.workers or "
            f"train.cpus_per_worker, or {BIGGER}" + totals,
            "train.workers",
        )
    if nodes is None:
        return
    per_worker = {
        "CPU": cpus_per_worker if worker_cpus is None else worker_cpus,
        "GPU": 1.0 if use_gpu else 0.0,
    }
    for res, amount in per_worker.items():
        biggest = max((n.get(res, 0.0) for n in nodes), default=0.0)
        if amount > biggest + 1e-9:
            raise InsufficientResourcesError(
                f"train.cpus_per_worker: one worker needs {_n(amount)} {res}s but the largest node has "
                f"{biggest:g}: a worker cannot span nodes; lower train.cpus_per_worker" + totals,
                "train.cpus_per_worker",
            )


@dataclass(frozen=True)
class NodeView:
    """One alive node as the plan sees it."""

    node_id: str
    cpus: float
    gpus: float
    driver_slots: float  # DRIVER_RESOURCE units (trial drivers it may host)
    workers: int  # Train workers of one trial that fit on it


def node_views(
    nodes: Sequence[Mapping[str, float]], node_ids: Sequence[str], worker_cpus: float, gpw: float
) -> tuple[NodeView, ...]:
    """`nodes` (resource dicts, as `ray.nodes()[i]["Resources"]`) with their ids, and how many workers of
    `worker_cpus` CPUs (+ `gpw` GPUs) each holds."""
    out = []
    for nid, res in zip(node_ids, nodes, strict=True):
        cpu, gpu = res.get("CPU", 0.0), res.get("GPU", 0.0)
        fits = math.floor(cpu / worker_cpus + 1e-9) if worker_cpus else 0
        if gpw:
            fits = min(fits, math.floor(gpu / gpw + 1e-9))
        out.append(NodeView(nid, cpu, gpu, res.get(DRIVER_RESOURCE, 0.0), fits))
    return tuple(out)


def placement_strategy(placement: str, workers: int, views: Sequence[NodeView]) -> str:
    """Ray's placement strategy for a run's workers: `auto` keeps them on one node when some node holds
    them all (STRICT_PACK: DDP and SyncBN traffic stays on the node), else on as few nodes as fit (PACK)."""
    if placement != "auto":
        return placement.upper()
    return "STRICT_PACK" if any(v.workers >= workers for v in views) else "PACK"


def shm_per_rank(
    *,
    loader_workers: int,
    batch_size: int,
    crop: tuple[int, int],
    val_size: tuple[int, int],
    prefetch: int = 2,
) -> int:
    """Shared memory (`/dev/shm`) one rank's DataLoaders need at most: every worker process holds up to
    `prefetch` batches of float32 images and uint8 labels, for the train loader (crops) and the val
    loader (whole images, `val_loader_workers(loader_workers)` processes). 0 without loader processes."""

    def batch(h: int, w: int) -> int:
        return batch_size * h * w * (3 * 4 + 1)

    return prefetch * (loader_workers * batch(*crop) + val_loader_workers(loader_workers) * batch(*val_size))


def val_loader_workers(loader_workers: int) -> int:
    """Processes of the val loader: half the train loader's (whole images are large, evaluation is rare),
    started anew at each evaluation (not persistent), so they hold no shared memory between them."""
    return loader_workers // 2


@dataclass(frozen=True)
class Plan:
    """What one trial reserves, where it may go, and how many run at once."""

    cluster_cpus: float
    cluster_gpus: float
    workers: int
    driver_cpus: float
    worker_cpus: float  # per Train worker, after the driver's share
    gpus_per_worker: float
    trial_cpus: float
    trial_gpus: float
    fit: int  # trials the cluster can hold at once
    max_concurrent: int  # tune.max_concurrent_trials, else `fit`, capped by num_samples
    placement: str = "PACK"  # Ray placement strategy of a trial's workers
    pinned_drivers: bool = False  # trial drivers take one DRIVER_RESOURCE unit (the head offers it)
    nodes: tuple[NodeView, ...] = ()
    excluded: tuple[str, ...] = ()  # node ids no worker may use (failed the per-node checks)
    shm_bytes: int = 0  # /dev/shm one rank needs

    def driver_resources(self) -> dict[str, float]:
        """What each trial's driver actor reserves (Tune's `with_resources`)."""
        return {"cpu": self.driver_cpus, **({DRIVER_RESOURCE: 1.0} if self.pinned_drivers else {})}

    def describe(self) -> str:
        src = f"floor({_n(self.cluster_cpus)} CPUs / {_n(self.trial_cpus)})"
        if self.trial_gpus:
            src += f", floor({_n(self.cluster_gpus)} GPUs / {_n(self.trial_gpus)})"
        lines = [
            f"resources: cluster {_n(self.cluster_cpus)} CPUs, {_n(self.cluster_gpus)} GPUs",
            f"  per trial: driver {_n(self.driver_cpus)} CPU + {self.workers} worker(s) x "
            f"({_n(self.worker_cpus)} CPU, {_n(self.gpus_per_worker)} GPU) = {_n(self.trial_cpus)} CPUs, "
            f"{_n(self.trial_gpus)} GPUs; workers placed {self.placement}",
            f"  concurrent trials: {self.max_concurrent} (cluster fits {self.fit}: {src})",
        ]
        where = f"on the nodes offering '{DRIVER_RESOURCE}'" if self.pinned_drivers else "anywhere"
        lines.append(f"  trial drivers: {where}; shared memory per rank: {self.shm_bytes / 2**20:.0f} MiB")
        lines.append(
            f"  Tune's 'Logical resource usage' counts the trial drivers only; each running trial's "
            f"{self.workers} Train worker(s) hold {_n(self.workers * self.worker_cpus)} CPUs, "
            f"{_n(self.trial_gpus)} GPUs more"
        )
        for v in self.nodes:
            note = " (excluded)" if v.node_id in self.excluded else ""
            drivers = f", {v.driver_slots:g} driver slots" if v.driver_slots else ""
            lines.append(
                f"  node {v.node_id[:12]}: {_n(v.cpus)} CPUs, {_n(v.gpus)} GPUs{drivers}; holds {v.workers} "
                f"worker(s) of a trial{note}"
            )
        return "\n".join(lines)


def plan_resources(
    cluster_cpus: float,
    cluster_gpus: float,
    cfg: Config,
    *,
    node_resources: Sequence[Mapping[str, float]] | None = None,
    node_ids: Sequence[str] | None = None,
    excluded: Sequence[str] = (),
    val_size: tuple[int, int] | None = None,
) -> Plan:
    """Per-trial reservation, placement and concurrency of a search on a cluster of `cluster_cpus` /
    `cluster_gpus`; `InsufficientResourcesError` with the numbers when a trial can never fit
    (`node_resources`: see `check_fit`; `node_ids` name them in the plan; `excluded` nodes give nothing).
    `val_size`: the val images' size, for the shared-memory need (default: the crop)."""
    t = cfg.train
    require_workers(t.workers)
    total = t.workers * t.cpus_per_worker
    if total <= 2 * DRIVER_CPUS:
        raise InsufficientResourcesError(
            f"train.cpus_per_worker: {t.workers} x {t.cpus_per_worker:g} CPUs leaves nothing for the workers "
            f"once the trial driver takes {DRIVER_CPUS:g}; use at least {2 * DRIVER_CPUS:g} in total",
            "train.cpus_per_worker",
        )
    gpw = 1.0 if t.use_gpu else 0.0
    ids = list(node_ids) if node_ids is not None else [f"node{i}" for i in range(len(node_resources or ()))]
    pinned = any(n.get(DRIVER_RESOURCE, 0.0) for n in node_resources or ())
    # A pinned driver takes no CPU (its resource token is enough: Tune refuses an empty request, not this);
    # otherwise its share comes out of the workers'. Ray counts resources in 1e-4 units: round down so
    # driver + workers never exceed `total`.
    driver_cpus = 0.0 if pinned else DRIVER_CPUS
    worker_cpus = math.floor((total - driver_cpus) / t.workers * 1e4) / 1e4
    views = node_views(node_resources or (), ids, worker_cpus, gpw)
    usable = [v for v in views if v.node_id not in set(excluded)]
    if excluded:  # what is left once the excluded nodes are gone
        cluster_cpus, cluster_gpus = sum(v.cpus for v in usable), sum(v.gpus for v in usable)
    check_fit(
        workers=t.workers, cpus_per_worker=t.cpus_per_worker, use_gpu=t.use_gpu, cpus=cluster_cpus,
        gpus=cluster_gpus, where="the cluster", unit="a trial", worker_cpus=worker_cpus,
        nodes=None if node_resources is None else [{"CPU": v.cpus, "GPU": v.gpus} for v in usable],
    )  # fmt: skip
    trial_cpus, trial_gpus = driver_cpus + t.workers * worker_cpus, t.workers * gpw
    by_cpu = math.floor(cluster_cpus / trial_cpus + 1e-9)
    fit = min(by_cpu, math.floor(cluster_gpus / trial_gpus + 1e-9)) if trial_gpus else by_cpu
    if pinned:
        fit = min(fit, math.floor(sum(v.driver_slots for v in views) + 1e-9))
    conc = min(cfg.tune.max_concurrent_trials or fit, cfg.tune.num_samples)
    d = cfg.data
    shm = shm_per_rank(
        loader_workers=d.loader_workers,
        batch_size=t.batch_size,
        crop=d.crop_size,
        val_size=val_size or d.crop_size,
    )
    return Plan(
        cluster_cpus, cluster_gpus, t.workers, driver_cpus, worker_cpus, gpw, trial_cpus, trial_gpus, fit, conc,
        placement=placement_strategy(t.placement, t.workers, usable), pinned_drivers=pinned,
        nodes=views, excluded=tuple(excluded), shm_bytes=shm,
    )  # fmt: skip


def trial_bundles(cfg: Config) -> list[dict[str, float]]:
    """The resource bundles of one trial (its driver, then one per Train worker), as an autoscaler
    request (`ray.autoscaler.sdk.request_resources(bundles=...)`)."""
    t = cfg.train
    worker_cpus = math.floor((t.workers * t.cpus_per_worker - DRIVER_CPUS) / t.workers * 1e4) / 1e4
    worker = {"CPU": worker_cpus, **({"GPU": 1.0} if t.use_gpu else {})}
    return [{"CPU": DRIVER_CPUS}] + [dict(worker) for _ in range(t.workers)]


def wait_until_fit(
    cfg: Config,
    resources: Callable[[], Mapping[str, float]],
    *,
    wait_s: float,
    request: Callable[[list[dict[str, float]]], None],
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    log: Callable[[str], None] = print,
    poll_s: float = 5.0,
) -> Mapping[str, float]:
    """The cluster's resources once one trial fits, for an autoscaling cluster whose nodes may not be up
    yet: with `wait_s` > 0 the trial's bundles are requested (`request`) and the cluster is polled until
    it holds one trial or `wait_s` passes; then, or at once with `wait_s` = 0, a cluster that still cannot
    hold one raises `InsufficientResourcesError` with the numbers."""
    deadline = clock() + wait_s
    asked = False
    while True:
        res = resources()
        try:
            plan_resources(res.get("CPU", 0.0), res.get("GPU", 0.0), cfg)
            return res
        except InsufficientResourcesError as exc:
            if clock() >= deadline:
                raise
            if not asked:
                request(trial_bundles(cfg))
                asked = True
                log(
                    f"waiting up to {wait_s:g} s for the cluster to hold one trial ({str(exc).split(';')[0]})"
                )
        sleep(poll_s)
