"""One training step and one evaluation pass: the loop body every trainer shares (pure torch, no Ray).

The training loop itself is `loop.run_loop` (one readable function); only :func:`train_step` and
:func:`evaluate` are factored out, plus the optimiser / poly schedule builders and seeding.
Everything here is device- and world-size-agnostic: tensors are allocated on the inputs' device, and a
DDP-wrapped model works unchanged (gradients are already all-reduced when ``backward`` returns).
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Literal, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR

from raycontrast.metrics import confusion_matrix
from raycontrast.models.projection import memory_keys

StepStats = dict[str, Tensor]

# Keys of the contrast diagnostics the criterion returns in its parts dict (forwarded as they are).
_PART_KEYS = ("ce", "contrast", "anchors", "hard_share", "intra_cos", "inter_cos")


class NonFiniteLossError(RuntimeError):
    """A run's losses stayed non-finite; the message starts with "non-finite loss:"."""

    PREFIX = "non-finite loss: "

    def __init__(self, detail: str) -> None:
        # Idempotent: unpickling (Ray sends the error to the driver) calls this again with the message.
        super().__init__(detail if detail.startswith(self.PREFIX) else self.PREFIX + detail)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


# ----------------------------------------------------------------------------- optimiser and schedule


def build_optimizer(
    model: nn.Module, *, lr: float, momentum: float, weight_decay: float, name: str = "sgd"
) -> torch.optim.Optimizer:
    """SGD (the paper's recipe) or AdamW with two parameter groups: weight decay on conv / linear weights only.

    AdamW uses ``momentum`` as beta1 (0.9 by default). It converges much faster from scratch, which the short
    CPU demo needs; the Cityscapes recipes keep SGD.

    BatchNorm weights and biases and every bias (all parameters with ``ndim <= 1``) get no weight decay:
    decaying a BN scale towards 0 shrinks the layer's output rather than regularising a filter, and a bias
    has no scale to regularise (common practice, e.g. timm's ``param_groups_weight_decay``).
    Groups: ``[{"params": decayed, "weight_decay": wd}, {"params": not decayed, "weight_decay": 0}]``,
    empty groups left out. Frozen parameters (``requires_grad=False``) are not optimised.
    """
    if lr <= 0 or momentum < 0 or weight_decay < 0:
        raise ValueError(
            f"need lr > 0, momentum >= 0, weight_decay >= 0; got {lr}, {momentum}, {weight_decay}"
        )
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for p in _unwrap(model).parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": params, "weight_decay": wd}
        for params, wd in ((decay, weight_decay), (no_decay, 0.0))
        if params
    ]
    if not groups:
        raise ValueError("model has no trainable parameters")
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    if name != "sgd":
        raise ValueError(f"unknown optimizer '{name}': use 'sgd' or 'adamw'")
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


class _PolyFactor:
    """LambdaLR factor for ``lr(it) = (base - min_lr) * (1 - it / max_iters) ** power + min_lr``.

    A callable object (not a lambda) so that ``LambdaLR.state_dict()`` saves it with the checkpoint.
    """

    def __init__(self, base_lr: float, max_iters: int, power: float, min_lr: float) -> None:
        self.base_lr, self.max_iters, self.power, self.min_lr = base_lr, max_iters, power, min_lr

    def __call__(self, it: int) -> float:
        if self.base_lr == 0:
            return 0.0
        frac = max(0.0, 1.0 - min(it, self.max_iters) / self.max_iters)
        return ((self.base_lr - self.min_lr) * frac**self.power + self.min_lr) / self.base_lr


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, max_iters: int, power: float, min_lr: float = 0.0
) -> LambdaLR:
    """Poly decay (ALGORITHM.md s6), stepped once per iteration:
    ``lr(it) = (base - min_lr) * (1 - it / max_iters) ** power + min_lr`` per group, constant ``min_lr``
    from ``max_iters`` on. ``base`` is each group's learning rate when the scheduler is built."""
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    if power < 0 or min_lr < 0:
        raise ValueError(f"need power >= 0 and min_lr >= 0, got {power} and {min_lr}")
    factors = []
    for g in optimizer.param_groups:
        base = float(g.get("initial_lr", g["lr"]))
        if min_lr > base:
            raise ValueError(f"min_lr {min_lr} exceeds the base learning rate {base}")
        factors.append(_PolyFactor(base, max_iters, power, min_lr))
    return LambdaLR(optimizer, factors)


