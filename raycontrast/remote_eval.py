"""`raycontrast eval --workers N`: the split's shards evaluated in parallel on Ray, one task per shard (each
loads the model from storage, so every node must see SOURCE), their confusion matrices summed."""

from __future__ import annotations

from typing import Any

import pyarrow.fs as pafs

from raycontrast.evaluation import EvalResult, evaluate_model, merge_shards

__all__ = ["evaluate_on_ray"]


def _shard(
    fs: pafs.FileSystem, path: str, sets: dict[str, Any], shard: tuple[int, int], kw: dict
) -> EvalResult:
    import torch

    from raycontrast.config import apply_overrides
    from raycontrast.inference import load_model

    model = load_model(fs, path, device="cuda" if torch.cuda.is_available() else "cpu")
    if sets:
        model.config = apply_overrides(model.config, sets)
    return evaluate_model(model, shard=shard, progress=False, **kw)


def evaluate_on_ray(
    fs: pafs.FileSystem,
    path: str,
    workers: int,
    *,
    sets: dict[str, Any],
    use_gpu: bool,
    address: str | None = None,
    **kw: Any,
) -> EvalResult:
    """`evaluate_model` of SOURCE `path` over `workers` Ray tasks (1 CPU, or 1 GPU each with `use_gpu`)."""
    import ray

    from raycontrast.train import init_ray

    init_ray(address)
    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0, max_retries=1)(_shard)
    refs = [task.remote(fs, path, sets, (i, workers), kw) for i in range(workers)]
    return merge_shards(ray.get(refs))
