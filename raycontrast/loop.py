"""The training loop shared by Ray Train workers and local mode (pure torch; no Ray import).

`run_loop` reads top to bottom: build, resume, loop, evaluate and report, checkpoint. Where it runs comes
in as a `session.Session` (`train._RaySession` in a Ray Train worker, `session.LocalSession` in-process);
what it builds comes from `build.build_parts`; what it saves is a `checkpoint.TrainState`.

Determinism, which exact resume and the DDP tests rely on: the data order and augmentations are functions
of (seed, epoch, index) (`sampling.ShardSampler`, `sampling.SeededItems`); the per-rank generator for anchor
and memory sampling is re-seeded every step from (seed, rank, iteration). So a run resumed from the
checkpoint at iteration k replays iterations k+1.. exactly as an uninterrupted run, skipping the batches
already seen.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from raycontrast.build import RunParts, build_parts, limit_threads
from raycontrast.checkpoint import TrainState, capture_rng_state, restore_rng_state
from raycontrast.config import Config, TrainSection
from raycontrast.engine import StepStats, evaluate, train_step
from raycontrast.metrics import all_reduce_confusion, iou, miou, pixel_accuracy
from raycontrast.sampling import step_seed
from raycontrast.session import Session

__all__ = ["LoopHooks", "LoopOptions", "WindowMeter", "run_loop", "say"]

# fp16: GradScaler starts at 2**16 and halves on each overflow; after this many in a row the scale is
# 2**-24, where no finite fp16 gradient overflows, so the gradients themselves are non-finite.
MAX_OVERFLOW_STEPS = 40


def say(message: str) -> None:
    """One progress line on stdout. Written directly: Ray Train patches `print` inside workers to log *and*
    echo, which would show every line twice on the driver."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


class LoopHooks:
    """Points where a run is observed: a search's warm-up trunk records its reports (`trunk.TrunkReports`),
    tests inject faults. A plain run installs none (these no-ops); the loop knows nothing of what a hook
    does."""

    def before_step(self, iteration: int, rank: int, world: int) -> None:
        """Before the step that trains iteration `iteration + 1`."""

    def after_step(self, iteration: int, stats: StepStats) -> None:
        """After the step; `iteration` steps are done."""

    def on_evaluation(self, metrics: dict[str, Any], rank: int) -> None:
        """After an evaluation has been reported (`metrics`: the report)."""

    def at_end(self, parts: RunParts, start_iteration: int, rank: int) -> None:
        """After the last step of this attempt (`start_iteration`: where it resumed)."""


class WindowMeter:
    """Per-step statistics summed on the device over the finite steps of a window, read as named means.

    Sums stay on the device (no host sync per step); `all_reduce` adds the other ranks' sums once per window.
    `extra_sizes`: also average `memory_fill@<size>` (see `LoopOptions.fill_sizes`).
    """

    KEYS = ("loss", "ce", "contrast", "anchors", "hard_share", "intra_cos", "inter_cos", "memory_fill")
    NAMES = ("loss", "ce_loss", "contrast_loss", *KEYS[3:])  # as reported

    def __init__(self, device: torch.device, extra_sizes: tuple[int, ...] = ()) -> None:
        extra = tuple(f"memory_fill@{size}" for size in extra_sizes)
        self.keys, self.names = self.KEYS + extra, self.NAMES + extra
        self.sums = torch.zeros(len(self.keys) + 1, dtype=torch.float64, device=device)  # + finite count
        self.reset()

    def reset(self) -> None:
        self.sums.zero_()
        self.steps = self.nonfinite = self.overflow = 0
        self.loaded_steps = 0  # of `steps`, taken before this attempt (a checkpoint written mid-window)
        self.started = time.time()

    def add(self, stats: StepStats, finite: bool, overflow: bool = False) -> None:
        """One step: its statistics count when it was applied (`finite`); a skipped step is an fp16
        `overflow` or a non-finite one."""
        if finite:
            self.sums += torch.stack([stats[k].double() for k in self.keys] + [self.sums.new_ones(())])
        self.steps += 1
        self.overflow += overflow
        self.nonfinite += not (finite or overflow)

    def all_reduce(self) -> None:
        dist.all_reduce(self.sums)

    def means(self) -> dict[str, float]:
        """Mean of each statistic over the finite steps (NaN when there were none)."""
        values = self.sums.tolist()
        n = values[-1]
        return {k: v / n if n > 0 else math.nan for k, v in zip(self.names, values, strict=False)}

    def state(self) -> dict[str, Any]:
        """The window so far, for a checkpoint written between evaluations."""
        return {
            "sums": self.sums.cpu().clone(),
            "steps": self.steps,
            "nonfinite": self.nonfinite,
            "overflow": self.overflow,
        }

    def load(self, state: dict[str, Any] | None) -> None:
        """Continue the window a checkpoint was written in (None: a fresh one). Its statistics beyond this
        meter's own keys (a trunk's per-size fills) are dropped."""
        if state is None:
            return
        sums = state["sums"].to(self.sums)
        self.sums[: len(self.KEYS)] = sums[: len(self.KEYS)]
        self.sums[-1] = sums[-1]
        self.steps, self.nonfinite, self.overflow = state["steps"], state["nonfinite"], state["overflow"]
        self.loaded_steps = self.steps

    @property
    def steps_timed(self) -> int:
        """Steps of the window taken since `started` (this attempt's share of it)."""
        return self.steps - self.loaded_steps


