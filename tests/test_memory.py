"""Tests for raycontrast.memory.PixelMemory against a slot-by-slot reference of the ring buffers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raycontrast.memory import PIXEL, SEGMENT, PixelMemory

K, D = 4, 8


def class_keys(labels_grid, gen, noise=0.3):
    """Embeddings whose first K channels encode the pixel's class (argmax), plus noise elsewhere.

    labels_grid [B, h, w] -> keys [B, D, h, w]; the class of any stored entry is recoverable.
    """
    batch, h, w = labels_grid.shape
    keys = torch.rand(batch, D, h, w, generator=gen) * noise
    onehot = F.one_hot(labels_grid.clamp(max=K - 1), K).permute(0, 3, 1, 2).float()
    keys[:, :K] += onehot * (labels_grid != 255)[:, None]
    return keys


def make_batch(gen, batch=2, h=6, w=8, ignore=0.2, classes=K):
    grid = torch.randint(0, classes, (batch, h, w), generator=gen)
    grid[torch.rand(batch, h, w, generator=gen) < ignore] = 255
    labels = grid.repeat_interleave(4, 1).repeat_interleave(4, 2)  # 4x resolution, exact nearest inverse
    return class_keys(grid, gen), labels, grid


def reference_write(state, entries, entry_labels, n_cls, per_class, size):
    """Write entries one at a time, exactly as a ring buffer with a pointer would."""
    feats, ptr, count = state
    for i, (x, lab) in enumerate(zip(entries, entry_labels.tolist(), strict=True)):
        if lab < 0:
            continue
        kind = SEGMENT if i % per_class == 0 else PIXEL
        feats[lab, kind, ptr[lab, kind]] = x
        ptr[lab, kind] = (ptr[lab, kind] + 1) % size
        count[lab, kind] = min(count[lab, kind] + 1, size)


@pytest.mark.parametrize("size", [1, 3, 7, 50])
def test_write_matches_slot_by_slot_reference(size):
    gen = torch.Generator().manual_seed(size)
    mem = PixelMemory(K, D, size, pixel_update_freq=3)
    ref = (
        torch.zeros(K, 2, size, D),
        torch.zeros(K, 2, dtype=torch.long),
        torch.zeros(K, 2, dtype=torch.long),
    )
    for step in range(5):
        keys, labels, _ = make_batch(gen, batch=1 + step % 3)
        entries, entry_labels = mem.candidates(keys, labels, gen)
        reference_write(ref, entries, entry_labels, K, 4, size)
        mem.write(entries, entry_labels)
        assert torch.equal(mem.ptr, ref[1]) and torch.equal(mem.count, ref[2])
        assert torch.equal(mem.feats, ref[0])  # oldest-first overwrite, keep the last `size`


def test_pointer_arithmetic_and_wraparound():
    mem = PixelMemory(2, 2, 5, pixel_update_freq=1)
    # One image, class 1 only: per call 1 segment + 1 pixel entry for class 1.
    for n in range(1, 8):
        entry = torch.tensor([[0.0, 0.0], [0.0, 0.0], [float(n), 0.0], [float(n), 1.0]])
        mem.write(entry, torch.tensor([-1, -1, 1, 1]))
        assert mem.ptr.tolist() == [[0, 0], [n % 5, n % 5]]
        assert mem.count.tolist() == [[0, 0], [min(n, 5)] * 2]
    # After 7 writes into 5 slots: slots hold writes 6, 7, 3, 4, 5 (the two oldest were overwritten).
    assert mem.feats[1, SEGMENT, :, 0].tolist() == [6.0, 7.0, 3.0, 4.0, 5.0]
    assert mem.feats[0].abs().sum() == 0


def test_more_than_size_entries_in_one_call():
    mem = PixelMemory(1, 1, 3, pixel_update_freq=1)
    mem.write(torch.tensor([[1.0], [2.0]]), torch.tensor([0, 0]))  # ptr -> 1
    values = torch.arange(10, 18, dtype=torch.float32)[:, None]  # 4 images: entries 10..17
    mem.write(values, torch.zeros(8, dtype=torch.long))
    # Pixel entries 11, 13, 15, 17 written one by one from ptr 1 leave slots [15, 17, 13].
    ref = (torch.zeros(1, 2, 3, 1), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long))
    reference_write(ref, torch.tensor([[1.0], [2.0]]), torch.tensor([0, 0]), 1, 2, 3)
    reference_write(ref, values, torch.zeros(8, dtype=torch.long), 1, 2, 3)
    assert torch.equal(mem.feats, ref[0]) and torch.equal(mem.ptr, ref[1])
    assert mem.count.tolist() == [[3, 3]]
    assert mem.feats[0, PIXEL, :, 0].tolist() == [15.0, 17.0, 13.0]


def test_entries_come_from_their_class_and_segments_are_means():
    gen = torch.Generator().manual_seed(0)
    mem = PixelMemory(K, D, 100, pixel_update_freq=5)
    keys, labels, grid = make_batch(gen, batch=3, h=10, w=10)
    mem.enqueue(keys, labels, gen)
    feats, feat_labels = mem.contrast_set()
    assert torch.equal(feats[:, :K].argmax(1), feat_labels)  # every stored key encodes its own class
    assert torch.allclose(feats.norm(dim=1), torch.ones(len(feats)))
    assert 0 in feat_labels.tolist()  # class 0 is stored like any other
    assert torch.equal(feat_labels, feat_labels.sort().values)  # grouped by class
    flat_keys, flat_grid = keys.permute(0, 2, 3, 1).reshape(3, -1, D), grid.flatten(1)
    pixel_pool = {c: F.normalize(flat_keys[flat_grid == c], dim=1) for c in range(K)}
    for c in range(K):
        # Segment queue, in image order: normalised mean of the class's pixels in each image.
        want = [
            F.normalize(flat_keys[b][flat_grid[b] == c].mean(0), dim=0)
            for b in range(3)
            if (flat_grid[b] == c).any()
        ]
        got = mem.feats[c, SEGMENT, : mem.count[c, SEGMENT]]
        assert torch.allclose(got, torch.stack(want), atol=1e-6)
        # Pixel queue: min(count, 5) distinct pixels of the class per image.
        n_exp = sum(min(int((flat_grid[b] == c).sum()), 5) for b in range(3))
        stored = mem.feats[c, PIXEL, : mem.count[c, PIXEL]]
        assert len(stored) == n_exp == mem.count[c, PIXEL]
        dist = (stored[:, None] - pixel_pool[c][None]).abs().amax(-1)
        assert (dist.min(1).values < 1e-6).all()
        assert len(set(dist.argmin(1).tolist())) == n_exp  # no pixel taken twice


def test_small_class_takes_all_pixels_and_ignore_is_skipped():
    grid = torch.full((1, 4, 4), 255)
    grid[0, 0, :3] = 2  # three pixels of class 2, the rest ignored
    gen = torch.Generator().manual_seed(1)
    mem = PixelMemory(K, D, 10, pixel_update_freq=5)
    mem.enqueue(class_keys(grid, gen), grid.repeat_interleave(4, 1).repeat_interleave(4, 2), gen)
    assert mem.count.tolist() == [[0, 0], [0, 0], [3, 1], [0, 0]]


def test_identical_memories_from_same_gathered_input():
    gen = torch.Generator().manual_seed(2)
    rank_data = [make_batch(gen) for _ in range(2)]

    def fake_gather(rank):
        """2-rank all-gather: the local entries of each rank, concatenated in rank order."""

        def gather(keys, labels):
            parts = [
                PixelMemory(K, D, 10, 3).candidates(k, lab, torch.Generator().manual_seed(r))
                for r, (k, lab, _) in enumerate(rank_data)
            ]
            assert torch.equal(parts[rank][0], keys) and torch.equal(parts[rank][1], labels)
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

        return gather

    mems = [PixelMemory(K, D, 10, 3, gather_fn=fake_gather(r)) for r in range(2)]
    for r, mem in enumerate(mems):
        keys, labels, _ = rank_data[r]
        mem.enqueue(keys, labels, torch.Generator().manual_seed(r))
    assert torch.equal(mems[0].feats, mems[1].feats)
    assert torch.equal(mems[0].ptr, mems[1].ptr) and torch.equal(mems[0].count, mems[1].count)
    single = PixelMemory(K, D, 10, 3)
    for r, (keys, labels, _) in enumerate(rank_data):
        single.enqueue(keys, labels, torch.Generator().manual_seed(r))
    assert torch.equal(single.feats, mems[0].feats)  # rank order == sequential order


def test_same_seed_same_contents():
    gen = torch.Generator().manual_seed(3)
    keys, labels, _ = make_batch(gen)
    a, b = PixelMemory(K, D, 10, 3), PixelMemory(K, D, 10, 3)
    a.enqueue(keys, labels, torch.Generator().manual_seed(9))
    b.enqueue(keys, labels, torch.Generator().manual_seed(9))
    assert torch.equal(a.feats, b.feats)


def test_state_round_trip_and_validation():
    gen = torch.Generator().manual_seed(4)
    mem = PixelMemory(K, D, 6, 2)
    for _ in range(3):
        mem.enqueue(*make_batch(gen)[:2], gen)
    state = mem.state_dict()
    other = PixelMemory(K, D, 6, 2)
    other.load_state_dict(state)
    for x, y in zip(mem.contrast_set(), other.contrast_set(), strict=True):
        assert torch.equal(x, y)
    assert torch.equal(mem.ptr, other.ptr) and torch.equal(mem.fill(), other.fill())
    with pytest.raises(ValueError, match="'feats' has shape"):
        PixelMemory(K, D, 7, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="missing key 'ptr'"):
        other.load_state_dict({"feats": state["feats"]})


def test_contrast_set_only_filled_slots():
    mem = PixelMemory(3, 2, 4, pixel_update_freq=1)
    feats, labels = mem.contrast_set()
    assert feats.shape == (0, 2) and labels.shape == (0,)
    mem.write(torch.tensor([[1.0, 0.0], [0.0, 1.0]] + [[0.0, 0.0]] * 4), torch.tensor([0, 0, -1, -1, -1, -1]))
    feats, labels = mem.contrast_set()
    assert labels.tolist() == [0, 0] and feats.tolist() == [[0.0, 1.0], [1.0, 0.0]]  # pixel, then segment
    assert float(mem.fill()) == pytest.approx(2 / 24)
    full = PixelMemory(1, 2, 1, 1)
    full.write(torch.ones(2, 2), torch.zeros(2, dtype=torch.long))
    feats, labels = full.contrast_set()
    assert feats.shape == (2, 2) and labels.tolist() == [0, 0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        PixelMemory(K, D, 0)
    mem = PixelMemory(K, D, 5)
    with pytest.raises(ValueError, match="labels must lie"):
        mem.enqueue(torch.zeros(1, D, 2, 2), torch.full((1, 8, 8), 7))
    with pytest.raises(ValueError, match="entries"):
        mem.write(torch.zeros(5, D), torch.zeros(5, dtype=torch.long))
