"""Host-device syncs in one training step, counted on CPU.

A CPU tensor never waits for a device, so the count is of the calls that would make the host wait on
CUDA: reading a value (`item`, `bool`, `int`, `float`, `tolist`, a copy to the CPU), and the ops whose
output size depends on the data (`nonzero`, boolean-mask indexing, `masked_select`, `unique`,
`repeat_interleave` without `output_size`). A `.to(device)` cannot be told from a copy to the host when
both are the CPU, so it is not counted (explicit `.cpu()` / `.numpy()` are). A `TorchFunctionMode` sees every such call made from Python,
which is where raycontrast makes them; ops inside C++ kernels (e.g. the optimiser's foreach kernels) are
not seen, and on CUDA `torch.cuda.set_sync_debug_mode` counts those too (`benchmarks/bench_gpu.py`).
"""

from __future__ import annotations

import traceback
from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode

from raycontrast.engine import build_optimizer, build_scheduler, train_step
from raycontrast.loss import ContrastCELoss
from raycontrast.memory import PixelMemory
from raycontrast.models.hrnet import HRNetV2

K = 5
_READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
          torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy}  # fmt: skip
_SIZED = {torch.nonzero, torch.Tensor.nonzero, torch.masked_select, torch.Tensor.masked_select,
          torch.unique, torch.Tensor.unique, torch.argwhere}  # fmt: skip


def _bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


class SyncCounter(TorchFunctionMode):
    """Counts the calls that sync on CUDA, by the raycontrast line that made them."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        syncs = (
            func in _READS
            or func in _SIZED
            or (func is torch.where and len(args) == 1)
            or (
                func in (torch.repeat_interleave, torch.Tensor.repeat_interleave)
                and "output_size" not in kwargs
            )
            or (func is torch.Tensor.__getitem__ and _bool_index(args))
        )
        if syncs:
            frame = next(
                (f for f in reversed(traceback.extract_stack()[:-1]) if "/raycontrast/" in f.filename), None
            )
            self.sites[f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}" if frame else "elsewhere"] += 1
        return func(*args, **kwargs)


def _count(memory_size: int, iteration: int, sparse: bool) -> Counter[str]:
    torch.manual_seed(0)
    model = HRNetV2("w18_small", K, proj_dim=8, sparse_proj=sparse)
    opt = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=1e-4)
    sched = build_scheduler(opt, max_iters=10, power=0.9)
    crit = ContrastCELoss(K, weight=1.0, warmup_iters=1, max_samples=64, max_views=20)
    memory = PixelMemory(K, 8, memory_size) if memory_size else None
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, K, (2, 64, 64), generator=g)
    images = torch.randn(2, 3, 64, 64, generator=g)
    kw = dict(memory=memory, generator=torch.Generator().manual_seed(1))
    train_step(model, crit, opt, sched, images, labels, iteration=0, **kw)  # fills the memory once
    with SyncCounter() as counter:
        train_step(model, crit, opt, sched, images, labels, iteration=iteration, **kw)
    return counter.sites


def test_the_counter_sees_syncs() -> None:
    x = torch.arange(4.0)
    with SyncCounter() as c:
        x.sum().item()
        _ = x[x > 1]
        bool(x.any())
        x.nonzero()
        x * 2  # not a sync
    assert sum(c.sites.values()) == 4


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse-head", "full-head"])
def test_syncs_per_step(sparse: bool) -> None:
    """The warm-up step (contrast off) and contrast steps with the memory off and on, with the projection
    head at the sampled pixels (the default) and on every pixel: each sync is listed by its line when the
    bound fails. The bounds are today's counts; lower them when a sync goes."""
    warm, off, on = _count(0, 0, sparse), _count(0, 5, sparse), _count(50, 5, sparse)
    print(f"syncs per step: warm-up {dict(warm)}; contrast {dict(off)}; contrast + memory {dict(on)}")
    assert sum(warm.values()) <= BOUNDS["warm-up"], warm
    assert sum(off.values()) <= BOUNDS["contrast"], off
    assert sum(on.values()) <= BOUNDS["memory"], on


# Today's counts. warm-up: the skip decision (engine: `bool(finite)`, which the algorithm needs). Contrast
# adds the sampler's label range and candidate total (anchors) and the loss's range probe (loss). The
# memory adds its label check and full-queue test on enqueue, its candidate gather, the contrast set's
# boolean selection and the loss's per-class counts. The validation reads (label ranges, the loss probe)
# are the ones a later change can move out of the step.
BOUNDS = {"warm-up": 1, "contrast": 4, "memory": 12}
