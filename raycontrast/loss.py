"""Pixel-contrast cross-entropy loss (Wang et al., "Exploring Cross-Image Pixel Contrast for Semantic
Segmentation", ICCV 2021): the pixel-to-pixel InfoNCE term and CE + contrast, on anchors chosen by
`raycontrast.anchors.sample_anchors` (re-exported here as part of the loss's public API).

Pure torch. The memory part of the contrast term runs in column chunks with an exact analytic backward, so
the [R, M] logits of a large memory bank are never held at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raycontrast.anchors import labels_to_grid, sample_anchors
from raycontrast.models.projection import PixelEmbedding

__all__ = ["ContrastCELoss", "PixelContrastLoss", "contrastive_loss", "labels_to_grid", "sample_anchors"]

# Column chunks of the memory term are sized so one [rows, cols] block stays under this many bytes.
_CHUNK_BYTES = 64 * 2**20
# Tests set this to force tiny chunks (None: derive the width from _CHUNK_BYTES).
_CHUNK_COLS: int | None = None
# Largest |s| = |f . x| / t allowed per dtype: exp(+-|s|) times 1e9 summed terms stays finite and normal.
_MAX_EXP = {torch.float32: 39.0, torch.float64: 330.0}


def _chunk_cols(rows: int, itemsize: int) -> int:
    if _CHUNK_COLS is not None:
        return _CHUNK_COLS
    return max(1, _CHUNK_BYTES // max(1, rows * itemsize))


def _without(x: Tensor, start: int, end: int) -> Tensor:
    """Rows of x outside [start, end)."""
    if start == end:
        return x
    return torch.cat([x[:start], x[end:]])


class _MemoryNegatives(torch.autograd.Function):
    """Neg_r = sum over memory entries j of another class than row r of exp(f_r . x_j / t).

    Rows and memory are sorted by class, so each column chunk lies inside one class block and needs no
    [rows, cols] mask, and the rows of that class are simply skipped. The forward also accumulates
    EX_r = sum_j exp(.) x_j, so the backward is dNeg_r / df_r = EX_r / t with no second pass (saved: [R, D]).
    """

    @staticmethod
    def forward(ctx, feats, row_bounds, memory, mem_bounds, inv_t):
        n_rows, dim = feats.shape
        neg, ex = feats.new_zeros(n_rows), feats.new_zeros(n_rows, dim)
        scaled = feats * inv_t
        cols = min(_chunk_cols(n_rows, feats.element_size()), memory.shape[0])
        buf = feats.new_empty(n_rows * cols)  # reused: fresh large blocks would page-fault on every chunk
        for c, (ms, me) in enumerate(mem_bounds):
            rs, re = row_bounds[c]
            if ms == me or re - rs == n_rows:
                continue
            f = _without(scaled, rs, re)
            neg_c, ex_c = f.new_zeros(f.shape[0]), f.new_zeros(f.shape[0], dim)
            for s in range(ms, me, cols):
                x = memory[s : min(s + cols, me)]
                z = buf[: f.shape[0] * x.shape[0]].view(f.shape[0], x.shape[0])
                torch.mm(f, x.t(), out=z).exp_()
                neg_c += z.sum(1)
                ex_c.addmm_(z, x)
            for dst, src in ((neg, neg_c), (ex, ex_c)):
                dst[:rs] += src[:rs]
                dst[re:] += src[rs:]
        ctx.save_for_backward(ex)
        ctx.inv_t = inv_t
        return neg

    @staticmethod
    def backward(ctx, grad):
        (ex,) = ctx.saved_tensors
        return grad[:, None] * ex * ctx.inv_t, None, None, None, None


class _MemoryPositives(torch.autograd.Function):
    """LP_r = sum over memory positives p of [s_p - log(exp(s_p) + Neg_r)], s_p = f_r . x_p / t.

    Only the same-class blocks are visited. dLP/df_r = sum_p Neg_r / (e_p + Neg_r) x_p / t and
    dLP/dNeg_r = -sum_p 1 / (e_p + Neg_r) are accumulated in the forward (saved: [R, D] + [R]).
    """

    @staticmethod
    def forward(ctx, feats, neg, row_bounds, memory, mem_bounds, inv_t):
        n_rows, dim = feats.shape
        out, w, q = feats.new_zeros(n_rows), feats.new_zeros(n_rows), feats.new_zeros(n_rows, dim)
        for c, (ms, me) in enumerate(mem_bounds):
            rs, re = row_bounds[c]
            if ms == me or rs == re:
                continue
            f, nr = feats[rs:re] * inv_t, neg[rs:re, None]
            cols = _chunk_cols(re - rs, feats.element_size())
            for s in range(ms, me, cols):
                x = memory[s : min(s + cols, me)]
                z = torch.mm(f, x.t())
                out[rs:re] += z.sum(1)
                d = z.exp_().add_(nr)  # e_p + Neg_r
                out[rs:re] -= d.log().sum(1)
                d.reciprocal_()
                w[rs:re] += d.sum(1)
                q[rs:re] += d.mul_(nr) @ x
        ctx.save_for_backward(q, w)
        ctx.inv_t = inv_t
        return out

    @staticmethod
    def backward(ctx, grad):
        q, w = ctx.saved_tensors
        return grad[:, None] * q * ctx.inv_t, -grad * w, None, None, None, None


def _bounds(counts: list[int]) -> list[tuple[int, int]]:
    ends = [sum(counts[: i + 1]) for i in range(len(counts))]
    return [(e - n, e) for e, n in zip(ends, counts, strict=True)]


def contrastive_loss(
    anchors: Tensor,
    anchor_labels: Tensor,
    *,
    temperature: float,
    base_temperature: float,
    memory: Tensor | None = None,
    memory_labels: Tensor | None = None,
) -> Tensor:
    """Pixel InfoNCE of ALGORITHM.md section 3 for `anchors [A, V, D]`, `anchor_labels [A]`.

    Rows F = anchors flattened view-major `[V*A, D]`; the contrast set of row r is every other row plus every
    memory row (`memory [M, D]`, `memory_labels [M]`, no gradient). With s = f_r . x / t:
        loss_r = -(t / bt) * mean_{p in P(r)} [ s_p - log(exp(s_p) + sum_{n in N(r)} exp(s_n)) ]
    averaged over the rows with at least one positive. Computed in float32 (float64 for float64 input) with
    autocast off; the memory part runs in column chunks with O(R * D) saved state. Returns a scalar, 0 (still
    attached to the graph) when no row has a positive.
    """
    if anchors.dim() != 3 or anchor_labels.shape != anchors.shape[:1]:
        raise ValueError(
            f"anchors must be [A, V, D] and anchor_labels [A], got {tuple(anchors.shape)}, {tuple(anchor_labels.shape)}"
        )
    if (memory is None) != (memory_labels is None):
        raise ValueError("memory and memory_labels must be given together")
    if anchors.shape[0] == 0 or anchors.shape[1] == 0:
        return anchors.sum().to(torch.float64 if anchors.dtype == torch.float64 else torch.float32) * 0.0
    with torch.autocast(device_type=anchors.device.type, enabled=False):
        return _contrastive_loss(anchors, anchor_labels, temperature, base_temperature, memory, memory_labels)


def _contrastive_loss(anchors, anchor_labels, temperature, base_temperature, memory, memory_labels):
    n_a, n_v, dim = anchors.shape
    dtype = torch.float64 if anchors.dtype == torch.float64 else torch.float32
    inv_t = 1.0 / temperature
    feats = anchors.to(dtype).transpose(0, 1).reshape(n_v * n_a, dim)  # row r = v * A + a
    labels = anchor_labels.long().repeat(n_v)
    # Sorting rows by class makes each class a contiguous block; the loss is a mean over rows, so order-free.
    order = torch.argsort(labels, stable=True)
    feats, labels = feats[order], labels[order]
    use_mem = memory is not None and memory.shape[0] > 0
    fnorm = feats.detach().norm(dim=1)
    if use_mem:
        if memory.dim() != 2 or memory.shape[1] != dim or memory_labels.shape != memory.shape[:1]:
            raise ValueError(
                f"memory must be [M, {dim}] with memory_labels [M], got {tuple(memory.shape)}, {tuple(memory_labels.shape)}"
            )
        mem = memory.detach().to(device=feats.device, dtype=dtype)
        mlab = memory_labels.to(feats.device).long()
        extra = [mlab.max(), mlab.min(), mem.norm(dim=1).max(), (mlab[1:] >= mlab[:-1]).all()]
    else:
        extra = [labels.max(), labels.min(), fnorm.max(), torch.ones((), device=labels.device)]
    probe = torch.stack([p.to(torch.float64) for p in [labels.max(), labels.min(), fnorm.max(), *extra]])
    lmax, lmin, fmax, mmax, mmin, xmax, is_sorted = probe.tolist()  # host sync
    if min(lmin, mmin) < 0:
        raise ValueError("anchor_labels and memory_labels must be >= 0")
    # No max-shift: |s| <= max|f| max|x| / t, and the check keeps exp(+-|s|) (times up to ~1e9 terms) well
    # inside the dtype's range, so every exp, sum and log below is finite and exact to rounding. For unit
    # vectors it holds for t >= 0.026 in float32. A per-row shift would cancel in the loss anyway.
    xmax = max(xmax, fmax)
    if fmax * xmax * inv_t > _MAX_EXP[dtype]:
        raise ValueError(
            f"temperature {temperature} is too small for features of norm {max(fmax, xmax):.3g} in {dtype}: "
            "use L2-normalised features, a larger temperature or float64"
        )
    n_cls = int(max(lmax, mmax)) + 1
    # In-batch block [R, R], dense with autograd (R <= max_samples); gradients reach both sides of f_r . f_j.
    sim = feats @ feats.t() * inv_t
    exp = sim.exp()
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    neg = exp.masked_fill(same, 0.0).sum(1)
    lp_mem, npos_mem = 0.0, 0
    if use_mem:
        if not is_sorted:
            morder = torch.argsort(mlab, stable=True)
            mem, mlab = mem[morder], mlab[morder]
        mcount = torch.bincount(mlab, minlength=n_cls)
        counts = torch.cat([torch.bincount(labels, minlength=n_cls), mcount]).tolist()  # host sync
        row_bounds, mem_bounds = _bounds(counts[:n_cls]), _bounds(counts[n_cls:])
        neg = neg + _MemoryNegatives.apply(feats, row_bounds, mem, mem_bounds, inv_t)
        lp_mem = _MemoryPositives.apply(feats, neg, row_bounds, mem, mem_bounds, inv_t)
        npos_mem = mcount[labels]
    log_den = (exp + neg[:, None]).log()
    lp = torch.where(pos, sim - log_den, 0.0).sum(1) + lp_mem
    npos = pos.sum(1) + npos_mem
    has_pos = npos > 0
    row_loss = torch.where(has_pos, lp / npos.clamp_min(1), 0.0) * (-temperature / base_temperature)
    return row_loss.sum() / has_pos.sum().clamp_min(1)


@torch.no_grad()
def _class_cosines(anchors: Tensor, anchor_labels: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cosine over same-class and over different-class pairs of sampled pixels (0 when undefined).

    anchors `[A, V, D]`: with per-anchor sums S_a, the sum over ordered same-class pairs is
    sum_{a, a' same class} S_a . S_a' - sum_r |f_r|^2; O(A^2 + R * D) and no host sync.
    """
    n_a, n_v, _ = anchors.shape
    f = F.normalize(anchors.double(), dim=-1)
    sums = f.sum(1)  # [A, D]
    self_sq = (f * f).sum()
    same_cls = (anchor_labels[:, None] == anchor_labels[None, :]).double()
    same = ((sums @ sums.t()) * same_cls).sum() - self_sq
    every = (sums.sum(0) ** 2).sum() - self_sq
    n_rows, n_same_anchor = n_a * n_v, same_cls.sum()
    n_same = n_same_anchor * n_v * n_v - n_rows
    n_diff = n_rows * n_rows - n_same_anchor * n_v * n_v
    intra = torch.where(n_same > 0, same / n_same.clamp_min(1), 0.0)
    inter = torch.where(n_diff > 0, (every - same) / n_diff.clamp_min(1), 0.0)
    return intra.float(), inter.float()


