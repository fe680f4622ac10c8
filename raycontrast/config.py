"""Typed, frozen configuration for a raycontrast run, and loading it from YAML with dotted overrides.

One tree (`Config`) describes a whole run: data, model, loss, memory, optimiser, training, search and storage.
Every default lives here with a comment naming its source. `load_config(path, overrides)` is the only way a
config is built from files, the CLI's `--set key=value` and Tune trials, so the same dotted key
(`loss.temperature`) means the same thing everywhere and names the same result column.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raycontrast.data.info import dataset_info

__all__ = [
    "Config",
    "ConfigError",
    "apply_overrides",
    "check_key",
    "flatten",
    "known_keys",
    "load_config",
    "parse_overrides",
    "to_yaml",
]

MIN_TEMPERATURE = 0.026  # 1/39: see LossSection._float32_safe
# Keys of earlier versions, with what to do instead (a plain "unknown key" would leave the user guessing).
REMOVED_KEYS = {
    "loss.ignore_index": "the ignore label is a fact of the dataset (255 for canvases and cityscapes, "
    "raycontrast.data.info), not a loss setting; delete the key",
}


class ConfigError(ValueError):
    """A config value or key is wrong. `key` is the dotted key, when one is to blame."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RunSection(_Section):
    name: str = Field("raycontrast", min_length=1)  # experiment folder under storage_path
    storage_path: str = (
        "results"  # local dir, NFS mount or s3://bucket/prefix; relative paths are made absolute
    )
    s3_endpoint: str | None = None  # host:port of an S3-compatible store (MinIO, Ceph); None = AWS
    s3_scheme: Literal["http", "https"] = "https"  # plain http only for loopback / private test stores
    seed: int = 0  # seeds data order, sampling and Optuna
    # A driver's lease on its run / experiment is taken over after this long without a heartbeat (written
    # every quarter of it); longer than a storage outage the driver should survive, and than clock skew.
    lease_timeout_s: float = Field(120.0, gt=0)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if "/" in v or v in {".", ".."}:
            raise ValueError("must be a plain folder name (no '/')")
        return v


class CanvasSection(_Section):
    train_images: int = Field(512, ge=1)  # demo data size: generated in seconds (DESIGN.md)
    val_images: int = Field(128, ge=1)
    height: int = Field(128, ge=32)
    width: int = Field(256, ge=32)
    seed: int = 0
    digit_size: tuple[int, int] = (32, 42)  # (min, max) side in pixels of a pasted digit box

    @field_validator("digit_size")
    @classmethod
    def _digit_range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 10 <= v[0] <= v[1]:
            raise ValueError("must be [min, max] with 10 <= min <= max")
        return v


