"""A trained model from wherever a run left it, and its exported form (pure PyTorch, no Ray).

A model SOURCE is any of:
- a checkpoint folder (`checkpoint_*`, holding `state.pt`) or its `state.pt`;
- a Train run folder (`<storage>/<run.name>`): its best checkpoint (the run's best val mIoU), else its newest;
- an experiment folder (`<storage>/<search name>`, holding `tables/`): the best trial's best checkpoint
  (`trials.best_checkpoint`, ranked by `analyze.best_trials`);
- a file written by `export_model` (`.safetensors`: inference weights, the config and the class names in
  its metadata).
Paths may be URIs (`s3://...`); `locate` gives their filesystem.
"""

from __future__ import annotations

import json
import math
import posixpath
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import torch

from raycontrast.checkpoint import STATE_FILE, checkpoint_iteration, list_checkpoints, load_state
from raycontrast.config import Config, apply_overrides
from raycontrast.data.info import DatasetInfo, dataset_info
from raycontrast.models.hrnet import HRNetV2
from raycontrast.storage import exists, path_on, write_atomic

__all__ = ["EXPORT_FORMAT", "TrainedModel", "export_model", "find_model", "load_model"]

EXPORT_FORMAT = "raycontrast-export/1"
_TRAINING_ONLY = ("proj_head.",)  # the projection head feeds the contrast loss only


@dataclass
class TrainedModel:
    """A model ready for inference: `net` in eval mode on its device; `val_miou` is the val mIoU its run
    recorded for these weights (None when they were saved between evaluations)."""

    net: HRNetV2
    config: Config
    info: DatasetInfo
    source: str  # the checkpoint folder or exported file the weights came from, on the filesystem
    iteration: int | None
    val_miou: float | None


def find_model(fs: pafs.FileSystem, path: str) -> str:
    """The checkpoint folder or exported file that SOURCE `path` names (see the module doc)."""
    return _locate(fs, path)[0]


def _locate(fs: pafs.FileSystem, path: str) -> tuple[str, dict[str, Any] | None]:
    """`find_model`, with the checkpoint's state when finding it meant reading it (not read twice)."""
    path = path.rstrip("/") or "/"
    if path.endswith(".safetensors"):
        if not exists(fs, path):
            raise FileNotFoundError(f"exported model {path} not found")
        return path, None
    if posixpath.basename(path) == STATE_FILE:
        return posixpath.dirname(path), None
    if exists(fs, posixpath.join(path, STATE_FILE)):
        return path, None
    if posixpath.basename(path) == "tables":
        path = posixpath.dirname(path)
    if exists(fs, posixpath.join(path, "tables", "trials.parquet")):
        return _experiment_best(fs, path)
    if list_checkpoints(fs, path):
        return _run_best(fs, path)
    raise FileNotFoundError(
        f"{path}: not a model source: no {STATE_FILE} (a checkpoint), no checkpoint_* folders (a Train run), "
        "no tables/trials.parquet (a search) and not an exported .safetensors file"
    )


def _run_best(fs: pafs.FileSystem, run: str) -> tuple[str, dict[str, Any] | None]:
    """A Train run's checkpoint at its best evaluation when it kept it, else its newest complete one."""
    found = list_checkpoints(fs, run)
    newest = load_state(fs, found[-1])
    best_it = int(newest.get("best_iteration") or -1)
    at_best = [p for p in found if checkpoint_iteration(p) == best_it]
    chosen = at_best[-1] if at_best else found[-1]
    return chosen, newest if chosen == found[-1] else None


def _experiment_best(fs: pafs.FileSystem, exp: str) -> tuple[str, dict[str, Any] | None]:
    from raycontrast.analyze import best_trials  # analyze pulls in plotting; only sources that need it pay
    from raycontrast.tables import load_results

    trials = load_results(exp, filesystem=fs)["trials"]
    ranked = best_trials(trials)
    if ranked.empty:
        raise FileNotFoundError(f"search {exp}: no trial has been evaluated yet, so there is no best model")
    best = ranked.iloc[0]
    kept = best.get("best_checkpoint")
    if isinstance(kept, str) and kept:
        on_fs = path_on(kept)
        if exists(fs, posixpath.join(on_fs, STATE_FILE)):
            return on_fs, None
    runs = posixpath.join(exp, "train_runs")
    infos = fs.get_file_info(pafs.FileSelector(runs, allow_not_found=True))
    mine = [i.path for i in infos if i.base_name.endswith(f"-train-{best.trial_id}")]
    if not mine or not list_checkpoints(fs, mine[0]):
        raise FileNotFoundError(
            f"search {exp}: its best trial {best.trial_id} kept no checkpoint (tune.keep_checkpoints: none?)"
        )
    return _run_best(fs, mine[0])