class PixelContrastLoss(nn.Module):
    """Hard-anchor sampling + pixel InfoNCE on an embedding map (optionally against a memory bank)."""

    def __init__(
        self,
        temperature: float = 0.1,
        base_temperature: float = 0.07,
        max_samples: int = 1024,
        max_views: int = 100,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        if temperature <= 0 or base_temperature <= 0:
            raise ValueError(
                f"temperature and base_temperature must be > 0, got {temperature}, {base_temperature}"
            )
        if max_samples < 1 or max_views < 1:
            raise ValueError(f"max_samples and max_views must be >= 1, got {max_samples}, {max_views}")
        self.temperature, self.base_temperature = temperature, base_temperature
        self.max_samples, self.max_views, self.ignore_index = max_samples, max_views, ignore_index

    def forward(
        self,
        embed: Tensor | PixelEmbedding,
        labels: Tensor,
        predict: Tensor,
        memory: tuple[Tensor, Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """embed `[B, D, h, w]` (L2-normalised; a tensor or a `PixelEmbedding`), labels `[B, H, W]`, predict `[B, h, w]`, memory `([M, D], [M])`.

        Returns `(loss, stats)`; stats are detached tensors: `anchors` (sampled pixels A*V), `hard_share`,
        `intra_cos` / `inter_cos` (mean cosine of sampled pixels within / across classes).
        """
        batch, dim, h, w = embed.shape
        if labels.dim() != 3 or predict.shape != (batch, h, w) or labels.shape[0] != batch:
            raise ValueError(
                f"need labels [B, H, W] and predict [{batch}, {h}, {w}], got {tuple(labels.shape)}, {tuple(predict.shape)}"
            )
        lab = labels_to_grid(labels, (h, w)).flatten(1)
        pred = predict.flatten(1).long()
        kw = {"max_samples": self.max_samples, "max_views": self.max_views, "ignore_index": self.ignore_index}
        index, anchor_labels = sample_anchors(lab, pred, **kw, generator=generator)
        n_pix = h * w
        if isinstance(embed, PixelEmbedding):
            anchors = embed.at(index)  # [A, V, D]: the projection head at these pixels only
        else:  # gather straight from [B, D, N]: no [B*N, D] copy, and one scatter in the backward
            anchors = embed.flatten(2)[index // n_pix, :, index % n_pix]  # [A, V, D]
        mem, mem_labels = memory if memory is not None else (None, None)
        t, bt = self.temperature, self.base_temperature
        loss = contrastive_loss(
            anchors, anchor_labels, temperature=t, base_temperature=bt, memory=mem, memory_labels=mem_labels
        )
        with torch.no_grad():
            hard = (lab.flatten()[index] != pred.flatten()[index]).float()
            intra, inter = _class_cosines(anchors.detach(), anchor_labels)
            stats = {
                "anchors": torch.tensor(float(index.numel()), device=embed.device),
                "hard_share": hard.mean() if index.numel() else hard.new_zeros(()),
                "intra_cos": intra,
                "inter_cos": inter,
            }
        return loss, stats


class ContrastCELoss(nn.Module):
    """loss = CE(bilinearly upsampled logits, labels) + weight * pixel contrast, contrast off during warm-up."""

    def __init__(
        self,
        num_classes: int,
        weight: float = 0.1,
        warmup_iters: int = 0,
        class_weights: Sequence[float] | Tensor | None = None,
        ignore_index: int = 255,
        temperature: float = 0.1,
        base_temperature: float = 0.07,
        max_samples: int = 1024,
        max_views: int = 100,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if weight < 0 or warmup_iters < 0:
            raise ValueError(f"weight and warmup_iters must be >= 0, got {weight}, {warmup_iters}")
        self.num_classes, self.weight, self.warmup_iters = num_classes, weight, warmup_iters
        self.ignore_index = ignore_index
        cw = None
        if class_weights is not None:
            cw = torch.as_tensor(class_weights, dtype=torch.float32).flatten()
            if cw.numel() != num_classes or not bool((cw >= 0).all()):
                raise ValueError(
                    f"class_weights must be {num_classes} non-negative numbers, got {cw.tolist()}"
                )
        self.register_buffer("class_weights", cw)
        self.contrast = PixelContrastLoss(temperature, base_temperature, max_samples, max_views, ignore_index)

    def forward(
        self,
        outputs: dict[str, Tensor],
        labels: Tensor,
        *,
        iteration: int,
        memory: tuple[Tensor, Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """outputs `{"seg": [B, K, h, w], "embed": [B, D, h, w]}`, labels `[B, H, W]` -> (total, detached parts)."""
        if "seg" not in outputs or "embed" not in outputs:
            raise KeyError(f"outputs must hold 'seg' and 'embed', got {sorted(outputs)}")
        seg, embed = outputs["seg"], outputs["embed"]
        if seg.shape[-2:] != embed.shape[-2:]:
            raise ValueError(
                f"seg {tuple(seg.shape)} and embed {tuple(embed.shape)} must share the spatial grid"
            )
        with torch.autocast(device_type=seg.device.type, enabled=False):
            logits = F.interpolate(seg.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
            weight = self.class_weights
            ce_sum = F.cross_entropy(logits, labels, weight, ignore_index=self.ignore_index, reduction="sum")
            # Same value as reduction="mean" (weighted mean), but 0 instead of NaN for an all-ignore batch.
            valid = labels != self.ignore_index
            safe = torch.where(valid, labels, 0)
            norm = (weight[safe] * valid).sum() if weight is not None else valid.sum().to(logits.dtype)
            ce = ce_sum / norm.clamp_min(torch.finfo(logits.dtype).tiny)
        if iteration < self.warmup_iters:
            # Keep the projection head in the graph so DDP sees a (zero) gradient for its parameters.
            contrast = embed.zero() if isinstance(embed, PixelEmbedding) else embed.sum().float() * 0.0
            zero = contrast.detach()
            stats = {"anchors": zero, "hard_share": zero, "intra_cos": zero, "inter_cos": zero}
        else:
            predict = seg.detach().argmax(1)
            contrast, stats = self.contrast(embed, labels, predict, memory=memory, generator=generator)
        total = ce + self.weight * contrast
        return total, {"ce": ce.detach(), "contrast": contrast.detach(), **stats}