@dataclass
class Progress:
    """The run's own clock and record, continued across resumes (part of `TrainState`)."""

    iteration: int = 0
    elapsed_s: float = 0.0  # before this attempt
    worker_seconds: float = 0.0  # before this attempt
    best_val_miou: float = -math.inf
    best_iteration: int = 0
    metrics: dict[str, Any] | None = None
    started: float = field(default_factory=time.time)  # this attempt's start
    train_images: int = 0  # trained in this attempt
    train_time_s: float = 0.0

    def time_s(self, now: float) -> float:
        return self.elapsed_s + now - self.started


def _resume(parts: RunParts, state: TrainState) -> Progress:
    parts.net.load_state_dict(state.model)
    parts.optimizer.load_state_dict(state.optimizer)
    parts.scheduler.load_state_dict(state.scheduler)
    if parts.scaler is not None and state.scaler is not None:
        parts.scaler.load_state_dict(state.scaler)
    if parts.memory is not None and state.memory is not None:
        parts.memory.load_state_dict(state.memory)
    restore_rng_state(state.rng)
    return Progress(
        state.iteration, state.elapsed_s, state.worker_seconds, state.best_val_miou, state.best_iteration,
        state.metrics,
    )  # fmt: skip


def _train_state(
    parts: RunParts, cfg: Config, progress: Progress, elapsed_s: float, worker_seconds: float
) -> TrainState:
    """The checkpoint of the run as it stands now (`progress.metrics`: its last evaluation)."""
    return TrainState(
        model=parts.net.state_dict(),
        optimizer=parts.optimizer.state_dict(),
        scheduler=parts.scheduler.state_dict(),
        iteration=progress.iteration,
        rng=capture_rng_state(),
        scaler=parts.scaler.state_dict() if parts.scaler else None,
        memory=parts.memory.state_dict() if parts.memory is not None else None,
        config=cfg.model_dump(mode="json"),
        elapsed_s=elapsed_s,
        worker_seconds=worker_seconds,
        best_val_miou=progress.best_val_miou,
        best_iteration=progress.best_iteration,
        metrics=progress.metrics,
    )


def _checkpoint_now(
    parts: RunParts, cfg: Config, session: Session, p: Progress, window: WindowMeter, why: str
) -> None:
    """Rank 0 writes a checkpoint at once, between evaluations, with the window's statistics so far (no
    evaluation, no report); training goes on. A preemption notice's restart resumes from it, losing at
    most the steps since; a shared warm-up trunk's trials fork from it."""
    if session.rank != 0:
        return
    now = time.time()
    state = _train_state(parts, cfg, p, p.time_s(now), p.worker_seconds + session.world * (now - p.started))
    state.window = window.state()
    say(f"{why} at iteration {p.iteration}: checkpoint {session.checkpoint_now(state)}")


