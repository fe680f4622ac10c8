"""The config turned into the parts of a training run, once, with every argument spelled out.

This is the one place where a config value becomes a module argument (`cfg.loss.temperature` ->
`ContrastCELoss(temperature=...)`), so `grep temperature raycontrast/` shows every hop from YAML to the loss,
and a new config field that no module reads is simply unused instead of breaking a worker. Dataset facts
(classes, ignore label) come from the dataset (`raycontrast.data.info`), never from the config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from threadpoolctl import threadpool_limits
from torch import nn
from torch.utils.data import DataLoader, Subset

from raycontrast.config import Config, TrainSection
from raycontrast.data.info import DatasetInfo, dataset_info
from raycontrast.data.loader import dataset_from_config
from raycontrast.engine import build_optimizer, build_scheduler, seed_everything
from raycontrast.loss import ContrastCELoss
from raycontrast.memory import PixelMemory, all_gather_entries
from raycontrast.models.hrnet import HRNetV2, convert_sync_bn
from raycontrast.models.pretrained import load_pretrained
from raycontrast.plan import val_loader_workers
from raycontrast.sampling import SeededItems, ShardSampler
from raycontrast.session import Session

__all__ = [
    "RunParts",
    "build_criterion",
    "build_memory",
    "build_model",
    "build_parts",
    "cudnn_autotune",
    "limit_threads",
    "mixed_precision",
    "native_bf16",
]


@dataclass
class RunParts:
    """Everything one rank trains with. `model` is what the session prepared (DDP-wrapped when
    world > 1); `net` is the bare `HRNetV2` behind it (state dicts, evaluation)."""

    info: DatasetInfo
    model: nn.Module
    net: HRNetV2
    criterion: ContrastCELoss
    memory: PixelMemory | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    generator: torch.Generator  # anchor and memory sampling; re-seeded every step
    sampler: ShardSampler
    train_loader: DataLoader
    val_loader: DataLoader
    steps_per_epoch: int


def limit_threads(t: TrainSection) -> int:
    """Cap every native thread pool at the worker's CPU share; returns the thread count.

    Not only torch's: OpenMP/BLAS pools of other libraries (the data pipeline) would otherwise oversubscribe
    the reservation (1.5x slower in-process on 2 cores, measured). Ray workers also get OMP_NUM_THREADS
    from their reservation; this makes local mode match.
    """
    threads = t.threads_per_worker or max(1, int(t.cpus_per_worker))
    threadpool_limits(limits=threads)
    torch.set_num_threads(threads)
    return threads


def build_model(cfg: Config, info: DatasetInfo) -> HRNetV2:
    return HRNetV2(
        cfg.model.variant, info.num_classes, proj_dim=cfg.model.proj_dim, sparse_proj=cfg.model.sparse_proj
    )


def build_criterion(cfg: Config, info: DatasetInfo) -> ContrastCELoss:
    loss = cfg.loss
    return ContrastCELoss(
        info.num_classes,
        weight=loss.weight,
        warmup_iters=loss.warmup_iters,
        class_weights=loss.class_weights,
        ignore_index=info.ignore_index,
        temperature=loss.temperature,
        base_temperature=loss.base_temperature,
        max_samples=loss.max_samples,
        max_views=loss.max_views,
    )


def build_memory(cfg: Config, info: DatasetInfo, world: int) -> PixelMemory | None:
    """The memory bank, or None when `memory.size` is 0. Kept outside DDP: every rank enqueues the
    all-gathered keys in rank order, so every rank holds the same memory."""
    if cfg.memory.size == 0:
        return None
    return PixelMemory(
        info.num_classes,
        cfg.model.proj_dim,
        cfg.memory.size,
        cfg.memory.pixel_update_freq,
        gather_fn=all_gather_entries if world > 1 else None,
        ignore_index=info.ignore_index,
    )


def native_bf16(device: torch.device) -> bool:
    """bf16 in hardware: CPUs, and CUDA devices of compute capability 8.0 (Ampere) or newer.

    `torch.cuda.is_bf16_supported()` also says yes on V100 / T4 through emulation, where cuDNN has no bf16
    convolution and a bf16 step is slower than fp32; those take fp16 with loss scaling instead.
    """
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 0)


def cudnn_autotune(device: torch.device) -> None:
    """On CUDA, let cuDNN time its convolution algorithms once per input shape and keep the fastest.

    The one place the flag is set: `build_parts` calls it for every run (local, and each Ray worker) once
    the device is known. It pays because the shapes repeat. Training batches are always `data.crop_size`
    crops (`RandomCrop` pads smaller images, the loader drops the last partial batch), so the search runs
    once, in the first step. Evaluation does see other shapes, but few: whole images (Cityscapes val: all
    1024x2048; canvases: all `data.canvases` height x width) or, in slide mode, crop-sized windows (edge
    windows padded to the crop), each in at most two batch sizes (a full val batch and the last, smaller
    one). Each new shape costs one search when first seen, then hits the cache; only a dataset of many
    image sizes evaluated whole would pay a search per size.
    The chosen algorithms may differ between processes; GPU runs are not bitwise reproducible anyway
    (atomic-add kernels in backward, e.g. of bilinear upsampling).
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def mixed_precision(
    amp: bool, device: torch.device
) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """`(autocast dtype, grad scaler)`: bf16 where it is native (no loss scaling needed), else fp16 with
    a `GradScaler`; `(None, None)` without `amp`."""
    if not amp:
        return None, None
    if native_bf16(device):
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler(device.type)