# ----------------------------------------------------------------------------- training step


def _save_buffers(model: nn.Module) -> list[tuple[list[Tensor], Tensor]]:
    """Copies of all buffers, one flat tensor per dtype: ``[(buffers, flat copy)]``."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for b in _unwrap(model).buffers():
        by_dtype.setdefault(b.dtype, []).append(b)
    return [(bufs, torch.cat([b.detach().flatten() for b in bufs])) for bufs in by_dtype.values()]


@torch.no_grad()
def _restore_buffers(saved: list[tuple[list[Tensor], Tensor]]) -> None:
    for bufs, flat in saved:
        for b, v in zip(bufs, flat.split([b.numel() for b in bufs]), strict=True):
            b.copy_(v.view_as(b))


def train_step(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    images: Tensor,
    labels: Tensor,
    *,
    iteration: int,
    memory=None,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    grad_clip: float | None = None,
    generator: torch.Generator | None = None,
) -> StepStats:
    """One optimisation step on ``images [B, 3, H, W]`` / ``labels [B, H, W]`` (int64, ignore 255).

    Order: forward (autocast with ``amp_dtype`` when given) -> ``criterion(outputs, labels, iteration=,
    memory=memory.contrast_set())`` (the memory as it was before this batch) -> backward (through
    ``scaler`` when given) -> global gradient norm (clipped to ``grad_clip`` when given) -> finite check
    -> optimiser step and memory enqueue of this batch's detached keys, both only when finite (a skipped
    step also restores the BatchNorm running statistics, so it leaves model and memory exactly as they
    were) -> scheduler step (always, so the schedule stays aligned with the iteration count).

    The enqueue comes after backward rather than straight after the loss: the loss has already read the
    memory, the keys are detached, so what the next step sees is the same; but this way a non-finite
    batch (NaN embeddings) never enters the memory, where it would poison every later loss, and a
    ``contrast_set`` that returns views of the ring buffers can never be overwritten in place while
    autograd still holds them for backward.

    Returns detached 0-d tensors on the inputs' device: ``loss, ce, contrast, anchors, hard_share,
    intra_cos, inter_cos`` (from the criterion), ``grad_norm`` (before clipping), ``lr`` (the rate this
    step used), ``finite`` (bool: the update was applied), ``overflow`` (bool: skipped because fp16
    gradients overflowed while the loss was finite, the ``scaler`` calibrating; such a step is not a
    divergence) and ``memory_fill`` (0 without a memory).
    """
    device = images.device
    optimizer.zero_grad(set_to_none=True)
    lr = optimizer.param_groups[0]["lr"]
    # BatchNorm running statistics change in the forward pass; a skipped step restores them (one small
    # concatenation per buffer dtype per step), else one NaN batch would silently ruin later evaluations.
    saved = _save_buffers(model)
    contrast_set = memory.contrast_set() if memory is not None else None

    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        outputs = model(images)
        loss, parts = criterion(
            outputs, labels, iteration=iteration, memory=contrast_set, generator=generator
        )

    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # true gradient scale for the norm, the clip and the finite check
    else:
        loss.backward()

    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    max_norm = grad_clip if grad_clip is not None else math.inf
    if params:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).detach()
    else:
        grad_norm = torch.zeros((), device=device)
    loss_finite = torch.isfinite(loss.detach())
    flags = torch.stack([torch.isfinite(grad_norm) & loss_finite, loss_finite]).to(torch.int32)
    if isinstance(model, DistributedDataParallel):
        # The gradients are all-reduced, so every rank computes the same norm, and a NaN loss on one rank
        # makes every rank's gradients NaN through that all-reduce. A non-finite loss whose backward stays
        # finite (an empty logsumexp's -inf has zero gradient) would still be local: one tiny MIN
        # all-reduce makes the decision global, so no rank steps or gathers into the memory alone.
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=model.process_group)
    finite, loss_finite = flags.bool().unbind()
    # fp16 loss scaling: inf gradients with a finite loss are the scaler calibrating (it halves the scale
    # and the step is skipped), not a divergence.
    overflow = ~finite & loss_finite if scaler is not None else torch.zeros_like(finite)

    # The memory's keys come from this step's weights: taken before the optimiser moves them (a
    # `PixelEmbedding` computes them now, in one no-grad pass of the projection head).
    keys = memory_keys(outputs["embed"]) if memory is not None else None

    # The one host sync of the step: skipping an update cannot be expressed without it (SGD's momentum
    # and weight decay move the weights even with zeroed gradients, and the BN statistics must be put
    # back). Every rank reaches the same decision, so the memory's gather collective stays matched.
    if bool(finite):
        if scaler is not None:
            scaler.step(optimizer)  # unscale_ was called above, so this only applies the update
        else:
            optimizer.step()
        if memory is not None:
            memory.enqueue(keys, labels, generator=generator)
    else:
        optimizer.zero_grad(set_to_none=True)
        _restore_buffers(saved)
    if scaler is not None:
        scaler.update()  # lowers the scale after an overflow (found_inf was recorded by unscale_)
    with warnings.catch_warnings():
        # A skipped first step makes torch warn that the schedule steps before the optimiser; stepping it
        # anyway is the point (the schedule follows the iteration count).
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
        scheduler.step()

    stats: StepStats = {"loss": loss.detach().float()}
    for key in _PART_KEYS:
        stats[key] = parts[key].detach()
    stats["grad_norm"] = grad_norm.float()
    stats["lr"] = torch.full((), lr, device=device)  # a fill, not a host-to-device copy
    stats["finite"] = finite
    stats["overflow"] = overflow
    stats["memory_fill"] = (
        memory.fill().to(device=device, dtype=torch.float32)
        if memory is not None
        else torch.zeros((), device=device)
    )
    return stats


# ----------------------------------------------------------------------------- evaluation


class SegmentationModel(Protocol):
    """What `evaluate` needs of a model: segmentation logits without the training-only heads."""

    def forward_seg(self, x: Tensor) -> Tensor:
        """`x [B, 3, H, W]` -> logits `[B, K, h, w]` (any grid; `evaluate` resizes to the labels)."""
        ...


def _pair(v: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    a, b = (v, v) if isinstance(v, int) else tuple(v)
    if a < 1 or b < 1:
        raise ValueError(f"{name} must be positive, got {v}")
    return int(a), int(b)


def _window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows of ``crop`` covering ``[0, size)``; the last one is flush with the end."""
    if size <= crop:
        return [0]
    n = (size - crop + stride - 1) // stride + 1
    return [min(i * stride, size - crop) for i in range(n)]


