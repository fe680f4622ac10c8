"""Built-in digit/texture canvases: determinism, splits, classes, ignore ring, cache safety, anchors."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from raycontrast.config import load_config
from raycontrast.data import canvases
from raycontrast.data.canvases import (
    CLASS_NAMES,
    NUM_CLASSES,
    PALETTE,
    CanvasDataset,
    anchor_qualification,
    digit_pool,
    generate_canvases,
    save_npz_atomic,
)
from raycontrast.data.info import dataset_info
from raycontrast.data.loader import build_dataset, dataset_from_config
from raycontrast.data.transforms import build_train_transform

SMALL = {"num_images": 6, "height": 64, "width": 128, "digit_size": (52, 64)}


def test_deterministic_by_seed_and_index():
    a = generate_canvases("train", 6, 64, 128, seed=1, digit_size=(52, 64))
    b = generate_canvases("train", 6, 64, 128, seed=1, digit_size=(52, 64))
    c = generate_canvases("train", 6, 64, 128, seed=2, digit_size=(52, 64))
    prefix = generate_canvases("train", 3, 64, 128, seed=1, digit_size=(52, 64))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert np.array_equal(a[0][:3], prefix[0]) and np.array_equal(a[1][:3], prefix[1])
    assert a[0].dtype == np.uint8 and a[0].shape == (6, 64, 128, 3) and a[1].shape == (6, 64, 128)
    val = generate_canvases("val", 6, 64, 128, seed=1, digit_size=(52, 64))
    assert not np.array_equal(a[0], val[0])


def test_digit_pools_disjoint_and_cover_all():
    train, val = digit_pool("train"), digit_pool("val")
    assert len(np.intersect1d(train, val)) == 0
    assert np.array_equal(np.union1d(train, val), np.arange(1797))
    assert 500 < len(val) < 700
    with pytest.raises(ValueError, match="test"):
        digit_pool("test")


def test_val_canvases_only_use_val_digits(monkeypatch):
    # Give every digit sample a class equal to (pool membership): train digits -> 1, val digits -> 0.
    imgs, _ = canvases._digits()
    in_val = np.isin(np.arange(len(imgs)), digit_pool("val")).astype(np.int64)
    monkeypatch.setattr(canvases, "_digits", lambda: (imgs, 1 - in_val))
    _, labels = generate_canvases("val", 20, 64, 128, seed=0, digit_size=(52, 64))
    assert (labels == 0).any() and not (labels == 1).any()
    _, labels = generate_canvases("train", 20, 64, 128, seed=0, digit_size=(52, 64))
    assert (labels == 1).any() and not (labels == 0).any()


def test_all_classes_present_and_metadata():
    assert NUM_CLASSES == 13 == len(CLASS_NAMES) == len(PALETTE)
    info = dataset_info("canvases")
    assert (info.num_classes, info.class_names, info.palette, info.ignore_index) == (
        13,
        CLASS_NAMES,
        PALETTE,
        255,
    )
    _, labels = generate_canvases("train", 48, seed=0)
    values = set(np.unique(labels).tolist())
    assert values == set(range(13)) | {255}


def test_ignore_ring_separates_digits_from_background():
    _, labels = generate_canvases("val", 16, seed=3)
    lab = labels.astype(np.int64)
    digit = lab < 10
    texture = (lab >= 10) & (lab < 13)
    assert (lab == 255).mean() > 0.01
    # No digit pixel touches a texture pixel (4-neighbourhood): there is always ignore in between.
    for a, b in ((digit, texture), (texture, digit)):
        assert not (a[:, :-1] & b[:, 1:]).any()
        assert not (a[:, :, :-1] & b[:, :, 1:]).any()
    # Every image with a digit has ignore pixels adjacent to it.
    for i in range(len(lab)):
        if digit[i].any():
            ring = np.zeros_like(digit[i])
            ring[1:] |= digit[i][:-1]
            ring[:-1] |= digit[i][1:]
            assert (lab[i][ring & ~digit[i]] == 255).all()


def test_dataset_items_and_transform():
    ds = CanvasDataset(None, "train", **SMALL)
    assert len(ds) == 6 and ds.num_classes == 13 and ds.cache_path is None
    x, y = ds[0]
    assert x.shape == (3, 64, 128) and x.dtype == torch.float32
    assert y.shape == (64, 128) and y.dtype == torch.uint8
    np.testing.assert_array_equal(y.numpy(), ds.labels[0])
    aug = CanvasDataset(None, "train", transform=build_train_transform((32, 48), (0.5, 1.0)), **SMALL)
    torch.manual_seed(0)
    x, y = aug[1]
    assert x.shape == (3, 32, 48) and y.shape == (32, 48)
    assert set(torch.unique(y).tolist()) <= set(range(13)) | {255}


def test_cache_round_trip(tmp_path, monkeypatch):
    first = CanvasDataset(tmp_path, "val", seed=4, **SMALL)
    assert first.cache_path.exists() and first.cache_path.parent == tmp_path
    other = CanvasDataset(tmp_path, "val", seed=5, **SMALL)
    assert other.cache_path != first.cache_path

    def boom(*a, **k):
        raise AssertionError("should have loaded from cache")

    monkeypatch.setattr(canvases, "generate_canvases", boom)
    again = CanvasDataset(tmp_path, "val", seed=4, **SMALL)
    assert np.array_equal(again.images, first.images) and np.array_equal(again.labels, first.labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [first.cache_path.name, other.cache_path.name]
    )


def _crash_mid_write(monkeypatch):
    def half_written_then_crash(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(np, "savez", half_written_then_crash)


def test_atomic_write_never_leaves_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    save_npz_atomic(path, a=np.arange(5))
    before = path.read_bytes()
    _crash_mid_write(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated"):
        save_npz_atomic(path, a=np.arange(7))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]
    monkeypatch.undo()
    with np.load(path) as z:
        np.testing.assert_array_equal(z["a"], np.arange(5))


def test_dataset_crash_while_caching_leaves_no_file(tmp_path, monkeypatch):
    _crash_mid_write(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated"):
        CanvasDataset(tmp_path, "train", **SMALL)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_cache_is_regenerated(tmp_path, damage):
    good = CanvasDataset(tmp_path, "train", **SMALL)
    data = good.cache_path.read_bytes()
    if damage == "garbage":
        good.cache_path.write_bytes(np.random.default_rng(0).bytes(1000))
    else:
        good.cache_path.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="regenerating"):
        again = CanvasDataset(tmp_path, "train", **SMALL)
    assert np.array_equal(again.images, good.images) and np.array_equal(again.labels, good.labels)
    with np.load(good.cache_path) as z:
        assert np.array_equal(z["labels"], good.labels)


class _FixedLabels(torch.utils.data.Dataset):
    num_classes = 3
    class_names = ("a", "b", "c")

    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.zeros(1), torch.from_numpy(self.labels[i])


def test_anchor_qualification_against_hand_count():
    # 8x8 maps, stride 2 -> 4x4 grid (16 cells). Image 0: class 0 has 12 grid cells, class 1 has 4.
    a = np.full((8, 8), 0)
    a[:2] = 1
    a[1::2, 1::2] = 2  # off-grid pixels: class 2 is invisible at stride 2
    b = np.full((8, 8), 255)
    b[:, :6] = 1  # class 1: 12 grid cells
    shares = anchor_qualification(_FixedLabels([a, b]), max_views=5, stride=2)
    assert shares["a"] == 1.0  # present once, 12 > 5
    assert shares["b"] == 0.5  # 4 (no) and 12 (yes)
    assert math.isnan(shares["c"])


def test_every_class_qualifies_as_anchor_at_demo_settings(tmp_path):
    """The demo config's canvases and max_views at the H/4 grid, raw and under its training augmentation."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    canvases_96 = cfg.data.canvases.model_copy(update={"train_images": 96})  # a sample is enough
    data = cfg.data.model_copy(update={"root": str(tmp_path), "canvases": canvases_96})
    mv = cfg.loss.max_views
    val = dataset_from_config(data, "val", train=False)
    assert len(val) == cfg.data.canvases.val_images
    shares = anchor_qualification(val, max_views=mv, stride=4)
    assert all(s >= 0.9 for s in shares.values()), shares
    torch.manual_seed(0)
    aug = dataset_from_config(data, "train", train=True)
    shares = anchor_qualification(aug, max_views=mv, stride=4)
    assert all(s >= 0.6 for s in shares.values()), shares


