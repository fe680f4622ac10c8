"""`raycontrast predict`: segment images with a trained model and write, per image (pure PyTorch, no Ray):

- `<stem>_trainIds.png`: the class id of every pixel (8-bit grey);
- `<stem>_color.png`: the same in the dataset's palette;
- `<stem>_overlay.png`: the colours blended over the image;
- for Cityscapes, `labelIds/<stem>.png`: the official labelIds, in a folder of their own, as the evaluation
  server and `cityscapesscripts` expect them (one prediction per `<city>_<seq>_<frame>` there).

Inputs are image files or folders (searched recursively), any size; or a split of the model's own dataset.
An unreadable image is named and skipped; the rest are still written.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.fs as pafs
import torch
from PIL import Image

from raycontrast.data.cityscapes import train_to_label
from raycontrast.data.transforms import Normalize
from raycontrast.engine import eval_geometry, segment_logits
from raycontrast.inference import TrainedModel
from raycontrast.storage import write_atomic

__all__ = ["IMAGE_SUFFIXES", "Prediction", "PredictSummary", "find_images", "predict"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
OVERLAY_ALPHA = 0.5  # share of the class colour in the overlay


@dataclass
class PredictSummary:
    """What `predict` wrote: one entry per image in `written`, `(name, reason)` per image it could not read."""

    out_dir: str
    written: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Prediction:
    name: str  # output stem
    image: np.ndarray  # uint8 [H, W, 3]
    train_ids: np.ndarray  # uint8 [H, W]


def find_images(inputs: Iterable[str]) -> list[Path]:
    """Image files among `inputs` (files as given, folders searched recursively, each sorted)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"predict input {item} not found (give image files or folders)")
    return out


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            return np.array(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise OSError(f"{path}: unreadable image ({type(e).__name__}: {e})") from e


def _file_images(paths: Sequence[Path], summary: PredictSummary) -> Iterator[tuple[str, np.ndarray]]:
    for p in paths:
        try:
            yield p.stem, _read_rgb(p)
        except OSError as e:
            summary.failed.append((str(p), str(e)))


def split_images(model: TrainedModel, split: str, limit: int | None) -> Iterator[tuple[str, np.ndarray]]:
    """Images of `split` of the model's own dataset (before any transform), named after their files
    (Cityscapes) or their index (canvases)."""
    from raycontrast.data.loader import dataset_from_config

    ds = dataset_from_config(model.config.data, split, train=False)
    n = len(ds) if limit is None else min(limit, len(ds))  # type: ignore[arg-type]
    files = getattr(ds, "images", None)
    for i in range(n):
        img, _ = ds.load_raw(i)  # type: ignore[attr-defined]
        name = Path(files[i]).stem if isinstance(files, list) else f"{model.info.name}_{split}_{i:05d}"
        yield name, img


def _batches(items: Iterable[tuple[str, np.ndarray]], size: int) -> Iterator[list[tuple[str, np.ndarray]]]:
    """Consecutive images of one size, at most `size` at a time (images of any size, batched where they match)."""
    batch: list[tuple[str, np.ndarray]] = []
    for item in items:
        if batch and (len(batch) == size or batch[0][1].shape != item[1].shape):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def segment(
    model: TrainedModel,
    images: list[np.ndarray],
    *,
    mode: Literal["whole", "slide"] = "whole",
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> np.ndarray:
    """Train ids `uint8 [B, H, W]` of same-sized `images` (`uint8 [H, W, 3]` each)."""
    norm = Normalize()
    x = torch.stack([norm(img, img[..., 0])[0] for img in images])
    device = next(model.net.parameters()).device
    crop, stride = eval_geometry(mode, tuple(model.config.data.crop_size), None)  # as evaluation does
    with torch.inference_mode():
        logits = segment_logits(
            model.net, x.to(device), out_size=tuple(x.shape[-2:]), mode=mode, crop=crop, stride=stride,
            scales=scales, flip=flip,
        )  # fmt: skip
    return logits.argmax(1).to(torch.uint8).cpu().numpy()


def _png(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _palette(model: TrainedModel) -> np.ndarray:
    """`uint8 [256, 3]`: the dataset's colour per train id (black beyond its classes)."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: len(model.info.palette)] = np.asarray(model.info.palette, dtype=np.uint8)
    return palette


def write_prediction(p: Prediction, out: Path, model: TrainedModel, palette: np.ndarray) -> None:
    """The PNGs of one prediction under `out` (each written atomically); `palette` from `_palette`."""
    fs = pafs.LocalFileSystem()
    colour = palette[p.train_ids]
    overlay = (OVERLAY_ALPHA * colour + (1 - OVERLAY_ALPHA) * p.image).round().astype(np.uint8)
    write_atomic(fs, str(out / f"{p.name}_trainIds.png"), _png(p.train_ids))
    write_atomic(fs, str(out / f"{p.name}_color.png"), _png(colour))
    write_atomic(fs, str(out / f"{p.name}_overlay.png"), _png(overlay))
    if model.info.name == "cityscapes":
        fs.create_dir(str(out / "labelIds"), recursive=True)
        write_atomic(fs, str(out / "labelIds" / f"{p.name}.png"), _png(train_to_label(p.train_ids)))


def predict(
    model: TrainedModel,
    inputs: Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    split: str | None = None,
    limit: int | None = None,
    mode: Literal["whole", "slide"] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    batch_size: int | None = None,
    progress: bool = True,
) -> PredictSummary:
    """Segment the images of `inputs` (or of `split` of the model's dataset) and write their PNGs to `out_dir`."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = PredictSummary(str(out))
    if split is not None:
        items: Iterable[tuple[str, np.ndarray]] = split_images(model, split, limit)
        total = None
    else:
        files = find_images(inputs)
        items, total = _file_images(files, summary), len(files)
    size = batch_size or model.config.train.batch_size
    mode = mode or model.config.train.eval_mode
    palette = _palette(model)
    with tqdm(total=total, desc="predict", unit="img", disable=not progress, leave=False) as bar:
        for batch in _batches(items, size):
            ids = segment(model, [img for _, img in batch], mode=mode, scales=scales, flip=flip)
            for (name, img), tid in zip(batch, ids, strict=True):
                write_prediction(Prediction(name, img, tid), out, model, palette)
                summary.written.append(name)
            bar.update(len(batch))
    return summary
