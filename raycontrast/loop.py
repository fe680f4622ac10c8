"""The training loop shared by Ray Train workers and local mode (pure torch; no Ray import).

`run_loop` is the whole loop, readable top to bottom: build (model, memory, criterion, optimiser, schedule,
data), resume, loop, evaluate, report. Its surroundings come in as a session object (rank, world size,
device, `prepare_model`, `load_checkpoint`, `report`): `train._RaySession` in a Ray Train worker,
`checkpoint.LocalSession` in-process.

Resume: both sessions load the newest *complete* checkpoint (`checkpoint.load_latest`): when the one Ray
registered last is truncated or corrupt, the loop says so and falls back to an older one. Determinism, which
exact resume and the DDP tests rely on: the data order and augmentations are functions of (seed, epoch,
index) (`checkpoint.ShardSampler`, `checkpoint.SeededItems`); the per-rank generator for anchor and memory
sampling is re-seeded every step from (seed, rank, iteration). So a run resumed from the checkpoint at
iteration k replays iterations k+1.. exactly as an uninterrupted run, skipping the batches already seen.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from threadpoolctl import threadpool_limits
from torch.utils.data import DataLoader, Subset

from raycontrast.checkpoint import (
    SeededItems,
    ShardSampler,
    capture_rng_state,
    restore_rng_state,
    step_seed,
)
from raycontrast.config import Config
from raycontrast.data.loader import dataset_from_config, dataset_info
from raycontrast.engine import (
    NonFiniteLossError,
    build_optimizer,
    build_scheduler,
    evaluate,
    seed_everything,
    train_step,
)
from raycontrast.loss import ContrastCELoss
from raycontrast.memory import PixelMemory
from raycontrast.metrics import all_reduce_confusion, iou, miou, pixel_accuracy
from raycontrast.models.hrnet import HRNetV2, convert_sync_bn, load_pretrained

__all__ = ["run_loop", "say"]


def say(message: str) -> None:
    """One progress line on stdout. Written directly: Ray Train patches `print` inside workers to log *and*
    echo, which would show every line twice on the driver."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


# Window statistics: per-step means over finite steps (order = the stacked accumulator's rows).
_STAT_KEYS = ("loss", "ce", "contrast", "anchors", "hard_share", "intra_cos", "inter_cos", "memory_fill")
_METRIC_NAMES = ("loss", "ce_loss", "contrast_loss", *_STAT_KEYS[3:])