def _slide_logits(
    net: SegmentationModel, images: Tensor, crop: tuple[int, int], stride: tuple[int, int]
) -> Tensor:
    """Logits ``[B, K, H, W]`` averaged over overlapping ``crop`` windows at input resolution.

    Each window's logits are upsampled (bilinear) to the window size; an image smaller than the crop is
    zero-padded at the bottom / right to the crop size and the padding's logits are dropped.
    """
    b, _, h, w = images.shape
    (ch, cw), (sh, sw) = crop, stride
    total: Tensor | None = None
    count = torch.zeros(1, 1, h, w, device=images.device)
    for y in _window_starts(h, ch, sh):
        for x in _window_starts(w, cw, sw):
            win = images[:, :, y : y + ch, x : x + cw]
            wh, ww = win.shape[-2:]
            if wh < ch or ww < cw:
                win = F.pad(win, (0, cw - ww, 0, ch - wh))
            logits = net.forward_seg(win).float()
            logits = F.interpolate(logits, size=(ch, cw), mode="bilinear", align_corners=False)[..., :wh, :ww]
            if total is None:
                total = images.new_zeros(b, logits.shape[1], h, w, dtype=torch.float32)
            total[:, :, y : y + wh, x : x + ww] += logits
            count[:, :, y : y + wh, x : x + ww] += 1
    assert total is not None
    return total / count


