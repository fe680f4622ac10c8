"""Checks that fail a run before Ray starts, for input that is known up front (no Ray import).

`check(cfg, command)` runs, cheapest first: the search space (tune), the resources this machine can give a
local Ray instance, the storage folder, the data (the first image/label pair of each split is decoded in
full) and the pretrained weights (loaded into a shape-only backbone). Each problem raises `PreflightError`
naming the config key or the file and saying what to do; the CLI prints it and exits 2. Nothing is left
behind: folders created only to probe writability are removed again.

What needs a live cluster is checked after connecting: its resources and whether its nodes share
`run.storage_path` by `raycontrast.train` / `raycontrast.tune`, and every node's data, weights, storage and
package versions by `check_nodes` (one task per node; Ray imported lazily).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from raycontrast.config import Config, ConfigError
from raycontrast.storage import check_run_dir, is_uri, open_storage

if TYPE_CHECKING:
    from raycontrast.models.pretrained import LoadReport

__all__ = [
    "FULL_SCAN_HINT",
    "PreflightError",
    "check",
    "check_data",
    "check_job_storage",
    "check_nodes",
    "check_resources",
    "check_space",
    "check_storage",
    "check_weights",
    "probe_node",
    "probe_writable",
]

Command = Literal["train", "tune"]
FULL_SCAN_HINT = "`raycontrast check-data --config FILE` decodes every file"


class PreflightError(ConfigError):
    """Input known before Ray starts is wrong. A `ConfigError` (so a `ValueError`): `key` names the
    config key to fix, the message also names the file and what to do."""


def check(cfg: Config, command: Command, *, resume: bool = False, address: str | None = None) -> None:
    """Run every pre-Ray check for `raycontrast train|tune`; raises `PreflightError` on the first problem.

    `address` is the `--address` given to the CLI (`RAY_ADDRESS` is read too): with a cluster address the
    resource checks are left to the connected cluster.
    """
    if command not in ("train", "tune"):
        raise ValueError(f"command must be 'train' or 'tune', got {command!r}")
    if command == "tune":
        check_space(cfg)
    t = cfg.train
    check_resources(
        command, workers=t.workers, use_gpu=t.use_gpu, cpus_per_worker=t.cpus_per_worker, address=address
    )
    check_storage(cfg.run.storage_path, cfg.run.name, command=command, resume=resume)
    check_data(cfg.data.dataset, cfg.data.root)
    if cfg.model.pretrained:
        report = check_weights(cfg.model.pretrained, cfg.model.variant)
        print(report.describe(cfg.model.pretrained, cfg.model.variant), flush=True)


# ----------------------------------------------------------------------------------------------- space


def check_space(cfg: Config) -> None:
    """`tune.space` parses, every bound is a valid value of its key, the initial points lie inside, and the
    confirmation seeds differ from the search's."""
    from raycontrast.space import check_confirm, initial_points, parse_space

    try:
        initial_points(cfg, parse_space(cfg))
        check_confirm(cfg)
    except ConfigError as exc:
        raise PreflightError(str(exc), exc.key) from None


# ------------------------------------------------------------------------------------------- resources


def _cluster_address(address: str | None) -> str | None:
    address = address or os.environ.get("RAY_ADDRESS") or None
    return None if address == "local" else address


def check_resources(
    command: Command,
    *,
    workers: int,
    use_gpu: bool,
    cpus_per_worker: float,
    address: str | None = None,
    num_gpus: int | None = None,
    num_cpus: int | None = None,
) -> None:
    """The GPUs and CPUs asked for fit this machine, when the run starts a local Ray instance (or none).

    `num_gpus` / `num_cpus` default to `torch.cuda.device_count()` / `os.cpu_count()`. With a cluster
    address (argument or `RAY_ADDRESS`) only the in-process mode (`train.workers=0`) is checked here.
    """
    from raycontrast.plan import InsufficientResourcesError, check_fit, require_workers

    in_process = command == "train" and workers == 0
    if use_gpu and num_gpus is None:
        import torch

        num_gpus = torch.cuda.device_count()
    try:
        if command == "tune":
            require_workers(workers)
        if in_process:
            if use_gpu and num_gpus < 1:
                raise PreflightError(
                    "train.use_gpu: train.use_gpu=true with train.workers=0 trains in this process on 1 GPU, "
                    "but this machine has 0 GPUs; set train.use_gpu=false",
                    "train.use_gpu",
                )
            return
        if _cluster_address(address):
            return  # the connected cluster's resources are checked after connecting
        check_fit(
            workers=workers, cpus_per_worker=cpus_per_worker, use_gpu=use_gpu, gpus=num_gpus or 0,
            cpus=num_cpus if num_cpus is not None else (os.cpu_count() or 1), where="this machine",
            unit="each trial" if command == "tune" else "the run",
        )  # fmt: skip
    except InsufficientResourcesError as exc:
        raise PreflightError(str(exc), exc.key) from None


