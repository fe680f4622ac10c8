"""The projection head evaluated only at the pixels that are read, with BatchNorm exact.

The head is 1x1 conv (W1, b1) -> BatchNorm -> ReLU -> 1x1 conv (W2, b2) -> L2 over channels, on every pixel of
the stride-4 grid. The contrast loss reads at most `max_samples` of those pixels, so `PixelEmbedding`
computes the head there only. What couples the pixels is BatchNorm's batch statistics, and those follow
from the features' mean m and centred second moment S (C x C) alone: for y = W1 x + b1,

    mean(y) = W1 m + b1,    var(y) = diag(W1 S W1^T)    (biased, over all B*h*w pixels).

Autograd through m and S is the gradient BatchNorm sends through its statistics, so loss, gradients and the
running statistics equal the full-grid head's to float rounding (`tests/test_projection.py`). Cost: S is one
P x C x C product forward and one backward (`_Gram`), instead of the head's three P x C x (C + D) (forward,
input and weight gradients), P = B*h*w pixels: about half the head's work at C = 270, D = 256 (W18). Under SyncBatchNorm with a process group of more than one rank, the
count, sum and second moment are all-reduced (differentiably), as SyncBatchNorm reduces its statistics.

The memory bank's keys (`full`) need every pixel's embedding but no gradient: one no-grad pass of the head
with the same statistics, only when the memory is on.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def _all_reduce(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x, group=group or dist.group.WORLD)


def _synced(bn: nn.Module) -> tuple[bool, dist.ProcessGroup | None]:
    if not isinstance(bn, nn.SyncBatchNorm) or not (dist.is_available() and dist.is_initialized()):
        return False, None
    group = bn.process_group
    return dist.get_world_size(group or dist.group.WORLD) > 1, group


class _Gram(torch.autograd.Function):
    """`x [B, C, N]` -> sum_b x_b x_b^T `[C, C]`; its backward is one product, (G + G^T) x, where autograd
    would differentiate both operands of the product separately (two)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001 - autograd's context
        ctx.save_for_backward(x)
        return torch.bmm(x, x.transpose(1, 2)).sum(0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        (x,) = ctx.saved_tensors
        return torch.matmul(grad + grad.t(), x)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half-precision features (as BatchNorm under autocast), else their own dtype."""
    return torch.promote_types(x.dtype, torch.float32)


def feature_moments(x: Tensor, bn: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """`x [B, C, h, w]` -> (count [], mean [C], centred second moment [C, C] (biased)), in float32 or wider,
    over every pixel, and over every rank of `bn`'s group when `bn` is a SyncBatchNorm under an initialised
    group."""
    flat = x.to(_compute_dtype(x)).flatten(2)  # [B, C, N]
    count = torch.full((), flat.shape[0] * flat.shape[2], dtype=flat.dtype, device=x.device)
    total = flat.sum((0, 2))
    synced, group = _synced(bn)
    if synced:
        count = _all_reduce(count, group)
        total = _all_reduce(total, group)
    mean = total / count
    centred = flat - mean[None, :, None]  # centred first: no cancellation in E[xx^T] - m m^T
    second = _Gram.apply(centred)  # [C, C]
    if synced:
        second = _all_reduce(second, group)
    return count, mean, second / count


class PixelEmbedding:
    """The L2-normalised output of `head` (`nn.Sequential(conv1x1, BatchNorm2d, ReLU, conv1x1)`) on
    `feats [B, C, h, w]`, computed where it is read.

    Construction computes the BatchNorm statistics of the whole batch and, in training mode, updates the
    running statistics once, as `head(feats)` would; in eval mode the running statistics are used.

    - `at(index)`: `index [...]` flat pixel indices into B*h*w -> `[..., D]`, with gradients to `feats` and
      every head parameter;
    - `full()`: the whole map `[B, D, h, w]`, without gradients (the memory's keys);
    - `zero()`: a 0-d zero with every head parameter in the graph (the warm-up's term for DDP).

    `shape`, `device` and `dtype` are those of the full map.
    """

    def __init__(self, head: nn.Sequential, feats: Tensor) -> None:
        conv1, bn, _relu, conv2 = head
        if feats.dim() != 4 or feats.shape[1] != conv1.in_channels:
            raise ValueError(f"feats must be [B, {conv1.in_channels}, h, w], got {tuple(feats.shape)}")
        self.feats, self.conv2, self.params = feats, conv2, list(head.parameters())
        batch, _, h, w = feats.shape
        self.shape = torch.Size((batch, conv2.out_channels, h, w))
        self.device, self.dtype = feats.device, feats.dtype
        self.compute = dt = _compute_dtype(feats)
        with torch.autocast(feats.device.type, enabled=False):
            w1 = conv1.weight.flatten(1).to(dt)  # [C1, C]
            b1 = conv1.bias.to(dt) if conv1.bias is not None else w1.new_zeros(w1.shape[0])
            if bn.training or not bn.track_running_stats:
                count, mean_x, second = feature_moments(feats, bn)
                mean = w1 @ mean_x + b1
                var = ((w1 @ second) * w1).sum(1)
                if bn.training and bn.track_running_stats:
                    self._update_running(bn, mean, var, count)
            else:
                mean, var = bn.running_mean.to(dt), bn.running_var.to(dt)
            scale = torch.rsqrt(var + bn.eps)
            if bn.affine:
                scale = scale * bn.weight.to(dt)
            shift = -mean * scale + (bn.bias.to(dt) if bn.affine else 0.0)
            # conv1 and BatchNorm folded into one affine map of the features: x -> x @ w + b.
            self.weight = w1.t() * scale  # [C, C1]
            self.bias = b1 * scale + shift  # [C1]

    @staticmethod
    @torch.no_grad()
    def _update_running(bn: nn.Module, mean: Tensor, var: Tensor, count: Tensor) -> None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / bn.num_batches_tracked.float() if bn.momentum is None else bn.momentum
        unbiased = var * count / (count - 1).clamp_min(1)
        bn.running_mean.mul_(1 - factor).add_(factor * mean.to(bn.running_mean.dtype))
        bn.running_var.mul_(1 - factor).add_(factor * unbiased.to(bn.running_var.dtype))

    def _head(self, x: Tensor) -> Tensor:
        """Features `[..., C]` (in `self.compute`) -> embeddings `[..., D]`."""
        z = torch.relu(x @ self.weight + self.bias)
        out = z @ self.conv2.weight.flatten(1).to(self.compute).t()
        if self.conv2.bias is not None:
            out = out + self.conv2.bias.to(self.compute)
        return F.normalize(out, p=2.0, dim=-1)

    def at(self, index: Tensor) -> Tensor:
        n_pix = self.shape[2] * self.shape[3]
        with torch.autocast(self.device.type, enabled=False):
            x = self.feats.flatten(2)[index // n_pix, :, index % n_pix].to(self.compute)  # [..., C]
            return self._head(x)

    @torch.no_grad()
    def full(self) -> Tensor:
        with torch.autocast(self.device.type, enabled=False):
            x = self.feats.detach().to(self.compute).movedim(1, -1)  # [B, h, w, C]
            return self._head(x).movedim(-1, 1).contiguous()

    def zero(self) -> Tensor:
        # Straight from the parameters and the features, not through the statistics: the warm-up's backward
        # then skips the second moment's P x C x C product, and every gradient is the same zero.
        return sum(p.sum() for p in self.params).float() * 0.0 + self.feats.sum().float() * 0.0


def memory_keys(embed: Tensor | PixelEmbedding) -> Tensor:
    """The memory bank's keys of a forward pass: `[B, D, h, w]`, float32, detached."""
    return (embed.full() if isinstance(embed, PixelEmbedding) else embed.detach()).float()
