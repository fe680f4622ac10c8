"""Tests for raycontrast.loss against independent references written from the paper's formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import raycontrast.loss as loss_mod
from raycontrast.loss import (
    ContrastCELoss,
    PixelContrastLoss,
    contrastive_loss,
    labels_to_grid,
    sample_anchors,
)

T, BT = 0.1, 0.07


def unit(*shape, gen, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, generator=gen, dtype=dtype), dim=-1)


def loop_reference(anchors, labels, t, bt, memory=None, memory_labels=None):
    """Plain-Python InfoNCE straight from the formula: explicit rows, contrast sets, positives, negatives."""
    n_a, n_v, _ = anchors.shape
    rows = [(anchors[a, v].tolist(), int(labels[a])) for v in range(n_v) for a in range(n_a)]
    contrast = [(i, x, lab) for i, (x, lab) in enumerate(rows)]
    if memory is not None:
        contrast += [(-1, x.tolist(), int(lab)) for x, lab in zip(memory, memory_labels, strict=True)]
    total, used = 0.0, 0
    for r, (f, lab_r) in enumerate(rows):
        pos_s, neg_s = [], []
        for j, x, lab_j in contrast:
            if j == r:
                continue
            s = sum(a * b for a, b in zip(f, x, strict=True)) / t
            (pos_s if lab_j == lab_r else neg_s).append(s)
        if not pos_s:
            continue
        neg_sum = sum(math.exp(s) for s in neg_s)
        log_probs = [s - math.log(math.exp(s) + neg_sum) for s in pos_s]
        total += -(t / bt) * sum(log_probs) / len(log_probs)
        used += 1
    return total / used if used else 0.0


def dense_reference(anchors, labels, t, bt, memory=None, memory_labels=None):
    """Vectorised full-logits version (builds the whole [R, R + M] matrix), differentiable."""
    n_a, n_v, dim = anchors.shape
    f = anchors.transpose(0, 1).reshape(-1, dim)
    lab = labels.repeat(n_v)
    x, xl = f, lab
    if memory is not None:
        x, xl = torch.cat([f, memory]), torch.cat([lab, memory_labels])
    s = f @ x.t() / t
    same = lab[:, None] == xl[None, :]
    not_self = torch.ones_like(same)
    not_self[:, : f.shape[0]].fill_diagonal_(False)
    pos, neg = same & not_self, ~same
    neg_sum = (s.exp() * neg).sum(1, keepdim=True)
    log_prob = s - torch.log(s.exp() + neg_sum)
    npos = pos.sum(1)
    keep = npos > 0
    row = -(t / bt) * (log_prob * pos).sum(1)[keep] / npos[keep]
    return row.mean() if keep.any() else f.sum() * 0


CASES = [
    # (A, V, D, anchor label pool, memory size, memory label pool)
    (3, 2, 4, 2, 0, 0),
    (5, 3, 8, 3, 0, 0),
    (4, 1, 6, 2, 0, 0),
    (6, 2, 5, 4, 17, 6),  # memory holds classes absent from the batch
    (5, 2, 7, 5, 11, 2),  # batch holds classes absent from the memory
    (2, 4, 3, 1, 9, 3),
]


@pytest.mark.parametrize("case", CASES)
def test_contrastive_loss_matches_loop_reference(case):
    gen = torch.Generator().manual_seed(sum(case))
    n_a, n_v, dim, n_lab, n_mem, n_mlab = case
    for _ in range(3):
        anchors = unit(n_a, n_v, dim, gen=gen)
        labels = torch.randint(0, n_lab, (n_a,), generator=gen)
        mem = mlab = None
        if n_mem:
            mem = unit(n_mem, dim, gen=gen)
            mlab = torch.randint(0, n_mlab, (n_mem,), generator=gen)
        got = contrastive_loss(
            anchors, labels, temperature=T, base_temperature=BT, memory=mem, memory_labels=mlab
        )
        want = loop_reference(anchors, labels, T, BT, mem, mlab)
        assert got.dtype == torch.float64
        assert abs(got.item() - want) < 1e-10


@pytest.mark.parametrize("chunk", [1, 2, 5, None])
def test_chunked_equals_dense(monkeypatch, chunk):
    monkeypatch.setattr(loss_mod, "_CHUNK_COLS", chunk)
    gen = torch.Generator().manual_seed(7)
    anchors = unit(6, 3, 8, gen=gen).requires_grad_()
    labels = torch.randint(0, 4, (6,), generator=gen)
    mem, mlab = unit(23, 8, gen=gen), torch.randint(0, 6, (23,), generator=gen)
    got = contrastive_loss(
        anchors, labels, temperature=T, base_temperature=BT, memory=mem, memory_labels=mlab
    )
    (g_got,) = torch.autograd.grad(got, anchors)
    want = dense_reference(anchors, labels, T, BT, mem, mlab)
    (g_want,) = torch.autograd.grad(want, anchors)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)
    assert torch.allclose(g_got, g_want, atol=1e-12, rtol=0)


def test_unsorted_memory_gives_same_loss():
    gen = torch.Generator().manual_seed(3)
    anchors, labels = unit(4, 2, 6, gen=gen), torch.tensor([0, 1, 2, 1])
    mem, mlab = unit(15, 6, gen=gen), torch.randint(0, 4, (15,), generator=gen)
    order = torch.argsort(mlab)
    a = contrastive_loss(anchors, labels, temperature=T, base_temperature=BT, memory=mem, memory_labels=mlab)
    b = contrastive_loss(
        anchors, labels, temperature=T, base_temperature=BT, memory=mem[order], memory_labels=mlab[order]
    )
    assert torch.allclose(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("with_memory", [False, True])
def test_gradcheck(monkeypatch, with_memory):
    monkeypatch.setattr(loss_mod, "_CHUNK_COLS", 2)
    gen = torch.Generator().manual_seed(11)
    anchors = unit(4, 2, 5, gen=gen).requires_grad_()
    labels = torch.tensor([0, 1, 0, 2])
    mem = mlab = None
    if with_memory:
        mem, mlab = unit(9, 5, gen=gen), torch.tensor([0, 0, 1, 3, 3, 3, 1, 0, 4])

    def fn(x):
        return contrastive_loss(x, labels, temperature=T, base_temperature=BT, memory=mem, memory_labels=mlab)

    assert torch.autograd.gradcheck(fn, (anchors,), eps=1e-6, atol=1e-7)


def test_single_view_rows_without_positive_are_excluded():
    gen = torch.Generator().manual_seed(5)
    anchors = unit(4, 1, 6, gen=gen).requires_grad_()
    labels = torch.tensor([0, 1, 1, 2])  # rows of classes 0 and 2 have no positive
    got = contrastive_loss(anchors, labels, temperature=T, base_temperature=BT)
    assert torch.isfinite(got)
    assert abs(got.item() - loop_reference(anchors.detach(), labels, T, BT)) < 1e-10
    got.backward()
    assert torch.isfinite(anchors.grad).all()
    no_pos = contrastive_loss(anchors[:1], labels[:1], temperature=T, base_temperature=BT)
    assert no_pos.item() == 0.0 and no_pos.grad_fn is not None


def test_random_unit_features_scale():
    gen = torch.Generator().manual_seed(0)
    n_a, n_v, n_cls = 20, 25, 10
    anchors = unit(n_a, n_v, 256, gen=gen, dtype=torch.float32)
    labels = torch.arange(n_a) % n_cls
    got = contrastive_loss(anchors, labels, temperature=T, base_temperature=BT).item()
    n_neg = n_v * n_a * (n_cls - 1) / n_cls
    expected = (T / BT) * math.log(n_neg)
    assert 0.8 * expected < got < 1.2 * expected


# ---------------------------------------------------------------- sampling


def random_maps(gen, batch=3, n_pix=400, n_cls=6, wrong=0.3, ignore=0.1):
    labels = torch.randint(0, n_cls, (batch, n_pix), generator=gen)
    # Skew the class frequencies so some classes fall under the threshold.
    labels = torch.where(torch.rand(batch, n_pix, generator=gen) < 0.5, labels % 3, labels)
    labels[torch.rand(batch, n_pix, generator=gen) < ignore] = 255
    flip = torch.rand(batch, n_pix, generator=gen) < wrong
    predict = torch.where(flip, torch.randint(0, n_cls, (batch, n_pix), generator=gen), labels)
    return labels, predict


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_views,max_samples", [(30, 200), (50, 1000), (10, 64), (5, 7)])
def test_sampling_rules(seed, max_views, max_samples):
    gen = torch.Generator().manual_seed(seed)
    labels, predict = random_maps(gen, wrong=[0.05, 0.3, 0.7][seed % 3])
    index, anchor_labels = sample_anchors(
        labels, predict, max_samples=max_samples, max_views=max_views, ignore_index=255, generator=gen
    )
    batch, n_pix = labels.shape
    pairs = []
    for b in range(batch):
        for c in sorted(set(labels[b].tolist()) - {255}):
            if int((labels[b] == c).sum()) > max_views:  # strict threshold
                pairs.append((b, c))
    if not pairs or max_samples // len(pairs) == 0:
        assert index.shape == (0, 0) and anchor_labels.shape == (0,)
        return
    n_view = min(max_samples // len(pairs), max_views)
    assert index.shape == (len(pairs), n_view)
    assert anchor_labels.tolist() == [c for _, c in pairs]
    flat_lab, flat_pred = labels.flatten(), predict.flatten()
    assert len(set(index.flatten().tolist())) == index.numel()  # no duplicates
    for row, (b, c) in enumerate(pairs):
        idx = index[row]
        assert ((idx // n_pix) == b).all()  # image / class ordering
        assert (flat_lab[idx] == c).all()
        hard = flat_pred[idx] != c
        n_kept_hard = int(hard.sum())
        assert hard[:n_kept_hard].all() and not hard[n_kept_hard:].any()  # hard first
        nh = int(((labels[b] == c) & (predict[b] != c)).sum())
        ne = int(((labels[b] == c) & (predict[b] == c)).sum())
        if nh >= n_view / 2 and ne >= n_view / 2:
            assert n_kept_hard == n_view // 2
        elif nh >= n_view / 2:
            assert n_view - n_kept_hard == ne
        else:
            assert n_kept_hard == nh


def test_sampling_hits_all_three_branches():
    """Crafted pairs, one per branch of the hard/easy rule."""
    n_pix = 300
    labels = torch.zeros(1, n_pix, dtype=torch.long)
    labels[0, 100:200], labels[0, 200:] = 1, 2
    predict = labels.clone()
    predict[0, :50] = 5  # class 0: 50 hard, 50 easy -> split
    predict[0, 100:197] = 5  # class 1: 97 hard, 3 easy -> all easy + top-up hard
    predict[0, 200:202] = 5  # class 2: 2 hard, 98 easy -> all hard + top-up easy
    index, anchor_labels = sample_anchors(labels, predict, max_samples=60, max_views=20, ignore_index=255)
    assert anchor_labels.tolist() == [0, 1, 2] and index.shape == (3, 20)
    n_hard = (predict.flatten()[index] != labels.flatten()[index]).sum(1).tolist()
    assert n_hard == [10, 17, 2]


def test_sampling_uniform_and_deterministic():
    labels = torch.zeros(1, 40, dtype=torch.long)
    predict = labels.clone()
    a = sample_anchors(
        labels,
        predict,
        max_samples=8,
        max_views=8,
        ignore_index=255,
        generator=torch.Generator().manual_seed(1),
    )
    b = sample_anchors(
        labels,
        predict,
        max_samples=8,
        max_views=8,
        ignore_index=255,
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    gen = torch.Generator().manual_seed(2)
    hits = torch.zeros(40)
    for _ in range(500):
        idx, _ = sample_anchors(labels, predict, max_samples=8, max_views=8, ignore_index=255, generator=gen)
        hits[idx.flatten()] += 1
    assert hits.min() > 50 and hits.max() < 150  # each pixel expected 100 times


def test_zero_classes_loss_is_connected_zero():
    crit = PixelContrastLoss(max_views=100)
    embed = F.normalize(torch.randn(2, 8, 4, 4), dim=1).requires_grad_()
    labels = torch.randint(0, 3, (2, 16, 16))  # 16 grid pixels per image < max_views
    loss, stats = crit(embed, labels, labels[:, ::4, ::4])
    assert loss.item() == 0.0 and torch.isfinite(loss) and loss.grad_fn is not None
    loss.backward()
    assert embed.grad is not None and (embed.grad == 0).all()
    assert stats["anchors"].item() == 0 and stats["intra_cos"].item() == 0


# ---------------------------------------------------------------- modules


def test_labels_to_grid_matches_stride_four():
    labels = torch.randint(0, 255, (2, 32, 64))
    assert torch.equal(labels_to_grid(labels, (8, 16)), labels[:, ::4, ::4])


def test_pixel_contrast_loss_end_to_end():
    gen = torch.Generator().manual_seed(0)
    batch, dim, h, w = 2, 16, 12, 16
    embed = F.normalize(
        torch.randn(batch, dim, h, w, generator=gen, dtype=torch.float64), dim=1
    ).requires_grad_()
    labels = torch.randint(0, 3, (batch, 4 * h, 4 * w), generator=gen)
    labels[:, :8] = 255
    grid = labels[:, ::4, ::4]
    predict = torch.where(torch.rand(batch, h, w, generator=gen) < 0.2, (grid + 1) % 3, grid)
    crit = PixelContrastLoss(max_samples=60, max_views=10)
    loss, stats = crit(embed, labels, predict, generator=torch.Generator().manual_seed(4))
    index, anchor_labels = sample_anchors(
        grid.flatten(1),
        predict.flatten(1),
        max_samples=60,
        max_views=10,
        ignore_index=255,
        generator=torch.Generator().manual_seed(4),
    )
    anchors = embed.detach().permute(0, 2, 3, 1).reshape(-1, dim)[index]
    assert abs(loss.item() - loop_reference(anchors, anchor_labels, 0.1, 0.07)) < 1e-10
    assert stats["anchors"].item() == index.numel()
    hard = (predict.flatten()[index] != grid.flatten()[index]).double().mean()
    assert abs(stats["hard_share"].item() - hard.item()) < 1e-6
    f = F.normalize(anchors.transpose(0, 1).reshape(-1, dim), dim=1)
    lab = anchor_labels.repeat(index.shape[1])
    cos, same = f @ f.t(), lab[:, None] == lab[None, :]
    off = ~torch.eye(len(lab), dtype=torch.bool)
    assert abs(stats["intra_cos"].item() - cos[same & off].mean().item()) < 1e-5
    assert abs(stats["inter_cos"].item() - cos[~same].mean().item()) < 1e-5
    loss.backward()
    touched = (embed.grad.abs().sum(1) > 0).flatten()
    assert set(touched.nonzero().flatten().tolist()) == set(index.flatten().tolist())


def make_outputs(gen, batch=2, n_cls=4, dim=8, h=12, w=12):
    seg = torch.randn(batch, n_cls, h, w, generator=gen, requires_grad=True)
    embed = F.normalize(torch.randn(batch, dim, h, w, generator=gen), dim=1).requires_grad_()
    labels = torch.randint(0, n_cls, (batch, 4 * h, 4 * w), generator=gen)
    return {"seg": seg, "embed": embed}, labels


def test_contrast_ce_warmup():
    gen = torch.Generator().manual_seed(0)
    outputs, labels = make_outputs(gen)
    crit = ContrastCELoss(num_classes=4, weight=0.5, warmup_iters=10, max_views=10, max_samples=80)
    total, parts = crit(outputs, labels, iteration=9)
    assert parts["contrast"].item() == 0.0
    total.backward()
    assert outputs["embed"].grad is not None and (outputs["embed"].grad == 0).all()
    total2, parts2 = crit(outputs, labels, iteration=10)
    assert parts2["contrast"].item() > 0
    assert abs(total2.item() - (parts2["ce"] + 0.5 * parts2["contrast"]).item()) < 1e-5
    up = F.interpolate(outputs["seg"], size=labels.shape[-2:], mode="bilinear", align_corners=False)
    assert abs(parts["ce"].item() - F.cross_entropy(up, labels).item()) < 1e-5


def test_contrast_ce_class_weights_and_ignore():
    gen = torch.Generator().manual_seed(1)
    outputs, labels = make_outputs(gen)
    labels[:, :5] = 255
    cw = [0.5, 1.0, 2.0, 0.0]
    crit = ContrastCELoss(num_classes=4, class_weights=cw)
    _, parts = crit(outputs, labels, iteration=0)
    up = F.interpolate(outputs["seg"], size=labels.shape[-2:], mode="bilinear", align_corners=False)
    want = F.cross_entropy(up, labels, weight=torch.tensor(cw), ignore_index=255)
    assert abs(parts["ce"].item() - want.item()) < 1e-5
    _, parts = crit(outputs, torch.full_like(labels, 255), iteration=0)
    assert parts["ce"].item() == 0.0
    with pytest.raises(ValueError, match="class_weights"):
        ContrastCELoss(num_classes=4, class_weights=[1.0, 2.0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_contrast_in_float32(dtype):
    gen = torch.Generator().manual_seed(2)
    anchors = unit(6, 3, 16, gen=gen, dtype=torch.float32).to(dtype)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.autocast("cpu", dtype=dtype):
        got = contrastive_loss(anchors, labels, temperature=T, base_temperature=BT)
    assert got.dtype == torch.float32
    want = loop_reference(anchors.double(), labels, T, BT)
    assert abs(got.item() - want) < 1e-4
    outputs, lab = make_outputs(gen)
    with torch.autocast("cpu", dtype=dtype):
        total, parts = ContrastCELoss(num_classes=4, max_views=10, max_samples=80)(outputs, lab, iteration=0)
    assert parts["contrast"].dtype == torch.float32 and torch.isfinite(total)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="labels and predict"):
        sample_anchors(
            torch.zeros(2, 3, dtype=torch.long),
            torch.zeros(2, 4, dtype=torch.long),
            max_samples=4,
            max_views=1,
            ignore_index=255,
        )
    with pytest.raises(ValueError, match="temperature"):
        contrastive_loss(
            torch.ones(2, 2, 4) * 10, torch.tensor([0, 1]), temperature=0.1, base_temperature=0.07
        )
    with pytest.raises(ValueError, match="memory"):
        contrastive_loss(
            torch.ones(2, 2, 4),
            torch.tensor([0, 1]),
            temperature=0.1,
            base_temperature=0.07,
            memory=torch.ones(3, 4),
        )


def test_float32_matches_float64_with_aligned_memory():
    """Near-duplicate positives and antipodal negatives: no cancellation, float32 stays close to float64."""
    gen = torch.Generator().manual_seed(8)
    centres = unit(3, 16, gen=gen)
    anchor_labels = torch.tensor([0, 1, 2, 0])
    anchors = F.normalize(
        centres[anchor_labels][:, None] + 0.3 * torch.randn(4, 5, 16, generator=gen, dtype=torch.float64),
        dim=-1,
    )
    mlab = torch.arange(3).repeat_interleave(400)
    mem = F.normalize(centres[mlab] + 1e-3 * torch.randn(1200, 16, generator=gen, dtype=torch.float64), dim=1)
    mem[mlab == 2] = -centres[0]  # class 2 memory points away from class 0
    grads = []
    for dtype in (torch.float64, torch.float32):
        a = anchors.detach().to(dtype).clone().requires_grad_()
        got = contrastive_loss(
            a, anchor_labels, temperature=0.05, base_temperature=BT, memory=mem.to(dtype), memory_labels=mlab
        )
        got.backward()
        grads.append((got.detach().double(), a.grad.double()))
    (l64, g64), (l32, g32) = grads
    assert torch.isfinite(l32) and abs(l32 - l64) / l64 < 1e-5
    assert (g32 - g64).norm() / g64.norm() < 1e-4
