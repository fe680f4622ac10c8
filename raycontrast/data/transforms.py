"""Joint image/label transforms, deterministic given a ``numpy.random.Generator``.

Representation: every transform takes and returns ``(img, label)`` with ``img`` a uint8 numpy array
``[H, W, 3]`` (RGB) and ``label`` an int64 numpy array ``[H, W]`` (ignore = 255), except ``Normalize``,
which ends a pipeline and returns ``(float32 tensor [3, H, W], uint8 tensor [H, W])``: labels travel
as uint8 (8x less shared memory between DataLoader workers than int64) and are cast on the device.
Each transform is called as ``t(img, label, rng)``; all randomness comes from ``rng``.
The augmentations follow the mmsegmentation Cityscapes recipe (random resize, crop with the
category-max-ratio rule, flip, photometric distortion).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

# ImageNet statistics on the 0..255 scale (what HRNet ImageNet checkpoints expect).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

Pair = tuple[np.ndarray, np.ndarray]
Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple]


def resize_pair(img: np.ndarray, label: np.ndarray, size: tuple[int, int]) -> Pair:
    """Resize to ``size = (h, w)``: bilinear for the image, nearest for the label (no new label values)."""
    h, w = size
    if (h, w) == img.shape[:2]:
        return img, label
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"resize_pair: label values must lie in 0..255, got {label.min()}..{label.max()}")
    img_r = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
    lab_r = np.asarray(Image.fromarray(label.astype(np.uint8)).resize((w, h), Image.NEAREST))
    return img_r, lab_r.astype(np.int64)


class Compose:
    """Apply transforms in order: ``Compose([...])(img, label, rng)``."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, img: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple:
        for t in self.transforms:
            img, label = t(img, label, rng)
        return img, label


