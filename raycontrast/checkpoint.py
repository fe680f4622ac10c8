"""What a run needs to stop and continue exactly: checkpoint files on storage, RNG states, a resumable data
order, and the in-process session (no Ray; pyarrow filesystems, so local, NFS and S3 storage alike).

Checkpoint layout: `<run_path>/checkpoint_<name>/state.pt`, one `torch.save`d dict (tensors and plain
values only, so it loads with `weights_only=True`). `state.pt` is written under a temporary name and
renamed, so a killed writer leaves no partial `state.pt`; a checkpoint damaged anyway (a truncated copy,
a half-finished upload, a disk error) fails to load and `load_latest` falls back to the newest complete one.
Directory names sort by age: Ray Train names them by timestamp, the local session by zero-padded iteration.

Determinism of the data order: `ShardSampler` shards like `DistributedSampler(shuffle=True, drop_last=True)`
(a function of seed and epoch) and can skip the batches already trained on; `SeededItems` seeds each
sample's augmentation from (seed, epoch, index). With the RNG states saved here, a run resumed at iteration
k replays iterations k+1.. exactly as an uninterrupted run.
"""

from __future__ import annotations

import io
import math
import os
import posixpath
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
from torch.utils.data import Dataset, DistributedSampler

from raycontrast.results import write_bytes_atomic

__all__ = [
    "STATE_FILE",
    "Loaded",
    "LocalSession",
    "SeededItems",
    "ShardSampler",
    "capture_rng_state",
    "filesystem_for",
    "list_checkpoints",
    "load_latest",
    "load_state",
    "restore_rng_state",
    "save_state",
    "state_bytes",
    "step_seed",
    "storage_location",
]

STATE_FILE = "state.pt"
# Keys every checkpoint written by the training loop carries; a dict without them is not one of ours.
_REQUIRED = ("model", "optimizer", "scheduler", "iteration", "rng")


# ------------------------------------------------------------------------------------- determinism


def step_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (e.g. seed, rank, iteration) with NumPy's SeedSequence."""
    a, b = np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(a) << 31) ^ int(b)


class ShardSampler(DistributedSampler):
    """`DistributedSampler(shuffle=True, drop_last=True)` that yields `(epoch, index)` and can skip.

    The order depends only on (seed, epoch); `skip` drops that many leading samples of this rank's shard
    (batches already trained on before a resume). The epoch travels with the index so that
    `SeededItems` can seed each sample's augmentation, also inside DataLoader worker processes.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.skip = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.skip :]
        return iter([(self.epoch, i) for i in indices])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)


class SeededItems(Dataset):
    """Wraps a dataset whose transforms draw from torch's global RNG: item `(epoch, i)` is drawn with that
    RNG seeded from (seed, epoch, i), so augmentations do not depend on rank, loader workers or resumes."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(step_seed(self.seed, epoch, index))
            return self.dataset[index]