def _config_from(data: dict[str, Any], source: str) -> Config:
    return apply_overrides(data, {}, source=f"the config saved in {source}")


def load_model(fs: pafs.FileSystem, path: str, device: torch.device | str = "cpu") -> TrainedModel:
    """The model SOURCE `path` names (`find_model`), its weights on `device`, in eval mode."""
    source, state = _locate(fs, path)
    if source.endswith(".safetensors"):
        return _load_export(fs, source, torch.device(device))
    state = state if state is not None else load_state(fs, source)
    if not state.get("config"):
        raise ValueError(f"checkpoint {source} holds no config; it was not written by raycontrast's loop")
    cfg = _config_from(state["config"], source)
    info = dataset_info(cfg.data.dataset)
    net = HRNetV2(cfg.model.variant, info.num_classes, proj_dim=cfg.model.proj_dim)
    net.load_state_dict(state["model"])
    metrics = state.get("metrics") or {}
    at_eval = metrics.get("iteration") == state["iteration"] and metrics.get("val_miou") is not None
    return TrainedModel(
        net=net.to(device).eval(),
        config=cfg,
        info=info,
        source=source,
        iteration=int(state["iteration"]),
        val_miou=float(metrics["val_miou"]) if at_eval else None,
    )


# --------------------------------------------------------------------------------------------- export


def export_model(model: TrainedModel, fs: pafs.FileSystem, out: str) -> int:
    """Write `model`'s inference weights (no optimiser, memory or projection head) to `out` as safetensors,
    atomically, with the config, class names, iteration and val mIoU in its metadata. Returns its size.

    `load_model` reads it back; its `backbone.*` tensors are what `model.pretrained` takes."""
    from safetensors.torch import save

    tensors = {
        k: v.detach().to("cpu").contiguous()
        for k, v in model.net.state_dict().items()
        if not k.startswith(_TRAINING_ONLY)
    }
    meta = {
        "format": EXPORT_FORMAT,
        "config": json.dumps(model.config.model_dump(mode="json")),
        "class_names": json.dumps(list(model.info.class_names)),
        "iteration": json.dumps(model.iteration),
        "val_miou": json.dumps(model.val_miou),
        "source": model.source,
    }
    data = save(tensors, metadata=meta)
    write_atomic(fs, out, data)
    return len(data)


def _load_export(fs: pafs.FileSystem, path: str, device: torch.device) -> TrainedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load

    with fs.open_input_stream(path) as f:
        data = f.read()
    try:
        tensors = load(data)
        meta = _safetensors_metadata(data)
    except (SafetensorError, ValueError) as e:
        raise ValueError(f"exported model {path} could not be read ({e})") from e
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(
            f"{path} is not a raycontrast export (format {meta.get('format')!r}, expected {EXPORT_FORMAT!r}); "
            "a plain backbone state dict goes to model.pretrained instead"
        )
    cfg = _config_from(json.loads(meta["config"]), path)
    info = dataset_info(cfg.data.dataset)
    net = HRNetV2(cfg.model.variant, info.num_classes, proj_dim=cfg.model.proj_dim)
    missing, unexpected = net.load_state_dict(tensors, strict=False)
    lacking = [k for k in missing if not k.startswith(_TRAINING_ONLY)]
    if lacking or unexpected:
        raise ValueError(
            f"exported model {path} does not fit an HRNet {cfg.model.variant}: missing {lacking[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    val = json.loads(meta.get("val_miou", "null"))
    it = json.loads(meta.get("iteration", "null"))
    return TrainedModel(
        net=net.to(device).eval(),
        config=cfg,
        info=info,
        source=path,
        iteration=it,
        val_miou=None if val is None or math.isnan(val) else float(val),
    )


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors payload (an 8-byte little-endian header size, then JSON)."""
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise ValueError("no safetensors header")
    return json.loads(data[8 : 8 + n]).get("__metadata__") or {}
