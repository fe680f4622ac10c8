"""Built-in demo data: real handwritten digits on real textures, deterministic by seed.

Each canvas is a background of 1-3 texture regions (brick, grass, gravel from scikit-image's bundled
images) split by parallel straight boundaries of random direction, with a handwritten digit (scikit-learn's
bundled 8x8 digits, bilinearly upscaled, about 4x for the default 32-42 px box) pasted in a random colour
into every cell of a grid, so each canvas carries many digits of most classes.
Classes: 0-9 the digits (ink pixels), 10 brick, 11 grass, 12 gravel. Ignore (255): the anti-aliased ring
between a digit's ink and the background, and a 2-pixel band along texture boundaries.

Train and val never share a digit sample (a fixed split of the 1797 digits) nor texture pixels (train
crops the top half of each texture image, val the bottom half). Canvas ``i`` of a split depends only on
``(seed, split, i)`` and the size arguments, so any subset regenerates identically.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import torch
from torch.utils.data import Dataset

from raycontrast.data.info import CANVASES
from raycontrast.data.transforms import build_eval_transform, item_rng
from raycontrast.storage import write_atomic

IGNORE_INDEX = CANVASES.ignore_index
CLASS_NAMES, PALETTE, NUM_CLASSES = CANVASES.class_names, CANVASES.palette, CANVASES.num_classes
TEXTURES = ("brick", "grass", "gravel")
SPLITS = ("train", "val")
# Bump when the generator changes so stale caches are never reused.
GENERATOR_VERSION = 2  # 2: a digit in every grid cell (1 filled half to all cells at random)
_DIGIT_SPLIT_SEED = 20210101  # fixed forever: the train/val digit pools must never move
_VAL_DIGIT_FRACTION = 1 / 3
# Thresholds on the upscaled digit intensity (0..1): ink above _INK, ignore ring between _RING and _INK.
_INK, _RING = 0.45, 0.2
_BAND = 1.0  # half-width in pixels of the ignore band along texture boundaries


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 sklearn digits as float32 ``[N, 10, 10]`` in 0..1 (one zero pixel of margin) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.pad(d.images.astype(np.float32) / 16.0, ((0, 0), (1, 1), (1, 1)))
    return imgs, d.target.astype(np.int64)


def digit_pool(split: str) -> np.ndarray:
    """Indices into the sklearn digits set used by ``split``; train and val pools are disjoint."""
    if split not in SPLITS:
        raise ValueError(f"canvases: split must be one of {SPLITS}, got {split!r}")
    n = len(_digits()[1])
    perm = np.random.default_rng(_DIGIT_SPLIT_SEED).permutation(n)
    n_val = round(n * _VAL_DIGIT_FRACTION)
    return np.sort(perm[:n_val] if split == "val" else perm[n_val:])


@functools.lru_cache(maxsize=2)
def _textures(split: str) -> np.ndarray:
    """float32 ``[3, 256, 512]`` grey textures in 0..1: the top half of each image for train, bottom for val."""
    import skimage.data

    out = []
    for name in TEXTURES:
        img = getattr(skimage.data, name)().astype(np.float32) / 255.0
        half = img.shape[0] // 2
        out.append(img[:half] if split == "train" else img[half : 2 * half])
    return np.stack(out)


@functools.lru_cache(maxsize=64)
def _bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """``[out, in]`` weights of 1-D bilinear resizing (half-pixel centres, like align_corners=False)."""
    src = np.clip((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0, in_size - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w = (src - i0).astype(np.float32)
    m = np.zeros((out_size, in_size), np.float32)
    np.add.at(m, (np.arange(out_size), i0), 1 - w)
    np.add.at(m, (np.arange(out_size), i1), w)
    return m


def _hsv_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated random colour, RGB in 0..1."""
    h, s, v = rng.random(), rng.uniform(0.7, 1.0), rng.uniform(0.6, 1.0)
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return (v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)).astype(np.float32)