class RandomRescale:
    """Scale both sides by one ratio drawn uniformly from ``ratio_range`` (relative to the input size)."""

    def __init__(self, ratio_range: tuple[float, float] = (0.5, 2.0)) -> None:
        lo, hi = ratio_range
        if not 0 < lo <= hi:
            raise ValueError(f"RandomRescale: ratio_range must satisfy 0 < lo <= hi, got {ratio_range}")
        self.ratio_range = (float(lo), float(hi))

    def __call__(self, img: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> Pair:
        r = rng.uniform(*self.ratio_range)
        h, w = img.shape[:2]
        return resize_pair(img, label, (max(1, round(h * r)), max(1, round(w * r))))


class RandomCrop:
    """Random ``size = (h, w)`` crop; pad bottom/right (image 0, label ``ignore_index``) when smaller.

    Category-max-ratio rule (mmseg): redraw the crop window, up to ``max_tries`` times, while the crop
    holds a single class or one class covers at least ``cat_max_ratio`` of its non-ignored pixels; after
    ``max_tries`` rejections the last drawn window is kept unchecked. ``cat_max_ratio >= 1`` disables it.
    """

    def __init__(
        self,
        size: tuple[int, int],
        cat_max_ratio: float = 0.75,
        ignore_index: int = 255,
        max_tries: int = 10,
    ) -> None:
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"RandomCrop: size must be (h, w) with positive ints, got {size}")
        self.size = (int(size[0]), int(size[1]))
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = int(ignore_index)
        self.max_tries = int(max_tries)

    def _window(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int]:
        y0 = int(rng.integers(0, max(h - self.size[0], 0) + 1))
        x0 = int(rng.integers(0, max(w - self.size[1], 0) + 1))
        return y0, x0

    def _accept(self, crop: np.ndarray) -> bool:
        counts = np.bincount(crop.ravel(), minlength=self.ignore_index + 1)
        counts[self.ignore_index] = 0
        present = counts[counts > 0]
        return len(present) > 1 and present.max() / present.sum() < self.cat_max_ratio

    def __call__(self, img: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> Pair:
        ch, cw = self.size
        h, w = img.shape[:2]
        y0, x0 = self._window(h, w, rng)
        if self.cat_max_ratio < 1.0:
            for _ in range(self.max_tries):
                if self._accept(label[y0 : y0 + ch, x0 : x0 + cw]):
                    break
                y0, x0 = self._window(h, w, rng)
        img = img[y0 : y0 + ch, x0 : x0 + cw]
        label = label[y0 : y0 + ch, x0 : x0 + cw]
        ph, pw = ch - img.shape[0], cw - img.shape[1]
        if ph or pw:
            img = np.pad(img, ((0, ph), (0, pw), (0, 0)), constant_values=0)
            label = np.pad(label, ((0, ph), (0, pw)), constant_values=self.ignore_index)
        return np.ascontiguousarray(img), np.ascontiguousarray(label)


class RandomFlip:
    """Horizontal flip of image and label together with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = float(p)

    def __call__(self, img: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> Pair:
        if rng.random() < self.p:
            return np.ascontiguousarray(img[:, ::-1]), np.ascontiguousarray(label[:, ::-1])
        return img, label


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """float ``[..., 3]`` RGB -> HSV with H in [0, 1), S in [0, 1], V in the input's scale."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    delta = v - rgb.min(-1)
    safe = np.where(delta > 0, delta, 1)
    s = np.where(v > 0, delta / np.where(v > 0, v, 1), 0)
    h = np.where(v == r, (g - b) / safe, np.where(v == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = np.where(delta > 0, (h / 6.0) % 1.0, 0)
    return np.stack([h, s, v], -1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of ``rgb_to_hsv``."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    # Standard closed form: channel n uses k = (n + 6h) mod 6.
    out = [v - v * s * np.clip(np.minimum((n + h * 6) % 6, 4 - (n + h * 6) % 6), 0, 1) for n in (5, 3, 1)]
    return np.stack(out, -1)


def adjust_saturation(img: np.ndarray, alpha: float) -> np.ndarray:
    """uint8 RGB with HSV saturation scaled by ``alpha`` (capped at 1), hue and value kept."""
    # With H and V fixed every channel moves linearly towards V, so no HSV round trip is needed.
    x = img.astype(np.float32)
    v = x.max(-1, keepdims=True)
    spread = v - x.min(-1, keepdims=True)
    alpha_eff = np.minimum(alpha, v / np.maximum(spread, 1e-6))
    return np.clip(np.rint(v - alpha_eff * (v - x)), 0, 255).astype(np.uint8)


def adjust_hue(img: np.ndarray, shift: float) -> np.ndarray:
    """uint8 RGB with the hue rotated by ``shift`` turns (1.0 = 360 degrees)."""
    hsv = rgb_to_hsv(img.astype(np.float32))
    hsv[..., 0] = (hsv[..., 0] + shift) % 1.0
    return np.clip(np.rint(hsv_to_rgb(hsv)), 0, 255).astype(np.uint8)


class PhotoMetricDistortion:
    """mmseg's photometric distortion on uint8 RGB, each step applied with probability 1/2.

    Order: brightness (+delta), contrast (x alpha) either before or after, saturation (x alpha), hue
    (+delta, OpenCV units of 2 degrees, so 18 -> 36 degrees); each step rounds back to uint8 like mmseg.
    """

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
    ) -> None:
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta

    @staticmethod
    def _to_u8(x: np.ndarray) -> np.ndarray:
        return np.clip(x, 0, 255).astype(np.uint8)

    def __call__(self, img: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> Pair:
        if rng.integers(2):
            img = self._to_u8(
                img.astype(np.float32) + rng.uniform(-self.brightness_delta, self.brightness_delta)
            )
        contrast_first = bool(rng.integers(2))
        if contrast_first and rng.integers(2):
            img = self._to_u8(img.astype(np.float32) * rng.uniform(*self.contrast_range))
        if rng.integers(2):
            img = adjust_saturation(img, rng.uniform(*self.saturation_range))
        if rng.integers(2):
            img = adjust_hue(img, int(rng.integers(-self.hue_delta, self.hue_delta)) / 180.0)
        if not contrast_first and rng.integers(2):
            img = self._to_u8(img.astype(np.float32) * rng.uniform(*self.contrast_range))
        return img, label


class Normalize:
    """uint8 ``[H, W, 3]`` -> float32 tensor ``[3, H, W]`` ``(img - mean) / std``; label (0..255) -> uint8
    tensor."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = np.asarray(mean, dtype=np.float32)
        self.inv_std = 1.0 / np.asarray(std, dtype=np.float32)

    def __call__(
        self, img: np.ndarray, label: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # numpy on HWC, then one transpose copy: much cheaper than permuted torch ops per sample.
        x = (img.astype(np.float32) - self.mean) * self.inv_std
        x = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
        return x, torch.from_numpy(np.ascontiguousarray(label, dtype=np.uint8))


def build_train_transform(
    crop_size: tuple[int, int],
    scale_range: tuple[float, float] = (0.5, 2.0),
    *,
    cat_max_ratio: float = 0.75,
    flip_p: float = 0.5,
    photometric: bool = True,
    ignore_index: int = 255,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """Rescale -> crop (cat-max-ratio, ignore padding) -> flip -> photometric -> normalise."""
    steps: list[Transform] = [
        RandomRescale(scale_range),
        RandomCrop(crop_size, cat_max_ratio=cat_max_ratio, ignore_index=ignore_index),
        RandomFlip(flip_p),
    ]
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps.append(Normalize(mean, std))
    return Compose(steps)


def build_eval_transform(
    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Compose:
    """Full-size evaluation: normalise only."""
    return Compose([Normalize(mean, std)])


def item_rng() -> np.random.Generator:
    """Per-sample generator seeded from torch's global RNG.

    DataLoader seeds torch differently in every worker (from the main process's torch seed), so drawing
    the numpy seed from torch gives distinct, reproducible augmentations per worker without extra state.
    """
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
