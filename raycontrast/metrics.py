"""Segmentation metrics from a confusion matrix: per-class IoU, mIoU, pixel accuracy.

The confusion matrix is additive over images and processes, so evaluation accumulates it per batch and
sums it across ranks once (:func:`all_reduce_confusion`) before computing scores. Conventions match the
Cityscapes evaluation on trainIds: pixels whose label is ``ignore_index`` are dropped (whatever was
predicted there), and a class absent from both labels and predictions has IoU NaN and is left out of
the mean.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Count (label, prediction) pairs with one bincount, on the inputs' device.

    pred, target: integer tensors of the same shape ``[...]`` (e.g. ``[B, H, W]``).
    Returns ``[K, K]`` int64 with rows = target class, columns = predicted class.
    Raises ValueError if a kept pixel (target != ignore_index) has a target or prediction outside [0, K).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if pred.is_floating_point() or target.is_floating_point():
        raise ValueError("pred and target must be integer tensors (class ids), got floating point")
    k = int(num_classes)
    if k < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    target = target.reshape(-1).long()
    pred = pred.reshape(-1).to(device=target.device, dtype=torch.long)
    keep = target != ignore_index
    target, pred = target[keep], pred[keep]
    if target.numel() == 0:
        return torch.zeros(k, k, dtype=torch.long, device=target.device)
    # One host sync for both range checks: a silent bincount overflow into other cells is worse.
    lo, hi = torch.stack(
        [torch.minimum(pred.min(), target.min()), torch.maximum(pred.max(), target.max())]
    ).tolist()
    if lo < 0 or hi >= k:
        bad_p = pred[(pred < 0) | (pred >= k)]
        which = "prediction" if bad_p.numel() else "target"
        bad = bad_p if bad_p.numel() else target[(target < 0) | (target >= k)]
        raise ValueError(
            f"{which} value {int(bad[0])} outside [0, {k}) on a non-ignored pixel "
            f"(num_classes={k}, ignore_index={ignore_index})"
        )
    return torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)


def iou(cm: Tensor) -> Tensor:
    """Per-class IoU = TP / (TP + FP + FN) from ``cm [K, K]``; ``[K]`` float64, NaN where the class is
    absent from both labels and predictions (denominator 0)."""
    cm = cm.double()
    tp = cm.diagonal()
    denom = cm.sum(0) + cm.sum(1) - tp
    return torch.where(denom > 0, tp / denom.clamp_min(1), torch.full_like(tp, math.nan))


def miou(cm: Tensor) -> float:
    """Mean IoU over the classes present in labels or predictions (NaN if there are none)."""
    scores = iou(cm)
    valid = ~scores.isnan()
    return float(scores[valid].mean()) if bool(valid.any()) else math.nan


def pixel_accuracy(cm: Tensor) -> float:
    """Fraction of non-ignored pixels predicted correctly (NaN for an empty matrix)."""
    total = cm.sum()
    return float(cm.diagonal().sum().double() / total) if int(total) > 0 else math.nan


def all_reduce_confusion(cm: Tensor) -> Tensor:
    """Sum ``cm [K, K]`` over all processes of the default torch.distributed group.

    Returns a new tensor (the input is left untouched); a copy of ``cm`` when torch.distributed is not
    initialised (single process).
    """
    out = cm.clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
