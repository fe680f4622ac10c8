"""engine: train_step (order, warm-up, skip on non-finite, clipping, AMP), poly schedule, optimiser
groups, evaluate (whole / slide against independent references), seeding helpers."""

from __future__ import annotations

import math
import pickle
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

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
from raycontrast.models.hrnet import HRNetV2
from raycontrast.sampling import step_seed

K = 5
STAT_KEYS = {
    "loss",
    "ce",
    "contrast",
    "anchors",
    "hard_share",
    "intra_cos",
    "inter_cos",
    "grad_norm",
    "lr",
    "finite",
    "overflow",
    "memory_fill",
}


def _model() -> HRNetV2:
    torch.manual_seed(0)
    return HRNetV2("w18_small", K, proj_dim=8)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """2 x 3 x 64 x 64 images whose colour depends on the class of each quadrant; a row of ignore."""
    g = torch.Generator().manual_seed(1)
    labels = torch.empty(2, 64, 64, dtype=torch.long)
    for b, classes in enumerate(((0, 1, 2, 3), (4, 3, 2, 1))):
        for q, c in enumerate(classes):
            labels[b, (q // 2) * 32 : (q // 2 + 1) * 32, (q % 2) * 32 : (q % 2 + 1) * 32] = c
    labels[:, 0] = 255
    palette = torch.randn(K + 1, 3, generator=g)
    images = palette[labels.clamp_max(K)].permute(0, 3, 1, 2) + 0.3 * torch.randn(2, 3, 64, 64, generator=g)
    return images.contiguous(), labels


def _criterion(warmup_iters: int = 0, weight: float = 1.0) -> ContrastCELoss:
    # 8 (image, class) pairs of 64 grid pixels each qualify with max_views 20.
    return ContrastCELoss(K, weight=weight, warmup_iters=warmup_iters, max_samples=64, max_views=20)


def _setup(lr: float = 0.02, max_iters: int = 100, weight_decay: float = 1e-4):
    model = _model()
    opt = build_optimizer(model, lr=lr, momentum=0.9, weight_decay=weight_decay)
    sched = build_scheduler(opt, max_iters=max_iters, power=0.9)
    return model, opt, sched


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- train_step


def test_loss_decreases_params_change_and_stats_are_detached_scalars() -> None:
    model, opt, sched = _setup()
    images, labels = _batch()
    crit = _criterion()
    before = _snapshot(model)
    losses = []
    for it in range(6):
        stats = train_step(
            model, crit, opt, sched, images, labels, iteration=it, generator=torch.Generator().manual_seed(it)
        )
        assert set(stats) == STAT_KEYS
        for k, v in stats.items():
            assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad, k
        assert bool(stats["finite"]) and stats["finite"].dtype == torch.bool
        assert float(stats["contrast"]) > 0 and float(stats["anchors"]) == 8 * 8
        assert float(stats["loss"]) == pytest.approx(float(stats["ce"]) + float(stats["contrast"]), rel=1e-5)
        assert float(stats["lr"]) == pytest.approx(0.02 * (1 - it / 100) ** 0.9)
        assert float(stats["memory_fill"]) == 0.0
        losses.append(float(stats["loss"]))
    assert losses[-1] < losses[0]
    after = model.state_dict()
    changed = [k for k, v in before.items() if v.is_floating_point() and not torch.equal(v, after[k])]
    assert any(k.startswith("backbone.") for k in changed)
    assert any(k.startswith("seg_head.") for k in changed) and any(
        k.startswith("proj_head.") for k in changed
    )
    assert sched.last_epoch == 6


class _SpyMemory(PixelMemory):
    def __init__(self, log: list, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log = log

    def contrast_set(self):
        feats, labs = super().contrast_set()
        self.log.append(("contrast_set", feats.clone(), labs.clone()))
        return feats, labs

    def enqueue(self, keys, labels, generator=None):
        self.log.append(("enqueue", keys.requires_grad, keys.shape, labels.shape))
        super().enqueue(keys, labels, generator=generator)


class _SpyCriterion(nn.Module):
    def __init__(self, inner: nn.Module, log: list) -> None:
        super().__init__()
        self.inner, self.log = inner, log

    def forward(self, outputs, labels, *, iteration, memory=None, generator=None):
        self.log.append(("loss", None if memory is None else (memory[0].clone(), memory[1].clone())))
        return self.inner(outputs, labels, iteration=iteration, memory=memory, generator=generator)


def test_loss_sees_the_memory_as_it_was_and_memory_fills_after() -> None:
    model, opt, sched = _setup()
    images, labels = _batch()
    log: list = []
    memory = _SpyMemory(log, K, 8, size=50, pixel_update_freq=4)
    crit = _SpyCriterion(_criterion(), log)
    fills = []
    for it in range(3):
        start = len(log)
        stats = train_step(model, crit, opt, sched, images, labels, iteration=it, memory=memory)
        events = log[start:]
        assert [e[0] for e in events] == ["contrast_set", "loss", "enqueue"]
        # The loss got exactly what contrast_set returned before this step's enqueue.
        _, feats, labs = events[0]
        seen = events[1][1]
        assert torch.equal(seen[0], feats) and torch.equal(seen[1], labs)
        # Keys are detached, on the 16 x 16 embedding grid; labels at input resolution.
        assert events[2][1:] == (False, torch.Size([2, 8, 16, 16]), torch.Size([2, 64, 64]))
        fills.append(float(stats["memory_fill"]))
        assert fills[-1] == pytest.approx(float(memory.fill()))
        if it == 0:
            assert feats.shape[0] == 0  # empty memory at the first step
        else:
            assert feats.shape[0] > 0  # the previous steps' keys
    assert 0 < fills[0] < fills[1] < fills[2]
    # What step 2 contrasted against has all of step 1's entries and no entry of step 2's own batch.
    assert log[-3][1].shape[0] < memory.contrast_set()[0].shape[0]


def test_full_memory_trains_and_keeps_the_latest_keys() -> None:
    # Size 2 fills every queue within two steps; a full memory's contrast set is a view of its storage.
    model, opt, sched = _setup()
    images, labels = _batch()
    memory = PixelMemory(K, 8, size=2, pixel_update_freq=2)
    for it in range(4):
        stats = train_step(model, _criterion(), opt, sched, images, labels, iteration=it, memory=memory)
        assert bool(stats["finite"]) and math.isfinite(float(stats["loss"]))
    assert float(stats["memory_fill"]) == 1.0


def test_warmup_keeps_projection_head_in_graph_with_zero_grads() -> None:
    model, opt, sched = _setup()
    images, labels = _batch()
    crit = _criterion(warmup_iters=1)
    proj = list(model.proj_head.parameters())
    stats = train_step(model, crit, opt, sched, images, labels, iteration=0)
    assert float(stats["contrast"]) == 0.0 and float(stats["anchors"]) == 0.0
    assert float(stats["loss"]) == pytest.approx(float(stats["ce"]))
    # DDP safety: every projection-head parameter has a gradient, and it is exactly zero.
    assert all(p.grad is not None and not bool(p.grad.any()) for p in proj)
    assert any(bool(p.grad.any()) for p in model.seg_head.parameters())
    stats = train_step(model, crit, opt, sched, images, labels, iteration=1)
    assert float(stats["contrast"]) > 0
    assert all(p.grad is not None for p in proj) and any(bool(p.grad.any()) for p in proj)


class _NaNCriterion(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, outputs, labels, **kw):
        loss, parts = self.inner(outputs, labels, **kw)
        return loss * math.nan, parts


@pytest.mark.parametrize("source", ["images", "criterion"])
def test_nonfinite_step_changes_nothing_but_advances_the_schedule(source: str) -> None:
    model, opt, sched = _setup()
    images, labels = _batch()
    crit = _criterion()
    memory = PixelMemory(K, 8, size=20, pixel_update_freq=2)
    train_step(model, crit, opt, sched, images, labels, iteration=0, memory=memory)  # momentum buffers exist
    before = _snapshot(model)
    momentum = [opt.state[p]["momentum_buffer"].clone() for g in opt.param_groups for p in g["params"]]
    mem_before = [t.clone() for t in memory.contrast_set()]
    lr_before = opt.param_groups[0]["lr"]
    if source == "images":
        images = images.clone()
        images[0, :, 10, 10] = math.nan
    else:
        crit = _NaNCriterion(crit)
    stats = train_step(model, crit, opt, sched, images, labels, iteration=1, memory=memory)
    assert not bool(stats["finite"]) and not math.isfinite(float(stats["loss"]))
    after = model.state_dict()
    for k, v in before.items():  # parameters and BatchNorm running statistics
        assert torch.equal(v, after[k]), k
    assert all(p.grad is None for g in opt.param_groups for p in g["params"])
    now = [opt.state[p]["momentum_buffer"] for g in opt.param_groups for p in g["params"]]
    assert all(torch.equal(a, b) for a, b in zip(momentum, now, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(mem_before, memory.contrast_set(), strict=True))
    assert sched.last_epoch == 2 and opt.param_groups[0]["lr"] < lr_before
    # The run can go on: the next finite step updates again.
    stats = train_step(model, _criterion(), opt, sched, *_batch(), iteration=2, memory=memory)
    assert bool(stats["finite"])


def test_nonfinite_error_message() -> None:
    err = NonFiniteLossError("3 consecutive steps at iteration 10")
    assert isinstance(err, RuntimeError) and str(err).startswith("non-finite loss:")
    again = pickle.loads(pickle.dumps(err))  # as Ray sends it from a worker to the driver
    assert str(again) == str(err) == "non-finite loss: 3 consecutive steps at iteration 10"


def test_grad_norm_is_the_global_norm_and_clipping_bounds_it() -> None:
    images, labels = _batch()
    norms = {}
    for clip in (None, 1e-3):
        model, opt, sched = _setup()
        stats = train_step(model, _criterion(), opt, sched, images, labels, iteration=0, grad_clip=clip)
        grads = [p.grad.double() for p in model.parameters() if p.grad is not None]
        total = math.sqrt(sum(float((g * g).sum()) for g in grads))
        norms[clip] = float(stats["grad_norm"])
        if clip is None:
            assert norms[clip] == pytest.approx(total, rel=1e-4)
        else:
            assert total <= clip * (1 + 1e-4)
    # Same model, same batch: the reported norm is the one before clipping.
    assert norms[1e-3] == pytest.approx(norms[None], rel=1e-4) and norms[None] > 1e-3


def test_bf16_autocast_on_cpu() -> None:
    model, opt, sched = _setup()
    images, labels = _batch()
    memory = PixelMemory(K, 8, size=20, pixel_update_freq=2)
    for it in range(2):
        stats = train_step(
            model,
            _criterion(),
            opt,
            sched,
            images,
            labels,
            iteration=it,
            memory=memory,
            amp_dtype=torch.bfloat16,
        )
        assert bool(stats["finite"]) and stats["loss"].dtype == torch.float32
        assert float(stats["contrast"]) > 0
    assert float(memory.fill()) > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_grad_scaler_backs_off_and_skips_on_nonfinite() -> None:
    model, opt, sched = _setup()
    images, labels = _batch()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    stats = train_step(model, _criterion(), opt, sched, images, labels, iteration=0, scaler=scaler)
    assert bool(stats["finite"]) and scaler.get_scale() == 2.0**10
    # The reported norm is the unscaled one (same as without a scaler, same init and batch).
    model2, opt2, sched2 = _setup()
    ref = train_step(model2, _criterion(), opt2, sched2, images, labels, iteration=0)
    assert float(stats["grad_norm"]) == pytest.approx(float(ref["grad_norm"]), rel=1e-3)
    before = _snapshot(model)
    stats = train_step(
        model, _NaNCriterion(_criterion()), opt, sched, images, labels, iteration=1, scaler=scaler
    )
    assert not bool(stats["finite"]) and scaler.get_scale() == 2.0**9
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not bool(stats["overflow"])  # a NaN loss is a divergence, whatever the scaler does


class _InfGradCriterion(nn.Module):
    """A finite loss whose gradient overflows (what fp16 loss scaling meets while it calibrates)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, outputs, labels, **kw):
        loss, parts = self.inner(outputs, labels, **kw)
        return _InfBackward.apply(loss), parts


class _InfBackward(torch.autograd.Function):
    """Identity forward; an infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def test_grad_overflow_with_a_scaler_is_not_a_divergence() -> None:
    model, opt, sched = _setup()
    images, labels = _batch()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = _snapshot(model)
    stats = train_step(
        model, _InfGradCriterion(_criterion()), opt, sched, images, labels, iteration=0, scaler=scaler
    )
    assert math.isfinite(float(stats["loss"])) and not bool(stats["finite"]) and bool(stats["overflow"])
    assert scaler.get_scale() == 2.0**9  # the scaler backed off ...
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # ... and nothing moved
    model2, opt2, sched2 = _setup()  # without a scaler the same inf gradients are a divergence
    stats = train_step(model2, _InfGradCriterion(_criterion()), opt2, sched2, images, labels, iteration=0)
    assert not bool(stats["finite"]) and not bool(stats["overflow"])


# ----------------------------------------------------------------------------- optimiser and schedule


def test_poly_schedule_values() -> None:
    model = _model()
    opt = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched = build_scheduler(opt, max_iters=10, power=0.9, min_lr=1e-4)
    lrs = []
    for _ in range(13):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    expect = lambda it: (0.01 - 1e-4) * (1 - min(it, 10) / 10) ** 0.9 + 1e-4
    for it in (0, 5, 10, 12):
        assert lrs[it] == pytest.approx([expect(it)] * len(opt.param_groups), rel=1e-12)
    assert lrs[0][0] == pytest.approx(0.01) and lrs[10][0] == pytest.approx(1e-4)
    # The schedule resumes from a state dict.
    opt2 = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched2 = build_scheduler(opt2, max_iters=10, power=0.9, min_lr=1e-4)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr()
    with pytest.raises(ValueError, match="min_lr"):
        build_scheduler(
            build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=0), max_iters=10, power=0.9, min_lr=0.1
        )
    with pytest.raises(ValueError, match="max_iters"):
        build_scheduler(opt, max_iters=0, power=0.9)


def test_no_weight_decay_on_batchnorm_and_biases() -> None:
    model = _model()
    opt = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=5e-4)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    ids_decay = {id(p) for p in decay["params"]}
    ids_none = {id(p) for p in no_decay["params"]}
    expect_none = set()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            expect_none |= {id(m.weight), id(m.bias)}
        elif isinstance(m, nn.Conv2d):
            assert id(m.weight) in ids_decay
            if m.bias is not None:
                expect_none.add(id(m.bias))
    assert ids_none == expect_none
    assert ids_decay | ids_none == {id(p) for p in model.parameters()} and not ids_decay & ids_none


# ----------------------------------------------------------------------------- evaluate


class _PixelClassStub(nn.Module):
    """Stride-1 'model': predicts at each pixel the class written in the image's first channel."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives evaluate a device to read
        self.calls: list[tuple[bool, bool, tuple[int, ...]]] = []

    def forward_seg(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_inference_mode_enabled(), tuple(x.shape[-2:])))
        cls = x[:, 0].round().long().clamp(0, K - 1)
        return F.one_hot(cls, K).permute(0, 3, 1, 2).float() * 4.0 + self.anchor


class _RowStub(nn.Module):
    """Position-dependent stride-1 'model': class 1 where the window-local row exceeds half the window,
    else class 0 (logit0 = 0.5, logit1 = local_row / crop_h); averaging over windows changes the answer."""

    def __init__(self, crop_h: int) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.crop_h = crop_h

    def forward_seg(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        rows = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1).expand(b, 1, h, w) / self.crop_h
        out = torch.zeros(b, K, h, w)
        out[:, 0] = 0.5
        out[:, 1:2] = rows
        out[:, 2:] = -1.0
        return out + self.anchor


def _expected_cm(pred: np.ndarray, target: np.ndarray, ignore: int = 255) -> torch.Tensor:
    cm = np.zeros((K, K), dtype=np.int64)
    keep = target != ignore
    np.add.at(cm, (target[keep], pred[keep]), 1)
    return torch.from_numpy(cm)


def _pixel_data(h: int, w: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cls = torch.randint(0, K, (2, h, w), generator=g)
    images = torch.cat([cls[:, None].float(), torch.randn(2, 2, h, w, generator=g)], 1)
    labels = torch.where(
        torch.rand(2, h, w, generator=g) < 0.7, cls, torch.randint(0, K, (2, h, w), generator=g)
    )
    labels[:, :2] = 255
    return images, labels, cls


@pytest.mark.parametrize(("h", "w"), [(37, 53), (20, 25), (64, 64)])
def test_evaluate_whole_and_slide_exact_on_pixel_stub(h: int, w: int) -> None:
    images, labels, cls = _pixel_data(h, w)
    expect = _expected_cm(cls.numpy(), labels.numpy())
    loader = [(images[:1], labels[:1]), (images[1:], labels[1:])]
    stub = _PixelClassStub()
    whole = evaluate(stub, loader, num_classes=K)
    slide = evaluate(stub, loader, num_classes=K, mode="slide", crop_size=32, stride=(16, 21))
    assert whole.dtype == torch.int64 and torch.equal(whole, expect) and torch.equal(slide, expect)
    # Every forward ran in eval mode under inference mode; slide windows are exactly crop-sized.
    assert all(not training and inference for training, inference, _ in stub.calls)
    assert all(size == (32, 32) for *_, size in stub.calls[2:])
    assert stub.training


def _slide_reference(h: int, w: int, crop: int, stride: int) -> np.ndarray:
    """Independent reference for _RowStub under sliding windows: mean local row over covering windows."""

    def starts(n: int) -> list[int]:
        s = list(range(0, max(n - crop, 0) + 1, stride))
        if n > crop and s[-1] != n - crop:
            s.append(n - crop)
        return s

    total = np.zeros((h, w))
    count = np.zeros((h, w))
    for y0 in starts(h):
        for x0 in starts(w):
            for y in range(y0, min(y0 + crop, h)):
                total[y, x0 : x0 + crop] += (y - y0) / crop
                count[y, x0 : x0 + crop] += 1
    return (total / count > 0.5).astype(np.int64)


@pytest.mark.parametrize(("h", "w", "crop", "stride"), [(37, 53, 32, 21), (70, 40, 32, 16), (20, 25, 32, 21)])
def test_evaluate_slide_averages_overlaps(h: int, w: int, crop: int, stride: int) -> None:
    labels = torch.randint(0, 2, (1, h, w), generator=torch.Generator().manual_seed(3))
    loader = [(torch.zeros(1, 3, h, w), labels)]
    stub = _RowStub(crop)
    pred = _slide_reference(h, w, crop, stride)
    got = evaluate(stub, loader, num_classes=K, mode="slide", crop_size=crop, stride=stride)
    assert torch.equal(got, _expected_cm(pred, labels[0].numpy()))
    whole_pred = (np.arange(h)[:, None] / crop > 0.5).repeat(w, 1).astype(np.int64)
    whole = evaluate(stub, loader, num_classes=K)
    assert torch.equal(whole, _expected_cm(whole_pred, labels[0].numpy()))


class _ConstantStub(nn.Module):
    """Stride-4 'model': logits constant over the image, the class given by the image's mean rounded."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward_seg(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        cls = x.mean((1, 2, 3)).round().long().clamp(0, K - 1)
        grid = F.one_hot(cls, K).float()[:, :, None, None].expand(b, K, math.ceil(h / 4), math.ceil(w / 4))
        return grid + self.anchor


def test_evaluate_upsamples_to_label_size() -> None:
    images = torch.stack([torch.full((3, 30, 45), 2.0), torch.full((3, 30, 45), 4.0)])
    labels = torch.randint(0, K, (2, 60, 90), generator=torch.Generator().manual_seed(0))
    pred = np.stack([np.full((60, 90), 2), np.full((60, 90), 4)])
    cm = evaluate(_ConstantStub(), [(images, labels)], num_classes=K)
    assert torch.equal(cm, _expected_cm(pred, labels.numpy()))


def test_evaluate_hrnet_skips_projection_head_and_restores_mode() -> None:
    model = _model()
    images, labels = _batch()
    calls = []
    model.proj_head.register_forward_hook(lambda *a: calls.append(1))
    model.eval()
    with torch.no_grad():
        logits = F.interpolate(model(images)["seg"], size=(64, 64), mode="bilinear", align_corners=False)
    calls.clear()
    model.train()
    cm = evaluate(model, [(images, labels)], num_classes=K)
    assert model.training and all(m.training for m in model.modules())
    assert calls == []
    assert torch.equal(cm, _expected_cm(logits.argmax(1).numpy(), labels.numpy()))
    assert int(cm.sum()) == int((labels != 255).sum())
    model.eval()
    evaluate(model, [(images, labels)], num_classes=K, mode="slide", crop_size=(48, 40))
    assert not model.training


def test_evaluate_rejects_bad_mode() -> None:
    with pytest.raises(ValueError, match="mode"):
        evaluate(_PixelClassStub(), [], num_classes=K, mode="tiles")
    with pytest.raises(ValueError, match="crop_size"):
        evaluate(_PixelClassStub(), [], num_classes=K, mode="slide")


# ----------------------------------------------------------------------------- seeding


def test_seed_everything_and_step_generators() -> None:
    seed_everything(7)
    a = (random.random(), np.random.rand(), torch.rand(3))  # noqa: NPY002 - the global state is the point
    seed_everything(7)
    b = (random.random(), np.random.rand(), torch.rand(3))  # noqa: NPY002
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    draw = lambda s, r: torch.randperm(1000, generator=torch.Generator().manual_seed(step_seed(s, r)))
    assert torch.equal(draw(0, 1), draw(0, 1))
    assert not torch.equal(draw(0, 0), draw(0, 1)) and not torch.equal(draw(0, 1), draw(1, 0))


# ----------------------------------------------------------------------------- DDP (2 CPU processes, gloo)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = DistributedDataParallel(_model())
        opt = build_optimizer(model, lr=0.02, momentum=0.9, weight_decay=1e-4)
        sched = build_scheduler(opt, max_iters=100, power=0.9)

        def gather(keys: torch.Tensor, labels: torch.Tensor):
            ks, ls = (
                [torch.empty_like(keys) for _ in range(world)],
                [torch.empty_like(labels) for _ in range(world)],
            )
            dist.all_gather(ks, keys)
            dist.all_gather(ls, labels)
            return torch.cat(ks), torch.cat(ls)

        memory = PixelMemory(K, 8, size=20, pixel_update_freq=2, gather_fn=gather)
        images, labels = _batch()
        if rank == 1:  # different data per rank
            images, labels = images.flip(-1), labels.flip(-1)
        crit = _criterion()

        class _RankInf(nn.Module):
            # A non-finite loss on rank 1 only, with finite gradients (a constant +inf has zero gradient).
            def forward(self, outputs, labels, **kw):
                loss, parts = crit(outputs, labels, **kw)
                return loss + (math.inf if rank == 1 else 0.0), parts

        finite = []
        for it, c in enumerate((crit, _RankInf(), crit)):
            stats = train_step(model, c, opt, sched, images, labels, iteration=it, memory=memory)
            finite.append(bool(stats["finite"]))
            state = {f"p{i}": p.detach().clone() for i, p in enumerate(model.parameters())}
            state["mem"] = memory.state_dict()["feats"]
            torch.save(state, f"{out_dir}/rank{rank}_step{it}.pt")
        torch.save({"finite": torch.tensor(finite)}, f"{out_dir}/rank{rank}_finite.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_decide_alike_and_stay_identical(tmp_path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    load = lambda name: torch.load(tmp_path / name, weights_only=True)
    for rank in (0, 1):
        assert load(f"rank{rank}_finite.pt")["finite"].tolist() == [True, False, True]
    for it in range(3):
        a, b = load(f"rank0_step{it}.pt"), load(f"rank1_step{it}.pt")
        assert all(torch.equal(a[k], b[k]) for k in a), it  # same weights and same memory on both ranks
    s0, s1 = load("rank0_step0.pt"), load("rank0_step1.pt")
    assert all(torch.equal(s0[k], s1[k]) for k in s0)  # the skipped step changed nothing on rank 0 either


def test_adamw_option_keeps_the_weight_decay_groups() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = build_optimizer(model, lr=1e-3, momentum=0.9, weight_decay=0.01, name="adamw")
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        build_optimizer(model, lr=1e-3, momentum=0.9, weight_decay=0.0, name="lamb")