def test_every_grid_cell_gets_a_digit():
    """64x128 canvases with 30-32 px digit boxes: a 2x4 grid, so 8 digits (ink blobs) per canvas."""
    from scipy import ndimage

    _, labels = generate_canvases("val", 4, 64, 128, seed=5, digit_size=(30, 32))
    for lab in labels:
        cells = [lab[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32] for r in range(2) for c in range(4)]
        assert all((cell < 10).any() for cell in cells)
        assert ndimage.label(lab < 10)[1] >= 8


def test_hflip_off_never_mirrors():
    """``hflip=False`` (the demo: a mirrored digit is another glyph): at scale 1 the crop is the canvas."""
    kw = {"root": None, "crop_size": (64, 128), "scale_range": (1.0, 1.0), "train": True}
    args = {"num_images": 8, "height": 64, "width": 128, "digit_size": (30, 32)}
    raw = CanvasDataset(None, "train", **args)
    for hflip, expect_mirrored in ((False, False), (True, True)):
        torch.manual_seed(0)
        ds = build_dataset("canvases", "train", hflip=hflip, canvas_args=args, **kw)
        mirrored = []
        for i in range(len(ds)):
            lab = ds[i][1].numpy()
            if np.array_equal(lab, raw.labels[i]):
                mirrored.append(False)
            else:
                assert np.array_equal(lab, raw.labels[i][:, ::-1])
                mirrored.append(True)
        assert any(mirrored) == expect_mirrored


def test_build_dataset_errors():
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("mnist", "train", root=None, crop_size=(8, 8), scale_range=(1, 1), train=False)
    with pytest.raises(ValueError, match="colour"):
        build_dataset(
            "canvases",
            "val",
            root=None,
            crop_size=(8, 8),
            scale_range=(1, 1),
            train=False,
            canvas_args={"colour": 1},
        )
    with pytest.raises(ValueError, match="root"):
        build_dataset("cityscapes", "val", root=None, crop_size=(8, 8), scale_range=(1, 1), train=False)
