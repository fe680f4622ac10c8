"""Cityscapes fine annotations: ``labelIds`` PNGs mapped to the 19 train classes (ignore = 255).

Layout::

    root/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png
    root/gtFine/{split}/{city}/{stem}_gtFine_labelIds.png
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from raycontrast.data.info import CITYSCAPES, CITYSCAPES_LABELS
from raycontrast.data.transforms import build_eval_transform, item_rng

IGNORE_INDEX = CITYSCAPES.ignore_index
LABELS = CITYSCAPES_LABELS
CLASS_NAMES, PALETTE, NUM_CLASSES = CITYSCAPES.class_names, CITYSCAPES.palette, CITYSCAPES.num_classes


def _build_lut() -> np.ndarray:
    """uint8 labelId -> trainId table (int16, -1 = id not in the table).

    A labelIds PNG is uint8, so id -1 (license plate) would read back as 255; cityscapesScripts never draws
    it (negative ids are skipped), but treating 255 as -1 keeps files from other tools loadable.
    """
    lut = np.full(256, -1, dtype=np.int16)
    for _, label_id, train_id in LABELS:
        lut[label_id % 256] = IGNORE_INDEX if train_id < 0 else train_id
    return lut


_LUT_U8 = _build_lut()
_ID_TO_TRAIN = {label_id: (IGNORE_INDEX if train_id < 0 else train_id) for _, label_id, train_id in LABELS}


def label_to_train(label_ids: int | np.ndarray, source: str = "label map") -> int | np.ndarray:
    """Map Cityscapes labelIds to trainIds (ignore 255). Accepts an int (including -1) or an integer array.

    Arrays come back as uint8 of the same shape. Ids outside the table raise ValueError naming ``source``.
    """
    if isinstance(label_ids, (int, np.integer)):
        if int(label_ids) not in _ID_TO_TRAIN:
            raise ValueError(f"{source}: label id {int(label_ids)} is not a Cityscapes labelId (-1..33)")
        return _ID_TO_TRAIN[int(label_ids)]
    ids = np.asarray(label_ids)
    if ids.dtype != np.uint8:
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{source}: label ids must be integers, got dtype {ids.dtype}")
        bad_range = (ids < -1) | (ids > 255)
        if bad_range.any():
            raise ValueError(
                f"{source}: label ids {np.unique(ids[bad_range])[:10].tolist()} are not Cityscapes labelIds "
                "(-1..33); is this a labelIds map?"
            )
        ids = (ids % 256).astype(np.uint8)
    train = _LUT_U8[ids]
    bad = train < 0
    if bad.any():
        raise ValueError(
            f"{source}: label ids {np.unique(ids[bad])[:10].tolist()} are not Cityscapes labelIds (0..33, "
            "-1); use the *_gtFine_labelIds.png files from gtFine_trainvaltest"
        )
    return train.astype(np.uint8)


_TRAIN_TO_LABEL = np.zeros(256, dtype=np.uint8)  # trainId -> labelId; the ignore label maps to 0 (unlabeled)
for _, _label_id, _train_id in LABELS:
    if 0 <= _train_id < IGNORE_INDEX:
        _TRAIN_TO_LABEL[_train_id] = _label_id


def train_to_label(train_ids: np.ndarray) -> np.ndarray:
    """uint8 trainIds -> the official labelIds (what the evaluation server and cityscapesScripts take)."""
    return _TRAIN_TO_LABEL[train_ids]


def read_png(path: Path, mode: str | None = None) -> np.ndarray:
    """Decode a PNG fully (truncated or corrupt files raise OSError naming the path)."""
    try:
        with Image.open(path) as im:
            im.load()
            if mode is not None and im.mode != mode:
                im = im.convert(mode)
            return np.array(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise OSError(
            f"{path}: unreadable or truncated image ({type(e).__name__}: {e}); re-extract the file from "
            "the Cityscapes archive"
        ) from e


class CityscapesDataset(Dataset):
    """Cityscapes fine split -> ``(image float32 [3, H, W], label int64 [H, W])``.

    ``transform(img uint8 [H, W, 3], label int64 [H, W], rng)`` must end in ``Normalize``; None means
    ``build_eval_transform()`` (ImageNet normalisation, full size).
    """

    class_names = CLASS_NAMES
    num_classes = NUM_CLASSES
    palette = PALETTE
    ignore_index = IGNORE_INDEX

    def __init__(self, root: str | Path, split: str, transform: Callable | None = None) -> None:
        self.root = Path(root)
        self.split = split
        self.transform = transform if transform is not None else build_eval_transform()
        img_root = self.root / "leftImg8bit"
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"Cityscapes root {self.root} does not exist; point it at the folder holding leftImg8bit/ "
                "and gtFine/ (from leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip)"
            )
        split_dir = img_root / split
        if not split_dir.is_dir():
            found = sorted(p.name for p in img_root.iterdir() if p.is_dir()) if img_root.is_dir() else []
            raise FileNotFoundError(
                f"Cityscapes split folder {split_dir} does not exist (splits found: {found}); "
                "expected root/leftImg8bit/{split}/{city}/*_leftImg8bit.png"
            )
        self.images = sorted(split_dir.glob("*/*_leftImg8bit.png"))
        if not self.images:
            raise FileNotFoundError(
                f"Cityscapes split folder {split_dir} holds no */*_leftImg8bit.png images; check the extraction"
            )
        self.labels = [self._label_path(p) for p in self.images]
        missing = [(i, lab) for i, lab in zip(self.images, self.labels, strict=True) if not lab.is_file()]
        if missing:
            img, lab = missing[0]
            raise FileNotFoundError(
                f"label file {lab} for image {img} is missing ({len(missing)} image(s) without labels); "
                "extract gtFine_trainvaltest.zip into the same root"
            )

    def _label_path(self, img: Path) -> Path:
        stem = img.name[: -len("_leftImg8bit.png")]
        return self.root / "gtFine" / self.split / img.parent.name / f"{stem}_gtFine_labelIds.png"

    def __len__(self) -> int:
        return len(self.images)

    def load_raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(img uint8 [H, W, 3], trainId label int64 [H, W])`` before any transform."""
        img_path, lab_path = self.images[index], self.labels[index]
        img = read_png(img_path, "RGB")
        ids = read_png(lab_path)
        if ids.ndim != 2:
            raise ValueError(f"{lab_path}: a labelIds map must be single-channel, got shape {ids.shape}")
        if ids.shape != img.shape[:2]:
            raise ValueError(
                f"{lab_path}: label size {ids.shape[1]}x{ids.shape[0]} differs from image {img_path} "
                f"size {img.shape[1]}x{img.shape[0]}; the pair does not belong together"
            )
        return img, label_to_train(ids, source=str(lab_path)).astype(np.int64)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, label = self.load_raw(index)
        return self.transform(img, label, item_rng())