def _evaluate(parts: RunParts, cfg: Config, session: Session, window: WindowMeter, lr: float, p: Progress):
    """Evaluate on the val shard and build the report: one collective for the window statistics, one for
    the confusion matrix, one for the peak RSS."""
    t, world, it = cfg.train, session.world, p.iteration
    window_time, t_eval = time.time() - window.started, time.time()
    cm = all_reduce_confusion(
        evaluate(
            parts.net, parts.val_loader, num_classes=parts.info.num_classes, ignore_index=parts.info.ignore_index,
            mode=t.eval_mode, crop_size=cfg.data.crop_size, amp_dtype=parts.amp_dtype,
        )
    )  # fmt: skip
    eval_time = time.time() - t_eval
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0], device=session.device)
    if world > 1:
        window.all_reduce()
        dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    val_miou, now = miou(cm), time.time()
    if not math.isnan(val_miou) and val_miou > p.best_val_miou:
        p.best_val_miou, p.best_iteration = val_miou, it
    # A window continued from a checkpoint (a fork, a preemption) was partly trained before this attempt,
    # outside window_time: the rate counts this attempt's steps only.
    images = window.steps_timed * t.batch_size * world
    p.train_images += images
    p.train_time_s += window_time
    means = window.means()
    # Tune's progress table shows the first four metrics of a report: the score, the best so far, where.
    return {
        "val_miou": val_miou,
        "best_val_miou": p.best_val_miou if math.isfinite(p.best_val_miou) else math.nan,
        "iteration": it,
        "loss": means["loss"],
        "epoch": (it - 1) // parts.steps_per_epoch,
        "lr": lr,
        **means,
        "nonfinite_steps": window.nonfinite,
        "overflow_steps": window.overflow,
        "val_pixel_acc": pixel_accuracy(cm),
        "val_class_iou": iou(cm).tolist(),
        "images_per_s": images / max(window_time, 1e-9),
        "time_s": p.time_s(now),
        "worker_seconds": p.worker_seconds + world * (now - p.started),
        "peak_rss_mb": float(rss),
        "train_time_s": window_time,
        "eval_time_s": eval_time,
    }


@dataclass(frozen=True)
class LoopOptions:
    """How a run is driven, beside its config (none of it changes what is computed).

    stop_at: stop after this many iterations (before `train.iterations`; the schedule still spans all of
    them), writing a checkpoint there: the shared warm-up trunk of a search. fill_sizes: also report the
    memory fill a memory of each of these sizes would have (`memory_fill@<size>`), so the trunk's curve
    rows can be given to trials of every memory size.
    """

    stop_at: int | None = None
    fill_sizes: tuple[int, ...] = ()


@dataclass
class _Streak:
    """Consecutive skipped steps: non-finite ones and fp16 overflows."""

    nonfinite: int = 0
    overflow: int = 0

    def update(self, finite: bool, overflow: bool, max_nonfinite: int, it: int, loss: float) -> str | None:
        """Why the run diverged, once one of the streaks is too long; else None."""
        self.nonfinite = 0 if finite or overflow else self.nonfinite + 1
        self.overflow = self.overflow + 1 if overflow else 0
        if self.nonfinite < max_nonfinite and self.overflow < MAX_OVERFLOW_STEPS:
            return None
        what = "consecutive steps" if self.nonfinite else "consecutive fp16 overflows"
        return (
            f"{max(self.nonfinite, self.overflow)} {what} up to iteration {it} (loss {loss}); lower optim.lr "
            "or set optim.grad_clip"
        )


def _log_line(t: TrainSection, log: WindowMeter, stats: StepStats, it: int, world: int) -> None:
    m, dt = log.means(), time.time() - log.started
    say(
        f"it {it}/{t.iterations} | lr {float(stats['lr']):.2e} | loss {m['loss']:.4f} (ce {m['ce_loss']:.4f}, "
        f"contrast {m['contrast_loss']:.4f}) | {log.steps * t.batch_size * world / max(dt, 1e-9):.1f} img/s | "
        f"memory {m['memory_fill']:.2f}"
    )
    log.reset()


def _report(
    parts: RunParts, cfg: Config, session: Session, window: WindowMeter, stats: StepStats, p: Progress
) -> None:
    """Evaluate, report (every rank: a barrier) with a checkpoint when one is due, say so, start a window."""
    t, it = cfg.train, p.iteration
    p.metrics = _evaluate(parts, cfg, session, window, float(stats["lr"]), p)
    save = it % t.checkpoint_interval == 0 or it == t.iterations
    ckpt = None
    if save and session.rank == 0:
        ckpt = _train_state(parts, cfg, p, p.metrics["time_s"], p.metrics["worker_seconds"])
    session.report(p.metrics, ckpt)
    if session.rank == 0:
        say(
            f"eval it {it}: val mIoU {p.metrics['val_miou']:.4f} | pixel acc {p.metrics['val_pixel_acc']:.4f} | "
            f"best {p.best_val_miou:.4f} @ {p.best_iteration}" + (" | checkpoint" if save else "")
        )
    window.reset()