def segment_logits(
    net: SegmentationModel,
    images: Tensor,
    *,
    out_size: tuple[int, int],
    mode: Literal["whole", "slide"] = "whole",
    crop: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    amp_dtype: torch.dtype | None = None,
) -> Tensor:
    """Segmentation logits ``[B, K, *out_size]`` of ``images [B, 3, H, W]``, averaged at ``out_size``.

    Each of ``scales`` resizes the images (bilinear) before the forward, ``flip`` adds each scale's mirror
    image (its logits mirrored back); every view's logits are upsampled to ``out_size`` and the views'
    logits averaged. One view (``scales=(1.0,)``, no flip) is the training-time evaluation: its logits
    are returned as the forward left them when already at ``out_size``.
    """
    views = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    h, w = images.shape[-2:]
    total: Tensor | None = None
    for scale, flipped in views:
        x = images
        if scale != 1.0:
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        if flipped:
            x = x.flip(-1)
        with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = net.forward_seg(x) if mode == "whole" else _slide_logits(net, x, crop, stride)  # type: ignore[arg-type]
        if flipped:
            logits = logits.flip(-1)
        if logits.shape[-2:] != tuple(out_size):
            logits = F.interpolate(logits.float(), size=out_size, mode="bilinear", align_corners=False)
        if len(views) == 1:
            return logits
        total = logits.float() if total is None else total + logits.float()
    assert total is not None
    return total / len(views)


def eval_geometry(
    mode: str, crop_size: int | tuple[int, int] | None, stride: int | tuple[int, int] | None
) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """`(crop, stride)` of an evaluation mode: None for whole images; slide windows of `crop_size` every
    `stride` (default 2/3 of the crop)."""
    if mode not in ("whole", "slide"):
        raise ValueError(f"evaluate mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "whole":
        return None, None
    if crop_size is None:
        raise ValueError("evaluate mode 'slide' needs crop_size")
    crop = _pair(crop_size, "crop_size")
    if stride is not None:
        return crop, _pair(stride, "stride")
    return crop, (max(1, crop[0] * 2 // 3), max(1, crop[1] * 2 // 3))


def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    *,
    num_classes: int,
    ignore_index: int = 255,
    mode: Literal["whole", "slide"] = "whole",
    crop_size: int | tuple[int, int] | None = None,
    stride: int | tuple[int, int] | None = None,
    amp_dtype: torch.dtype | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> Tensor:
    """Confusion matrix ``[K, K]`` int64 (rows = label, columns = prediction) of ``model`` on ``loader``.

    The loader yields ``(images [B, 3, H, W], labels [B, H', W'])``; both move to the model's device.
    ``mode="whole"``: one forward per batch, logits upsampled bilinearly (align_corners=False) to the
    label size. ``mode="slide"``: windows of ``crop_size`` every ``stride`` (default 2/3 of the crop),
    logits averaged where windows overlap, then resized to the label size if it differs from the image.
    ``scales`` / ``flip``: test-time augmentation (`segment_logits`; the default is the single view the
    training loop evaluates with). Prediction = argmax of ``model.forward_seg`` (a `SegmentationModel`:
    HRNetV2 skips its projection head there). Runs in eval mode under ``torch.inference_mode`` and restores
    the model's training mode afterwards; ``on_batch(images_in_batch)`` after each batch. The matrix is
    local to this process (the caller all-reduces).
    """
    crop, strides = eval_geometry(mode, crop_size, stride)
    net = _unwrap(model)  # no DDP forward hooks: evaluation is rank-local
    ref = next(iter(net.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for images, labels in loader:
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                logits = segment_logits(
                    net, images, out_size=tuple(labels.shape[-2:]), mode=mode, crop=crop, stride=strides,
                    scales=scales, flip=flip, amp_dtype=amp_dtype,
                )  # fmt: skip
                cm += confusion_matrix(logits.argmax(1), labels, num_classes, ignore_index)
                if on_batch is not None:
                    on_batch(len(images))
    finally:
        model.train(was_training)
    return cm


# ----------------------------------------------------------------------------- seeding


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - seeds the global state third-party code may draw from
    torch.manual_seed(seed)
