"""``build_dataset``: the one place that turns plain data arguments into a dataset with its transform;
``dataset_from_config``: the same from a config's ``data`` section."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset

from raycontrast.data import canvases, cityscapes
from raycontrast.data.info import DatasetName, dataset_info
from raycontrast.data.transforms import build_eval_transform, build_train_transform

if TYPE_CHECKING:
    from raycontrast.config import DataSection

_CANVAS_ARGS = {"num_images", "height", "width", "seed", "digit_size"}


def build_dataset(
    name: DatasetName,
    split: str,
    *,
    root: str | Path | None,
    crop_size: tuple[int, int],
    scale_range: tuple[float, float],
    train: bool,
    hflip: bool = True,
    canvas_args: dict[str, Any] | None = None,
) -> Dataset:
    """Dataset yielding ``(image float32 [3, H, W], label int64 [H, W])``.

    ``train=True``: random rescale in ``scale_range`` -> random ``crop_size`` crop (cat-max-ratio 0.75,
    ignore padding) -> horizontal flip (if ``hflip``) -> photometric distortion -> normalise; otherwise full
    size, normalise only.
    For canvases ``root`` is the cache folder (None: no cache) and ``canvas_args`` holds
    ``CanvasDataset`` keyword arguments (num_images, height, width, seed, digit_size).
    """
    info = dataset_info(name)
    if train:
        transform = build_train_transform(
            tuple(crop_size), tuple(scale_range), flip_p=0.5 if hflip else 0.0, ignore_index=info.ignore_index
        )
    else:
        transform = build_eval_transform()
    if name == "canvases":
        unknown = set(canvas_args or {}) - _CANVAS_ARGS
        if unknown:
            raise ValueError(f"canvas_args: unknown keys {sorted(unknown)}; allowed: {sorted(_CANVAS_ARGS)}")
        return canvases.CanvasDataset(root, split, transform=transform, **(canvas_args or {}))
    if canvas_args:
        raise ValueError(f"canvas_args {sorted(canvas_args)} only apply to dataset 'canvases', not {name!r}")
    if root is None:
        raise ValueError("dataset 'cityscapes' needs root: the folder holding leftImg8bit/ and gtFine/")
    return cityscapes.CityscapesDataset(root, split, transform=transform)


def dataset_from_config(data: DataSection, split: str, *, train: bool) -> Dataset:
    """``build_dataset`` for ``split`` with every setting of a config's ``data`` section (for canvases: the
    split's image count from ``data.canvases``, its size, seed and digit size; the cache under ``data.root``)."""
    args = None
    if data.dataset == "canvases":
        c = data.canvases
        args = {
            "num_images": c.train_images if split == "train" else c.val_images,
            "height": c.height,
            "width": c.width,
            "seed": c.seed,
            "digit_size": c.digit_size,
        }
    return build_dataset(
        data.dataset,
        split,
        root=data.root,
        crop_size=data.crop_size,
        scale_range=data.scale_range,
        train=train,
        hflip=data.hflip,
        canvas_args=args,
    )