def capture_rng_state() -> dict[str, Any]:
    """Global RNG states (torch, CUDA, NumPy, Python) as tensors and plain numbers (weights_only-loadable)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 - saving the legacy global state
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }


def restore_rng_state(s: Mapping[str, Any]) -> None:
    """Inverse of `capture_rng_state` (CUDA states only when the device count matches)."""
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["gauss"]))  # noqa: NPY002
    p = s["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))


# ------------------------------------------------------------------------------------------ storage


def storage_location(
    storage_path: str, *, s3_endpoint: str | None = None, s3_scheme: str = "https"
) -> tuple[str, pafs.FileSystem | None]:
    """`(storage path for Ray, pyarrow filesystem or None)`.

    `s3://bucket/prefix` -> `("bucket/prefix", S3FileSystem(endpoint_override=s3_endpoint, scheme=s3_scheme))`
    (credentials from the usual AWS environment variables); other URIs pass through for Ray to resolve; a
    local path becomes absolute (Ray workers do not share the driver's cwd).
    """
    if storage_path.startswith("s3://"):
        kwargs = {"endpoint_override": s3_endpoint} if s3_endpoint else {}
        return storage_path[len("s3://") :].rstrip("/"), pafs.S3FileSystem(scheme=s3_scheme, **kwargs)
    if "://" in storage_path:
        return storage_path.rstrip("/"), None
    return os.path.abspath(os.path.expanduser(storage_path)), None


def filesystem_for(storage: str, fs: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    """`(filesystem, path on it)` for a `resolve_storage` result."""
    if fs is not None:
        return fs, storage
    if "://" in storage:
        return pafs.FileSystem.from_uri(storage)
    return pafs.LocalFileSystem(), storage


# ---------------------------------------------------------------------------------- checkpoint files


def state_bytes(state: Mapping[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    return buf.getvalue()


def save_state(fs: pafs.FileSystem, ckpt_dir: str, state: Mapping[str, Any]) -> str:
    """Write `state` to `<ckpt_dir>/state.pt` atomically (temp name + rename; one upload on object
    stores); creates `ckpt_dir`. Returns the file's path."""
    path = posixpath.join(ckpt_dir, STATE_FILE)
    fs.create_dir(ckpt_dir, recursive=True)
    write_bytes_atomic(fs, path, state_bytes(state))
    return path


def load_state(fs: pafs.FileSystem, ckpt_dir: str) -> dict[str, Any]:
    """`<ckpt_dir>/state.pt` as a dict (on CPU). Raises `ValueError` naming the file when it is missing,
    truncated, corrupt, or not a training checkpoint."""
    path = posixpath.join(ckpt_dir, STATE_FILE)
    try:
        with fs.open_input_file(path) as f:
            data = f.read()
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise ValueError(f"checkpoint {path} is missing ({e})") from e
    except Exception as e:  # torch reports truncation and bad bytes as RuntimeError, EOFError, pickle errors
        raise ValueError(f"checkpoint {path} is incomplete or corrupt ({type(e).__name__}: {e})") from e
    missing = [k for k in _REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"checkpoint {path} is incomplete or corrupt (no {', '.join(missing)})")
    return state


def list_checkpoints(fs: pafs.FileSystem, run_path: str) -> list[str]:
    """`checkpoint_*` directories directly under `run_path`, oldest first (by name, see module doc)."""
    infos = fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    return sorted(
        i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
    )


@dataclass
class Loaded:
    """A loaded checkpoint: its state and directory, and the newer ones skipped as `(dir, reason)`."""

    state: dict[str, Any] | None
    path: str | None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def describe(self) -> str | None:
        """One line per skipped checkpoint saying which one is used instead (None if none was skipped)."""
        if not self.skipped:
            return None
        instead = f"resuming from {self.path} instead" if self.path else "starting from scratch instead"
        return "\n".join(f"{reason}; {instead}" for _, reason in self.skipped)


def load_latest(fs: pafs.FileSystem, run_path: str, preferred: str | None = None) -> Loaded:
    """The newest complete checkpoint of the run at `run_path`.

    `preferred` (e.g. the checkpoint Ray Train registered last) is tried first; then every `checkpoint_*`
    directory, newest first. Unreadable ones are skipped and listed in `Loaded.skipped`. `Loaded.state` is
    None when there is no complete checkpoint at all.
    """
    candidates = list(reversed(list_checkpoints(fs, run_path)))
    if preferred is not None:
        preferred = preferred.rstrip("/")
        candidates = [preferred] + [c for c in candidates if c.rstrip("/") != preferred]
    out = Loaded(None, None)
    for ckpt in candidates:
        try:
            out.state, out.path = load_state(fs, ckpt), ckpt
            return out
        except ValueError as e:
            out.skipped.append((ckpt, str(e)))
    return out


# ---------------------------------------------------------------------------------- local session


class LocalSession:
    """`train.workers: 0`: the loop's one in-process rank, without Ray.

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
        self.last_metrics: dict[str, Any] | None = None

    def checkpoints(self) -> list[str]:
        return list_checkpoints(self.fs, self.run_path)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def load_checkpoint(self) -> dict[str, Any] | None:
        loaded = load_latest(self.fs, self.run_path)
        if (msg := loaded.describe()) is not None:
            self.log(msg)
        return loaded.state

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        self.last_metrics = metrics
        if state is None:
            return
        path = f"{self.run_path}/checkpoint_{metrics['iteration']:08d}"
        save_state(self.fs, path, state)
        score = metrics["val_miou"]
        self.scores[path] = -math.inf if math.isnan(score) else score
        latest = self.checkpoints()[-1]
        ranked = sorted(self.scores, key=lambda p: self.scores[p], reverse=True)
        for old in ranked[self.num_to_keep :]:
            if old != latest:
                self.fs.delete_dir(old)
                del self.scores[old]