# --------------------------------------------------------------------------------------------- storage


def probe_writable(path: str | Path, key: str) -> None:
    """`path` can be created as a folder and written to; a probe file is written and deleted.

    Writes for real rather than asking `os.access` (which says yes to root whatever the mode bits).
    Folders created only for the probe are removed again, so a failed run leaves nothing behind.
    """
    path = Path(path).expanduser().absolute()
    created: list[Path] = []
    try:
        missing, existing = [], path
        while not existing.exists() and existing != existing.parent:
            missing.append(existing)
            existing = existing.parent
        if not existing.is_dir():
            where = (
                f"{path} is a file" if existing == path else f"{path} cannot be made: {existing} is a file"
            )
            raise PreflightError(
                f"{key}: {where}, not a folder; choose a folder path (or move the file away)", key
            )
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        fd, probe = tempfile.mkstemp(prefix=".raycontrast-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PreflightError(
            f"{key}: cannot create or write {path} ({type(exc).__name__}: {exc.strerror or exc}); "
            "choose a writable folder or fix its permissions",
            key,
        ) from None
    finally:
        for d in reversed(created):
            with contextlib.suppress(OSError):  # someone else wrote into it meanwhile: theirs to keep
                d.rmdir()


def check_storage(storage_path: str, run_name: str, *, command: Command, resume: bool) -> None:
    """A local `run.storage_path` is writable, and `run.name` exists there exactly when resuming.

    URIs (`s3://...`) are left to Ray / pyarrow, which reach them with the run's credentials.
    """
    if is_uri(storage_path):
        return
    probe_writable(storage_path, "run.storage_path")
    noun = "experiment" if command == "tune" else "run"
    try:
        check_run_dir(open_storage(storage_path), run_name, resume=resume, noun=noun)
    except ConfigError as exc:
        raise PreflightError(str(exc), exc.key) from None


def job_working_dir() -> str | None:
    """The working_dir of the Ray job this process runs as (`ray job submit --working-dir`), else None."""
    try:
        return json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"])["runtime_env"].get("working_dir")
    except (KeyError, ValueError, TypeError, AttributeError):
        return None


def check_job_storage(storage_path: str) -> None:
    """Under `ray job submit --working-dir`, a relative `run.storage_path` would land in the job's private
    copy of the working dir, which the next job (a `--resume`) never sees: refused, with the reason."""
    if is_uri(storage_path) or os.path.isabs(os.path.expanduser(storage_path)) or job_working_dir() is None:
        return
    raise PreflightError(
        f"run.storage_path: '{storage_path}' is a relative path, and this runs as a Ray job inside a temporary "
        f"copy of its working dir ({os.getcwd()}), which a later job does not see: a --resume could not find "
        "the results. Give an absolute path that every node sees (an NFS mount) or s3://bucket/prefix, e.g. "
        "--set run.storage_path=/mnt/shared/raycontrast",
        "run.storage_path",
    )


# ------------------------------------------------------------------------------------------------ data


def check_data(
    dataset: str,
    root: str,
    *,
    full: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, int]:
    """Cityscapes: both splits exist, every image has its label, and the first pair of each split (every
    pair with `full=True`) decodes with known label ids and matching sizes. Canvases: the cache folder
    `root` is writable. Returns the number of image/label pairs per split (empty for canvases).
    """
    if dataset == "canvases":
        probe_writable(root, "data.root")
        return {}
    from raycontrast.data.cityscapes import CityscapesDataset

    counts: dict[str, int] = {}
    for split in ("train", "val"):
        try:
            ds = CityscapesDataset(root, split)
            n = len(ds) if full else 1
            for i in range(n):
                ds.load_raw(i)
                if progress is not None and (i + 1 == n or (i + 1) % 100 == 0):
                    progress(f"  {split}: {i + 1}/{len(ds)} image/label pairs decoded")
        except (OSError, ValueError) as exc:
            scope = "" if full else f" (preflight decodes the first pair of each split; {FULL_SCAN_HINT})"
            raise PreflightError(f"data.root: {exc}{scope}", "data.root") from None
        counts[split] = len(ds)
    return counts


# --------------------------------------------------------------------------------------------- weights


