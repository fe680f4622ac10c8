"""Joint image/label transforms: determinism, geometry, label integrity, mmseg crop rule, colour maths."""

import colorsys

import numpy as np
import pytest
import torch

from raycontrast.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Normalize,
    PhotoMetricDistortion,
    RandomCrop,
    RandomFlip,
    RandomRescale,
    adjust_hue,
    adjust_saturation,
    build_eval_transform,
    build_train_transform,
    hsv_to_rgb,
    rgb_to_hsv,
)

PALETTE = np.random.default_rng(123).integers(0, 256, size=(256, 3), dtype=np.uint8)


def blocky_pair(h: int = 48, w: int = 80, block: int = 8, seed: int = 0):
    """Label made of constant blocks (values from a small set plus ignore) and an image that encodes it."""
    rng = np.random.default_rng(seed)
    coarse = rng.choice([0, 3, 7, 11, 255], size=(h // block, w // block))
    label = np.kron(coarse, np.ones((block, block), np.int64)).astype(np.int64)
    return PALETTE[label].copy(), label


def test_train_transform_is_deterministic_given_seed():
    img, label = blocky_pair()
    t = build_train_transform((32, 40), (0.5, 2.0))
    a = t(img, label, np.random.default_rng(7))
    b = t(img, label, np.random.default_rng(7))
    c = t(img, label, np.random.default_rng(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))


@pytest.mark.parametrize("shape", [(10, 12), (48, 80), (200, 300)])
def test_train_transform_output_shapes_and_types(shape):
    img, label = blocky_pair(*shape, block=2)
    x, y = build_train_transform((32, 40), (0.5, 2.0))(img, label, np.random.default_rng(0))
    assert x.shape == (3, 32, 40) and x.dtype == torch.float32
    assert y.shape == (32, 40) and y.dtype == torch.uint8  # cast to int64 on the device


def test_crop_pads_image_with_zero_and_label_with_ignore():
    img, label = blocky_pair(20, 30, block=2)
    out_img, out_lab = RandomCrop((32, 48), cat_max_ratio=1.0)(img, label, np.random.default_rng(0))
    assert out_img.shape == (32, 48, 3) and out_lab.shape == (32, 48)
    np.testing.assert_array_equal(out_img[:20, :30], img)
    np.testing.assert_array_equal(out_lab[:20, :30], label)
    assert (out_img[20:] == 0).all() and (out_img[:, 30:] == 0).all()
    assert (out_lab[20:] == 255).all() and (out_lab[:, 30:] == 255).all()


def test_crop_is_a_window_of_the_input():
    img, label = blocky_pair(48, 80, block=4)
    out_img, out_lab = RandomCrop((16, 24), cat_max_ratio=1.0)(img, label, np.random.default_rng(3))
    hits = [
        (y, x)
        for y in range(48 - 16 + 1)
        for x in range(80 - 24 + 1)
        if np.array_equal(img[y : y + 16, x : x + 24], out_img)
    ]
    assert hits
    y, x = hits[0]
    np.testing.assert_array_equal(label[y : y + 16, x : x + 24], out_lab)


def test_rescale_keeps_label_values_and_alignment():
    img, label = blocky_pair(48, 80, block=8)
    values = set(np.unique(label).tolist())
    for seed in range(10):
        out_img, out_lab = RandomRescale((0.5, 2.0))(img, label, np.random.default_rng(seed))
        assert set(np.unique(out_lab).tolist()) <= values
        # Away from block edges bilinear colours are exact, so image and label must still agree there.
        interior = np.ones_like(out_lab, bool)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                interior &= np.roll(out_lab, (dy, dx), (0, 1)) == out_lab
        interior[[0, -1]] = False
        interior[:, [0, -1]] = False
        assert interior.mean() > 0.3
        np.testing.assert_array_equal(out_img[interior], PALETTE[out_lab[interior]])


def test_rescale_range_respected():
    img, label = blocky_pair(40, 60, block=4)
    for seed in range(30):
        out_img, out_lab = RandomRescale((0.5, 2.0))(img, label, np.random.default_rng(seed))
        h, w = out_lab.shape
        assert out_img.shape[:2] == (h, w)
        assert 20 <= h <= 80 and 30 <= w <= 120
        assert abs(w / h - 1.5) < 0.1  # aspect ratio kept
    out = RandomRescale((1.5, 1.5))(img, label, np.random.default_rng(0))
    assert out[1].shape == (60, 90)


def test_flip_flips_both():
    img, label = blocky_pair()
    f_img, f_lab = RandomFlip(p=1.0)(img, label, np.random.default_rng(0))
    np.testing.assert_array_equal(f_img, img[:, ::-1])
    np.testing.assert_array_equal(f_lab, label[:, ::-1])
    n_img, n_lab = RandomFlip(p=0.0)(img, label, np.random.default_rng(0))
    np.testing.assert_array_equal(n_img, img)
    np.testing.assert_array_equal(n_lab, label)


def _windows_drawn(rng_after, seed, h, w, size):
    """How many crop windows (two integer draws each) a crop consumed from default_rng(seed)."""
    ref = np.random.default_rng(seed)
    for n in range(1, 30):
        ref.integers(0, h - size[0] + 1)
        ref.integers(0, w - size[1] + 1)
        if ref.bit_generator.state == rng_after.bit_generator.state:
            return n
    raise AssertionError("rng state never matched")


def test_cat_max_ratio_retries_then_gives_up():
    # A single class everywhere: no window can pass, so mmseg draws 1 + max_tries windows and keeps the last.
    label = np.zeros((60, 60), np.int64)
    img = np.zeros((60, 60, 3), np.uint8)
    rng = np.random.default_rng(5)
    _, out = RandomCrop((20, 20), cat_max_ratio=0.75, max_tries=10)(img, label, rng)
    assert out.shape == (20, 20)
    assert _windows_drawn(rng, 5, 60, 60, (20, 20)) == 11
    # Two balanced classes in every window: the first window passes.
    label = np.indices((60, 60)).sum(0) % 2
    rng = np.random.default_rng(5)
    RandomCrop((20, 20), cat_max_ratio=0.75)(img, label, rng)
    assert _windows_drawn(rng, 5, 60, 60, (20, 20)) == 1
    # Disabled rule: one window.
    rng = np.random.default_rng(5)
    RandomCrop((20, 20), cat_max_ratio=1.0)(img, np.zeros((60, 60), np.int64), rng)
    assert _windows_drawn(rng, 5, 60, 60, (20, 20)) == 1


def _passes(crop, ratio=0.75, ignore=255):
    vals, counts = np.unique(crop[crop != ignore], return_counts=True)
    return len(vals) > 1 and counts.max() / counts.sum() < ratio


def test_cat_max_ratio_rule_enforced_when_possible():
    # Class 1 occupies a 30x30 corner of a 100x100 map of class 0; only windows near it pass the rule.
    label = np.zeros((100, 100), np.int64)
    label[:30, :30] = 1
    label[:5] = 255  # ignored pixels do not count towards either class
    img = np.zeros((100, 100, 3), np.uint8)
    with_rule = [
        _passes(RandomCrop((40, 40), 0.75)(img, label, np.random.default_rng(s))[1]) for s in range(40)
    ]
    without = [_passes(RandomCrop((40, 40), 1.0)(img, label, np.random.default_rng(s))[1]) for s in range(40)]
    assert sum(with_rule) > 2 * sum(without)
    assert sum(with_rule) >= 20


def test_hsv_round_trip_matches_colorsys():
    rgb = np.random.default_rng(0).random((200, 3)).astype(np.float32)
    hsv = rgb_to_hsv(rgb)
    ref = np.array([colorsys.rgb_to_hsv(*p) for p in rgb.astype(np.float64)])
    np.testing.assert_allclose(hsv, ref, atol=1e-5)
    np.testing.assert_allclose(hsv_to_rgb(hsv), rgb, atol=1e-5)


def test_saturation_and_hue_match_colorsys_reference():
    img = np.random.default_rng(1).integers(0, 256, size=(10, 20, 3), dtype=np.uint8)
    px = img.reshape(-1, 3).astype(np.float64) / 255
    for alpha in (0.5, 1.4):
        ref = []
        for p in px:
            h, s, v = colorsys.rgb_to_hsv(*p)
            ref.append(colorsys.hsv_to_rgb(h, min(s * alpha, 1.0), v))
        ref = np.rint(np.array(ref) * 255).reshape(img.shape)
        assert np.abs(adjust_saturation(img, alpha).astype(int) - ref).max() <= 1
    ref = []
    for p in px:
        h, s, v = colorsys.rgb_to_hsv(*p)
        ref.append(colorsys.hsv_to_rgb((h + 0.1) % 1.0, s, v))
    ref = np.rint(np.array(ref) * 255).reshape(img.shape)
    assert np.abs(adjust_hue(img, 0.1).astype(int) - ref).max() <= 1


def test_photometric_leaves_label_and_shape():
    img, label = blocky_pair()
    changed = 0
    for seed in range(8):
        out_img, out_lab = PhotoMetricDistortion()(img, label, np.random.default_rng(seed))
        assert out_img.dtype == np.uint8 and out_img.shape == img.shape
        assert out_lab is label
        changed += not np.array_equal(out_img, img)
    assert changed >= 6


def test_normalize_and_eval_transform():
    img, label = blocky_pair()
    x, y = build_eval_transform()(img, label, np.random.default_rng(0))
    ref = (torch.from_numpy(img).double().permute(2, 0, 1) - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / (
        torch.tensor(IMAGENET_STD).view(3, 1, 1)
    )
    torch.testing.assert_close(x.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(y, torch.from_numpy(label))
    x2, _ = Compose([Normalize((0, 0, 0), (1, 1, 1))])(img, label, np.random.default_rng(0))
    assert torch.equal(x2, torch.from_numpy(img).permute(2, 0, 1).float())
