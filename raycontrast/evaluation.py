"""`raycontrast eval`: a trained model scored on a split of its dataset, with test-time augmentation if
asked, and the per-class IoU written as a Parquet table (pure PyTorch, in this process; no Ray).

With the defaults (the config's `train.eval_mode`, one scale, no flip) this is the very evaluation the
training loop reports, so it reproduces the val mIoU of the checkpoint's curves row.
"""

from __future__ import annotations

import dataclasses
import math
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Subset

from raycontrast.data.loader import dataset_from_config
from raycontrast.engine import evaluate
from raycontrast.inference import TrainedModel
from raycontrast.metrics import iou, miou, pixel_accuracy
from raycontrast.plan import val_loader_workers
from raycontrast.storage import write_atomic

__all__ = ["EVAL_SCHEMA", "EvalResult", "eval_table", "evaluate_model", "merge_shards", "write_eval"]

TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # the paper's multi-scale set (with flip)

EVAL_SCHEMA = pa.schema(
    [
        pa.field("class_id", pa.int64(), nullable=False),
        pa.field("class_name", pa.string()),
        pa.field("iou", pa.float64()),  # NaN: class absent from both prediction and ground truth
        pa.field("pixels", pa.int64()),  # labelled pixels of the class
    ]
)


@dataclass(frozen=True)
class EvalResult:
    """Scores of one evaluation: `confusion [K, K]` (rows = label), per-class IoU, the settings used."""

    source: str
    split: str
    mode: str
    scales: tuple[float, ...]
    flip: bool
    images: int
    confusion: torch.Tensor
    class_names: tuple[str, ...]

    @property
    def class_iou(self) -> list[float]:
        return iou(self.confusion).tolist()

    @property
    def miou(self) -> float:
        return miou(self.confusion)

    @property
    def pixel_acc(self) -> float:
        return pixel_accuracy(self.confusion)

    def describe(self) -> str:
        """The per-class table and the summary line, as printed."""
        tta = f"scales {list(self.scales)}{' + flip' if self.flip else ''}"
        lines = [f"{self.split}: {self.images} images, {self.mode}, {tta}", f"  {'class':<16}    IoU"]
        for name, v in zip(self.class_names, self.class_iou, strict=True):
            lines.append(f"  {name:<16} {'   n/a' if math.isnan(v) else f'{v:6.4f}'}")
        lines.append(f"  {'mIoU':<16} {self.miou:6.4f}   (pixel accuracy {self.pixel_acc:.4f})")
        return "\n".join(lines)


def evaluate_model(
    model: TrainedModel,
    *,
    split: str = "val",
    mode: Literal["whole", "slide"] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> EvalResult:
    """Score `model` on `split` of the dataset its config names (`data.*`: root, canvases, crop size).

    `mode` defaults to the run's `train.eval_mode`; slide windows are `data.crop_size`, as in training.
    Batches of `train.batch_size` images; the model's device is used. `shard=(i, n)`: only images
    i, i + n, ... (their confusion matrices add up to the whole split's)."""
    cfg = model.config
    mode = mode or cfg.train.eval_mode
    if any(s <= 0 for s in scales):
        raise ValueError(f"--scales must be positive, got {list(scales)}")
    dataset = dataset_from_config(cfg.data, split, train=False)
    if shard != (0, 1):
        dataset = Subset(dataset, range(shard[0], len(dataset), shard[1]))  # type: ignore[arg-type]
    device = next(model.net.parameters()).device
    loader = DataLoader(
        dataset, batch_size=cfg.train.batch_size, shuffle=False,
        num_workers=val_loader_workers(cfg.data.loader_workers), pin_memory=device.type == "cuda",
    )  # fmt: skip
    bar = _progress(len(dataset), f"eval {split}", progress)  # type: ignore[arg-type]
    try:
        cm = evaluate(
            model.net, loader, num_classes=model.info.num_classes, ignore_index=model.info.ignore_index,
            mode=mode, crop_size=cfg.data.crop_size, scales=tuple(scales), flip=flip, on_batch=bar.update,
        )  # fmt: skip
    finally:
        bar.close()
    return EvalResult(
        source=model.source, split=split, mode=mode, scales=tuple(float(s) for s in scales), flip=flip,
        images=len(dataset), confusion=cm.cpu(), class_names=model.info.class_names,  # type: ignore[arg-type]
    )  # fmt: skip


def merge_shards(parts: Sequence[EvalResult]) -> EvalResult:
    """The whole split's result from its shards' (confusion matrices summed, images counted)."""
    first = parts[0]
    total = torch.stack([p.confusion for p in parts]).sum(0)
    return dataclasses.replace(first, confusion=total, images=sum(p.images for p in parts))


def _progress(total: int, label: str, enabled: bool):  # noqa: ANN202 - a tqdm bar
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="img", disable=not enabled, leave=False)


def eval_table(result: EvalResult) -> pa.Table:
    """Per-class IoU as a table; the settings and the mIoU go in its schema metadata."""
    labelled = result.confusion.sum(1).tolist()
    rows = [
        {"class_id": i, "class_name": n, "iou": v, "pixels": int(labelled[i])}
        for i, (n, v) in enumerate(zip(result.class_names, result.class_iou, strict=True))
    ]
    meta = {
        "source": result.source, "split": result.split, "mode": result.mode,
        "scales": ",".join(str(s) for s in result.scales), "flip": str(result.flip),
        "miou": repr(result.miou), "pixel_acc": repr(result.pixel_acc), "images": str(result.images),
    }  # fmt: skip
    return pa.Table.from_pylist(rows, schema=EVAL_SCHEMA.with_metadata(meta))


def default_eval_path(result: EvalResult) -> str:
    """`<checkpoint>/eval-<split>-<mode>[-ms][-flip].parquet`, or next to an exported file."""
    tag = (
        f"{result.split}-{result.mode}" + ("-ms" if result.scales != (1.0,) else "") + ("-flip" * result.flip)
    )
    base = result.source if not result.source.endswith(".safetensors") else posixpath.dirname(result.source)
    stem = (
        "" if base == result.source else posixpath.basename(result.source).removesuffix(".safetensors") + "-"
    )
    return posixpath.join(base, f"{stem}eval-{tag}.parquet")


def write_eval(result: EvalResult, fs: pafs.FileSystem, path: str | None = None) -> str:
    """Write `eval_table(result)` atomically to `path` (default `default_eval_path`); returns the path."""
    target = path or default_eval_path(result)
    sink = pa.BufferOutputStream()
    pq.write_table(eval_table(result), sink)
    write_atomic(fs, target, sink.getvalue().to_pybytes())
    return target