def check_weights(path: str, variant: str) -> LoadReport:
    """`model.pretrained` exists and loads into an HRNet `variant` backbone (keys and shapes); returns what
    it loaded and ignored.

    The backbone is built on the meta device: shapes only, so even W48 costs no real allocation; the
    checkpoint itself is read in full, which is what catches truncated files.
    """
    import torch

    from raycontrast.models.hrnet import HRNetBackbone
    from raycontrast.models.pretrained import load_pretrained

    with torch.device("meta"):
        backbone = HRNetBackbone(variant)  # type: ignore[arg-type]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # copying into meta tensors is a no-op, which is the point
            return load_pretrained(backbone, path)
    except (OSError, ValueError) as exc:
        todo = ""
        if isinstance(exc, FileNotFoundError):
            todo = "; or set model.pretrained=null to start from random weights"
        elif "backbone" in str(exc):  # missing keys / shape mismatch: usually the wrong variant
            todo = f" (model.variant={variant!r}: use a checkpoint of that variant, or change model.variant)"
        raise PreflightError(f"model.pretrained: {exc}{todo}", "model.pretrained") from None


# ----------------------------------------------------------------------------------- per node, once up


def probe_node(cfg_json: dict, fs: object, folder: str, driver_versions: dict[str, str | None]) -> list[str]:
    """What is wrong for a search on the node this runs on (empty: nothing): another raycontrast / torch
    / ray / Optuna than the driver's, data that does not load (imports, cache, a sample decoded), pretrained
    weights that do not load, storage that cannot be written."""
    import posixpath
    import uuid

    from raycontrast.experiment import versions
    from raycontrast.storage import write_atomic

    cfg, problems = Config.model_validate(cfg_json), []
    mine = versions()
    if mine != driver_versions:
        diff = ", ".join(
            f"{k} {mine.get(k)} (driver {v})" for k, v in driver_versions.items() if mine.get(k) != v
        )
        problems.append(f"versions differ from the driver's: {diff}")
    try:
        check_data(cfg.data.dataset, cfg.data.root)
        from raycontrast.data.loader import dataset_from_config  # imported here: the import itself may fail

        dataset_from_config(cfg.data, "val", train=False)[0]
    except Exception as exc:
        problems.append(f"data.root {cfg.data.root}: {type(exc).__name__}: {str(exc)[:300]}")
    if cfg.model.pretrained:
        try:
            check_weights(cfg.model.pretrained, cfg.model.variant)
        except Exception as exc:
            problems.append(f"model.pretrained: {str(exc)[:300]}")
    probe = posixpath.join(folder, f".probe-{uuid.uuid4().hex}")
    try:
        write_atomic(fs, probe, b"ok")  # type: ignore[arg-type]
        fs.delete_file(probe)  # type: ignore[attr-defined]
    except Exception as exc:
        problems.append(f"run.storage_path: cannot write {folder} ({type(exc).__name__}: {exc})")
    return problems


def check_nodes(cfg: Config, fs: object, folder: str, *, timeout_s: float = 300.0) -> list[str]:
    """Run `probe_node` once on every alive node before any trial starts. A failing node is named with
    its reasons: the search is refused (`tune.bad_nodes: refuse`), or the node is left out of every trial
    (`exclude`); returns the ids of the nodes to leave out."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raycontrast.experiment import versions

    nodes = {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}
    probe = ray.remote(num_cpus=0, max_retries=0)(probe_node)
    refs = {
        nid: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(nid, soft=False)).remote(
            cfg.model_dump(mode="json"), fs, folder, versions()
        )
        for nid in nodes
    }
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    bad: dict[str, list[str]] = {}
    for nid, ref in refs.items():
        if ref not in ready:
            ray.cancel(ref, force=True)
            bad[nid] = [f"the check did not answer within {timeout_s:g} s"]
            continue
        try:
            problems = ray.get(ref)
        except Exception as exc:  # the worker could not even run it (e.g. raycontrast not importable)
            problems = [f"the check failed to run: {type(exc).__name__}: {str(exc).splitlines()[-1][:300]}"]
        if problems:
            bad[nid] = problems
    lines = [
        f"node {nid[:12]} ({nodes[nid].get('NodeManagerAddress')}): {'; '.join(p)}" for nid, p in bad.items()
    ]
    if bad and cfg.tune.bad_nodes == "refuse":
        raise ConfigError(
            f"{len(bad)} of {len(nodes)} nodes cannot run this search:\n  "
            + "\n  ".join(lines)
            + "\nfix them, or set tune.bad_nodes=exclude to leave them out of every trial",
            "tune.bad_nodes",
        )
    for line in lines:
        print(f"left out: {line}", flush=True)
    return sorted(bad)
