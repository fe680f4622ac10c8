"""What a run saves to continue exactly, and how it finds the checkpoint to continue from (no Ray).

`TrainState` is the checkpointed record: its fields are the keys of the file, named here once. A
checkpoint is `<run_path>/checkpoint_<name>/state.pt`, one `torch.save`d dict of tensors and plain values
(it loads with `weights_only=True`), streamed straight to storage under a temporary name and renamed
(`storage.write_atomic`), and read back without a whole-file copy (memory-mapped on local disks, streamed
from object stores). Directory names sort by age: they start with the zero-padded iteration (`checkpoint_<iteration>` in
local runs, `checkpoint_<iteration>_<UTC time>` under Ray Train), so the newest one never depends on clocks.

Reading tells two failures apart. A file that is missing, cut short or not one of ours is *damaged*
(`DamagedCheckpointError`): `load_latest` skips it and falls back to the next older one. An I/O error of the
storage (an S3 503, an NFS EIO) is *transient*: it is retried with backoff and, if it persists, raised as
`CheckpointReadError` naming the file, never mistaken for damage (which would silently lose work).
"""

from __future__ import annotations

import io
import math
import posixpath
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch

from raycontrast.storage import write_atomic

__all__ = [
    "STATE_FILE",
    "CheckpointReadError",
    "DamagedCheckpointError",
    "Loaded",
    "TrainState",
    "best_checkpoint",
    "checkpoint_iteration",
    "capture_rng_state",
    "list_checkpoints",
    "load_latest",
    "load_state",
    "restore_rng_state",
    "retain_checkpoints",
    "save_state",
]

STATE_FILE = "state.pt"
READ_ATTEMPTS = 5  # transient read errors: tries before giving up ...
READ_BACKOFF_S = 0.5  # ... waiting 0.5, 1, 2, 4 s in between (7.5 s in all)


@dataclass
class TrainState:
    """Everything the training loop needs to continue a run exactly, as saved at an evaluation.

    model / optimizer / scheduler / scaler: their `state_dict()`s; memory: `PixelMemory.state_dict()`;
    rng: `capture_rng_state()`; iteration: steps done; config: the run's config (JSON form);
    elapsed_s / worker_seconds: the run's clock and cost so far; best_val_miou / best_iteration: the best
    evaluation so far; metrics: the last report (repeated when a finished run is resumed); window: the
    statistics of the evaluation window it was written in, when not at an evaluation (`WindowMeter.state`).
    """

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    iteration: int
    rng: dict[str, Any]
    scaler: dict[str, Any] | None = None
    memory: dict[str, torch.Tensor] | None = None
    config: dict[str, Any] | None = None
    elapsed_s: float = 0.0
    worker_seconds: float = 0.0
    best_val_miou: float = -math.inf
    best_iteration: int = 0
    metrics: dict[str, Any] | None = None
    window: dict[str, Any] | None = None  # the unfinished window's statistics (between evaluations)

    def to_checkpoint(self) -> dict[str, Any]:
        """The dict that goes into `state.pt` (values as they are: no copies)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_checkpoint(cls, state: Mapping[str, Any]) -> TrainState:
        """Inverse of `to_checkpoint`; keys of other versions are ignored, missing optional ones defaulted."""
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})


# Keys every checkpoint of the training loop carries; a dict without them is not one of ours.
REQUIRED = tuple(f.name for f in fields(TrainState) if f.default is MISSING)


class DamagedCheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or not a training checkpoint (message names it)."""


class CheckpointReadError(OSError):
    """Storage kept failing while reading a checkpoint (transient errors retried; message names the file)."""


# ------------------------------------------------------------------------------------------- RNG states


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


# ------------------------------------------------------------------------------------ checkpoint files


def save_state(fs: pafs.FileSystem, ckpt_dir: str, state: Mapping[str, Any]) -> str:
    """Stream `state` to `<ckpt_dir>/state.pt` atomically (no serialised copy in host RAM); creates
    `ckpt_dir`. Returns the file's path."""
    path = posixpath.join(ckpt_dir, STATE_FILE)
    fs.create_dir(ckpt_dir, recursive=True)
    write_atomic(fs, path, lambda f: torch.save(dict(state), f))
    return path


