"""The CUDA path: an AMP training step on one GPU (bf16 where native, else fp16 with loss scaling), a whole
in-process run on the GPU, the GPU benchmark's measurement in its quick setup, and, where two GPUs exist,
a 2-rank NCCL step with SyncBN whose ranks stay identical. Skipped without CUDA (and excluded by default:
marker `gpu`)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from raycontrast.build import mixed_precision, native_bf16
from raycontrast.engine import build_optimizer, build_scheduler, evaluate, train_step
from raycontrast.loss import ContrastCELoss
from raycontrast.memory import PixelMemory, all_gather_entries
from raycontrast.models.hrnet import HRNetV2, convert_sync_bn

from conftest import load_benchmark, tiny_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
K = 5


def _batch(device: torch.device, flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """2 x 3 x 128 x 128 images coloured by the class of each quadrant, a row of ignore."""
    g = torch.Generator().manual_seed(1)
    labels = torch.empty(2, 128, 128, dtype=torch.long)
    for b, classes in enumerate(((0, 1, 2, 3), (4, 3, 2, 1))):
        for q, c in enumerate(classes):
            labels[b, (q // 2) * 64 : (q // 2 + 1) * 64, (q % 2) * 64 : (q % 2 + 1) * 64] = c
    labels[:, 0] = 255
    palette = torch.randn(K + 1, 3, generator=g)
    images = palette[labels.clamp_max(K)].permute(0, 3, 1, 2) + 0.3 * torch.randn(2, 3, 128, 128, generator=g)
    if flip:
        images, labels = images.flip(-1), labels.flip(-1)
    return images.to(device).contiguous(memory_format=torch.channels_last), labels.to(device)


def test_amp_step_on_one_gpu() -> None:
    device = torch.device("cuda", 0)
    amp_dtype, scaler = mixed_precision(True, device)
    assert (amp_dtype == torch.bfloat16) == native_bf16(device) and (scaler is None) == native_bf16(device)
    torch.manual_seed(0)
    model = HRNetV2("w18_small", K, proj_dim=16).to(device, memory_format=torch.channels_last)
    criterion = ContrastCELoss(K, weight=1.0, max_samples=256, max_views=20).to(device)
    memory = PixelMemory(K, 16, size=50, pixel_update_freq=4).to(device)
    opt = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=1e-4)
    sched = build_scheduler(opt, max_iters=20, power=0.9)
    images, labels = _batch(device)
    gen = torch.Generator(device=device).manual_seed(0)
    losses = []
    for it in range(6):
        stats = train_step(
            model, criterion, opt, sched, images, labels, iteration=it, memory=memory, scaler=scaler,
            amp_dtype=amp_dtype, generator=gen,
        )  # fmt: skip
        assert all(v.device.type == "cuda" for v in stats.values())
        losses.append(float(stats["loss"]))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert float(memory.fill()) > 0
    cm = evaluate(model, [(images, labels)], num_classes=K, amp_dtype=amp_dtype)
    assert cm.device.type == "cuda" and int(cm.sum()) == int((labels != 255).sum())


def test_whole_local_run_on_the_gpu(tmp_path, monkeypatch) -> None:
    from raycontrast import train

    cfg = tiny_config(
        tmp_path, "gpu", **{"train.use_gpu": True, "train.amp": True, "model.channels_last": True}
    )
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored afterwards
    out = train.fit(cfg)
    assert torch.backends.cudnn.benchmark  # fixed-size crops: build_parts turned the autotuner on
    assert out.metrics["iteration"] == cfg.train.iterations and 0 <= out.metrics["val_miou"] <= 1
    assert out.metrics["nonfinite_steps"] <= 2  # fp16 may skip a step or two while its scale settles


def test_gpu_benchmark_quick_figures(monkeypatch) -> None:
    bench = load_benchmark("bench_gpu")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored after
    setup = dataclasses.replace(bench.QUICK, steps=2, warmup=1)
    report = bench.measure(setup, torch.device("cuda", 0))
    h, w = setup.crop
    assert report.forward_gflop == pytest.approx(bench.table_forward_gflop(h, w), rel=1e-3)
    assert [f.memory_size for f in report.figures] == list(setup.memory_sizes)
    for f in report.figures:
        for value in (f.step_ms, f.off_ms, f.peak_gib, f.model_gflop, f.contrast_gflop, f.tflops):
            assert math.isfinite(value) and value > 0, f
        assert math.isfinite(f.contrast_share)  # a timing difference: its sign is not a test's business
        assert f.syncs >= 1  # at least the skip decision in train_step


def _nccl_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        torch.manual_seed(0)
        net = convert_sync_bn(HRNetV2("w18_small", K, proj_dim=16)).to(device)
        model = DistributedDataParallel(net, device_ids=[rank])
        amp_dtype, scaler = mixed_precision(True, device)
        criterion = ContrastCELoss(K, weight=1.0, max_samples=256, max_views=20).to(device)
        memory = PixelMemory(K, 16, size=50, pixel_update_freq=4, gather_fn=all_gather_entries).to(device)
        opt = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=1e-4)
        sched = build_scheduler(opt, max_iters=20, power=0.9)
        images, labels = _batch(device, flip=rank == 1)  # different data per rank
        gen = torch.Generator(device=device).manual_seed(rank)
        for it in range(3):
            train_step(
                model, criterion, opt, sched, images, labels, iteration=it, memory=memory, scaler=scaler,
                amp_dtype=amp_dtype, generator=gen,
            )  # fmt: skip
        state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        state["memory"] = memory.state_dict()["feats"].cpu()
        torch.save(state, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_rank_nccl_step_with_syncbn(tmp_path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_nccl_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # Parameters (DDP), BN running statistics (SyncBN: global batch statistics) and the memory (all-gather)
    # are the same on both ranks.
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert F.normalize(a["memory"].flatten(0, 2), dim=-1).isfinite().all()
