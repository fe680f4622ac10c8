"""Hard-anchor sampling of the pixel-contrast loss (ALGORITHM.md section 2), vectorised: one shuffle, one
sort and one gather for all images and classes, no per-class Python loop (pure torch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["labels_to_grid", "sample_anchors", "shuffle_within_groups"]


def labels_to_grid(labels: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest downsampling of labels `[B, H, W]` to `[B, h, w]` (for H = 4h this is `labels[:, ::4, ::4]`)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    grid = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")
    return grid[:, 0].long()


def shuffle_within_groups(group: Tensor, num_groups: int, generator: torch.Generator | None = None):
    """Random order of the items of `group [n]` (ids in [0, num_groups]) sorted by group id.

    Returns `(order [n], offset [num_groups + 1], count [num_groups + 1])`: the items of group g are
    `order[offset[g] : offset[g] + count[g]]` in uniformly random order, so any prefix of that range is a
    uniformly random subset of the group.
    """
    perm = torch.randperm(group.numel(), generator=generator, device=group.device)
    order = perm[torch.argsort(group[perm], stable=True)]
    count = torch.bincount(group, minlength=num_groups + 1)
    return order, torch.cumsum(count, 0) - count, count


def sample_anchors(
    labels: Tensor,
    predict: Tensor,
    *,
    max_samples: int,
    max_views: int,
    ignore_index: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Hard-anchor sampling (ALGORITHM.md section 2) for labels and predictions `[B, N]` on the embedding grid.

    Candidate (image, class) pairs have more than `max_views` pixels; with `total` pairs every pair keeps
    `V = min(max_samples // total, max_views)` pixels: half hard (gt c, pred != c) and half easy, topped up
    from the other pool when one is short. Returns `(index [A, V], anchor_labels [A])`, indices into the
    flattened `B * N` pixels, rows ordered by image then class, hard pixels first within a row. A == 0
    (shapes [0, 0] and [0]) when no pair qualifies or `max_samples < total`.
    """
    if labels.dim() != 2 or labels.shape != predict.shape:
        raise ValueError(
            f"labels and predict must both be [B, N], got {tuple(labels.shape)} and {tuple(predict.shape)}"
        )
    batch, n_pix = labels.shape
    dev = labels.device
    empty = (torch.zeros(0, 0, dtype=torch.long, device=dev), torch.zeros(0, dtype=torch.long, device=dev))
    if labels.numel() == 0:
        return empty
    valid = labels != ignore_index
    lab = torch.where(valid, labels, 0)
    lo, hi = torch.stack([lab.min(), lab.max()]).tolist()  # host sync 1
    if lo < 0:
        raise ValueError(f"labels must be >= 0 or ignore_index ({ignore_index}), found {lo}")
    k = hi + 1
    pair = (torch.arange(batch, device=dev)[:, None] * k + lab).flatten()  # (image, class) id per pixel
    counts = torch.zeros(batch * k, dtype=torch.long, device=dev).scatter_add_(
        0, pair, valid.flatten().long()
    )
    cand = counts > max_views  # strictly more than max_views pixels
    total = int(cand.sum())  # host sync 2
    if total == 0 or max_samples // total == 0:
        return empty
    views = min(max_samples // total, max_views)
    row = torch.cumsum(cand, 0) - 1  # row of each candidate pair: image-major, then class ascending
    keep = valid.flatten() & cand[pair]
    easy = (predict.flatten() == lab.flatten()).long()
    group = torch.where(keep, 2 * row[pair] + easy, 2 * total)  # groups (row, hard=0 / easy=1); rest last
    order, offset, count = shuffle_within_groups(group, 2 * total, generator)
    n_hard, n_easy = count[: 2 * total].view(-1, 2).t()
    off_hard, off_easy = offset[: 2 * total].view(-1, 2).t()
    half_h, half_e = 2 * n_hard >= views, 2 * n_easy >= views
    k_hard = torch.where(half_h & half_e, views // 2, torch.where(half_h, views - n_easy, n_hard))[:, None]
    slot = torch.arange(views, device=dev)
    src = torch.where(slot < k_hard, off_hard[:, None] + slot, off_easy[:, None] + slot - k_hard)
    index = order[src]
    return index, lab.flatten()[index[:, 0]]
