"""Cityscapes loader on a tiny fake tree in the official layout."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raycontrast.data.cityscapes import (
    CLASS_NAMES,
    LABELS,
    NUM_CLASSES,
    PALETTE,
    CityscapesDataset,
    label_to_train,
)
from raycontrast.data.transforms import Normalize, build_train_transform

H, W = 32, 64
CITIES = {"aachen": 2, "bochum": 1}


def reference_train_ids() -> dict[int, int]:
    """labelId -> trainId from cityscapesScripts if installed, else the published table typed out again."""
    try:
        from cityscapesscripts.helpers.labels import labels
    except ImportError:
        return {lid: (255 if tid < 0 else tid) for _, lid, tid in LABELS}
    return {lab.id: (255 if lab.trainId < 0 else lab.trainId) for lab in labels}


def write_pair(root: Path, split: str, city: str, stem: str, ids: np.ndarray, img: np.ndarray | None = None):
    img_dir = root / "leftImg8bit" / split / city
    lab_dir = root / "gtFine" / split / city
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    if img is None:
        # The red channel encodes the label id so alignment survives any geometric transform.
        img = np.stack([ids * 7, np.full_like(ids, 50), np.full_like(ids, 100)], -1).astype(np.uint8)
    Image.fromarray(img).save(img_dir / f"{stem}_leftImg8bit.png")
    Image.fromarray(ids.astype(np.uint8), mode="L").save(lab_dir / f"{stem}_gtFine_labelIds.png")
    return img_dir / f"{stem}_leftImg8bit.png", lab_dir / f"{stem}_gtFine_labelIds.png"


def make_tree(root: Path, split: str = "train", seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    ids_list = []
    for city, n in CITIES.items():
        for k in range(n):
            ids = rng.integers(0, 34, size=(H, W))
            ids[:4, :4] = np.arange(7).repeat(3)[:16].reshape(4, 4)  # unlabeled ids 0..6 always present
            write_pair(root, split, city, f"{city}_{k:06d}_000019", ids)
            ids_list.append(ids)
    return ids_list


def test_tables():
    assert len(CLASS_NAMES) == NUM_CLASSES == 19 and len(PALETTE) == 19
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in PALETTE)
    assert sorted(lid for _, lid, _ in LABELS) == list(range(-1, 34))
    ref = reference_train_ids()
    assert {lid: label_to_train(lid) for lid in range(-1, 34)} == ref
    assert sorted(v for v in ref.values() if v != 255) == list(range(19))
    assert label_to_train(-1) == 255 and label_to_train(7) == 0 and label_to_train(33) == 18
    with pytest.raises(ValueError, match="34"):
        label_to_train(34)
    # Arrays: int arrays with -1 and the uint8 read-back of -1 (255) both map to ignore.
    np.testing.assert_array_equal(label_to_train(np.array([-1, 7, 26])), [255, 0, 13])
    np.testing.assert_array_equal(label_to_train(np.array([255, 8], np.uint8)), [255, 1])


def test_loader_maps_train_ids_and_keeps_alignment(tmp_path):
    ids_list = make_tree(tmp_path)
    ds = CityscapesDataset(tmp_path, "train")
    assert len(ds) == 3 and ds.num_classes == 19 and len(ds.class_names) == 19 and len(ds.palette) == 19
    ref = reference_train_ids()
    lut = np.array([ref[i] for i in range(34)])
    for i, ids in enumerate(ids_list):  # sorted order: aachen 0, aachen 1, bochum 0
        assert ds.images[i].name.startswith(list(CITIES)[0 if i < 2 else 1])
        x, y = ds[i]
        assert x.shape == (3, H, W) and x.dtype == torch.float32
        assert y.shape == (H, W) and y.dtype == torch.uint8
        np.testing.assert_array_equal(y.numpy(), lut[ids])
        assert (y[:4, :4] == 255).all()
    # Alignment through a random geometric pipeline: the red channel still decodes to the label.
    ds_aug = CityscapesDataset(
        tmp_path,
        "train",
        transform=build_train_transform(
            (16, 24), (1.0, 1.0), photometric=False, mean=(0, 0, 0), std=(1, 1, 1)
        ),
    )
    torch.manual_seed(0)
    for i in range(len(ds_aug)):
        x, y = ds_aug[i]
        decoded = torch.from_numpy(lut[(x[0].round().long() // 7).numpy()])
        assert torch.equal(decoded, y)


def test_label_id_255_is_license_plate_ignore(tmp_path):
    ids = np.full((H, W), 7)
    ids[0, 0] = 255
    write_pair(tmp_path, "val", "c", "c_000000_000019", ids)
    _, y = CityscapesDataset(tmp_path, "val")[0]
    assert y[0, 0] == 255 and (y.flatten()[1:] == 0).all()


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        CityscapesDataset(tmp_path / "nope", "train")
    assert str(tmp_path / "nope") in str(e.value)


def test_missing_split(tmp_path):
    make_tree(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="val") as e:
        CityscapesDataset(tmp_path, "val")
    assert str(tmp_path / "leftImg8bit" / "val") in str(e.value) and "train" in str(e.value)


def test_empty_split(tmp_path):
    (tmp_path / "leftImg8bit" / "train" / "aachen").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no") as e:
        CityscapesDataset(tmp_path, "train")
    assert str(tmp_path / "leftImg8bit" / "train") in str(e.value)


def test_image_without_label(tmp_path):
    make_tree(tmp_path)
    img_path, lab_path = write_pair(tmp_path, "train", "bochum", "bochum_000009_000019", np.zeros((H, W)))
    lab_path.unlink()
    with pytest.raises(FileNotFoundError) as e:
        CityscapesDataset(tmp_path, "train")
    assert str(lab_path) in str(e.value) and str(img_path) in str(e.value)


def test_truncated_png(tmp_path):
    make_tree(tmp_path)
    ds = CityscapesDataset(tmp_path, "train")
    path = ds.images[1]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="truncated") as e:
        ds[1]
    assert str(path) in str(e.value)
    ds[0]  # others still load


def test_unreadable_png(tmp_path):
    make_tree(tmp_path)
    ds = CityscapesDataset(tmp_path, "train")
    path = ds.labels[2]
    path.write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(OSError) as e:
        ds[2]
    assert str(path) in str(e.value)


def test_label_ids_outside_table(tmp_path):
    ids = np.full((H, W), 7)
    ids[3, 3] = 200
    ids[4, 4] = 34
    _, lab_path = write_pair(tmp_path, "train", "c", "c_000000_000019", ids)
    with pytest.raises(ValueError, match=r"\[34, 200\]") as e:
        CityscapesDataset(tmp_path, "train")[0]
    assert str(lab_path) in str(e.value)


def test_label_size_mismatch(tmp_path):
    img = np.zeros((H, W + 2, 3), np.uint8)
    img_path, lab_path = write_pair(tmp_path, "train", "c", "c_000000_000019", np.full((H, W), 7), img)
    with pytest.raises(ValueError, match="size") as e:
        CityscapesDataset(tmp_path, "train")[0]
    assert str(lab_path) in str(e.value) and str(img_path) in str(e.value)


def test_transform_interface(tmp_path):
    make_tree(tmp_path)
    seen = []

    def spy(img, label, rng):
        seen.append((img.dtype, img.shape, label.dtype, label.shape, type(rng)))
        return Normalize()(img, label)

    CityscapesDataset(tmp_path, "train", transform=spy)[0]
    assert seen == [(np.uint8, (H, W, 3), np.int64, (H, W), np.random.Generator)]
