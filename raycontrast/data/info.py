"""Facts of each dataset, in one place and without importing torch: class names, palette, ignore label,
and the Cityscapes label table. The datasets, the config's checks, the loss, the tables and the prediction
writers all read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "CANVASES",
    "CITYSCAPES",
    "CITYSCAPES_LABELS",
    "DATASETS",
    "DatasetInfo",
    "DatasetName",
    "dataset_info",
]

DatasetName = Literal["canvases", "cityscapes"]
IGNORE_INDEX = 255  # both datasets: the label that is never trained on nor scored


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset's classes: `class_names[i]` and `palette[i]` (RGB) describe train id i."""

    name: str
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int = IGNORE_INDEX
    image_size: tuple[int, int] | None = None  # (height, width) of its images when fixed (val: whole images)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# (name, labelId, trainId) from the official cityscapesScripts table; trainId 255 / -1 are not trained on.
CITYSCAPES_LABELS: tuple[tuple[str, int, int], ...] = (
    ("unlabeled", 0, 255),
    ("ego vehicle", 1, 255),
    ("rectification border", 2, 255),
    ("out of roi", 3, 255),
    ("static", 4, 255),
    ("dynamic", 5, 255),
    ("ground", 6, 255),
    ("road", 7, 0),
    ("sidewalk", 8, 1),
    ("parking", 9, 255),
    ("rail track", 10, 255),
    ("building", 11, 2),
    ("wall", 12, 3),
    ("fence", 13, 4),
    ("guard rail", 14, 255),
    ("bridge", 15, 255),
    ("tunnel", 16, 255),
    ("pole", 17, 5),
    ("polegroup", 18, 255),
    ("traffic light", 19, 6),
    ("traffic sign", 20, 7),
    ("vegetation", 21, 8),
    ("terrain", 22, 9),
    ("sky", 23, 10),
    ("person", 24, 11),
    ("rider", 25, 12),
    ("car", 26, 13),
    ("truck", 27, 14),
    ("bus", 28, 15),
    ("caravan", 29, 255),
    ("trailer", 30, 255),
    ("train", 31, 16),
    ("motorcycle", 32, 17),
    ("bicycle", 33, 18),
    ("license plate", -1, -1),
)

_CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip
_CANVAS_PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (150, 60, 40), (30, 110, 30),
    (128, 128, 128),
)  # fmt: skip

CITYSCAPES = DatasetInfo(
    "cityscapes",
    tuple(name for name, _, train_id in sorted(CITYSCAPES_LABELS, key=lambda r: r[2]) if 0 <= train_id < 255),
    _CITYSCAPES_PALETTE,
    image_size=(1024, 2048),
)
# 10 digit classes (ink pixels) and 3 textures.
CANVASES = DatasetInfo(
    "canvases", tuple(f"digit {d}" for d in range(10)) + ("brick", "grass", "gravel"), _CANVAS_PALETTE
)
DATASETS: dict[str, DatasetInfo] = {"canvases": CANVASES, "cityscapes": CITYSCAPES}


def dataset_info(name: str) -> DatasetInfo:
    """The facts of dataset `name` ('canvases' or 'cityscapes')."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(repr(n) for n in DATASETS)}")
    return DATASETS[name]
