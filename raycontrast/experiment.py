"""What a run or search was started with, stored beside it, and what a `--resume` may change (no Ray).

At the first start, `<folder>/experiment.json` records the full config and the versions of raycontrast,
Ray, torch and Optuna. `--resume` compares the config it is given with that record:
- keys that cannot change results (`FREE_KEYS`: concurrency, logging, retries, storage access) may change
  and are applied;
- `ACCEPTABLE` keys may change only when named with `--accept KEY`, and only in the way that is safe
  (raising `tune.num_samples` extends a search, even a finished one; raising `tune.confirm.top_k` or adding
  `tune.confirm.seeds` runs the new confirmation trials; a moved data or weights path must hold the same
  files);
- any other difference is refused, listing each key with its old and new value.
Other package versions are refused at once, with what to install: Ray Train refuses the checkpoint state
of another Ray version, which would otherwise fail every resumed trial one by one.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pyarrow.fs as pafs

from raycontrast.config import Config, ConfigError, flatten
from raycontrast.storage import exists, write_atomic

__all__ = [
    "ACCEPTABLE",
    "EXPERIMENT_FILE",
    "FREE_KEYS",
    "ExperimentRecord",
    "SearchStateError",
    "check_resume",
    "record_start",
    "versions",
]

EXPERIMENT_FILE = "experiment.json"
PACKAGES = ("raycontrast", "ray", "torch", "optuna")
# May change on --resume: how the work is spread and watched, never what is computed.
FREE_KEYS = frozenset(
    {
        "run.lease_timeout_s", "run.s3_endpoint", "run.s3_scheme", "run.storage_path",
        "train.log_interval", "train.max_failures", "data.loader_workers",
        "tune.max_concurrent_trials", "tune.max_failures", "tune.wait_for_resources_s", "tune.bad_nodes",
        "train.placement", "train.preemption_poll_interval", "tune.share_warmup", "tune.keep_checkpoints",
    }
)  # fmt: skip


class SearchStateError(RuntimeError):
    """A resumed search whose saved state could not be restored; the message says what to do."""


def _more_samples(old: Any, new: Any) -> bool:
    return isinstance(old, int) and isinstance(new, int) and new >= old


def _anything(old: Any, new: Any) -> bool:
    return True


def _more_seeds(old: Any, new: Any) -> bool:
    seq = (list, tuple)
    return isinstance(old, seq) and isinstance(new, seq) and list(new[: len(old)]) == list(old)


# May change on --resume when named with --accept: key -> (rule on (old, new), what the rule means).
ACCEPTABLE: dict[str, tuple[Callable[[Any, Any], bool], str]] = {
    "tune.num_samples": (_more_samples, "may only grow: more trials extend the search"),
    "tune.confirm.top_k": (_more_samples, "may only grow: more of the best configs run again with each seed"),
    "tune.confirm.seeds": (
        _more_seeds,
        "may only gain seeds, after the old ones: the best configs run again",
    ),
    "data.root": (_anything, "the new folder must hold the same data"),
    "model.pretrained": (_anything, "the new path must hold the same weights file"),
}


def versions() -> dict[str, str | None]:
    """Installed versions of the packages whose state a resume depends on (None: not installed)."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@dataclass(frozen=True)
class ExperimentRecord:
    config: dict[str, Any]  # Config.model_dump(mode="json")
    versions: dict[str, str | None]

    @staticmethod
    def path(fs: pafs.FileSystem, folder: str) -> str:
        return posixpath.join(folder, EXPERIMENT_FILE)

    def write(self, fs: pafs.FileSystem, folder: str) -> None:
        data = json.dumps({"config": self.config, "versions": self.versions}, indent=1, sort_keys=True)
        write_atomic(fs, self.path(fs, folder), data.encode())

    @classmethod
    def read(cls, fs: pafs.FileSystem, folder: str) -> ExperimentRecord | None:
        """The record in `folder`, or None (started by a version that wrote none)."""
        path = cls.path(fs, folder)
        if not exists(fs, path):
            return None
        with fs.open_input_stream(path) as f:
            data = json.loads(f.read())
        return cls(data["config"], data["versions"])


def _check_versions(saved: dict[str, str | None], what: str) -> None:
    now = versions()
    changed = {k: (saved.get(k), now.get(k)) for k in PACKAGES if saved.get(k) != now.get(k)}
    if not changed:
        return
    listed = ", ".join(f"{k} {old} (now {new})" for k, (old, new) in changed.items())
    pins = " ".join(f"{k}=={old}" for k, (old, _) in changed.items() if old and k != "raycontrast")
    todo = f"install those versions (pip install {pins}) to resume it" if pins else "install that version"
    raise ConfigError(f"run.name: {what} was started with {listed}; {todo}, or start a new run.name")


def check_resume(
    record: ExperimentRecord, cfg: Config, *, accept: Iterable[str] = (), what: str = "the experiment"
) -> list[str]:
    """Refuse a resume under other package versions or with a config that would change results.

    Returns one line per change that is applied (free or accepted); raises `ConfigError` listing every
    refused key with its old and new value.
    """
    _check_versions(record.versions, what)
    old = flatten(Config.model_validate(record.config))
    new = flatten(cfg)
    accept = set(accept)
    unknown = accept - set(ACCEPTABLE)
    if unknown:
        raise ConfigError(
            f"--accept {', '.join(sorted(unknown))}: only {', '.join(ACCEPTABLE)} can be accepted on --resume"
        )
    applied, refused = [], []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        change = f"{key}: {before!r} -> {after!r}"
        free = key in FREE_KEYS or (key == "data.root" and cfg.data.dataset == "canvases")  # a cache
        if free:
            applied.append(change)
        elif key in accept and ACCEPTABLE[key][0](before, after):
            applied.append(f"{change} (accepted; {ACCEPTABLE[key][1]})")
        else:
            hint = f" (--accept {key}: {ACCEPTABLE[key][1]})" if key in ACCEPTABLE else ""
            refused.append(change + hint)
    if refused:
        raise ConfigError(
            f"run.name: --resume with a config that changes results; {what} was started with other values:\n  "
            + "\n  ".join(refused)
            + "\nresume with the original values, or start a new run.name",
            "run.name",
        )
    return applied


def record_start(
    fs: pafs.FileSystem,
    folder: str,
    cfg: Config,
    *,
    resume: bool,
    accept: Iterable[str] = (),
    what: str = "the experiment",
    log: Callable[[str], None] = print,
) -> None:
    """On `--resume`, refuse other package versions and changes that change results (`check_resume`);
    then record the config and versions this start runs with in `folder`."""
    if resume:
        record = ExperimentRecord.read(fs, folder)
        if record is None:
            log(f"{what}: no record of its config (an older version started it); resuming unchecked")
        else:
            for line in check_resume(record, cfg, accept=accept, what=what):
                log(f"resume: {line}")
    ExperimentRecord(cfg.model_dump(mode="json"), versions()).write(fs, folder)