class DataSection(_Section):
    dataset: Literal["canvases", "cityscapes"] = "cityscapes"  # the paper's benchmark
    root: str = "data/cityscapes"  # Cityscapes root (leftImg8bit/, gtFine/) or the demo-data cache dir
    crop_size: tuple[int, int] = (512, 1024)  # ALGORITHM.md s6: crop 512x1024
    scale_range: tuple[float, float] = (0.5, 2.0)  # ALGORITHM.md s6: random scale 0.5-2.0
    hflip: bool = True  # random horizontal flip; off for glyphs (a mirrored digit is another shape)
    loader_workers: int = Field(2, ge=0)  # DataLoader processes per training worker
    canvases: CanvasSection = CanvasSection()

    @field_validator("crop_size")
    @classmethod
    def _positive_crop(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 8:
            raise ValueError("both sides must be >= 8 pixels")
        return v

    @field_validator("scale_range")
    @classmethod
    def _ordered_scales(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError("must be [low, high] with 0 < low <= high")
        return v

    @property
    def num_classes(self) -> int:
        return dataset_info(self.dataset).num_classes


class ModelSection(_Section):
    variant: Literal["w18_small", "w18_small_v2", "w18", "w48"] = "w48"  # ALGORITHM.md s6: HRNet-W48 recipe
    proj_dim: int = Field(256, ge=1)  # ALGORITHM.md s6: projection dim 256
    pretrained: str | None = None  # local ImageNet HRNet checkpoint (.pth/.safetensors); never downloaded
    sync_bn: bool = True  # ALGORITHM.md s5: SyncBN under DDP on GPUs (ignored on CPU)
    channels_last: bool = False  # memory format for convs; faster on recent GPUs with AMP
    # Projection head only at the pixels the loss samples, BatchNorm statistics exact (models.projection);
    # false: the head on every pixel, as the reference code does (same results to float rounding).
    sparse_proj: bool = True


class LossSection(_Section):
    temperature: float = Field(0.1, gt=0)  # ALGORITHM.md s6: t = 0.1 (official README best)
    base_temperature: float = Field(0.07, gt=0)  # ALGORITHM.md s6: bt = 0.07
    max_samples: int = Field(1024, ge=1)  # ALGORITHM.md s6: 1024 anchors per process
    max_views: int = Field(100, ge=1)  # ALGORITHM.md s6: 100 views per class
    weight: float = Field(0.1, ge=0)  # ALGORITHM.md s6: loss_weight 0.1
    warmup_iters: int = Field(5000, ge=0)  # ALGORITHM.md s6: official hard switch at 5000 of 40k
    class_weights: tuple[float, ...] | None = None  # optional CE class weights, one per class

    @field_validator("temperature")
    @classmethod
    def _float32_safe(cls, v: float) -> float:
        # The contrast term runs in float32 without a max-shift: exp(+-1/t) over unit features must stay in
        # range (raycontrast.loss checks |s| <= 39), so t >= 1/39.
        if v < MIN_TEMPERATURE:
            raise ValueError(f"must be >= {MIN_TEMPERATURE} (float32 range of exp(1/t) for unit features)")
        return v

    @field_validator("class_weights")
    @classmethod
    def _nonneg_weights(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is not None and (not v or any(w < 0 or not math.isfinite(w) for w in v)):
            raise ValueError("must be a non-empty list of finite weights >= 0")
        return v


class MemorySection(_Section):
    size: int = Field(0, ge=0)  # slots per class per queue; 0 = off (ALGORITHM.md s6: 5000 when enabled)
    pixel_update_freq: int = Field(10, ge=1)  # ALGORITHM.md s4: 10 pixels per class per image


class OptimSection(_Section):
    name: Literal["sgd", "adamw"] = "sgd"  # ALGORITHM.md s6: SGD; AdamW for short from-scratch runs (demo)
    lr: float = Field(0.01, gt=0)  # ALGORITHM.md s6: SGD lr 0.01
    momentum: float = Field(0.9, ge=0, lt=1)  # ALGORITHM.md s6
    weight_decay: float = Field(5e-4, ge=0)  # ALGORITHM.md s6 (official; mmseg uses 2e-4)
    poly_power: float = Field(0.9, ge=0)  # ALGORITHM.md s6: poly decay power 0.9
    min_lr: float = Field(0.0, ge=0)  # floor of the poly schedule
    grad_clip: float | None = Field(None, gt=0)  # max global grad norm; None = no clipping


class TrainSection(_Section):
    iterations: int = Field(40_000, ge=1)  # ALGORITHM.md s6: 40k iterations
    batch_size: int = Field(2, ge=1)  # per worker; ALGORITHM.md s6: 4 GPUs x 2 images
    workers: int = Field(4, ge=0)  # Ray Train workers; 0 = in-process local mode (no Ray actors)
    use_gpu: bool = False  # one GPU per worker when true
    cpus_per_worker: float = Field(1.0, gt=0)  # CPU reservation of each Train worker
    amp: bool = False  # mixed precision (contrast term stays float32)
    eval_interval: int = Field(4000, ge=1)  # iterations between evaluations == Ray reports
    log_interval: int = Field(50, ge=1)  # iterations between progress lines
    checkpoint_interval: int = Field(4000, ge=1)  # iterations between checkpoints (rank 0)
    eval_mode: Literal["whole", "slide"] = "whole"  # ALGORITHM.md s6: single-scale whole image
    max_failures: int = Field(1, ge=-1)  # worker-group restarts (-1 = unlimited)
    num_to_keep: int = Field(2, ge=1)  # checkpoints kept, best by val mIoU
    max_nonfinite_steps: int = Field(3, ge=1)  # consecutive non-finite losses before the run fails
    threads_per_worker: int | None = Field(None, ge=1)  # torch intra-op threads; None = cpus_per_worker
    # Where a run's workers go: auto = on one node when they fit there (strict_pack), else on as few as fit
    # (pack): DDP's gradient all-reduce and SyncBN's collectives stay off the network. spread: one per node.
    placement: Literal["auto", "pack", "strict_pack", "spread"] = "auto"
    # Steps between polls for a preemption notice (a collective; 0 = never): on a notice, a checkpoint is
    # written at once, so a reclaim loses at most this many steps.
    preemption_poll_interval: int = Field(10, ge=0)


class SearcherSection(_Section):
    """Optuna's TPE sampler, which suggests every trial past the published points."""

    # Trials TPE samples at random before it models the results, the published points among them (Optuna
    # counts them). None: a quarter of tune.num_samples, at least 2 past the published points, at most 10
    # (Optuna's own default, 10, would leave a 16-trial search mostly random). See `space.startup_trials`.
    n_startup_trials: int | None = Field(None, ge=0)
    seed: int | None = None  # None: run.seed
    multivariate: bool = True  # model the searched keys jointly (Optuna's default for one objective)


class ConfirmSection(_Section):
    """After the search: the `top_k` configs (by best val mIoU) run again with each of `seeds` as run.seed,
    as trials of the same experiment, to the full budget; the report ranks configs by the mean over seeds."""

    top_k: int = Field(0, ge=0)  # 0: off
    seeds: tuple[int, ...] = ()  # run.seed of each extra run; the search's own trials used run.seed


class TuneSection(_Section):
    # Default space: the three knobs the paper studies (temperature, memory size, loss weight).
    space: dict[str, Any] = {
        "loss.temperature": {"loguniform": [0.03, 0.5]},
        "memory.size": {"choice": [0, 1000, 2500, 5000]},
        "loss.weight": {"loguniform": [0.01, 1.0]},
    }
    num_samples: int = Field(16, ge=1)  # trials in the search
    searcher: SearcherSection = SearcherSection()
    confirm: ConfirmSection = ConfirmSection()
    scheduler: Literal["asha", "fifo"] = "asha"  # ASHA early stopping on training iterations
    grace_period: int = Field(1, ge=1)  # evaluations before ASHA may stop a trial
    reduction_factor: float = Field(2.0, gt=1)  # ASHA halving rate
    max_concurrent_trials: int | None = Field(None, ge=1)  # None = derived from the cluster's resources
    max_failures: int = Field(1, ge=0)  # trial restarts on failure
    # auto: when every searched key leaves the warm-up unchanged (raycontrast.trunk), train the first
    # loss.warmup_iters iterations once and fork every trial from them (exact); off: every trial trains them.
    share_warmup: Literal["auto", "off"] = "auto"
    # When a trial ends: keep its best checkpoint (by val mIoU), all of them, or none (W48: 0.5-0.7 GB each).
    keep_checkpoints: Literal["best", "all", "none"] = "best"
    # A node that fails the per-node checks (data, weights, storage, versions): refuse to start, or leave
    # it out of every trial.
    bad_nodes: Literal["refuse", "exclude"] = "refuse"
    # An autoscaling cluster may not hold one trial yet: wait this long for it (resources are requested
    # from the autoscaler), 0 = refuse at once.
    wait_for_resources_s: float = Field(0.0, ge=0)
    # Published settings, tried first (ALGORITHM.md s6/s7): in-batch t 0.1 / w 0.1, memory t 0.07 / w 1.0 / 5000.
    points_to_evaluate: tuple[dict[str, Any], ...] = (
        {"loss.temperature": 0.1, "loss.weight": 0.1, "memory.size": 0},
        {"loss.temperature": 0.07, "loss.weight": 1.0, "memory.size": 5000},
    )

    @field_validator("share_warmup", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `off` (in a file or in `--set tune.share_warmup=off`) as the boolean false.
        return "off" if v is False else v

    @field_validator("space")
    @classmethod
    def _nonempty(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not v:
            raise ValueError("the search space is empty: declare at least one key, e.g. 'loss.temperature'")
        return v


class Config(_Section):
    run: RunSection = RunSection()
    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    loss: LossSection = LossSection()
    memory: MemorySection = MemorySection()
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    tune: TuneSection = TuneSection()

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        k = self.data.num_classes
        cw = self.loss.class_weights
        if cw is not None and len(cw) != k:
            raise ValueError(
                f"loss.class_weights: needs {k} weights for dataset '{self.data.dataset}', got {len(cw)}"
            )
        c = self.tune.confirm
        if c.top_k and not c.seeds:
            raise ValueError("tune.confirm.seeds: top_k > 0 needs at least one seed to run the winners with")
        if len(set(c.seeds)) != len(c.seeds):
            raise ValueError(f"tune.confirm.seeds: {list(c.seeds)} must be distinct")
        return self


# ----------------------------------------------------------------------------------------------- keys


def _section_fields(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_fields


def known_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """All dotted leaf keys of the config tree, e.g. ['run.name', ..., 'loss.temperature', ...]."""
    keys = []
    for name, field in _section_fields(model).items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += known_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _unknown_key_error(key: str) -> ConfigError:
    if key in REMOVED_KEYS:
        return ConfigError(f"config key '{key}' was removed: {REMOVED_KEYS[key]}", key=key)
    close = difflib.get_close_matches(key, known_keys(), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known sections: {', '.join(Config.model_fields)}"
    return ConfigError(f"unknown config key '{key}'{hint}", key=key)


def check_key(key: str) -> None:
    """`key` is a dotted leaf key of the config tree; else a `ConfigError` naming it (with a suggestion)."""
    model: type[BaseModel] = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = _section_fields(model)
        if part not in fields:
            raise _unknown_key_error(key)
        ann = fields[part].annotation
        is_section = isinstance(ann, type) and issubclass(ann, BaseModel)
        last = i == len(parts) - 1
        if is_section and last:
            raise ConfigError(
                f"'{key}' is a section, not a value; set one of its keys, e.g. '{known_keys(ann, key + '.')[0]}'",
                key,
            )
        if not is_section and not last:
            raise _unknown_key_error(key)
        if is_section:
            model = ann


# --------------------------------------------------------------------------------------------- values


def _describe(err: Mapping[str, Any]) -> tuple[str, str]:
    loc = [str(p) for p in err["loc"] if not str(p).isdigit()]
    key = ".".join(loc)
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if err["type"] == "extra_forbidden":
        return key, str(_unknown_key_error(key))
    got = err.get("input")
    shown = "" if err["type"] in {"missing"} or isinstance(got, dict) else f" (got {got!r})"
    if key:
        return key, f"{key}: {msg}{shown}"
    # model-level checks start their message with the dotted key they blame
    head = msg.split(":", 1)[0]
    return (head if "." in head and " " not in head else ""), msg


def _validate(data: Mapping[str, Any], source: str) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        first_key, lines = None, []
        for err in exc.errors():
            key, line = _describe(err)
            first_key = first_key or key or None
            lines.append(f"  - {line}")
        raise ConfigError(f"invalid config ({source}):\n" + "\n".join(lines), key=first_key) from None


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[leaf] = value


def _plain(value: Any) -> Any:
    """Turn pydantic dumps (tuples) into YAML-friendly lists, recursively."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def apply_overrides(
    base: Config | Mapping[str, Any], overrides: Mapping[str, Any], source: str = "overrides"
) -> Config:
    """Return `base` with dotted-key `overrides` applied (`{"loss.temperature": 0.2}`), validated.

    The same function serves the CLI's `--set` and every Tune trial, so both fail the same way.
    """
    tree = _plain(base.model_dump() if isinstance(base, Config) else dict(base))
    for key, value in overrides.items():
        check_key(key)
        _set_dotted(tree, key, _plain(value))
    return _validate(tree, source)


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read a YAML config (safe_load only) and apply dotted-key overrides; `path=None` uses the defaults."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(
                f"config file not found: {p} (pass an existing YAML file, e.g. configs/demo.yaml)"
            )
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{p} must hold a mapping of sections (run:, data:, ...), got {type(loaded).__name__}"
            )
        tree = loaded
        _validate(tree, source)  # report file errors against the file, before overrides
    return apply_overrides(tree, overrides or {}, source if not overrides else f"{source} + overrides")


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Parse CLI `key=value` strings; values are YAML scalars/lists (`0.2`, `true`, `[256, 512]`, `null`)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like key=value, e.g. loss.temperature=0.2")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


def flatten(cfg: Config) -> dict[str, Any]:
    """Dotted-key view of every leaf value (`{'loss.temperature': 0.1, ...}`), for tables and logs."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and not (
            prefix.endswith("space.") or prefix.endswith("points_to_evaluate.")
        ):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(_plain(cfg.model_dump()), "")
    return out


def to_yaml(cfg: Config) -> str:
    """The config as a complete YAML document (what `load_config` reads back to the same Config)."""
    return yaml.safe_dump(_plain(cfg.model_dump()), sort_keys=False)
