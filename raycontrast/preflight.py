"""Checks that fail a run before Ray starts, for input that is known up front (no Ray import).

`check(cfg, command)` runs, cheapest first: the search space (tune), the resources this machine can give a
local Ray instance, the storage folder, the data (the first image/label pair of each split is decoded in
full) and the pretrained weights (loaded into a shape-only backbone). Each problem raises `PreflightError`
naming the config key or the file and saying what to do; the CLI prints it and exits 2. Nothing is left
behind: folders created only to probe writability are removed again.

What needs a live cluster (its resources, whether its nodes share `run.storage_path`) is checked after
connecting, by `raycontrast.train` / `raycontrast.tune`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from raycontrast.config import Config, ConfigError

__all__ = [
    "FULL_SCAN_HINT",
    "PreflightError",
    "check",
    "check_data",
    "check_resources",
    "check_space",
    "check_storage",
    "check_weights",
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
        check_weights(cfg.model.pretrained, cfg.model.variant)


# ----------------------------------------------------------------------------------------------- space


def check_space(cfg: Config) -> None:
    """`tune.space` parses, every bound is a valid value of its key, and the initial points lie inside."""
    from raycontrast.space import initial_points, parse_space

    try:
        initial_points(cfg, parse_space(cfg))
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
    if command == "tune" and workers < 1:
        raise PreflightError(
            "train.workers: a search runs each trial on Ray Train workers, got train.workers=0; "
            "set train.workers to 1 or more",
            "train.workers",
        )
    in_process = command == "train" and workers == 0
    if _cluster_address(address) and not in_process:
        return  # the connected cluster's resources are checked after connecting
    if use_gpu:
        if num_gpus is None:
            import torch

            num_gpus = torch.cuda.device_count()
        if in_process and num_gpus < 1:
            raise PreflightError(
                "train.use_gpu: train.use_gpu=true with train.workers=0 trains in this process on 1 GPU, "
                "but this machine has 0 GPUs; set train.use_gpu=false",
                "train.use_gpu",
            )
        if not in_process and workers > num_gpus:
            what = "each trial asks for" if command == "tune" else "asks for"
            raise PreflightError(
                f"train.use_gpu: {what} {workers} worker(s) x 1 GPU (train.workers={workers}, "
                f"train.use_gpu=true), but this machine has {num_gpus} GPU(s); set train.use_gpu=false, "
                + (f"lower train.workers to {num_gpus}, " if num_gpus else "")
                + "or pass --address of a cluster with GPUs",
                "train.use_gpu",
            )
    if not in_process:
        num_cpus = num_cpus if num_cpus is not None else (os.cpu_count() or 1)
        need = workers * cpus_per_worker
        if need > num_cpus + 1e-9:
            raise PreflightError(
                f"train.workers: train.workers={workers} x train.cpus_per_worker={cpus_per_worker:g} = "
                f"{need:g} CPUs, but this machine has {num_cpus}; lower train.workers or "
                "train.cpus_per_worker, or pass --address of a bigger cluster",
                "train.workers",
            )


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
    if "://" in storage_path:
        return
    probe_writable(storage_path, "run.storage_path")
    run_dir = Path(storage_path).expanduser().absolute() / run_name
    noun = "experiment" if command == "tune" else "run"
    if run_dir.exists() and not resume:
        raise PreflightError(
            f"run.name: {'an' if noun == 'experiment' else 'a'} {noun} named '{run_name}' already exists at "
            f"{run_dir}; pass --resume to continue it, or choose another run.name",
            "run.name",
        )
    if resume and not run_dir.exists():
        raise PreflightError(
            f"run.name: --resume: no {noun} named '{run_name}' under {storage_path}; "
            "start it without --resume, or set run.name / run.storage_path to the one to continue",
            "run.name",
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


def check_weights(path: str, variant: str) -> None:
    """`model.pretrained` exists and loads into an HRNet `variant` backbone (keys and shapes).

    The backbone is built on the meta device: shapes only, so even W48 costs no real allocation; the
    checkpoint itself is read in full, which is what catches truncated files.
    """
    import torch

    from raycontrast.models.hrnet import HRNetBackbone, load_pretrained

    with torch.device("meta"):
        backbone = HRNetBackbone(variant)  # type: ignore[arg-type]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # copying into meta tensors is a no-op, which is the point
            load_pretrained(backbone, path)
    except (OSError, ValueError) as exc:
        todo = ""
        if isinstance(exc, FileNotFoundError):
            todo = "; or set model.pretrained=null to start from random weights"
        elif "backbone" in str(exc):  # missing keys / shape mismatch: usually the wrong variant
            todo = f" (model.variant={variant!r}: use a checkpoint of that variant, or change model.variant)"
        raise PreflightError(f"model.pretrained: {exc}{todo}", "model.pretrained") from None