def _background(rng: np.random.Generator, tex: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Texture regions: ``(rgb float32 [h, w, 3] in 0..1, label uint8 [h, w])``."""
    k = int(rng.choice([1, 2, 3], p=[0.25, 0.4, 0.35]))
    classes = rng.choice(len(TEXTURES), size=k, replace=False)
    th, tw = tex.shape[1:]
    if h > th or w > tw:  # larger canvases: mirror-tile the texture half
        tex = np.pad(tex, ((0, 0), (0, max(0, h - th)), (0, max(0, w - tw))), mode="symmetric")
    grey = np.empty((k, h, w), np.float32)
    for j, c in enumerate(classes):
        y0 = rng.integers(0, tex.shape[1] - h + 1)
        x0 = rng.integers(0, tex.shape[2] - w + 1)
        patch = tex[c, y0 : y0 + h, x0 : x0 + w]
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        if rng.random() < 0.5:
            patch = patch[::-1]
        # Per-region contrast/brightness jitter so the class is carried by the texture, not the grey level.
        mean = patch.mean()
        grey[j] = np.clip((patch - mean) * rng.uniform(0.7, 1.3) + mean + rng.uniform(-0.15, 0.15), 0, 1)
    tints = 1.0 + rng.uniform(-0.15, 0.15, size=(k, 3)).astype(np.float32)
    if k == 1:
        region = np.zeros((h, w), np.int64)
        band = np.zeros((h, w), bool)
    else:
        theta = rng.uniform(0, np.pi)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        t = xs * np.cos(theta) + ys * np.sin(theta)
        # Cut positions at jittered area quantiles (estimated on a sub-grid) so no region is a sliver.
        fracs = (np.arange(1, k) + rng.uniform(-0.3, 0.3, size=k - 1)) / k
        cuts = np.sort(np.quantile(t[::4, ::4], fracs))
        region = np.searchsorted(cuts, t)
        band = (np.abs(t[..., None] - cuts) < _BAND).any(-1)
    g = np.take_along_axis(grey, region[None], 0)[0]
    rgb = g[..., None] * tints[region]
    label = classes[region].astype(np.uint8) + 10
    label[band] = IGNORE_INDEX
    return rgb, label


def _paste_digits(
    rng: np.random.Generator,
    rgb: np.ndarray,
    label: np.ndarray,
    pool: np.ndarray,
    digit_size: tuple[int, int],
) -> None:
    """Paste non-overlapping digits in place: one in every cell of a grid of ``max size`` cells."""
    imgs, targets = _digits()
    h, w = label.shape
    smax = min(digit_size[1], h, w)
    smin = min(digit_size[0], smax)
    rows, cols = max(1, h // smax), max(1, w // smax)
    slots = rows * cols
    sh, sw = h // rows, w // cols
    for slot in range(slots):
        idx = int(rng.choice(pool))
        s = int(rng.integers(smin, smax + 1))
        y0 = (slot // cols) * sh + int(rng.integers(0, sh - s + 1))
        x0 = (slot % cols) * sw + int(rng.integers(0, sw - s + 1))
        a = _bilinear_matrix(s, imgs.shape[1])
        v = a @ imgs[idx] @ a.T  # separable bilinear upscaling, [s, s]
        alpha = np.clip((v - _RING) / (_INK - _RING), 0, 1)[..., None]
        box = rgb[y0 : y0 + s, x0 : x0 + s]
        # Ink keeps a little of the texture underneath, so it is not a flat colour.
        ink_rgb = _hsv_colour(rng) * (0.75 + 0.25 * box.mean(-1, keepdims=True))
        rgb[y0 : y0 + s, x0 : x0 + s] = box * (1 - alpha) + ink_rgb * alpha
        lab = label[y0 : y0 + s, x0 : x0 + s]
        ink = v >= _INK
        # The ring is also every 4-neighbour of ink: at small upscales v can drop past the ring in one pixel.
        near = ink.copy()
        near[1:] |= ink[:-1]
        near[:-1] |= ink[1:]
        near[:, 1:] |= ink[:, :-1]
        near[:, :-1] |= ink[:, 1:]
        lab[(v >= _RING) | near] = IGNORE_INDEX
        lab[ink] = targets[idx]


def generate_canvases(
    split: str,
    num_images: int,
    height: int = 128,
    width: int = 256,
    seed: int = 0,
    digit_size: tuple[int, int] = (32, 42),
) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``(images uint8 [N, H, W, 3], labels uint8 [N, H, W])``; canvas i depends on (seed, split, i).

    ``digit_size`` is the (min, max) side in pixels of a pasted digit box (the 8x8 digit plus a one-pixel
    margin, so the ink spans about 0.8 of it).
    """
    pool, tex = digit_pool(split), _textures(split)
    if height < 8 or width < 8 or num_images < 1:
        raise ValueError(
            f"canvases: need height, width >= 8 and num_images >= 1, got {height}, {width}, {num_images}"
        )
    images = np.empty((num_images, height, width, 3), np.uint8)
    labels = np.empty((num_images, height, width), np.uint8)
    for i in range(num_images):
        rng = np.random.default_rng([seed, SPLITS.index(split), i])
        rgb, lab = _background(rng, tex, height, width)
        _paste_digits(rng, rgb, lab, pool, digit_size)
        images[i] = np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)
        labels[i] = lab
    return images, labels


