"""Where the time of one training step goes: HRNet + pixel-contrast loss + memory bank.

Measures, at the recipe's crop (2 x 3 x 512 x 1024, 19 classes, proj_dim 256) by default:
  - the CE-only step (backbone + seg head, no projection head), split into forward, backward and
    optimiser step;
  - the full step through ``engine.train_step`` (projection head + ContrastCELoss, no warm-up), with the
    memory off and with ``--memory-size`` entries per class and queue (filled before timing), once with the
    projection head at the sampled pixels only (``model.sparse_proj``, the default) and once on every pixel;
  - in isolation: the projection head (forward + backward), the contrast loss (forward + backward on a
    leaf embedding, memory off / on) and the memory enqueue.
Prints each part's median and its share of the full step, and the contrast share
(contrast loss + enqueue over the full step; goal <= 10 %). All ratios come from this one run.

    python benchmarks/bench_step.py                        # W18, CPU, 3 repeats + 1 warm-up
    python benchmarks/bench_step.py --device cuda --repeats 10
    python benchmarks/bench_step.py --variant w18_small --size 256 512 --memory-size 1000
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raycontrast.engine import build_optimizer, build_scheduler, train_step
from raycontrast.loss import ContrastCELoss
from raycontrast.memory import PixelMemory
from raycontrast.models.hrnet import HRNetV2
from raycontrast.models.projection import PixelEmbedding


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


HEADS = ("full", "sparse")  # model.sparse_proj false / true


def synthetic_labels(batch: int, h: int, w: int, num_classes: int, seed: int = 0) -> Tensor:
    """Street-scene-like label maps ``[B, H, W]``: Voronoi cells of 40 random seeds, random classes, ~5 %
    ignore. Gives roughly 10-15 classes per image, most above max_views pixels on the H/4 grid."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(h, dtype=torch.float32).view(h, 1, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, w, 1)
    out = torch.empty(batch, h, w, dtype=torch.long)
    for b in range(batch):
        pts = torch.rand(40, 2, generator=g) * torch.tensor([h, w])
        cls = torch.randint(0, num_classes, (41,), generator=g)
        cls[-1] = 255
        d = (ys - pts[:, 0]) ** 2 + (xs - pts[:, 1]) ** 2  # [H, W, 40]
        cell = d.argmin(-1)
        cell[: h // 20] = 40  # an ignore band
        out[b] = cls[cell]
    return out


class _SegOnly(nn.Module):
    """The CE-only network: backbone + seg head, no projection head."""

    def __init__(self, net: HRNetV2) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"seg": self.net.seg_head(self.net.features(x))}


def _ce(seg: Tensor, labels: Tensor) -> Tensor:
    logits = F.interpolate(seg.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, labels, ignore_index=255)


