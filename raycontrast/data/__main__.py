"""`python -m raycontrast.data [config]`: generation time of a config's demo canvases and how many
(image, class) pairs can become contrast anchors at its `loss.max_views` (raw labels and augmented)."""

from __future__ import annotations

import sys
import time

import torch

from raycontrast.config import load_config
from raycontrast.data.canvases import anchor_qualification, generate_canvases
from raycontrast.data.info import CANVASES
from raycontrast.data.loader import dataset_from_config


def report(config_path: str) -> None:
    """Print generation time and the anchor-qualification table for a config's canvases and max_views."""
    cfg = load_config(config_path)
    c, mv = cfg.data.canvases, cfg.loss.max_views
    for split, n in (("train", c.train_images), ("val", c.val_images)):
        t0 = time.perf_counter()
        generate_canvases(split, n, c.height, c.width, c.seed, c.digit_size)
        print(f"generate {split}: {n} canvases {c.height}x{c.width} in {time.perf_counter() - t0:.2f} s")
    lo, hi = cfg.data.scale_range
    rows = {  # train=False: no augmentation, the raw labels
        f"{split} mv{mv}": anchor_qualification(dataset_from_config(cfg.data, split, train=False), mv)
        for split in ("train", "val")
    }
    aug = dataset_from_config(cfg.data, "train", train=True)
    torch.manual_seed(0)  # the augmentation draws from torch's RNG
    rows[f"train aug{lo:g}-{hi:g} mv{mv}"] = anchor_qualification(aug, mv)
    print(
        f"{config_path}: share of (image, class) pairs with more than max_views (mv) pixels on the H/4 grid"
    )
    print(f"{'class':>8} " + " ".join(f"{r:>20}" for r in rows))
    for name in CANVASES.class_names:
        print(f"{name:>8} " + " ".join(f"{rows[r][name]:>20.2f}" for r in rows))


if __name__ == "__main__":
    report(sys.argv[1] if len(sys.argv) > 1 else "configs/demo.yaml")
