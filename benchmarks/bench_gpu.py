"""One training step of the W48 recipe on one CUDA GPU: step time, peak memory, MFU, contrast share, host syncs.

Setup: configs/cityscapes_hrnet_w48.yaml turned into parts by the package's own build functions, so this
measures the code a run trains with: HRNetV2-W48, 19 classes, proj_dim 256, batch 2 x 3 x 512 x 1024, AMP
(bf16 on compute capability >= 8.0, else fp16 with a GradScaler: `build.mixed_precision`), channels_last,
the cuDNN autotuner (`build.cudnn_autotune`), SGD with the poly schedule, each step one `engine.train_step`.
Random images; labels are 64 x 64 blocks of random classes under an ignore band, so every class present
qualifies for anchor sampling. Two settings: memory off, and `memory.size` 5000 (filled with random unit
keys before timing: the steady state of a long run).

Per setting it prints
  - step time: median over --steps timed steps after --warmup, CUDA events around each `train_step`;
  - contrast share: the same step at an iteration inside `loss.warmup_iters` (contrast term off; the
    projection head and the memory enqueue run all the same) against one past it, (on - off) / on, the
    two timed alternately;
  - peak GPU memory over those steps (`torch.cuda.max_memory_allocated`: weights, optimiser state, memory
    bank and activations);
  - MFU of the contrast-on step: the model's FLOPs (forward + backward, counted by `FlopCounterMode` over one
    step without memory and contrast) / step time / --peak-tflops. The contrast loss's and the enqueue's own
    FLOPs are counted and printed apart; they are not in MFU;
  - host syncs per step: the synchronising CUDA calls torch reports under `set_sync_debug_mode("warn")`
    over one contrast-on step (torch's check is experimental and misses some, e.g. in torch.distributed);
and once the counted forward GFLOPs of backbone + seg head against the HRNet authors' table.

    python benchmarks/bench_gpu.py                    # 20 timed steps after 5 warm-up steps, each setting
    python benchmarks/bench_gpu.py --quick            # smoke run: 256 x 512 crops, memory 500, 3 steps
    python benchmarks/bench_gpu.py --peak-tflops 312  # a GPU default_peak_tflops does not know

Without a CUDA device it says so and exits with status 1 (nothing was measured); the CPU counterpart is
benchmarks/bench_step.py.
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from raycontrast.build import build_criterion, build_memory, build_model, cudnn_autotune, mixed_precision
from raycontrast.config import Config, load_config
from raycontrast.data.info import DatasetInfo, dataset_info
from raycontrast.engine import build_optimizer, build_scheduler, seed_everything, train_step
from raycontrast.memory import PixelMemory
from raycontrast.models.hrnet import HRNetV2

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "cityscapes_hrnet_w48.yaml"

# HRNet-Semantic-Segmentation's README: HRNetV2-W48 696.2 GFLOPs at 1024 x 2048 (one image). Their tool
# (lib/utils/modelsummary.py) sums multiply-adds of conv and linear layers and divides by 2**30;
# FlopCounterMode counts 2 FLOPs per multiply-add, in units of 1e9.
TABLE_GMACS, TABLE_PIXELS = 696.2, 1024 * 2048


def table_forward_gflop(h: int, w: int) -> float:
    """The authors' W48 forward figure scaled to one h x w image, in FlopCounterMode's GFLOP."""
    return 2 * TABLE_GMACS * 2**30 / 1e9 * (h * w) / TABLE_PIXELS


def default_peak_tflops(device_name: str) -> float | None:
    """Dense bf16 Tensor Core peak in TFLOP/s (fp16 is the same on these parts), or None if unknown.

    NVIDIA's H100, H200 and A100 datasheets quote the figure with 2:4 sparsity, twice these: H100 / H200
    SXM 1,979, H100 / H200 NVL 1,671, H100 PCIe 1,513, A100 (SXM and PCIe) 624.
    """
    name = device_name.upper()
    if "H100" in name or "H200" in name:
        if "PCIE" in name:
            return 756.0
        return 835.0 if "NVL" in name else 989.0
    if "A100" in name:
        return 312.0
    return None


@dataclass(frozen=True)
class Setup:
    crop: tuple[int, int] = (512, 1024)  # the recipe's data.crop_size
    memory_sizes: tuple[int, ...] = (0, 5000)  # slots per class and queue; 0 = off
    steps: int = 20
    warmup: int = 5


QUICK = Setup(crop=(256, 512), memory_sizes=(0, 500), steps=3, warmup=2)


@dataclass(frozen=True)
class Figures:
    memory_size: int
    step_ms: float  # median, contrast on
    off_ms: float  # median, contrast off (an iteration inside the warm-up)
    peak_gib: float
    model_gflop: float  # forward + backward of the model, per step
    contrast_gflop: float  # what the contrast-on step adds: loss and memory enqueue
    syncs: int  # per contrast-on step

    @property
    def tflops(self) -> float:
        return self.model_gflop / self.step_ms  # GFLOP / ms = TFLOP/s

    @property
    def contrast_share(self) -> float:
        return (self.step_ms - self.off_ms) / self.step_ms


@dataclass(frozen=True)
class Report:
    amp: str
    batch: int
    crop: tuple[int, int]
    forward_gflop: float  # counted, backbone + seg head, per image
    figures: list[Figures]


def _config(crop: tuple[int, int], memory_size: int) -> Config:
    return load_config(RECIPE, {"data.crop_size": list(crop), "memory.size": memory_size})


def _batch(cfg: Config, info: DatasetInfo, device: torch.device, fmt: torch.memory_format):
    """Images `[B, 3, H, W]` (in `fmt`) and labels `[B, H, W]`: 64 x 64 blocks of random classes, the top
    5 % ignored."""
    b, (h, w) = cfg.train.batch_size, cfg.data.crop_size
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, info.num_classes, (b, -(-h // 64), -(-w // 64)), generator=g)
    labels = blocks.repeat_interleave(64, 1).repeat_interleave(64, 2)[:, :h, :w].contiguous()
    labels[:, : h // 20] = info.ignore_index
    images = torch.randn(b, 3, h, w, generator=g)
    return images.to(device).contiguous(memory_format=fmt), labels.to(device)


def _full_memory(cfg: Config, info: DatasetInfo, device: torch.device) -> PixelMemory | None:
    memory = build_memory(cfg, info, world=1)
    if memory is None:
        return None
    memory.to(device)
    g = torch.Generator(device=device).manual_seed(1)
    feats = F.normalize(torch.randn(memory.feats.shape, generator=g, device=device), dim=-1)
    full = torch.full_like(memory.count, memory.size)
    memory.load_state_dict({"feats": feats, "ptr": torch.zeros_like(memory.ptr), "count": full})
    return memory


def _gflop(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def _forward_gflop(net: HRNetV2, images: Tensor, amp_dtype: torch.dtype | None) -> float:
    net.eval()
    with torch.no_grad(), torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        flops = _gflop(lambda: net.forward_seg(images))
    net.train()
    return flops


def _host_syncs(fn: Callable[[], object]) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing CUDA operation" in str(w.message) for w in caught)


def _median_ms(events: list[tuple[torch.cuda.Event, torch.cuda.Event]]) -> float:
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def _timed(fn: Callable[[], object]) -> tuple[torch.cuda.Event, torch.cuda.Event]:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    return start, end


def measure(setup: Setup, device: torch.device) -> Report:
    """Build the recipe's parts on `device` (CUDA) and measure one `train_step` per memory size in `setup`."""
    cfg = _config(setup.crop, 0)
    info = dataset_info(cfg.data.dataset)
    torch.cuda.set_device(device)
    cudnn_autotune(device)
    seed_everything(cfg.run.seed)
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    net = build_model(cfg, info).to(device, memory_format=fmt)
    o = cfg.optim
    opt = build_optimizer(net, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, name=o.name)
    sched = build_scheduler(opt, max_iters=cfg.train.iterations, power=o.poly_power, min_lr=o.min_lr)
    amp_dtype, scaler = mixed_precision(cfg.train.amp, device)
    criterion = build_criterion(cfg, info).to(device)
    images, labels = _batch(cfg, info, device, fmt)
    gen = torch.Generator(device=device).manual_seed(0)
    on = cfg.loss.warmup_iters  # the first iteration with the contrast term; before it the term is 0

    def step(iteration: int, memory: PixelMemory | None) -> None:
        train_step(
            net, criterion, opt, sched, images, labels, iteration=iteration, memory=memory, scaler=scaler,
            amp_dtype=amp_dtype, grad_clip=o.grad_clip, generator=gen,
        )  # fmt: skip

    step(0, None)  # the autotuner's search, outside every count
    forward = _forward_gflop(net, images, amp_dtype) / images.shape[0]
    model_gflop = _gflop(partial(step, 0, None))
    figures = []
    for size in setup.memory_sizes:
        memory = _full_memory(_config(setup.crop, size), info, device)
        for _ in range(setup.warmup):
            step(0, memory)
            step(on, memory)
        contrast_gflop = _gflop(partial(step, on, memory)) - model_gflop
        syncs = _host_syncs(partial(step, on, memory))
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        off, with_contrast = [], []
        for _ in range(setup.steps):  # alternated, so both see the same clocks and temperature
            off.append(_timed(partial(step, 0, memory)))
            with_contrast.append(_timed(partial(step, on, memory)))
        off_ms, step_ms = _median_ms(off), _median_ms(with_contrast)
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
        figures.append(Figures(size, step_ms, off_ms, peak_gib, model_gflop, contrast_gflop, syncs))
        del memory
    amp = "off" if amp_dtype is None else str(amp_dtype).removeprefix("torch.")
    amp += " + GradScaler" if scaler is not None else ""
    return Report(amp, images.shape[0], setup.crop, forward, figures)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="timed steps per setting (default 20; --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; --quick 2)")
    p.add_argument("--quick", action="store_true", help="smoke run: 256 x 512 crops, memory 500")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="dense peak of the GPU (default: from its name)"
    )
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(
            f"bench_gpu: torch {torch.__version__} sees no CUDA device (built with CUDA "
            f"{torch.version.cuda}); this benchmark needs one GPU. On CPU use benchmarks/bench_step.py."
        )
    setup = QUICK if args.quick else Setup()
    setup = replace(
        setup,
        steps=setup.steps if args.steps is None else args.steps,
        warmup=setup.warmup if args.warmup is None else args.warmup,
    )
    if setup.steps < 1 or setup.warmup < 0:
        p.error("need --steps >= 1 and --warmup >= 0")
    device = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(device)
    peak = args.peak_tflops or default_peak_tflops(name)
    print(
        f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}) | "
        f"{name}, compute {'.'.join(map(str, torch.cuda.get_device_capability(device)))} | peak "
        + (f"{peak:g} TFLOP/s" if peak else "unknown (pass --peak-tflops)")
    )
    r = measure(setup, device)
    h, w = r.crop
    print(
        f"HRNet-W48, batch {r.batch} x 3 x {h} x {w}, AMP {r.amp}, channels_last, cudnn.benchmark | "
        f"median of {setup.steps} steps after {setup.warmup} warm-up, per setting"
    )
    table = table_forward_gflop(h, w)
    print(
        f"forward, backbone + seg head: {r.forward_gflop:.1f} GFLOP per image counted; the authors' 696.2 "
        f"(multiply-adds / 2^30 at 1024 x 2048) scaled to {h} x {w}: {table:.1f} GFLOP "
        f"(counted / table {r.forward_gflop / table:.3f})"
    )
    print(f"model forward + backward: {r.figures[0].model_gflop:.1f} GFLOP per step (counted)\n")
    print(
        f"{'memory':>7}{'step ms':>10}{'no-contrast ms':>16}{'contrast share':>16}{'peak GiB':>10}"
        f"{'TFLOP/s':>9}{'MFU':>8}{'contrast GFLOP':>16}{'syncs/step':>12}"
    )
    for f in r.figures:
        mfu = f"{f.tflops / peak:.1%}" if peak else "n/a"
        print(
            f"{f.memory_size or 'off':>7}{f.step_ms:>10.1f}{f.off_ms:>16.1f}{f.contrast_share:>16.1%}"
            f"{f.peak_gib:>10.2f}{f.tflops:>9.1f}{mfu:>8}{f.contrast_gflop:>16.1f}{f.syncs:>12}"
        )


if __name__ == "__main__":
    main()
