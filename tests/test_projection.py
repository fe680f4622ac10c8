"""models.projection: the projection head at the sampled pixels only equals the full-grid head (loss, every
gradient, BatchNorm running statistics, the memory's keys), alone, in training steps with the memory on and
off, under SyncBatchNorm across 2 gloo ranks (against one process on the whole batch) and under DDP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raycontrast.engine import build_optimizer, build_scheduler, train_step
from raycontrast.loss import ContrastCELoss, PixelContrastLoss
from raycontrast.memory import PixelMemory
from raycontrast.models.hrnet import HRNetV2
from raycontrast.models.projection import PixelEmbedding, memory_keys

C, D = 12, 6


def _head(momentum: float | None = 0.1) -> nn.Sequential:
    torch.manual_seed(0)
    head = nn.Sequential(
        nn.Conv2d(C, C, 1), nn.BatchNorm2d(C, momentum=momentum), nn.ReLU(), nn.Conv2d(C, D, 1)
    )
    with torch.no_grad():  # BN affine parameters away from their (1, 0) start, so their gradients matter
        head[1].weight.uniform_(0.5, 1.5)
        head[1].bias.uniform_(-0.5, 0.5)
    return head.double()


def _feats(batch: int = 2, h: int = 6, w: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # A large common offset: a variance from E[x^2] - E[x]^2 would lose digits here; the centred one does not.
    return (torch.randn(batch, C, h, w, generator=g, dtype=torch.float64) * 0.5 + 3.0).requires_grad_()


def _grads(head: nn.Module, feats: torch.Tensor) -> list[torch.Tensor]:
    return [feats.grad, *(p.grad for p in head.parameters())]


def _bn_state(head: nn.Sequential) -> list[torch.Tensor]:
    bn = head[1]
    return [bn.running_mean, bn.running_var, bn.num_batches_tracked]


@pytest.mark.parametrize("momentum", [0.1, None])
def test_sparse_head_equals_the_full_head_in_loss_gradients_and_running_statistics(momentum) -> None:
    full_head, sparse_head = _head(momentum), _head(momentum)
    feats_full, feats_sparse = _feats(), _feats()
    labels = torch.randint(0, 3, (2, 24, 28), generator=torch.Generator().manual_seed(2))
    predict = torch.randint(0, 3, (2, 6, 7), generator=torch.Generator().manual_seed(3))
    crit = PixelContrastLoss(max_samples=40, max_views=6)
    for step in range(2):  # twice: the running statistics' update rule (momentum or cumulative) as well
        for f in (feats_full, feats_sparse):
            f.grad = None
        full = F.normalize(full_head(feats_full), dim=1)
        lazy = PixelEmbedding(sparse_head, feats_sparse)
        assert lazy.shape == full.shape
        a, _ = crit(full, labels, predict, generator=torch.Generator().manual_seed(step))
        b, _ = crit(lazy, labels, predict, generator=torch.Generator().manual_seed(step))
        a.backward()
        b.backward()
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
        for gb, ga in zip(_grads(sparse_head, feats_sparse), _grads(full_head, feats_full), strict=True):
            assert ga.abs().max() > 0
            torch.testing.assert_close(gb, ga, rtol=1e-10, atol=1e-12)
        for sb, sa in zip(_bn_state(sparse_head), _bn_state(full_head), strict=True):
            torch.testing.assert_close(sb, sa, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lazy.full(), full.detach(), rtol=1e-12, atol=1e-12)


def test_eval_mode_uses_the_running_statistics_and_zero_keeps_every_parameter_in_the_graph() -> None:
    head, feats = _head(), _feats()
    head(feats.detach())  # some running statistics
    head.eval()
    lazy = PixelEmbedding(head, feats)
    torch.testing.assert_close(lazy.full(), F.normalize(head(feats), dim=1).detach(), rtol=1e-12, atol=1e-12)
    head.train()
    before = [t.clone() for t in _bn_state(head)]
    lazy = PixelEmbedding(head, feats)
    assert not torch.equal(_bn_state(head)[0], before[0])  # updated once, on construction
    lazy.zero().backward()
    assert all(p.grad is not None and not p.grad.any() for p in head.parameters())
    assert feats.grad is not None and not feats.grad.any()


def _step_models(sparse: bool, memory_size: int) -> tuple[HRNetV2, PixelMemory | None]:
    torch.manual_seed(0)
    model = HRNetV2("w18_small", 4, proj_dim=8, sparse_proj=sparse).double()
    memory = PixelMemory(4, 8, size=memory_size, pixel_update_freq=3) if memory_size else None
    if memory is not None:
        memory.feats = memory.feats.double()
    return model, memory


@pytest.mark.parametrize("memory_size", [0, 6])
def test_training_steps_with_the_sparse_head_match_the_full_head(memory_size) -> None:
    """Three SGD steps (the first in the CE-only warm-up): every loss, parameter, buffer and memory slot."""
    g = torch.Generator().manual_seed(5)
    images = torch.randn(2, 3, 32, 48, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 32, 48), generator=g)
    runs = []
    for sparse in (False, True):
        model, memory = _step_models(sparse, memory_size)
        opt = build_optimizer(model, name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4)
        sched = build_scheduler(opt, max_iters=10, power=0.9)
        crit = ContrastCELoss(4, weight=0.5, warmup_iters=1, max_samples=60, max_views=8)
        losses = []
        for it in range(3):
            stats = train_step(
                model, crit, opt, sched, images, labels, iteration=it, memory=memory,
                generator=torch.Generator().manual_seed(it),
            )  # fmt: skip
            losses.append(stats["loss"])
        runs.append((model, memory, torch.stack(losses)))
    (full, mem_full, loss_full), (sparse, mem_sparse, loss_sparse) = runs
    assert float(loss_full[1]) != float(loss_full[0])
    torch.testing.assert_close(loss_sparse, loss_full, rtol=1e-10, atol=1e-12)
    a, b = full.state_dict(), sparse.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-8, atol=1e-10, msg=k)
    if memory_size:
        assert float(mem_full.fill()) > 0
        torch.testing.assert_close(mem_sparse.feats, mem_full.feats, rtol=1e-6, atol=1e-7)
        assert torch.equal(mem_sparse.ptr, mem_full.ptr)


def test_memory_keys_of_a_tensor_are_detached_float() -> None:
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    keys = memory_keys(x)
    assert keys.dtype == torch.float32 and not keys.requires_grad


# ------------------------------------------------------------------- SyncBatchNorm across 2 gloo ranks


def _sync_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        head = nn.SyncBatchNorm.convert_sync_batchnorm(_head())
        feats = _feats(batch=4)[2 * rank : 2 * rank + 2].detach().requires_grad_()  # this rank's half
        lazy = PixelEmbedding(head, feats)
        index = torch.arange(0, 2 * 42, 5).view(-1, 1)  # pixels of this rank's two images
        out = lazy.at(index)
        (out * torch.linspace(-1, 1, D, dtype=out.dtype)).sum().backward()
        grads = {"feats": feats.grad, **{n: p.grad for n, p in head.named_parameters()}}
        torch.save(
            {"out": out.detach(), "grads": grads, "bn": head[1].state_dict()}, f"{out_dir}/rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


def test_sync_batchnorm_statistics_span_the_ranks(tmp_path) -> None:
    """Two ranks with two images each equal one process with all four: outputs, gradients (summed over
    ranks for parameters), running statistics."""
    import torch.multiprocessing as mp

    mp.spawn(_sync_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    head, feats = _head(), _feats(batch=4)
    lazy = PixelEmbedding(head, feats)
    index = torch.arange(0, 2 * 42, 5).view(-1, 1)
    outs = [lazy.at(index), lazy.at(index + 2 * 42)]  # rank 0's pixels, then rank 1's
    weights = torch.linspace(-1, 1, D, dtype=torch.float64)
    sum((o * weights).sum() for o in outs).backward()
    for r in (0, 1):
        torch.testing.assert_close(ranks[r]["out"], outs[r].detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            ranks[r]["grads"]["feats"], feats.grad[2 * r : 2 * r + 2], rtol=1e-10, atol=1e-12
        )
        for k, v in head[1].state_dict().items():
            torch.testing.assert_close(ranks[r]["bn"][k], v, rtol=1e-12, atol=1e-12)
    for n, p in head.named_parameters():
        torch.testing.assert_close(
            ranks[0]["grads"][n] + ranks[1]["grads"][n], p.grad, rtol=1e-10, atol=1e-12
        )


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, _ = _step_models(True, 0)
        model = DistributedDataParallel(model.float())
        opt = build_optimizer(model, name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4)
        sched = build_scheduler(opt, max_iters=10, power=0.9)
        crit = ContrastCELoss(4, weight=0.5, warmup_iters=1, max_samples=60, max_views=8)
        g = torch.Generator().manual_seed(5 + rank)  # different data per rank
        images, labels = torch.randn(2, 3, 32, 48, generator=g), torch.randint(0, 4, (2, 32, 48), generator=g)
        for it in range(2):
            train_step(
                model,
                crit,
                opt,
                sched,
                images,
                labels,
                iteration=it,
                generator=torch.Generator().manual_seed(it),
            )
        torch.save(model.module.state_dict(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_with_the_sparse_head_keeps_the_ranks_identical(tmp_path) -> None:
    """The head runs after DDP's forward; its gradients are still all-reduced (warm-up step and contrast step)."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    proj = [k for k in a if k.startswith("proj_head") and k.endswith("weight")]
    assert proj
    for k in a:
        if "running" in k or "num_batches" in k:
            continue  # plain BatchNorm (no SyncBN on CPU): each rank's own batch statistics
        assert torch.equal(a[k], b[k]), k