def _loaders(
    cfg: Config, rank: int, world: int, pin: bool
) -> tuple[ShardSampler, DataLoader, DataLoader, int]:
    d, t = cfg.data, cfg.train
    train_set = dataset_from_config(d, "train", train=True)
    val_set = dataset_from_config(d, "val", train=False)
    sampler = ShardSampler(train_set, num_replicas=world, rank=rank, seed=cfg.run.seed)
    steps_per_epoch = sampler.num_samples // t.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"data: {len(train_set)} training images cannot fill one batch on each of {world} "  # type: ignore[arg-type]
            f"workers (train.batch_size={t.batch_size}); use fewer workers or a smaller batch"
        )
    train_loader = DataLoader(
        SeededItems(train_set, cfg.run.seed), batch_size=t.batch_size, sampler=sampler, drop_last=True,
        num_workers=d.loader_workers, pin_memory=pin, persistent_workers=d.loader_workers > 0,
    )  # fmt: skip
    # Unpadded val shard (rank::world): the all-reduced confusion matrix counts every image exactly once.
    # Fewer processes, started per evaluation: whole images are large, and idle persistent workers would
    # hold their shared memory (a container's /dev/shm is often 64 MB) between evaluations.
    val_shard = Subset(val_set, range(rank, len(val_set), world))  # type: ignore[arg-type]
    val_loader = DataLoader(
        val_shard, batch_size=t.batch_size, shuffle=False, num_workers=val_loader_workers(d.loader_workers),
        pin_memory=pin, persistent_workers=False,
    )  # fmt: skip
    return sampler, train_loader, val_loader, steps_per_epoch


def build_parts(cfg: Config, session: Session, *, pretrained: bool) -> RunParts:
    """Build every part for one rank of `session`: identical initial weights on every rank (seeded; DDP
    also broadcasts rank 0's). `pretrained=False` skips `model.pretrained` (a resumed run loads its own)."""
    info = dataset_info(cfg.data.dataset)
    device, world = session.device, session.world
    cudnn_autotune(device)
    seed_everything(cfg.run.seed)
    net = build_model(cfg, info)
    if cfg.model.pretrained and pretrained:
        load_pretrained(net, cfg.model.pretrained)
    if device.type == "cuda" and world > 1 and cfg.model.sync_bn:
        net = convert_sync_bn(net)  # SyncBN needs CUDA; on CPU each rank normalises its own batch
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = session.prepare_model(net.to(memory_format=memory_format))  # to device; DDP when world > 1
    net = model.module if hasattr(model, "module") else model
    memory = build_memory(cfg, info, world)
    o = cfg.optim
    optimizer = build_optimizer(net, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, name=o.name)
    scheduler = build_scheduler(
        optimizer, max_iters=cfg.train.iterations, power=o.poly_power, min_lr=o.min_lr
    )
    amp_dtype, scaler = mixed_precision(cfg.train.amp, device)
    sampler, train_loader, val_loader, steps_per_epoch = _loaders(
        cfg, session.rank, world, device.type == "cuda"
    )
    return RunParts(
        info=info,
        model=model,
        net=net,
        criterion=build_criterion(cfg, info).to(device),
        memory=None if memory is None else memory.to(device),
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        amp_dtype=amp_dtype,
        memory_format=memory_format,
        generator=torch.Generator(device=device),
        sampler=sampler,
        train_loader=train_loader,
        val_loader=val_loader,
        steps_per_epoch=steps_per_epoch,
    )
