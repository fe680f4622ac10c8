"""HRNetV2 for semantic segmentation with a pixel-embedding projection head.

Backbone layout and state-dict key names follow the public HRNet ImageNet checkpoints (``conv1``, ``bn1``,
``conv2``, ``bn2``, ``layer1``, ``transition1``, ``stage2``, ... ``stage4``), so such a checkpoint loads into
``HRNetV2.backbone`` (``raycontrast.models.pretrained``).

Output grid: the stem has two 3x3 stride-2 convolutions with padding 1, each mapping a size ``n`` to
``(n + 1) // 2``, so an ``H x W`` input gives predictions on an ``h x w`` grid with ``h = ceil(H / 4)`` and
``w = ceil(W / 4)`` (e.g. 512x1024 -> 128x256, 250x500 -> 63x125, 97x131 -> 25x33). Lower branches are
``ceil`` of successive halvings of that grid; upsampling always targets the exact size of the receiving
branch, so any input size works.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raycontrast.models.projection import PixelEmbedding

Variant = Literal["w18_small", "w18_small_v2", "w18", "w48"]
VARIANTS: tuple[str, ...] = ("w18_small", "w18_small_v2", "w18", "w48")

# Per variant: stage1 (bottleneck blocks, bottleneck width) and, for stages 2-4,
# (num_modules, blocks per branch, channels per branch), as in the public HRNet configs.
_ARCH: dict[str, dict[str, tuple]] = {
    "w18_small": {
        "stage1": (1, 32),
        "stage2": (1, 2, (16, 32)),
        "stage3": (1, 2, (16, 32, 64)),
        "stage4": (1, 2, (16, 32, 64, 128)),
    },
    "w18_small_v2": {
        "stage1": (2, 64),
        "stage2": (1, 2, (18, 36)),
        "stage3": (3, 2, (18, 36, 72)),
        "stage4": (2, 2, (18, 36, 72, 144)),
    },
    "w18": {
        "stage1": (4, 64),
        "stage2": (1, 4, (18, 36)),
        "stage3": (4, 4, (18, 36, 72)),
        "stage4": (3, 4, (18, 36, 72, 144)),
    },
    "w48": {
        "stage1": (4, 64),
        "stage2": (1, 4, (48, 96)),
        "stage3": (4, 4, (48, 96, 192)),
        "stage4": (3, 4, (48, 96, 192, 384)),
    },
}


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, mom: float, relu: bool) -> nn.Sequential:
    """Conv (no bias; BN follows) + BN (+ ReLU); indices 0/1(/2) match the public key layout."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout, momentum=mom),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN with identity shortcut: [B, C, h, w] -> [B, C, h, w]."""

    expansion = 1

    def __init__(self, cin: int, planes: int, mom: float, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes, momentum=mom)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes, momentum=mom)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # In-place add on a fresh BN output is autograd-safe (BN does not save its output).
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4 channels) with shortcut: [B, Cin, h, w] -> [B, 4 * planes, h, w]."""

    expansion = 4

    def __init__(self, cin: int, planes: int, mom: float, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=mom)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes, momentum=mom)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4, momentum=mom)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


def _make_layer(block: type[nn.Module], cin: int, planes: int, blocks: int, mom: float) -> nn.Sequential:
    cout = planes * block.expansion
    downsample = None
    if cin != cout:
        downsample = _conv_bn(cin, cout, 1, 1, mom, relu=False)
    layers = [block(cin, planes, mom, downsample)]
    layers += [block(cout, planes, mom) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class HighResolutionModule(nn.Module):
    """Parallel branches of basic blocks followed by all-to-all fusion.

    Input and output: a list of ``n`` tensors ``[B, C_i, h_i, w_i]`` (``h_{i+1} = ceil(h_i / 2)``).
    Fusion output ``i`` = ReLU(sum_j f_ij(x_j)) with f_ii = identity, f_ij for j > i a 1x1 conv + BN then
    bilinear upsampling to exactly (h_i, w_i), and for j < i a chain of i - j stride-2 3x3 conv + BN
    (ReLU between, not after the last).
    """

    def __init__(self, channels: tuple[int, ...], num_blocks: int, mom: float) -> None:
        super().__init__()
        n = len(channels)
        self.branches = nn.ModuleList(
            nn.Sequential(*[BasicBlock(c, c, mom) for _ in range(num_blocks)]) for c in channels
        )
        fuse_layers = []
        for i in range(n):
            row: list[nn.Module | None] = []
            for j in range(n):
                if j > i:
                    row.append(_conv_bn(channels[j], channels[i], 1, 1, mom, relu=False))
                elif j == i:
                    row.append(None)
                else:
                    n_down = i - j
                    steps = []
                    for k in range(n_down):
                        last = k == n_down - 1
                        cout = channels[i] if last else channels[j]
                        steps.append(_conv_bn(channels[j], cout, 3, 2, mom, relu=not last))
                    row.append(nn.Sequential(*steps))
            fuse_layers.append(nn.ModuleList(row))
        self.fuse_layers = nn.ModuleList(fuse_layers)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs, strict=True)]
        if len(xs) == 1:
            return xs
        out = []
        for i, row in enumerate(self.fuse_layers):
            size = xs[i].shape[-2:]
            y: Tensor | None = None
            owned = False
            for j, f in enumerate(row):
                if j == i:
                    t = xs[j]
                elif j > i:
                    t = F.interpolate(f(xs[j]), size=size, mode="bilinear", align_corners=False)
                else:
                    t = f(xs[j])
                # Accumulate in place only into a tensor this row owns: xs[i] is still read by other rows.
                if y is None:
                    y, owned = t, j != i
                elif owned:
                    y += t
                else:
                    y, owned = y + t, True
            out.append(self.relu(y))
        return out


def _make_transition(pre: tuple[int, ...], cur: tuple[int, ...], mom: float) -> nn.ModuleList:
    """Branch adapters between stages; None for unchanged branches, a stride-2 chain for each new one."""
    layers: list[nn.Module | None] = []
    for i, c in enumerate(cur):
        if i < len(pre):
            layers.append(None if pre[i] == c else _conv_bn(pre[i], c, 3, 1, mom, relu=True))
        else:
            n_down = i + 1 - len(pre)
            steps = [
                _conv_bn(pre[-1], c if k == n_down - 1 else pre[-1], 3, 2, mom, relu=True)
                for k in range(n_down)
            ]
            layers.append(nn.Sequential(*steps))
    return nn.ModuleList(layers)


class HRNetBackbone(nn.Module):
    """HRNetV2 backbone: [B, 3, H, W] -> four maps [B, C_i, ceil(H / 2^(i+2)), ceil(W / 2^(i+2))]."""

    def __init__(self, variant: Variant, bn_momentum: float = 0.1) -> None:
        super().__init__()
        if variant not in _ARCH:
            raise ValueError(f"unknown HRNet variant {variant!r}; allowed: {sorted(_ARCH)}")
        arch = _ARCH[variant]
        mom = bn_momentum
        self.variant = variant
        self.conv1 = nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, momentum=mom)
        self.conv2 = nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64, momentum=mom)
        self.relu = nn.ReLU(inplace=True)

        n1, planes1 = arch["stage1"]
        self.layer1 = _make_layer(Bottleneck, 64, planes1, n1, mom)
        pre: tuple[int, ...] = (planes1 * Bottleneck.expansion,)
        for s in (2, 3, 4):
            num_modules, num_blocks, channels = arch[f"stage{s}"]
            setattr(self, f"transition{s - 1}", _make_transition(pre, channels, mom))
            stage = nn.Sequential(
                *[HighResolutionModule(channels, num_blocks, mom) for _ in range(num_modules)]
            )
            setattr(self, f"stage{s}", stage)
            pre = channels
        self.out_channels: tuple[int, ...] = pre

    @staticmethod
    def _transition(trans: nn.ModuleList, ys: list[Tensor]) -> list[Tensor]:
        # New branches are derived from the lowest-resolution output of the previous stage.
        return [
            ys[min(i, len(ys) - 1)] if t is None else t(ys[min(i, len(ys) - 1)]) for i, t in enumerate(trans)
        ]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        ys = [self.layer1(x)]
        ys = self.stage2(self._transition(self.transition1, ys))
        ys = self.stage3(self._transition(self.transition2, ys))
        return self.stage4(self._transition(self.transition3, ys))


class HRNetV2(nn.Module):
    """HRNetV2 + segmentation head + projection head.

    forward(x [B, 3, H, W]) -> {"seg": [B, K, h, w], "embed": [B, D, h, w]} with h = ceil(H / 4),
    w = ceil(W / 4) (the stem's stride-4 grid); ``embed`` is L2-normalised over channels. With
    ``sparse_proj`` (training mode only) ``embed`` is a ``PixelEmbedding`` instead: the same map, computed at
    the pixels the loss reads (``models.projection``).
    Both heads read the concatenation of the four branches upsampled (bilinear) to branch 1
    (C = 240 for w18_small, 270 for w18 / w18_small_v2, 720 for w48).
    """

    def __init__(
        self,
        variant: Variant,
        num_classes: int,
        proj_dim: int = 256,
        *,
        bn_momentum: float = 0.1,
        sparse_proj: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 1 or proj_dim < 1:
            raise ValueError(f"num_classes and proj_dim must be >= 1, got {num_classes} and {proj_dim}")
        self.variant, self.sparse_proj = variant, sparse_proj
        self.backbone = HRNetBackbone(variant, bn_momentum)
        c = sum(self.backbone.out_channels)
        self.feat_channels = c
        # As in HRNet-Semantic-Segmentation's last layer (biased 1x1 convs).
        self.seg_head = nn.Sequential(
            nn.Conv2d(c, c, 1),
            nn.BatchNorm2d(c, momentum=bn_momentum),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, num_classes, 1),
        )
        self.proj_head = nn.Sequential(
            nn.Conv2d(c, c, 1),
            nn.BatchNorm2d(c, momentum=bn_momentum),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, proj_dim, 1),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] -> concatenated multi-resolution features [B, C, ceil(H/4), ceil(W/4)]."""
        ys = self.backbone(x)
        size = ys[0].shape[-2:]
        ups = [ys[0]] + [F.interpolate(y, size=size, mode="bilinear", align_corners=False) for y in ys[1:]]
        return torch.cat(ups, dim=1)

    def forward_seg(self, x: Tensor) -> Tensor:
        """Segmentation logits only, ``[B, K, h, w]``: evaluation and prediction skip the projection head."""
        return self.seg_head(self.features(x))

    def forward(self, x: Tensor) -> dict[str, Tensor | PixelEmbedding]:
        feats = self.features(x)
        if self.sparse_proj and self.training:  # the head runs where the loss and the memory read it
            embed: Tensor | PixelEmbedding = PixelEmbedding(self.proj_head, feats)
        else:
            embed = F.normalize(self.proj_head(feats), p=2.0, dim=1)
        return {"seg": self.seg_head(feats), "embed": embed}


def convert_sync_bn(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm with SyncBatchNorm (for DDP on GPUs; a no-op numerically on one process)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