def run_loop(
    config: Mapping[str, Any],
    session: Session,
    hooks: LoopHooks | None = None,
    options: LoopOptions | None = None,
) -> dict[str, Any]:
    """Train one model as one rank of `session`; `config` is `Config.model_dump(mode="json")`.

    Returns a summary (rank 0's reaches Ray's `Result.return_value`). A run whose losses stay non-finite
    (`train.max_nonfinite_steps`) stops and says why in `summary["diverged"]`: it returns rather than
    raises, because a retry would only diverge again.
    """
    cfg, hooks, opts = Config.model_validate(config), hooks or LoopHooks(), options or LoopOptions()
    t, rank, world = cfg.train, session.rank, session.world
    limit_threads(t)
    state = session.load_checkpoint()  # first: a resumed run needs no pretrained weights
    parts = build_parts(cfg, session, pretrained=state is None)
    p = Progress() if state is None else _resume(parts, state)
    window, log = WindowMeter(session.device, opts.fill_sizes), WindowMeter(session.device)
    if state is not None:
        window.load(state.window)  # a checkpoint written mid-window (a fork, a preemption notice)
        if rank == 0:
            fill = float(parts.memory.fill()) if parts.memory is not None else 0.0
            say(f"resumed at iteration {p.iteration}/{t.iterations} (memory fill {fill:.2f})")
    redelivered = state is not None and session.redeliver(state)
    start_it, first_step_unix, streak, diverged, last_notice = p.iteration, None, _Streak(), None, None
    end = min(opts.stop_at or t.iterations, t.iterations)
    parts.model.train()
    while p.iteration < end and diverged is None:
        parts.sampler.set_epoch(p.iteration // parts.steps_per_epoch)
        parts.sampler.skip = (p.iteration % parts.steps_per_epoch) * t.batch_size  # a resume mid-epoch
        for images, labels in parts.train_loader:
            hooks.before_step(p.iteration, rank, world)
            images = images.to(session.device, non_blocking=True).contiguous(
                memory_format=parts.memory_format
            )
            labels = labels.to(session.device, non_blocking=True).long()  # uint8 from the loader
            parts.generator.manual_seed(step_seed(cfg.run.seed, rank, p.iteration))
            first_step_unix = first_step_unix or time.time()
            stats = train_step(
                parts.model, parts.criterion, parts.optimizer, parts.scheduler, images, labels,
                iteration=p.iteration, memory=parts.memory, scaler=parts.scaler, amp_dtype=parts.amp_dtype,
                grad_clip=cfg.optim.grad_clip, generator=parts.generator,
            )  # fmt: skip
            for size in opts.fill_sizes:
                stats[f"memory_fill@{size}"] = parts.memory.fill(size) if size else stats["memory_fill"] * 0
            p.iteration += 1
            it = p.iteration
            hooks.after_step(it, stats)
            finite = bool(stats["finite"])  # already synced inside train_step (the skip decision)
            overflow = not finite and bool(stats["overflow"])
            window.add(stats, finite, overflow)
            log.add(stats, finite, overflow)
            # Deterministic: a retry would diverge the same way, so the run ends here, on every rank alike
            # (the skip decision is global), and the driver records it instead of Ray retrying it.
            if diverged := streak.update(finite, overflow, t.max_nonfinite_steps, it, float(stats["loss"])):
                break
            if t.preemption_poll_interval and it % t.preemption_poll_interval == 0:
                notice = session.preempted()  # every rank: a collective
                if notice is not None and notice != last_notice:
                    last_notice = notice
                    _checkpoint_now(parts, cfg, session, p, window, f"preemption notice ({notice})")
            if rank == 0 and (it % t.log_interval == 0 or it == t.iterations):
                _log_line(t, log, stats, it, world)
            if it % t.eval_interval == 0 or it == t.iterations:
                _report(parts, cfg, session, window, stats, p)
                hooks.on_evaluation(p.metrics, rank)
            if it >= end:
                break
    if opts.stop_at is not None and diverged is None and start_it < end:
        _checkpoint_now(parts, cfg, session, p, window, f"stopped at iteration {end}")  # the trunk's fork
    if p.metrics is not None and start_it >= t.iterations and not redelivered:
        session.report(p.metrics, None)  # resumed a finished run: its final metrics, for the driver
    hooks.at_end(parts, start_it, rank)
    return {
        "diverged": diverged,  # None, or why the losses stayed non-finite (`NonFiniteLossError` detail)
        "metrics": p.metrics,  # the last report (Ray's Result.metrics is the last *checkpoint's* instead)
        "best_val_miou": p.best_val_miou,
        "best_iteration": p.best_iteration,
        "first_step_unix": first_step_unix,
        "loop_end_unix": time.time(),
        "train_images": p.train_images,
        "train_time_s": p.train_time_s,
        "worker_seconds": p.worker_seconds + world * (time.time() - p.started),
        "class_names": list(parts.info.class_names),
    }