def _fill_memory(memory: PixelMemory, dim: int, num_classes: int, device: torch.device) -> None:
    """Fill every queue with random unit keys through the public enqueue (small grids, many images)."""
    g = torch.Generator(device="cpu").manual_seed(1)
    labels = torch.arange(num_classes).repeat_interleave(4)  # every class, 4 pixels each
    for i in range(10_000):
        if memory.fill() >= 1.0:
            return
        keys = F.normalize(torch.randn(64, dim, 1, labels.numel(), generator=g), dim=1).to(device)
        lab = labels[torch.randperm(labels.numel(), generator=g)].view(1, 1, -1).expand(64, 1, -1).to(device)
        memory.enqueue(keys, lab.contiguous())
        if i > 9_000:
            raise RuntimeError("memory did not fill")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="w18", choices=["w18_small", "w18_small_v2", "w18", "w48"])
    p.add_argument("--size", type=int, nargs=2, default=(512, 1024), metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--proj-dim", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--memory-size", type=int, default=5000, help="slots per class per queue; 0 = memory off only"
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available")
    torch.manual_seed(0)
    h, w = args.size
    k, dim, reps, warm = args.classes, args.proj_dim, args.repeats, args.warmup
    print(f"torch {torch.__version__} | device {device}", end="")
    if device.type == "cuda":
        print(f" ({torch.cuda.get_device_name(device)})", end="")
    print(f" | CPU {_cpu_model()} | threads {torch.get_num_threads()} | python {platform.python_version()}")
    print(
        f"HRNet-{args.variant}, batch {args.batch} x 3 x {h} x {w}, {k} classes, proj_dim {dim}, "
        f"median of {reps} (+{warm} warm-up)\n"
    )

    net = HRNetV2(args.variant, k, proj_dim=dim).to(device).train()
    images = torch.randn(args.batch, 3, h, w, device=device)
    labels = synthetic_labels(args.batch, h, w, k).to(device)
    times: dict[str, float] = {}

    def med(name: str, values: list[float]) -> None:
        times[name] = statistics.median(values)
        print(f"  measured {name}: {times[name] * 1e3:.1f} ms", file=sys.stderr, flush=True)

    # CE-only step (split into forward, backward and optimiser step) and the full steps through the engine,
    # interleaved round by round, so a slower stretch of a shared machine hits every variant alike.
    seg_only = _SegOnly(net)
    opt = build_optimizer(net, lr=0.01, momentum=0.9, weight_decay=5e-4)

    def ce_parts() -> tuple[float, float, float]:
        opt.zero_grad(set_to_none=True)
        _sync(device)
        t0 = time.perf_counter()
        loss = _ce(seg_only(images)["seg"], labels)
        _sync(device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        opt.step()
        _sync(device)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    crit = ContrastCELoss(k, weight=0.1, warmup_iters=0).to(device)
    sched = build_scheduler(opt, max_iters=10**6, power=0.9)
    memory = None
    sizes = [0] + ([args.memory_size] if args.memory_size > 0 else [])
    rounds: dict[str, list[float]] = {}
    for size in sizes:
        if size:
            memory = PixelMemory(k, dim, size).to(device)
            _fill_memory(memory, dim, k, device)
        step = lambda: train_step(net, crit, opt, sched, images, labels, iteration=1, memory=memory)  # noqa: B023
        for i in range(warm + reps):
            fwd, bwd, opt_t = ce_parts()
            measured = {f"ce_step_mem{size}": fwd + bwd + opt_t}
            if not size:
                measured.update(ce_fwd=fwd, ce_bwd=bwd, opt_step=opt_t)
            for head in HEADS:
                net.sparse_proj = head == "sparse"
                measured[f"full_step_mem{size}_{head}"] = _time(step, device, 1, 0)[0]
            if i >= warm:
                for name, t in measured.items():
                    rounds.setdefault(name, []).append(t)
    net.sparse_proj = False
    for name, values in rounds.items():
        med(name, values)
    times["ce_step"] = times["ce_step_mem0"]

    # Isolated parts on realistic tensors from one forward.
    with torch.no_grad():
        feats = net.features(images)
        predict = net.seg_head(feats).argmax(1)
        embed0 = F.normalize(net.proj_head(feats), dim=1)
    upstream = torch.randn_like(embed0)
    feats_leaf = feats.detach().requires_grad_(True)

    def proj() -> None:
        net.zero_grad(set_to_none=True)
        (F.normalize(net.proj_head(feats_leaf), dim=1) * upstream).sum().backward()

    med("proj_head", _time(proj, device, reps, warm))

    def head_and_loss_sparse() -> None:
        net.zero_grad(set_to_none=True)
        loss, _ = crit.contrast(PixelEmbedding(net.proj_head, feats_leaf), labels, predict)
        loss.backward()

    med("sparse_head_contrast_mem0", _time(head_and_loss_sparse, device, reps, warm))

    for size in sizes:
        mem = memory.contrast_set() if size else None

        def contrast(mem: tuple[Tensor, Tensor] | None = mem) -> None:
            e = embed0.clone().requires_grad_(True)
            loss, _ = crit.contrast(e, labels, predict, memory=mem)
            loss.backward()

        med(f"contrast_mem{size}", _time(contrast, device, reps, warm))
    if memory is not None:
        med("enqueue", _time(lambda: memory.enqueue(embed0, labels), device, reps, warm))

    # Report.
    _, stats = crit.contrast(embed0, labels, predict)
    print(
        f"contrast sampling: {int(stats['anchors'])} anchor pixels, hard share {float(stats['hard_share']):.2f}"
    )
    print(f"{'part':<34}{'median ms':>12}{'share of step':>16}")

    def row(name: str, t: float, ref: float) -> None:
        print(f"{name:<34}{t * 1e3:>12.1f}{t / ref:>15.1%}")

    ce = times["ce_step"]
    print("-- CE-only step (backbone + seg head)")
    row("  forward", times["ce_fwd"], ce)
    row("  backward", times["ce_bwd"], ce)
    row("  optimiser step", times["opt_step"], ce)
    row("  total", ce, ce)
    for size in sizes:
        ce = times[f"ce_step_mem{size}"]  # the CE-only step timed in the same rounds
        label = f"memory {size}/class/queue" if size else "memory off"
        sparse = times[f"full_step_mem{size}_sparse"]
        print(
            f"-- full step, {label}, projection head at the sampled pixels (model.sparse_proj, the default)"
        )
        row("  full step (train_step)", sparse, sparse)
        row("  contrast branch (full - CE-only)", sparse - ce, sparse)
        if not size:
            row("  projection head + contrast loss", times["sparse_head_contrast_mem0"], sparse)
        if not size:
            print(f"  contrast branch share = {(sparse - ce) / sparse:.1%} (goal <= 5% with the memory off)")
        full = times[f"full_step_mem{size}_full"]
        branch = f"{(full - ce) / (sparse - ce):.2f}x" if sparse > ce else "(within noise)"
        print(
            f"  speed-up over the full-grid head: {full / sparse:.2f}x the step, {branch} the contrast branch"
        )
        print(f"-- full step, {label}, projection head on every pixel (share of that step)")
        row("  full step (train_step)", full, full)
        row("  projection head fwd+bwd", times["proj_head"], full)
        row("  contrast loss fwd+bwd", times[f"contrast_mem{size}"], full)
        enq = times["enqueue"] if size else 0.0
        if size:
            row("  memory enqueue", enq, full)
        row("  contrast branch (full - CE-only)", full - ce, full)
        row("  contrast branch (sum of parts)", times["proj_head"] + times[f"contrast_mem{size}"] + enq, full)
        share = (times[f"contrast_mem{size}"] + enq) / full
        print(f"  contrast share (loss{' + enqueue' if size else ''}) = {share:.1%} (goal <= 10%)")


if __name__ == "__main__":
    main()