def _decode(fs: pafs.FileSystem, path: str) -> Any:
    if fs.type_name == "local":  # memory-mapped: tensors page in from the file (shared by a node's ranks)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    with fs.open_input_file(path) as f:  # random access: the zip reader fetches records as it needs them
        return torch.load(f, map_location="cpu", weights_only=True)


def _damaged(path: str, e: BaseException) -> DamagedCheckpointError:
    return DamagedCheckpointError(
        f"checkpoint {path} is incomplete or corrupt ({type(e).__name__}: {str(e)[:200]})"
    )


def load_state(
    fs: pafs.FileSystem, ckpt_dir: str, *, sleep: Callable[[float], None] = time.sleep
) -> dict[str, Any]:
    """`<ckpt_dir>/state.pt` as a dict (tensors on CPU).

    Raises `DamagedCheckpointError` when it is missing, truncated, corrupt or not a training checkpoint,
    and `CheckpointReadError` when the storage still fails after `READ_ATTEMPTS` tries. torch's reader
    reports some cut-short files as OSError too, so an OSError is settled by reading the raw bytes: if the
    storage delivers them, the bytes are to blame; if not, the storage is, and the read is retried.
    """
    path = posixpath.join(ckpt_dir, STATE_FILE)
    for attempt in range(READ_ATTEMPTS):
        try:
            state = _decode(fs, path)
            break
        except FileNotFoundError as e:
            raise DamagedCheckpointError(f"checkpoint {path} is missing ({e})") from e
        except OSError:
            try:
                with fs.open_input_stream(path) as f:
                    data = f.read()
            except FileNotFoundError as e:
                raise DamagedCheckpointError(f"checkpoint {path} is missing ({e})") from e
            except OSError as e:  # the storage, not the bytes: try again
                if attempt + 1 == READ_ATTEMPTS:
                    raise CheckpointReadError(
                        f"checkpoint {path} could not be read after {READ_ATTEMPTS} attempts "
                        f"({type(e).__name__}: {e}); check the storage and resume again"
                    ) from e
                sleep(READ_BACKOFF_S * 2**attempt)
                continue
            try:
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
                break
            except Exception as e:
                raise _damaged(path, e) from e
        except Exception as e:  # torch reports truncation and bad bytes as RuntimeError, pickle errors
            raise _damaged(path, e) from e
    missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise DamagedCheckpointError(f"checkpoint {path} is incomplete or corrupt (no {', '.join(missing)})")
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


def load_latest(fs: pafs.FileSystem, run_path: str, **load_kwargs: Any) -> Loaded:
    """The newest complete checkpoint of the run at `run_path`: every `checkpoint_*` directory, newest
    first. Damaged ones are skipped and listed in `Loaded.skipped`; `Loaded.state` is None when none is
    complete. A persistent storage error is raised (`CheckpointReadError`), never skipped."""
    out = Loaded(None, None)
    for ckpt in reversed(list_checkpoints(fs, run_path)):
        try:
            out.state, out.path = load_state(fs, ckpt, **load_kwargs), ckpt
            return out
        except DamagedCheckpointError as e:
            out.skipped.append((ckpt, str(e)))
    return out


def checkpoint_iteration(path: str) -> int:
    """The iteration a checkpoint directory's name starts with (`checkpoint_<iteration>[_...]`), else -1."""
    part = posixpath.basename(path.rstrip("/")).split("_")
    return int(part[1]) if len(part) > 1 and part[0] == "checkpoint" and part[1].isdigit() else -1


def best_checkpoint(paths: list[str], scores: Mapping[int, float]) -> str | None:
    """Of checkpoint directories, the one whose iteration scored the highest val mIoU in `scores`
    (iteration -> val mIoU; NaN and unscored ones never win); ties go to the earliest iteration."""
    scored = [
        (scores[i], -i, p)
        for p in paths
        if (i := checkpoint_iteration(p)) in scores and scores[i] == scores[i]
    ]
    return max(scored)[2] if scored else None


def retain_checkpoints(
    fs: pafs.FileSystem, run_path: str, scores: Mapping[int, float], keep: str
) -> str | None:
    """At the end of a run: keep `"all"` its checkpoints, only the `"best"` one (`best_checkpoint`), or
    `"none"`. Returns the kept best checkpoint (None when none is kept)."""
    found = list_checkpoints(fs, run_path)
    best = best_checkpoint(found, scores) if keep != "none" else None
    if keep != "all":
        for path in found:
            if path != best:
                fs.delete_dir(path)
    return best