def save_npz_atomic(path: str | Path, **arrays: np.ndarray) -> None:
    """Write an ``.npz`` so ``path`` is either the old file or the complete new one, never a partial one."""
    write_atomic(pafs.LocalFileSystem(), os.fspath(path), lambda f: np.savez(f, **arrays))


class CanvasDataset(Dataset):
    """Digit-on-texture canvases -> ``(image float32 [3, H, W], label int64 [H, W])``, 13 classes.

    ``root`` is a cache folder (one ``.npz`` per split and parameter set, named by their hash) or None to
    generate in memory. ``transform`` has the ``CityscapesDataset`` interface; None = normalise only.
    """

    class_names = CLASS_NAMES
    num_classes = NUM_CLASSES
    palette = PALETTE
    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        root: str | Path | None,
        split: str,
        num_images: int = 512,
        height: int = 128,
        width: int = 256,
        seed: int = 0,
        transform: Callable | None = None,
        digit_size: tuple[int, int] = (32, 42),
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"CanvasDataset: split must be one of {SPLITS}, got {split!r}")
        self.split = split
        self.transform = transform if transform is not None else build_eval_transform()
        params = {
            "version": GENERATOR_VERSION,
            "split": split,
            "num_images": int(num_images),
            "height": int(height),
            "width": int(width),
            "seed": int(seed),
            "digit_size": [int(digit_size[0]), int(digit_size[1])],
        }
        gen_args = {k: v for k, v in params.items() if k != "version"}
        gen_args["digit_size"] = tuple(gen_args["digit_size"])
        if root is None:
            self.cache_path = None
            self.images, self.labels = generate_canvases(**gen_args)
            return
        key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
        Path(root).mkdir(parents=True, exist_ok=True)
        self.cache_path = Path(root) / f"canvases-{split}-{key}.npz"
        loaded = self._load_cache(self.cache_path, (num_images, height, width))
        if loaded is None:
            self.images, self.labels = generate_canvases(**gen_args)
            save_npz_atomic(self.cache_path, images=self.images, labels=self.labels)
        else:
            self.images, self.labels = loaded

    @staticmethod
    def _load_cache(path: Path, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray] | None:
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                images, labels = z["images"], z["labels"]
            if images.shape != (*shape, 3) or labels.shape != shape or images.dtype != np.uint8:
                raise ValueError(f"unexpected arrays {images.shape} {images.dtype}, {labels.shape}")
            return images, labels
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            warnings.warn(f"canvas cache {path} is unreadable ({e}); regenerating it", stacklevel=3)
            return None

    def __len__(self) -> int:
        return len(self.images)

    def load_raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(img uint8 [H, W, 3], label int64 [H, W])`` before any transform."""
        return self.images[index], self.labels[index].astype(np.int64)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, label = self.load_raw(index)
        return self.transform(img, label, item_rng())


def anchor_qualification(dataset: Dataset, max_views: int, stride: int = 4) -> dict[str, float]:
    """Per class, the share of (image, class) pairs, among those where the class appears on the
    ``stride`` grid (``label[::stride, ::stride]``, as the contrast loss sees it), in which the class has
    more than ``max_views`` grid pixels, i.e. can become a contrast anchor (ALGORITHM.md section 2).
    Classes never present get NaN. Samples go through the dataset's own transform.
    """
    k = dataset.num_classes
    present = np.zeros(k, np.int64)
    qualified = np.zeros(k, np.int64)
    for i in range(len(dataset)):
        grid = np.asarray(dataset[i][1])[::stride, ::stride].ravel()
        counts = np.bincount(grid[grid < k], minlength=k)
        present += counts > 0
        qualified += counts > max_views
    return {
        name: (float(q / p) if p else float("nan"))
        for name, q, p in zip(dataset.class_names, qualified, present, strict=True)
    }