def _gather_varlen(keys: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather `keys [N, D]`, `labels [N]` whose N differs per rank; concatenated in rank order.

    Collectives need equal shapes: gather the counts, pad to the largest, gather, trim.
    """
    world = dist.get_world_size()
    n = torch.tensor([keys.shape[0]], device=keys.device, dtype=torch.long)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    sizes = [int(c) for c in counts]
    m = max(sizes)
    pk = keys.new_zeros((m, keys.shape[1]))
    pk[: keys.shape[0]] = keys
    pl = labels.new_zeros((m,))
    pl[: labels.shape[0]] = labels
    ks, ls = [torch.empty_like(pk) for _ in range(world)], [torch.empty_like(pl) for _ in range(world)]
    dist.all_gather(ks, pk)
    dist.all_gather(ls, pl)
    return torch.cat([k[:s] for k, s in zip(ks, sizes, strict=True)]), torch.cat(
        [lab[:s] for lab, s in zip(ls, sizes, strict=True)]
    )


def run_loop(config_dict: Mapping[str, Any], session: Any) -> dict[str, Any]:
    """Train one model as one rank of `session` (`_RaySession` or `_LocalSession`).

    `config_dict` is `Config.model_dump(mode="json")`, plus private keys starting with "_" used by tests:
    `_debug_dump_dir` (each rank saves its final parameters, memory and per-step losses there),
    `_fail_at_iteration` / `_fail_marker` (the last rank raises once at that iteration, if the marker file
    does not exist yet), `_pause_at_iteration` / `_pause_file` (rank 0 writes its PID there once and sleeps
    `_pause_s` seconds, so a test can kill the process at a known point). Returns a summary (rank 0's
    reaches `Result.return_value`).
    """
    extras = {k: v for k, v in config_dict.items() if k.startswith("_")}
    cfg = Config.model_validate({k: v for k, v in config_dict.items() if not k.startswith("_")})
    t, d = cfg.train, cfg.data
    rank, world, device = session.rank, session.world, session.device
    threads = t.threads_per_worker or max(1, int(t.cpus_per_worker))
    # Every native pool, not only torch's: OpenMP/BLAS pools of other libraries (the data pipeline) would
    # otherwise oversubscribe the worker's CPU reservation (1.5x slower in-process on 2 cores, measured).
    # Ray workers also get OMP_NUM_THREADS from their reservation; this makes local mode match.
    threadpool_limits(limits=threads)
    torch.set_num_threads(threads)
    num_classes, class_names = dataset_info(d.dataset)
    is_cuda = device.type == "cuda"

    # The newest complete checkpoint, if any (loaded first: no pretrained weights are needed when resuming).
    state = session.load_checkpoint()

    # ---- build: identical initial weights on every rank (DDP also broadcasts rank 0's)
    seed_everything(cfg.run.seed)
    model = HRNetV2(cfg.model.variant, num_classes, proj_dim=cfg.model.proj_dim)
    if cfg.model.pretrained and state is None:
        load_pretrained(model, cfg.model.pretrained)
    if is_cuda and world > 1 and cfg.model.sync_bn:
        model = convert_sync_bn(model)  # SyncBN needs CUDA; on CPU each rank normalises its own batch
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = session.prepare_model(model.to(memory_format=memory_format))  # to device; DDP when world > 1
    raw = model.module if hasattr(model, "module") else model
    criterion = ContrastCELoss(num_classes, **cfg.loss.model_dump()).to(device)  # same keyword names
    memory = None
    if cfg.memory.size > 0:  # outside DDP; every rank enqueues the all-gathered keys in rank order
        memory = PixelMemory(
            num_classes,
            cfg.model.proj_dim,
            cfg.memory.size,
            cfg.memory.pixel_update_freq,
            gather_fn=_gather_varlen if world > 1 else None,
        ).to(device)
    optimizer = build_optimizer(
        raw,
        lr=cfg.optim.lr,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
        name=cfg.optim.name,
    )
    scheduler = build_scheduler(
        optimizer, max_iters=t.iterations, power=cfg.optim.poly_power, min_lr=cfg.optim.min_lr
    )
    amp_dtype = None
    if t.amp:  # bf16 needs no loss scaling; fp16 (older GPUs) does
        fp16 = is_cuda and not torch.cuda.is_bf16_supported()
        amp_dtype = torch.float16 if fp16 else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    generator = torch.Generator(device=device)

    train_set, val_set = (
        dataset_from_config(d, "train", train=True),
        dataset_from_config(d, "val", train=False),
    )
    sampler = ShardSampler(train_set, num_replicas=world, rank=rank, seed=cfg.run.seed)
    steps_per_epoch = sampler.num_samples // t.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"data: {len(train_set)} training images cannot fill one batch on each of {world} "  # type: ignore[arg-type]
            f"workers (train.batch_size={t.batch_size}); use fewer workers or a smaller batch"
        )
    loader_args = {
        "num_workers": d.loader_workers,
        "pin_memory": is_cuda,
        "persistent_workers": d.loader_workers > 0,
    }
    train_loader = DataLoader(
        SeededItems(train_set, cfg.run.seed),
        batch_size=t.batch_size,
        sampler=sampler,
        drop_last=True,
        **loader_args,
    )
    # Unpadded val shard (rank::world): the all-reduced confusion matrix counts every image exactly once.
    val_shard = Subset(val_set, range(rank, len(val_set), world))  # type: ignore[arg-type]
    val_loader = DataLoader(val_shard, batch_size=t.batch_size, shuffle=False, **loader_args)

    # ---- resume
    it, elapsed0, worker_s0, best, best_it, last_metrics = 0, 0.0, 0.0, -math.inf, 0, None
    if state is not None:
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        if memory is not None and state["memory"] is not None:
            memory.load_state_dict(state["memory"])
        restore_rng_state(state["rng"])
        it, elapsed0, worker_s0 = state["iteration"], state["elapsed_s"], state["worker_seconds"]
        best, best_it, last_metrics = state["best_val_miou"], state["best_iteration"], state["metrics"]
        if rank == 0:
            say(
                f"resumed at iteration {it}/{t.iterations} (memory fill "
                f"{float(memory.fill()) if memory is not None else 0:.2f})"
            )
    start_it = it

    # ---- loop
    t_start = window_t0 = log_t0 = time.time()
    first_step_unix, eval_time, train_images, train_time = None, 0.0, 0, 0.0
    window = torch.zeros(len(_STAT_KEYS) + 1, dtype=torch.float64, device=device)  # sums + finite count
    log_sum = torch.zeros_like(window)
    window_steps = log_steps = window_nonfinite = consecutive_nonfinite = 0
    debug_losses: list[torch.Tensor] = []
    model.train()
    while it < t.iterations:
        epoch = it // steps_per_epoch
        sampler.set_epoch(epoch)
        sampler.skip = (it % steps_per_epoch) * t.batch_size
        for images, labels in train_loader:
            if extras.get("_fail_at_iteration") == it and rank == world - 1:
                marker = extras["_fail_marker"]
                if not os.path.exists(marker):
                    open(marker, "w").close()  # noqa: SIM115 - an empty marker file
                    raise RuntimeError(f"injected failure at iteration {it} (rank {rank})")
            if extras.get("_pause_at_iteration") == it and rank == 0:
                pid_file = extras["_pause_file"]
                if not os.path.exists(pid_file):  # first attempt only; a restarted worker group runs on
                    with open(pid_file + ".tmp", "w") as f:
                        f.write(str(os.getpid()))
                    os.replace(pid_file + ".tmp", pid_file)  # the reader never sees an empty file
                    time.sleep(extras.get("_pause_s", 300))
            images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            labels = labels.to(device, non_blocking=True)
            generator.manual_seed(step_seed(cfg.run.seed, rank, it))
            first_step_unix = first_step_unix or time.time()
            stats = train_step(
                model,
                criterion,
                optimizer,
                scheduler,
                images,
                labels,
                iteration=it,
                memory=memory,
                scaler=scaler,
                amp_dtype=amp_dtype,
                grad_clip=cfg.optim.grad_clip,
                generator=generator,
            )
            it += 1
            finite = bool(stats["finite"])  # already synced inside train_step (skip decision)
            step = torch.stack([stats[k].double() for k in _STAT_KEYS] + [window.new_ones(())])
            if finite:
                window += step
                log_sum += step
            window_steps, log_steps = window_steps + 1, log_steps + 1
            window_nonfinite += not finite
            consecutive_nonfinite = 0 if finite else consecutive_nonfinite + 1
            # Deterministic, so a Ray retry (train.max_failures) fails the same way; no special-casing.
            if consecutive_nonfinite >= t.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{consecutive_nonfinite} consecutive steps up to iteration {it} "
                    f"(loss {float(stats['loss'])}); lower optim.lr or set optim.grad_clip"
                )
            if "_debug_dump_dir" in extras:
                debug_losses.append(stats["loss"])

            if rank == 0 and (it % t.log_interval == 0 or it == t.iterations):
                m = (log_sum[:-1] / log_sum[-1].clamp_min(1)).tolist()
                dt = time.time() - log_t0
                say(
                    f"it {it}/{t.iterations} | lr {float(stats['lr']):.2e} | loss {m[0]:.4f} (ce {m[1]:.4f}, "
                    f"contrast {m[2]:.4f}) | {log_steps * t.batch_size * world / max(dt, 1e-9):.1f} img/s | "
                    f"memory {m[7]:.2f}"
                )
                log_sum.zero_()
                log_steps, log_t0 = 0, time.time()

            if it % t.eval_interval == 0 or it == t.iterations:
                # ---- evaluate and report: one collective for the window, one for the confusion matrix
                window_time = time.time() - window_t0
                t_eval = time.time()
                cm = all_reduce_confusion(
                    evaluate(
                        raw,
                        val_loader,
                        num_classes=num_classes,
                        ignore_index=cfg.loss.ignore_index,
                        mode=t.eval_mode,
                        crop_size=d.crop_size,
                        amp_dtype=amp_dtype,
                    )
                )
                eval_time = time.time() - t_eval
                rss = torch.tensor(
                    [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0], device=device
                )
                if world > 1:
                    dist.all_reduce(window)
                    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
                means = (window[:-1] / window[-1]).tolist() if float(window[-1]) > 0 else [math.nan] * 8
                val_miou = miou(cm)
                if not math.isnan(val_miou) and val_miou > best:
                    best, best_it = val_miou, it
                now = time.time()
                train_images += window_steps * t.batch_size * world
                train_time += window_time
                last_metrics = {
                    "iteration": it,
                    "epoch": (it - 1) // steps_per_epoch,
                    "lr": float(stats["lr"]),
                    **dict(zip(_METRIC_NAMES, means, strict=True)),
                    "nonfinite_steps": window_nonfinite,
                    "val_miou": val_miou,
                    "val_pixel_acc": pixel_accuracy(cm),
                    "val_class_iou": iou(cm).tolist(),
                    "images_per_s": window_steps * t.batch_size * world / max(window_time, 1e-9),
                    "time_s": elapsed0 + now - t_start,
                    "worker_seconds": worker_s0 + world * (now - t_start),
                    "peak_rss_mb": float(rss),
                    "train_time_s": window_time,
                    "eval_time_s": eval_time,
                }
                save = it % t.checkpoint_interval == 0 or it == t.iterations
                ckpt = None
                if save and rank == 0:
                    ckpt = {
                        "model": raw.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler else None,
                        "memory": memory.state_dict() if memory is not None else None,
                        "iteration": it,
                        "rng": capture_rng_state(),
                        "config": cfg.model_dump(mode="json"),
                        "elapsed_s": now - t_start + elapsed0,
                        "worker_seconds": worker_s0 + world * (now - t_start),
                        "best_val_miou": best,
                        "best_iteration": best_it,
                        "metrics": last_metrics,
                    }
                session.report(last_metrics, ckpt)  # every rank: a barrier
                if rank == 0:
                    say(
                        f"eval it {it}: val mIoU {val_miou:.4f} | pixel acc {last_metrics['val_pixel_acc']:.4f} | "
                        f"best {best:.4f} @ {best_it}" + (" | checkpoint" if save else "")
                    )
                window.zero_()
                window_steps = window_nonfinite = 0
                window_t0 = time.time()
            if it >= t.iterations:
                break

    if last_metrics is not None and start_it >= t.iterations:
        session.report(last_metrics, None)  # resumed a finished run: repeat its final metrics
    if "_debug_dump_dir" in extras:
        torch.save(
            {
                "model": {k: v.cpu() for k, v in raw.state_dict().items()},
                "memory": memory.state_dict() if memory is not None else None,
                "losses": torch.stack(debug_losses).cpu() if debug_losses else torch.zeros(0),
                "start_iteration": start_it,
                "pid": os.getpid(),
            },
            os.path.join(extras["_debug_dump_dir"], f"rank{rank}.pt"),
        )
    return {
        "best_val_miou": best,
        "best_iteration": best_it,
        "first_step_unix": first_step_unix,
        "loop_end_unix": time.time(),
        "train_images": train_images,
        "train_time_s": train_time,
        "class_names": list(class_names),
    }
