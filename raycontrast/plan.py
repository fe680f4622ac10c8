"""Resource plan and storage checks of a search: pure functions of the cluster's numbers, no Ray.

Resources: the trial driver reserves `DRIVER_CPUS` (Tune refuses 0) and each of the `train.workers` workers
gets its share of `train.cpus_per_worker` minus the driver's share, so a trial costs exactly
`workers x cpus_per_worker` CPUs and runs on a plain `ray start --head` with no custom resources.
`tune.run_search` reads the cluster from Ray and calls these before any trial starts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from raycontrast.config import Config, ConfigError

__all__ = [
    "DRIVER_CPUS",
    "SHARED_FS_TYPES",
    "Plan",
    "check_shared_storage",
    "mount_fs_type",
    "plan_resources",
]

DRIVER_CPUS = 0.02  # CPU reserved by each trial's driver actor; it only waits on its Train run
# Filesystems that several machines can mount at the same path (network / cluster / FUSE object stores).
SHARED_FS_TYPES = frozenset(
    ["nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "glusterfs", "beegfs", "wekafs"]
)  # fmt: skip


def _n(x: float) -> str:
    return f"{round(x, 3):g}"  # 2.9999 (Ray's 1e-4 resource grid) prints as 3


@dataclass(frozen=True)
class Plan:
    """What one trial reserves and how many run at once."""

    cluster_cpus: float
    cluster_gpus: float
    workers: int
    driver_cpus: float
    worker_cpus: float  # per Train worker, after the driver's share
    gpus_per_worker: float
    trial_cpus: float
    trial_gpus: float
    fit: int  # trials the cluster can hold at once
    max_concurrent: int  # what Tune is told (tune.max_concurrent_trials, else `fit`, capped by num_samples)

    def describe(self) -> str:
        src = f"floor({_n(self.cluster_cpus)} CPUs / {_n(self.trial_cpus)})"
        if self.trial_gpus:
            src += f", floor({_n(self.cluster_gpus)} GPUs / {_n(self.trial_gpus)})"
        lines = [
            f"resources: cluster {_n(self.cluster_cpus)} CPUs, {_n(self.cluster_gpus)} GPUs",
            f"  per trial: driver {_n(self.driver_cpus)} CPU + {self.workers} worker(s) x "
            f"({_n(self.worker_cpus)} CPU, {_n(self.gpus_per_worker)} GPU) = {_n(self.trial_cpus)} CPUs, "
            f"{_n(self.trial_gpus)} GPUs",
            f"  concurrent trials: {self.max_concurrent} (cluster fits {self.fit}: {src})",
        ]
        return "\n".join(lines)


def plan_resources(
    cluster_cpus: float,
    cluster_gpus: float,
    cfg: Config,
    *,
    node_resources: Sequence[Mapping[str, float]] | None = None,
) -> Plan:
    """Per-trial reservation and concurrency; `ConfigError` with the numbers when a trial can never fit.

    `node_resources` (one `{"CPU": .., "GPU": ..}` per alive node) adds the check that one worker fits on
    some node, since a worker cannot span nodes.
    """
    t = cfg.train
    if t.workers < 1:
        raise ConfigError(
            "train.workers: a search runs each trial on Ray Train workers; set it to >= 1", "train.workers"
        )
    total = t.workers * t.cpus_per_worker
    if total <= 2 * DRIVER_CPUS:
        raise ConfigError(
            f"train.cpus_per_worker: {t.workers} x {t.cpus_per_worker:g} CPUs leaves nothing for the workers "
            f"once the trial driver takes {DRIVER_CPUS:g}; use at least {2 * DRIVER_CPUS:g} in total",
            "train.cpus_per_worker",
        )
    # Ray counts resources in 1e-4 units; round down so driver + workers never exceed `total`.
    worker_cpus = math.floor((total - DRIVER_CPUS) / t.workers * 1e4) / 1e4
    gpw = 1.0 if t.use_gpu else 0.0
    trial_cpus, trial_gpus = DRIVER_CPUS + t.workers * worker_cpus, t.workers * gpw
    by_cpu = math.floor(cluster_cpus / trial_cpus + 1e-9)
    by_gpu = math.floor(cluster_gpus / trial_gpus + 1e-9) if trial_gpus else by_cpu
    fit = min(by_cpu, by_gpu)
    need = (
        f"a trial needs {_n(trial_cpus)} CPUs (driver {DRIVER_CPUS:g} + train.workers={t.workers} x "
        f"{_n(worker_cpus)}) and {_n(trial_gpus)} GPUs (train.use_gpu={t.use_gpu})"
    )
    if fit < 1:
        raise ConfigError(
            f"{need}, but the cluster has {cluster_cpus:g} CPUs and {cluster_gpus:g} GPUs: lower "
            "train.workers or train.cpus_per_worker, set train.use_gpu=false, or use a bigger cluster",
            "train.workers",
        )
    if node_resources is not None:
        for res, amount in (("CPU", worker_cpus), ("GPU", gpw)):
            biggest = max((n.get(res, 0.0) for n in node_resources), default=0.0)
            if amount > biggest + 1e-9:
                raise ConfigError(
                    f"{need}; one worker needs {_n(amount)} {res}s but the largest node has {biggest:g}: "
                    "a worker cannot span nodes, lower train.cpus_per_worker",
                    "train.cpus_per_worker",
                )
    conc = min(cfg.tune.max_concurrent_trials or fit, cfg.tune.num_samples)
    return Plan(
        cluster_cpus, cluster_gpus, t.workers, DRIVER_CPUS, worker_cpus, gpw, trial_cpus, trial_gpus, fit, conc
    )  # fmt: skip


def mount_fs_type(path: str) -> str | None:
    """Filesystem type of the mount holding `path` (Linux /proc/mounts; None elsewhere)."""
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) >= 3]
    except OSError:
        return None
    path = os.path.realpath(path)
    best, fs_type = "", None
    for mnt, typ in mounts:
        mnt = mnt.replace("\\040", " ")
        inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) > len(best):
            best, fs_type = mnt, typ
    return fs_type


def check_shared_storage(storage_path: str, alive_nodes: int, fs_type: str | None = None) -> None:
    """Multi-node searches need storage every node sees; a node-local path is a `ConfigError` saying why."""
    if alive_nodes <= 1 or ("://" in storage_path and not storage_path.startswith("file://")):
        return
    if fs_type and (fs_type in SHARED_FS_TYPES or fs_type.startswith("fuse.")):
        return
    raise ConfigError(
        f"run.storage_path: the cluster has {alive_nodes} nodes but '{storage_path}' is a local path "
        f"(filesystem {fs_type or 'unknown'}): each node would write its own checkpoints and trials could "
        "not resume on another node. Use a shared mount (NFS) or s3://bucket/prefix (with run.s3_endpoint "
        "for S3-compatible stores)",
        "run.storage_path",
    )
