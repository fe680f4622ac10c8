"""Pixel memory bank of the pixel-contrast loss (ALGORITHM.md section 4): per class a pixel queue and a
segment queue, each a ring buffer of `size` L2-normalised embeddings.

A plain class holding tensors (not an nn.Module), so a DDP wrapper never sees or broadcasts it; every rank
enqueues the same gathered entries in the same order and so holds an identical memory. Checkpoint it with
`state_dict()` next to the model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from raycontrast.anchors import labels_to_grid, shuffle_within_groups

__all__ = ["PixelMemory", "all_gather_entries", "shrink_state"]

GatherFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

PIXEL, SEGMENT = 0, 1  # queue index in the [K, 2, size, D] storage


def _identity_gather(keys: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    return keys, labels


def all_gather_entries(keys: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """All-gather `keys [E, D]` (float), `labels [E]` over the default process group, in rank order.

    E = B * K * (1 + pixel_update_freq) is fixed by the memory's layout and the per-rank batch size, so it
    is the same on every rank: no count exchange (no host sync) is needed. Keys and labels travel as one
    `[E, D + 1]` tensor, so it is one collective; labels (-1..K) are exact in any float dtype.
    """
    packed = torch.cat([keys, labels[:, None].to(keys.dtype)], dim=1)
    parts = [torch.empty_like(packed) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, packed)
    out = torch.cat(parts)
    return out[:, :-1], out[:, -1].to(labels.dtype)


class PixelMemory:
    """Per-class pixel and segment ring buffers.

    Storage `feats [K, 2, size, D]` (queue 0: pixels, queue 1: segments), write pointer `ptr [K, 2]` and fill
    count `count [K, 2]`. Writes go to `(ptr + i) % size`, so the oldest entries are overwritten first.

    `gather_fn(keys [E, D], labels [E]) -> (keys_all, labels_all)` is applied to this process's candidate
    entries before writing. The local entries have a fixed layout, E = B * K * (1 + pixel_update_freq):
    (image, class, slot) row-major, slot 0 the class's segment entry, slots 1.. its pixel entries; labels hold
    the class id, or -1 for an empty slot (class absent, or fewer pixels than pixel_update_freq). Under DDP
    gather_fn must return the concatenation over ranks along dim 0 in rank order (e.g. an all-gather of both
    tensors); with equal batch sizes every rank's E is the same. Default: identity (single process).
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        size: int,
        pixel_update_freq: int = 10,
        gather_fn: GatherFn | None = None,
        ignore_index: int = 255,
    ) -> None:
        if size < 1:
            raise ValueError(
                f"memory size must be >= 1 slot per class and queue, got {size} (0 means: no memory)"
            )
        if num_classes < 1 or dim < 1 or pixel_update_freq < 1:
            raise ValueError(
                f"num_classes, dim and pixel_update_freq must be >= 1, got {num_classes}, {dim}, {pixel_update_freq}"
            )
        self.num_classes, self.dim, self.size = num_classes, dim, size
        self.pixel_update_freq, self.ignore_index = pixel_update_freq, ignore_index
        self.gather_fn = gather_fn or _identity_gather
        self.feats = torch.zeros(num_classes, 2, size, dim)
        self.ptr = torch.zeros(num_classes, 2, dtype=torch.long)
        self.count = torch.zeros(num_classes, 2, dtype=torch.long)
        self.total = torch.zeros(num_classes, 2, dtype=torch.long)  # entries ever written, per queue

    @property
    def device(self) -> torch.device:
        return self.feats.device

    def to(self, device: torch.device | str) -> PixelMemory:
        self.feats, self.ptr, self.count = self.feats.to(device), self.ptr.to(device), self.count.to(device)
        self.total = self.total.to(device)
        return self

    def fill(self, size: int | None = None) -> Tensor:
        """Fraction of all slots that hold an entry, a 0-d float tensor on the memory's device (no host sync).

        `size`: the fill a memory of that size (<= this one's) would have after the same writes, computed
        with the same arithmetic (a ring of `size` slots holds min(total written, size) entries).
        """
        count = self.count if size is None else torch.clamp(self.total, max=size)
        return count.sum() / (count.numel() * (self.size if size is None else size))

    @torch.no_grad()
    def candidates(
        self, keys: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Local entries from keys `[B, D, h, w]` and labels `[B, H, W]` -> `([E, D], [E])` (layout: class doc).

        Segment entry: L2-normalised mean embedding of the class's pixels in the image. Pixel entries: up to
        `pixel_update_freq` distinct random pixels of that class, L2-normalised.
        """
        batch, dim, h, w = keys.shape
        if dim != self.dim or labels.dim() != 3 or labels.shape[0] != batch:
            raise ValueError(
                f"need keys [B, {self.dim}, h, w] and labels [B, H, W], got {tuple(keys.shape)}, {tuple(labels.shape)}"
            )
        n_cls, n_pix, n_take = self.num_classes, h * w, self.pixel_update_freq
        keys = keys.detach().to(self.feats.dtype)
        lab = labels_to_grid(labels.to(keys.device), (h, w)).flatten(1)  # [B, N]
        valid = lab != self.ignore_index
        if bool(((lab < 0) | (lab >= n_cls))[valid].any()):
            raise ValueError(f"labels must lie in [0, {n_cls}) or equal ignore_index {self.ignore_index}")
        cls = torch.where(valid, lab, n_cls)
        flat = keys.flatten(2)  # [B, D, N]
        # Segment sums via one batched matmul with the one-hot class map (no [B*N, D] copy).
        onehot = F.one_hot(cls, n_cls + 1)[..., :n_cls].to(flat.dtype)  # [B, N, K]
        seg = F.normalize(torch.bmm(flat, onehot).transpose(1, 2), dim=-1)  # [B, K, D]
        group = (torch.arange(batch, device=keys.device)[:, None] * n_cls + cls).flatten()
        group = torch.where(valid.flatten(), group, batch * n_cls)
        order, offset, count = shuffle_within_groups(group, batch * n_cls, generator)
        slot = torch.arange(n_take, device=keys.device)
        taken = slot < count[: batch * n_cls, None]  # [B*K, P]
        src = torch.where(taken, offset[: batch * n_cls, None] + slot, 0)
        idx = order[src]  # flattened pixel ids b * N + n
        pix = F.normalize(flat[idx // n_pix, :, idx % n_pix], dim=-1) * taken[..., None]  # [B*K, P, D]
        cls_id = torch.arange(n_cls, device=keys.device).repeat(batch)
        seg_lab = torch.where(count[: batch * n_cls] > 0, cls_id, -1)
        pix_lab = torch.where(taken, cls_id[:, None], -1)
        entries = torch.cat([seg.reshape(batch * n_cls, 1, dim), pix], dim=1).reshape(-1, dim)
        entry_labels = torch.cat([seg_lab[:, None], pix_lab], dim=1).reshape(-1)
        return entries, entry_labels

    @torch.no_grad()
    def enqueue(self, keys: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> None:
        """Add this step's entries: keys `[B, D, h, w]` (detached here), labels `[B, H, W]` (ignore excluded)."""
        entries, entry_labels = self.gather_fn(*self.candidates(keys, labels, generator))
        self.write(entries, entry_labels)

    @torch.no_grad()
    def write(self, entries: Tensor, entry_labels: Tensor) -> None:
        """Write gathered entries `[E, D]`, labels `[E]` (layout: class doc, E a multiple of K * (1 + P)).

        Entry i of queue q goes to slot (ptr[q] + rank_i) % size, rank_i its position among this call's
        entries of q; when more than `size` arrive, only the last `size` are kept (same result as writing
        them one by one).
        """
        n_cls, size, per_class = self.num_classes, self.size, 1 + self.pixel_update_freq
        if entries.dim() != 2 or entries.shape[1] != self.dim or entries.shape[0] % (n_cls * per_class):
            raise ValueError(
                f"entries must be [E, {self.dim}] with E a multiple of {n_cls * per_class}, got {tuple(entries.shape)}"
            )
        if entry_labels.shape != entries.shape[:1]:
            raise ValueError(f"entry_labels must be [{entries.shape[0]}], got {tuple(entry_labels.shape)}")
        entries, entry_labels = entries.to(self.feats), entry_labels.to(self.device).long()
        n_queue = 2 * n_cls
        kind = torch.full((per_class,), PIXEL, device=self.device)
        kind[0] = SEGMENT
        kind = kind.repeat(entries.shape[0] // per_class)
        valid = (entry_labels >= 0) & (entry_labels < n_cls)
        queue = torch.where(valid, 2 * entry_labels + kind, n_queue)  # [E], arrival order
        order = torch.argsort(queue, stable=True)
        n_new = torch.bincount(queue, minlength=n_queue + 1)
        first = torch.cumsum(n_new, 0) - n_new
        rank = torch.empty_like(queue)
        rank[order] = torch.arange(queue.numel(), device=self.device) - first[queue[order]]
        ptr, n_new = self.ptr.view(-1), n_new[:n_queue]
        q = queue.clamp(max=n_queue - 1)
        keep = valid & (rank >= n_new[q] - size)
        dest = q * size + (ptr[q] + rank) % size
        self.feats.view(-1, self.dim)[dest[keep]] = entries[keep]
        self.ptr.copy_(((ptr + n_new) % size).view(n_cls, 2))
        self.count.copy_(torch.clamp(self.count.view(-1) + n_new, max=size).view(n_cls, 2))
        self.total += n_new.view(n_cls, 2)

    def contrast_set(self) -> tuple[Tensor, Tensor]:
        """Filled slots -> `(feats [M', D], labels [M'])`, grouped by class (class c: pixels, then segments).

        When every queue is full this is a view of the storage (no copy): use it before the next enqueue.
        """
        n_cls, size = self.num_classes, self.size
        cls = torch.arange(n_cls, device=self.device)
        if bool((self.count == size).all()):
            return self.feats.view(-1, self.dim), cls.repeat_interleave(2 * size)
        filled = torch.arange(size, device=self.device) < self.count[..., None]  # [K, 2, size]
        return self.feats[filled], cls[:, None, None].expand_as(filled)[filled]

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "feats": self.feats.clone(), "ptr": self.ptr.clone(), "count": self.count.clone(),
            "total": self.total.clone(),
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for key, current in (("feats", self.feats), ("ptr", self.ptr), ("count", self.count)):
            if key not in state:
                raise ValueError(f"memory state is missing key '{key}' (has {sorted(state)})")
            if tuple(state[key].shape) != tuple(current.shape):
                raise ValueError(
                    f"memory state '{key}' has shape {tuple(state[key].shape)}, expected {tuple(current.shape)} "
                    f"(num_classes={self.num_classes}, size={self.size}, dim={self.dim})"
                )
        count, ptr = state["count"], state["ptr"]
        if bool((count < 0).any() | (count > self.size).any() | (ptr < 0).any() | (ptr >= self.size).any()):
            raise ValueError(f"memory state 'ptr'/'count' must lie in [0, {self.size}) / [0, {self.size}]")
        self.feats.copy_(state["feats"])
        self.ptr.copy_(ptr)
        self.count.copy_(count)
        self.total.copy_(state.get("total", count))  # older checkpoints: exact while no queue wrapped


def shrink_state(state: dict[str, Tensor], size: int) -> dict[str, Tensor]:
    """The state a memory of `size` slots per queue would hold after the same writes as the one whose
    `state` (a `PixelMemory.state_dict()` of `>= size` slots) is given.

    A ring of size s that has received n entries holds exactly the newest min(n, s), entry k (0-based, in
    arrival order) at slot k % s; in the larger ring, entry k sits at slot k % S. Both follow from the
    queue's total count, so the smaller ring is rebuilt slot by slot: `[K, 2, size, D]` feats, pointer
    n % s, count min(n, s), total n.
    """
    feats, total = state["feats"], state["total"]
    n_cls, _, big, dim = feats.shape
    if size > big:
        raise ValueError(f"cannot grow a memory of {big} slots per queue to {size}")
    k = total[..., None] - size + torch.arange(size, device=total.device)  # [K, 2, size]: the newest size ids
    valid = k >= 0
    src = torch.where(valid, k % big, 0)
    dst = torch.where(valid, k % size, 0)
    small = feats.new_zeros(n_cls, 2, size, dim)
    taken = torch.gather(feats, 2, src[..., None].expand(n_cls, 2, size, dim))
    small.scatter_(2, dst[..., None].expand(n_cls, 2, size, dim), taken * valid[..., None])
    return {
        "feats": small,
        "ptr": total % size,
        "count": torch.clamp(total, max=size),
        "total": total.clone(),
    }
